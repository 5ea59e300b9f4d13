"""What one ``unrolled train`` invocation is given and what it returns: :class:`RunOptions`, :class:`RunSummary`.

Kept apart from the run itself because both ends use them: the command line
fills the options, ``tests/dist_worker.py`` and the benchmarks too, and all
of them read the summary. Neither is saved in a checkpoint: the run's own
settings are :class:`~unrolled.charlm.model.ModelConfig` and
:class:`~unrolled.charlm.model.TrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .text_files import MAX_TEXT_BYTES


@dataclass
class RunOptions:
    """Choices for one invocation that are not part of the run itself (not saved)."""

    files: list[str] = field(default_factory=list)  # text files, concatenated; none = corpus.builtin_corpus()
    encoding: str = "utf-8"  # encoding of the files
    out: str | None = None  # output folder; None = runs/<date-time>, or the folder being resumed
    resume: str | None = None  # a run folder or checkpoint file to continue
    engine: str | None = None  # engine name; None = the library's default
    stream: TextIO | None = None  # where messages and samples go (default: stdout)
    max_text_bytes: int = MAX_TEXT_BYTES  # the most bytes of text read (the text is held whole)
    skip_unknown: bool = False  # on resume, leave out characters outside the model's vocabulary (else refuse)
    comm: object | None = None  # a distributed.DataParallel under mpiexec -n N; None = one process


@dataclass
class RunSummary:
    """How a run ended."""

    out: Path  # the output folder
    step: int  # updates done in all
    stopped: str  # "done" (step or time limit reached) or "interrupted" (Ctrl-C or SIGTERM)
    train_bpc: float  # bits/char of the last updates (smoothed)
    val_bpc: float  # validation bits/char at the end (NaN if not measured)
    best_val_bpc: float  # lowest validation bits/char seen
    best_step: int  # the step it was seen at
    signum: int | None = None  # the signal that interrupted it
