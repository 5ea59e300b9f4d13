"""Validation and checkpoints of a training run: the score that picks ``best.npz``, and which file to trust.

Validation bits per character decide ``best.npz``; ``latest.npz`` is the
run as it stands. After a failure (a NaN, a loss far above its best) the run
names the last checkpoint saved before the loss began to climb, and a resumed
run refuses to overwrite a ``latest.npz`` newer than the one it started from.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from unrolled.train.checkpoint import load_checkpoint
from unrolled.train.interrupts import StopRequest

from .batching import iter_eval_chunks
from .model import INPUT_NAME, LOSS_NAME, TARGET_NAME, bits


def validation_bpc(trainer, val_ids: np.ndarray, seq: int, batch: int, dp=None,
                   stop: StopRequest | None = None) -> float:
    """Validation bits/char: every held-out character but the first, scored once, state carried.

    NaN when ``stop`` is requested part-way (one process only: under ``mpiexec``
    the ranks finish together). Under ``dp`` each rank scores its streams."""
    total, count, state = 0.0, 0.0, None
    for x, y, mask in iter_eval_chunks(val_ids, seq, batch):
        if stop is not None and stop.requested and dp is None:  # ranks finish together: no stop mid-way
            return math.nan
        if dp is not None:  # this rank's streams of the held-out text
            x, y, mask = dp.shard(x), dp.shard(y), dp.shard(mask)
        with np.errstate(all="ignore"):
            r = trainer.evaluate({INPUT_NAME: x, TARGET_NAME: y}, {LOSS_NAME: mask}, init_states=state,
                                 check_finite=False)  # the state is the engine's own; NaN: see below
        total += float(r.step_losses[LOSS_NAME].sum(dtype=np.float64))
        count += float(mask.sum())
        state = {k: np.array(v, copy=True) for k, v in r.final_states.items()}
    if dp is not None:
        total, count = dp.total([total, count])
    return bits(total / count)


def saved_step(path: Path) -> int | None:
    """The step a checkpoint was saved at, or None when it cannot be read."""
    try:
        return int(load_checkpoint(path)[1]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def refuse_to_bury_newer(out: Path, source: Path | None, step: int) -> None:
    """Refuse to overwrite a ``latest.npz`` newer than the checkpoint ``source`` a run resumed from at ``step``."""
    latest = out / "latest.npz"
    if source is None or not latest.exists() or latest.resolve() == source.resolve():
        return
    newer = saved_step(latest)
    if newer is None or newer > step:
        at = f"step {newer}" if newer is not None else "a step it cannot tell (the file is unreadable)"
        raise ValueError(
            f"{latest} ({at}) is newer than {source} (step {step}), and this run would overwrite it; "
            f"continue the newer one with --resume {out}, or go on from {source.name} into "
            f"another folder with --out NEW_FOLDER")


def where_to_go_back(out: Path, saved: int | None, best: dict, bad_from: int) -> str:
    """The checkpoint to go back to after a failure: the last one saved before step ``bad_from``."""
    if saved is not None and saved < bad_from:
        return f"the last good checkpoint is {out / 'latest.npz'} (step {saved})"
    if best["step"] and best["step"] < bad_from:
        return (f"the last good checkpoint is {out / 'best.npz'} (step {best['step']}, "
                f"{best['val_bpc']:.3f} bits/char); latest.npz was saved after the loss began to climb")
    if saved is None:
        return "no checkpoint had been saved yet"
    return f"every checkpoint was saved after the loss began to climb at step {bad_from}"
