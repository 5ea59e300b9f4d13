"""What a training run settles before it trains: its configs, its checks, its output folder.

A fresh run's configs come from the flags; a resumed run's from its
checkpoint, with only the settings in :data:`RESUMABLE` allowed to change.
A checkpoint may come from anyone, so its run fields are checked by type and
range here, one sentence naming the field, before any of them is used. The
output folder is made only once every setting is known to be good, so a
refused run leaves no folder behind; under ``mpiexec`` rank 0 alone makes it
(:func:`on_root`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from unrolled.words import count

from .batching import StreamBatcher
from .model import LoadedModel, ModelConfig, TrainConfig

# Settings a resumed run may change: they decide how long it goes on and what
# it reports, never which numbers it computes.
RESUMABLE = frozenset({"steps", "minutes", "sample_every", "sample_length", "eval_every", "checkpoint_every"})
RUN_STATE = ("trainer", "data", "best")  # what a resume needs beyond the model
DEFAULT_RUNS = Path("runs")


def default_out_dir() -> Path:
    """``runs/<date-time>``, with ``-2``, ``-3``, … added when that folder exists already."""
    base = DEFAULT_RUNS / time.strftime("%Y%m%d-%H%M%S")
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def prepare_out_dir(out: Path, *, fresh: bool) -> Path:
    """Create the output folder and make sure files can be written in it, or say why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".unrolled-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to the output folder {out}: {e.strerror or e}; choose another with --out") from None
    if fresh and any((out / n).exists() for n in ("latest.npz", "best.npz")):
        raise ValueError(f"{out} already holds a run; continue it with --resume {out}, or choose another --out")
    return out


def check_text_length(n: int, cfg: TrainConfig, source: str) -> None:
    """Refuse a text of ``n`` characters too short for one training chunk and a validation part."""
    T, B = cfg.bptt_k1, cfg.batch
    n_val = int(round(n * cfg.val_fraction))
    need_train = T * B + 1
    if n_val < 2 and n - n_val >= need_train:
        raise ValueError(f"holding out {cfg.val_fraction:g} of the {count(n, 'character', spec=',')} of {source} "
                         f"leaves {n_val} for "
                         f"validation, fewer than the 2 it needs; raise --val-fraction or use a longer text")
    if n - n_val < need_train or n_val < 2:
        need = max(math.ceil(need_train / (1 - cfg.val_fraction)), math.ceil(2 / cfg.val_fraction)) + 1
        raise ValueError(
            f"{source} has {count(n, 'character', spec=',')}, too short: one training chunk of --seq {T} × "
            f"--batch {B} needs "
            f"{need_train:,} after holding out {cfg.val_fraction:g} for validation, so at least {need:,} in all; "
            f"use a longer text, or lower --seq or --batch"
        )


def resolve_configs(model_flags: dict, train_flags: dict, loaded: LoadedModel | None) -> tuple[ModelConfig, TrainConfig]:
    """The run's configs: from the flags for a fresh run; from the checkpoint (plus allowed changes) on resume."""
    if loaded is None:
        model = ModelConfig(**model_flags)
        dataclasses.replace(model, vocab_size=1).check()  # all but the vocabulary, before reading any text
        return model, TrainConfig(**train_flags).check()
    for name, value in model_flags.items():
        saved = getattr(loaded.model, name)
        if value != saved:
            raise ValueError(f"--{name.replace('_', '-')} {value} differs from the resumed run's {saved}; "
                             f"a resumed run keeps its model (leave the flag out)")
    changes = {}
    for name, value in train_flags.items():
        saved = getattr(loaded.train, name)
        if name in RESUMABLE:
            changes[name] = value
        elif value != saved:
            raise ValueError(f"--{name.replace('_', '-')} {value} differs from the resumed run's {saved}; "
                             f"a resumed run keeps its training settings, except "
                             f"{', '.join('--' + r.replace('_', '-') for r in sorted(RESUMABLE))}")
    return loaded.model, dataclasses.replace(loaded.train, **changes).check()


def check_run_meta(meta: dict, path: Path) -> None:
    """The run fields of a checkpoint's meta, by type and range: one sentence naming the field, never a
    TypeError from deep inside (the trainer's own state is checked as it is put back)."""
    missing = [name for name in RUN_STATE if name not in meta]
    if missing:
        raise ValueError(f"{path} holds a model but not the training state to resume it (no '{missing[0]}'); "
                         f"start a new run, or sample from it")

    def need(ok: bool, name: str, value, want: str) -> None:
        if not ok:
            raise ValueError(f"{path}: field '{name}' is {value!r:.60}, not {want}; the file is damaged or foreign")

    for name in RUN_STATE + ("text",):
        need(isinstance(meta.get(name, {}), dict), name, meta.get(name), "a JSON object")
    for key in ("position", "epoch", "seq_len", "batch_size", "text_length", "text_crc32"):
        v = meta["data"].get(key)
        need(type(v) is int and v >= 0, f"data.{key}", v, "a whole number of at least 0")
    for name, v in (("best.step", meta["best"].get("step")), ("step", meta.get("step", 0)),
                    ("trainer.step", meta["trainer"].get("step")), ("trainer.seed", meta["trainer"].get("seed", 0))):
        need(type(v) is int and v >= 0, name, v, "a whole number of at least 0")
    for name, v in (("best.val_bpc", meta["best"].get("val_bpc")), ("train_seconds", meta.get("train_seconds", 0.0))):
        need(type(v) in (int, float) and v >= 0, name, v, "a number of at least 0")  # NaN fails v >= 0
    need(isinstance(meta.get("engine", ""), str), "engine", meta.get("engine"), "an engine's name")


def is_new_text(meta: dict, batcher: StreamBatcher) -> bool:
    """Whether the resumed run was trained on another text than this batcher's (by length and CRC)."""
    saved, mine = meta.get("data"), batcher.state()
    if not isinstance(saved, dict):
        return False  # no position to restore: restoring it says so
    return (saved.get("text_length"), saved.get("text_crc32")) != (mine["text_length"], mine["text_crc32"])


def on_root(dp, make):
    """``make()`` on rank 0 only, its result (or its error) on every rank: for what one rank alone must do."""
    if dp is None:
        return make()
    result, error = None, None
    if dp.is_root:
        try:
            result = make()
        except ValueError as e:
            error = str(e)
    result, error = dp.bcast((result, error))
    if error is not None:
        raise ValueError(error)
    return result
