"""A training run's machine-readable log: ``metrics.csv`` beside ``loss.png``, and TensorBoard events.

One row per update, in order::

    step,elapsed_s,train_bpc,val_bpc,lr,grad_norm,chars_per_s
    500,41.73,2.1034,2.0567,0.002,1.8832,30571

``elapsed_s`` is the seconds spent in updates since the run began, over all
its invocations (compiling, validation and saving left out, as in
``--minutes``); ``train_bpc`` is this update's training loss in bits per
character; ``val_bpc`` is filled on the updates after which validation ran;
``grad_norm`` is the global gradient norm before clipping; ``chars_per_s``
is the smoothed training speed (empty until measured).

The log always agrees with the checkpoints. It is flushed to disk before
each save, so ``latest.npz`` never holds a step the log lacks; a resumed run
first keeps only the rows up to the step it resumes from (dropping any
written after the last save, and a row cut short by a kill), rewriting the
file atomically, then appends. Resuming therefore continues one log.

When a TensorBoard writer is installed (``tensorboardX``, or PyTorch's
``torch.utils.tensorboard`` with ``tensorboard``), the same figures also go
to event files in ``tensorboard/``; it is imported only then, never
required. ``UNROLLED_TENSORBOARD=0`` turns it off.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
import warnings
from pathlib import Path

from unrolled.atomic import atomic_write_text

METRICS_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
COLUMNS = ("step", "elapsed_s", "train_bpc", "val_bpc", "lr", "grad_norm", "chars_per_s")
FLUSH_SECONDS = 5.0  # rows reach the disk at least this often, for `tail -f`


class MetricsLog:
    """Appends one row per update to ``out/metrics.csv`` (see the module docstring)."""

    def __init__(self, out: Path, resume_step: int = 0):
        self.path = Path(out) / METRICS_NAME
        header = ",".join(COLUMNS) + "\n"
        kept = _rows_up_to(self.path, resume_step) if resume_step else []
        atomic_write_text(self.path, header + "".join(kept))
        self._file = open(self.path, "a", encoding="utf-8")
        self._flushed = time.monotonic()
        self.tensorboard = tensorboard_writer(Path(out) / TENSORBOARD_DIR, resume_step)

    def add(self, step: int, elapsed_s: float, train_bpc: float, val_bpc: float, lr: float, grad_norm: float,
            chars_per_s: float) -> None:
        values = (step, elapsed_s, train_bpc, val_bpc, lr, grad_norm, chars_per_s)
        self._file.write(",".join(_cell(v) for v in values) + "\n")
        if self.tensorboard is not None:
            for name, v in zip(COLUMNS[2:], values[2:]):
                if math.isfinite(v):
                    self.tensorboard.add_scalar(name, v, step)
        if time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """To the disk now (called before every checkpoint is saved)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        if self.tensorboard is not None:
            self.tensorboard.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        if self._file.closed:
            return
        self.flush()
        self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _cell(v) -> str:
    if isinstance(v, int):
        return str(v)
    return "" if not math.isfinite(v) else f"{v:.6g}"


def _rows_up_to(path: Path, step: int) -> list[str]:
    """The complete rows of an existing log for steps 1..``step``, in order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError):
        return []
    kept = []
    for line in lines[1:]:
        fields = line.rstrip("\n").split(",")
        if not line.endswith("\n") or len(fields) != len(COLUMNS) or not fields[0].isdigit():
            continue  # a row cut short by a kill, or not ours
        if int(fields[0]) <= step:
            kept.append(line)
    return kept


def tensorboard_writer(folder: Path, purge_step: int = 0):
    """A TensorBoard ``SummaryWriter`` for ``folder`` if a writer package is installed, else None."""
    if os.environ.get("UNROLLED_TENSORBOARD", "1") == "0":
        return None
    kw = {"purge_step": purge_step} if purge_step else {}
    try:
        if importlib.util.find_spec("tensorboardX") is not None:
            from tensorboardX import SummaryWriter
        elif importlib.util.find_spec("tensorboard") is not None and importlib.util.find_spec("torch") is not None:
            from torch.utils.tensorboard import SummaryWriter
        else:
            return None
        return SummaryWriter(str(folder), **kw)
    except (ImportError, OSError) as e:  # a broken optional package must not stop a run
        warnings.warn(f"no TensorBoard events: the writer could not start ({e}); metrics.csv has the same figures")
        return None
