"""Training a character-level language model from text: the run behind ``unrolled train``.

This module is the entry point, :func:`train`; the run itself is
:class:`~unrolled.charlm.training_run.TrainingRun`, built from modules with
one job each: ``run_options`` (what an invocation is given and returns),
``run_setup`` (configs, checks, output folder), ``corpus`` (the text),
``run_budget`` (the clock and the limits), ``run_report`` (messages, progress,
metrics log) and ``loss_plot`` (``loss.png``).

One run reads the text, builds the vocabulary and the model
(:mod:`unrolled.charlm.model`), holds out the last part for validation, and
loops: the next ``[k1, B]`` chunk of the streams (:class:`~unrolled.charlm.batching.StreamBatcher`)
-> one truncated-BPTT update (:class:`train.Trainer`: engine, global-norm
clipping, schedule, optimizer). Along the way it shows a progress bar, prints
a short sample now and then, measures validation bits per character, keeps
``latest.npz`` and ``best.npz`` (lowest validation loss) in the output
folder, draws ``loss.png``, and logs every update to ``metrics.csv``
(:mod:`unrolled.train.runlog`). Without a terminal for the progress bar (output
piped to a file) it prints a plain progress line every few seconds instead.

Everything a run needs to continue is in its checkpoints: the parameters,
the optimizer's moments, the schedule, the batcher's position, the state
carried between chunks (and, for ``k1 < k2``, the replay buffer), the
dropout generator, and the loss history. ``--resume DIR`` puts all of it
back, so an interrupted-and-resumed run computes bit for bit the losses of an
uninterrupted one (``tests/test_resume.py``).

Ctrl-C or SIGTERM asks the loop to stop after the update under way; the run
then saves ``latest.npz`` and returns. A second one quits at once, without
saving (:mod:`unrolled.train.interrupts`; the last saved checkpoint stays intact:
writes are atomic). One run at a time writes in a folder: it holds the
folder's lock while it lives, and removes what a save cut short left there
(:mod:`unrolled.train.runfolder`). A loss or gradient that is NaN
or infinite, or a loss that stays far above its best (:mod:`unrolled.train.divergence`),
stops the run with an error naming the step and the last good checkpoint;
nothing is saved after it. Time spent compiling (the first run on a machine)
is not counted in ``--minutes`` or in the speeds (:mod:`unrolled.engines.compiled.kernels.compiling`),
nor is validation, sampling or saving: the budget is seconds of updates,
kept in the checkpoint with the seconds spent, so a resumed run trains for
the rest of it and a rate that follows the budget (:mod:`unrolled.charlm.recipe`)
goes on from where it was.

Under ``mpiexec -n N`` (``RunOptions.comm``, :mod:`unrolled.train.distributed`)
each rank trains its ``B/N`` of the streams and validates its share of the
held-out text; rank 0 alone prints and writes. A checkpoint holds the whole
batch's carried state, so it resumes under any ``N`` that divides the batch.
Every rank stops at the same update after Ctrl-C; an error on any rank stops
them all (``MPI.Abort``), naming the last good checkpoint.
"""

from __future__ import annotations

import time

from .run_options import RunOptions, RunSummary
from .training_run import TrainingRun

__all__ = ["RunOptions", "RunSummary", "TrainingRun", "train"]

ABORT_GRACE_SECONDS = 2.0  # how long a failing rank but 0 waits for rank 0's own abort before it aborts


def train(options: RunOptions, model_flags: dict | None = None, train_flags: dict | None = None) -> RunSummary:
    """Train (or resume) a language model; ``*_flags`` name the config fields the user set.

    Under ``mpiexec`` an error on one rank must not leave the others waiting
    in a collective: it is printed, naming the last good checkpoint, and
    every rank is stopped.
    """
    if options.comm is None:
        return TrainingRun(options, model_flags, train_flags).run()
    run = None
    try:
        run = TrainingRun(options, model_flags, train_flags)
        return run.run()
    except BaseException as e:  # noqa: BLE001 (KeyboardInterrupt too: the second Ctrl-C)
        last = run.last_good() if run is not None and "checkpoint" not in str(e) else ""
        if not options.comm.is_root:  # most errors strike every rank alike: let rank 0 alone say it, if it can
            time.sleep(ABORT_GRACE_SECONDS)
        options.comm.abort(e, last, prog="unrolled train")
        raise
