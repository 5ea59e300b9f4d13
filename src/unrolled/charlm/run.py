"""Training a character-level language model from text: the run behind ``unrolled train``.

One run reads the text, builds the vocabulary and the model
(:mod:`unrolled.charlm.model`), holds out the last part for validation, and
loops: the next ``[k1, B]`` chunk of the streams (:class:`batching.StreamBatcher`)
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
is not counted in ``--minutes`` or in the speeds (:mod:`unrolled.engines.compiled.compiling`),
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

import dataclasses
import io
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from unrolled.engines.compiled import compiling
from unrolled.engines.registry import ENGINE_NAMES, make_engine
from unrolled.train.atomic import atomic_write_bytes
from unrolled.train.checkpoint import load_checkpoint, save_checkpoint
from unrolled.train.divergence import DivergenceWatch
from unrolled.train.interrupts import NAMES, StopRequest
from unrolled.train.lr_schedules import Cosine, make_schedule
from unrolled.train.optim import make_optimizer
from unrolled.train.runfolder import FolderLock, remove_stale_temporaries
from unrolled.train.runlog import METRICS_NAME, MetricsLog
from unrolled.train.trainer import Trainer
from unrolled.words import count

from . import recipe
from .batching import StreamBatcher, iter_eval_chunks, split_train_val
from .corpus import read_corpus, read_recorded_corpus, text_record
from .memory import check_fits, training_bytes
from .model import (
    INPUT_NAME,
    LOSS_NAME,
    TARGET_NAME,
    LoadedModel,
    ModelConfig,
    TrainConfig,
    bits,
    build_graph,
    checkpoint_contents,
    init_params,
    load_model,
)
from .sampling import Sampler
from .text_files import MAX_TEXT_BYTES, STDIN
from .vocabulary import Vocabulary, describe_at

# Settings a resumed run may change: they decide how long it goes on and what
# it reports, never which numbers it computes.
RESUMABLE = frozenset({"steps", "minutes", "sample_every", "sample_length", "eval_every", "checkpoint_every"})
DEFAULT_RUNS = Path("runs")
PLOT_NAME = "loss.png"
PROGRESS_SECONDS = 5.0  # between plain progress lines when there is no terminal for the progress bar
ABORT_GRACE_SECONDS = 2.0  # how long a failing rank but 0 waits for rank 0's own abort before it aborts
_clock = time.perf_counter  # the clock of --minutes and speeds (a module attribute, so that tests can set it)


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


# ------------------------------------------------------------------ setup


def default_out_dir() -> Path:
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


def _check_length(n: int, cfg: TrainConfig, source: str) -> None:
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


def _resolve_configs(model_flags: dict, train_flags: dict, loaded: LoadedModel | None) -> tuple[ModelConfig, TrainConfig]:
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


RUN_STATE = ("trainer", "data", "best")  # what a resume needs beyond the model


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


def _is_new_text(meta: dict, batcher: StreamBatcher) -> bool:
    """Whether the resumed run was trained on another text than this batcher's (by length and CRC)."""
    saved, mine = meta.get("data"), batcher.state()
    if not isinstance(saved, dict):
        return False  # no position to restore: _restore says so
    return (saved.get("text_length"), saved.get("text_crc32")) != (mine["text_length"], mine["text_crc32"])


# --------------------------------------------------------------- the run


class TrainingRun:
    """One training run, fresh or resumed; :meth:`run` trains until a limit, Ctrl-C or a failure."""

    def __init__(self, options: RunOptions, model_flags: dict | None = None, train_flags: dict | None = None):
        self.options = options
        self.stream = options.stream or sys.stdout
        self.dp = options.comm
        self.is_root = self.dp is None or self.dp.is_root  # the one that prints and writes
        if self.dp is not None and STDIN in map(str, options.files):
            raise ValueError("under mpiexec only rank 0 gets standard input, and every rank reads the text: "
                             "save it to a file and name the file")
        loaded = load_model(options.resume) if options.resume else None
        if loaded:
            check_run_meta(loaded.meta, loaded.path)
        self.model, self.config = _resolve_configs(dict(model_flags or {}), dict(train_flags or {}), loaded)

        # The text: the files given, else (on resume) the ones the checkpoint records, else the built-in corpus.
        if loaded and not options.files:
            corpus = read_recorded_corpus(loaded.meta.get("text", {}), loaded.path, options.max_text_bytes)
        else:
            corpus = read_corpus(options.files, options.encoding, options.max_text_bytes)
        self.corpus, self.text, self.source = corpus, corpus.text, corpus.name
        for note in corpus.notes:
            self._say(note)
        ids = self._encode(loaded)
        self.model.check()
        _check_length(len(ids), self.config, self.source)
        cfg = self.config
        self.train_ids, self.val_ids = split_train_val(ids, cfg.val_fraction, min_train=cfg.bptt_k1 * cfg.batch + 1)
        self.batcher = StreamBatcher(self.train_ids, cfg.bptt_k1, cfg.batch)
        self.new_text = loaded is not None and bool(options.files) and _is_new_text(loaded.meta, self.batcher)
        if self.dp is not None:
            self.dp.rows(cfg.batch)  # refuses a batch that does not split over the ranks
        self.recipe: list[recipe.Choice] = []
        if not loaded:
            self._apply_recipe(set(model_flags or {}) | set(train_flags or {}))
            cfg = self.config

        # The model and its trainer.
        self.graph = build_graph(self.model, train=True)
        T = max(cfg.seq, cfg.bptt_k2)  # the longest chunk an update or a validation pass holds
        check_fits(training_bytes(self.graph, T, cfg.batch, self.model.dtype, cfg.optimizer),
                   f"training {self.model.cell} {self.model.layers}×{self.model.hidden} on chunks of "
                   f"--seq {T} × --batch {cfg.batch}", "lower --hidden, --layers, --seq or --batch")
        # A resumed run keeps its engine unless told otherwise: engines agree to rounding, not bit for bit.
        saved = loaded.meta.get("engine") if loaded else None
        engine = options.engine or (saved if saved in ENGINE_NAMES else None)
        self.engine = make_engine(self.graph, engine)
        self.engine_name = getattr(self.engine, "name", engine or "default")
        if loaded:
            params = {k: np.array(v, copy=True) for k, v in loaded.params.items()}
        else:
            params = init_params(self.model, cfg.seed)
        # A cosine over a time budget, or over the budget's last part, follows the run's progress, which
        # _set_lr feeds the optimizer each update; a plain cosine over --steps is a schedule of steps.
        self.lr_follows_progress = cfg.lr_schedule == "cosine" and (bool(cfg.minutes) or cfg.decay < 1.0)
        schedule = None if self.lr_follows_progress else make_schedule(
            cfg.lr_schedule, cfg.lr, total_steps=cfg.steps or None, warmup_steps=cfg.warmup)
        self.trainer = Trainer(self.engine, params, make_optimizer(cfg.optimizer, cfg.lr), schedule=schedule,
                               clip_norm=cfg.clip or None, k1=cfg.bptt_k1, k2=cfg.bptt_k2, seed=cfg.seed,
                               comm=self.dp)
        self.params = self.trainer.params

        # Where it writes: made only now that every setting is known to be good, so a refused run leaves no folder.
        if options.out is not None:
            out = Path(options.out)
        elif loaded:
            out = loaded.path.parent
        else:
            out = default_out_dir()
        # Only the resumed run's own folder may already hold checkpoints: another run's are never overwritten.
        own = loaded is not None and out.resolve() == loaded.path.parent.resolve()
        if own and self.new_text:
            raise ValueError(f"{self.source} is not the text the run in {out} was trained on; training on another text "
                             f"continues in a new folder, so that this run stays as it is: add --out NEWDIR")
        self.out = _on_root(self.dp, lambda: prepare_out_dir(out, fresh=not own))
        self.text_meta = text_record(corpus, self.out)
        self._lock = FolderLock(self.out)  # taken by run(): one run at a time writes here
        self._resumed_from = loaded.path if own else None
        self.train_losses: list[float] = []  # nats/char of every update, in order
        self.val_points: list[tuple[int, float]] = []  # (step, validation bits/char)
        self.best = {"val_bpc": math.inf, "step": 0}
        self.train_seconds = 0.0  # time spent in updates, over all invocations
        self.budget_seconds = cfg.minutes * 60.0  # the run stops when train_seconds reaches it; 0 = no time limit
        self.saved_step: int | None = None  # the step of the last checkpoint written (the last good one)
        if loaded:
            self._restore(loaded)
            self._resume_budget(loaded, train_flags or {})
            self._extend_schedule(schedule)
            if self.lr_follows_progress:  # the rate follows the budget's progress, not a saved schedule of steps
                self.trainer.schedule = None
        if self.dp is not None:
            self.dp.context = self.last_good  # what a rank that gives up waiting for the others names
        self._sampler: Sampler | None = None
        self.watch = DivergenceWatch(len(self.vocabulary))
        self._ema_loss: float | None = None  # smoothed training loss of this invocation, nats/char
        self._ema_dt: float | None = None  # smoothed seconds per update
        self._first_step = self.step

    def _encode(self, loaded: LoadedModel | None) -> np.ndarray:
        """The text as ids: a fresh run's vocabulary is the text's; a resumed run keeps its own."""
        if not loaded:
            self.vocabulary = Vocabulary.from_text(self.text)
            self.model = dataclasses.replace(self.model, vocab_size=len(self.vocabulary))
            return self.vocabulary.encode(self.text)
        self.vocabulary = Vocabulary.from_list(loaded.vocabulary)
        ids, unknown = self.vocabulary.encode(self.text, unknown="skip")
        if unknown and not self.options.skip_unknown:
            first = next(i for i, ch in enumerate(self.text) if ch not in self.vocabulary)
            raise ValueError(f"{self.source}: {describe_at(self.text, first)} is not in the resumed model's "
                             f"vocabulary of {len(self.vocabulary)} characters ({unknown:,} such in all); "
                             f"pass --skip-unknown to leave them out")
        if unknown:
            self._say(f"leaving out {unknown:,} characters of {self.source} that are not in the model's vocabulary")
        return ids

    @property
    def step(self) -> int:
        return self.trainer.step_count

    def _apply_recipe(self, given: set) -> None:
        """A fresh run takes the recipe's choice (:mod:`unrolled.charlm.recipe`) for every setting not given."""
        cfg = self.config
        self.recipe = recipe.choose(len(self.train_ids), steps=cfg.steps, minutes=cfg.minutes, k1=cfg.bptt_k1,
                                    batch=cfg.batch, lr=cfg.lr, warmup=cfg.warmup, given=frozenset(given),
                                    lr_schedule=cfg.lr_schedule)
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        chosen = {c.field: c.value for c in self.recipe}
        self.model = dataclasses.replace(self.model, **{k: v for k, v in chosen.items() if k in model_fields}).check()
        self.config = dataclasses.replace(self.config, **{k: v for k, v in chosen.items()
                                                          if k not in model_fields}).check()

    def _resume_budget(self, loaded: LoadedModel, train_flags: dict) -> None:
        """A resumed run's time limit: the rest of its budget; with --minutes M, M more minutes; with a new
        --steps alone, none (the steps decide). A cosine over the budget stretches to the new end."""
        saved = loaded.meta.get("budget_seconds")
        if "minutes" in train_flags:
            self.budget_seconds = self.train_seconds + self.config.minutes * 60.0 if self.config.minutes else 0.0
        elif "steps" in train_flags:
            self.budget_seconds = 0.0
        elif saved is not None:
            self.budget_seconds = float(saved)
        else:  # written before runs kept their budget: --minutes counted per invocation
            self.budget_seconds = self.train_seconds + self.config.minutes * 60.0 if self.config.minutes else 0.0
        if self.lr_follows_progress and not (self.budget_seconds or self.config.steps):
            raise ValueError(f"{loaded.path} decays its learning rate over its budget; give --minutes (or "
                             f"--steps) to say how long the resumed run goes on")

    def _progress_fraction(self) -> float:
        """How far through its budget the run is (:func:`recipe.progress`)."""
        return recipe.progress(self.step, self.config.steps, self.train_seconds, self.budget_seconds)

    def _budget_spent(self) -> bool:
        cfg = self.config
        return bool(cfg.steps and self.step >= cfg.steps) or bool(
            self.budget_seconds and self.train_seconds >= self.budget_seconds)

    def _set_lr(self) -> None:
        """Under a cosine that follows the budget's progress, the next update's rate (warm-up first)."""
        cfg = self.config
        if not self.lr_follows_progress:
            return
        if self.step < cfg.warmup:
            lr = cfg.lr * (self.step + 1) / (cfg.warmup + 1)
        else:
            lr = Cosine(cfg.lr, 1).at_fraction(recipe.decayed(self._progress_fraction(), cfg.decay))
        self.trainer.optimizer.lr = lr

    def _restore(self, loaded: LoadedModel) -> None:
        meta, arrays = loaded.meta, loaded.arrays
        try:
            state = {k: v for k, v in arrays.items() if k.startswith(("optimizer/", "tbptt/"))}
            self.trainer.load_state(state, meta["trainer"])
            if self.new_text:  # the weights and optimizer go on; the new text is read from its start
                if self.trainer.tbptt is not None:
                    self.trainer.tbptt.reset()
            else:
                self.batcher.load_state(meta["data"])
            self.train_losses = [float(v) for v in arrays["history/train_loss"]]
            self.val_points = [(int(s), float(v)) for s, v in arrays["history/val"].reshape(-1, 2)]
            self.best = {"val_bpc": float(meta["best"]["val_bpc"]), "step": int(meta["best"]["step"])}
            self.train_seconds = float(meta.get("train_seconds", 0.0))
        except ValueError as e:
            raise ValueError(f"cannot resume from {loaded.path}: {e}") from None
        except (KeyError, TypeError, AttributeError, IndexError, OverflowError) as e:  # inside 'trainer'
            raise ValueError(f"cannot resume from {loaded.path}: its training state is damaged or foreign "
                             f"({type(e).__name__}: {str(e):.80})") from None
        if len(self.train_losses) != self.step:
            raise ValueError(f"{loaded.path} is inconsistent: {count(len(self.train_losses), 'loss', 'losses')} for "
                             f"{count(self.step, 'step')}")
        self.saved_step = self.step
        if self.new_text:  # figures on the old text do not compare with the new one's
            self.best = {"val_bpc": math.inf, "step": 0}
            self._say(f"resuming on a new text, {self.source}: its streams start at its beginning, and "
                      f"{self.out / 'best.npz'} keeps the best on this text")

    def _extend_schedule(self, schedule) -> None:
        """A resumed run with another ``--steps`` follows the schedule that many steps give.

        The checkpoint's schedule ends where the first run did: a cosine decay would hold the rate at
        its floor for every step beyond it, and the run would go on without learning."""
        saved = self.trainer.schedule
        if saved is None or schedule is None or saved.to_dict() == schedule.to_dict():
            return
        self.trainer.schedule = schedule
        self._say(f"the {self.config.lr_schedule} schedule now ends at step {self.config.steps:,}: the learning "
                  f"rate goes on at {schedule.lr_at(self.step):.3g} (it was {saved.lr_at(self.step):.3g} at step "
                  f"{self.step:,})")

    # ------------------------------------------------------------- loop

    def run(self) -> RunSummary:
        """Train until a limit, Ctrl-C, SIGTERM or a failure, holding the output folder's lock throughout."""
        cfg = self.config
        if cfg.steps and self.step >= cfg.steps:
            raise ValueError(f"the run has already done {count(self.step, 'step')} (--steps {cfg.steps}); "
                             f"pass a larger --steps to continue it")
        if self.budget_seconds and self.train_seconds >= self.budget_seconds:
            raise ValueError(f"the run has already spent its {self.budget_seconds / 60:g} minutes of training; "
                             f"pass --minutes M to train M minutes more")
        try:
            _on_root(self.dp, self._claim_folder)  # rank 0 alone writes, so it alone holds the lock
            return self._train()
        finally:
            self._lock.release()

    def _claim_folder(self) -> None:
        """Take the folder's lock; refuse to bury a newer latest.npz; remove what an interrupted save left."""
        self._lock.acquire()
        latest = self.out / "latest.npz"
        source = self._resumed_from
        if source is not None and latest.exists() and latest.resolve() != source.resolve():
            newer = _saved_step(latest)
            if newer is None or newer > self.step:
                at = f"step {newer}" if newer is not None else "a step it cannot tell (the file is unreadable)"
                raise ValueError(
                    f"{latest} ({at}) is newer than {source} (step {self.step}), and this run would overwrite it; "
                    f"continue the newer one with --resume {self.out}, or go on from {source.name} into "
                    f"another folder with --out NEW_FOLDER")
        removed, size = remove_stale_temporaries(self.out)
        if removed:
            self._say(f"removed {count(removed, 'unfinished temporary file')} ({size / 1e6:.1f} MB) "
                      f"that an interrupted save left in {self.out}")

    def _train(self) -> RunSummary:
        cfg = self.config
        stop = StopRequest("quitting at once, without saving (the last checkpoint saved stays whole)")
        self._bar = tqdm(total=cfg.steps or None, initial=self.step, unit="step", dynamic_ncols=True,
                         disable=None if self.is_root else True, file=sys.stderr, leave=False)
        self.log = MetricsLog(self.out, self.step) if self.is_root else _NoLog()
        self._row = None  # the last update's row of the log, written once its validation (if any) is known
        try:
            with stop:
                self._announce()
                stopped = self._loop(stop)
                if stopped == "done" and not (self.val_points and self.val_points[-1][0] == self.step):
                    self._evaluate_and_save(stop)
                if self.saved_step != self.step:  # interrupted, or the last validation was cut short
                    self._save(("latest",))
        finally:
            self._bar.close()
            self._write_row()
            self.log.close()
        self._plot()
        return self._finish(stopped, stop.signum)

    def _loop(self, stop: StopRequest) -> str:
        """Updates until a limit ("done") or Ctrl-C ("interrupted"); validation, samples and saves on the way."""
        cfg = self.config
        shown = _clock()  # when the last plain progress line was printed (no terminal)
        while True:
            if self.dp is not None and self.budget_seconds:  # every rank: rank 0's seconds, one stop, one rate
                self.train_seconds = float(self.dp.bcast(self.train_seconds))
            if self._budget_spent():  # train_seconds: updates only, compiling and validation left out
                break
            self._set_lr()
            self._update()
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self._evaluate_and_save(stop)
            elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not self.watch.over:
                self._save(("latest",))  # not while the loss is far above its best: that may be divergence
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self._print_sample()
            if self._bar.disable and self.is_root and _clock() - shown >= PROGRESS_SECONDS:  # piped: a plain line
                shown = _clock()
                total = f"/{cfg.steps:,}" if cfg.steps else ""
                self._say(f"step {self.step:,}{total}: {self._progress()}")
            if self._stopping(stop):
                return "interrupted"
        return "done"

    def _stopping(self, stop: "_StopRequest") -> bool:
        """Whether to stop now; every rank gives the same answer, so that all stop at the same update."""
        return stop.requested if self.dp is None else self.dp.any(stop.requested)

    def _update(self) -> float:
        """One update, logged and watched; its seconds, compiling left out."""
        if self.batcher.at_epoch_start:  # the streams jump back to their starts
            self.trainer.tbptt.reset()
        x, y = self.batcher.next_batch()
        if self.dp is not None:  # this rank's streams
            x, y = self.dp.shard(x), self.dp.shard(y)
        compiled, t0 = compiling.seconds(), _clock()
        with np.errstate(all="ignore"):  # a NaN is caught below, by name and step
            stats = self.trainer.train_step({INPUT_NAME: x, TARGET_NAME: y})
        compile_dt = compiling.seconds() - compiled
        dt = max(_clock() - t0 - compile_dt, 0.0)
        self.train_seconds += dt
        if compile_dt == 0.0 and self.step > self._first_step + 1:  # the first update may still load code
            self._ema_dt = dt if self._ema_dt is None else 0.9 * self._ema_dt + 0.1 * dt
        self._write_row()
        self._row = [self.step, self.train_seconds, bits(stats.loss), math.nan, stats.lr, stats.grad_norm,
                     self._chars_per_s()]
        if stats.skipped or not math.isfinite(stats.loss):
            what = "loss" if not math.isfinite(stats.loss) else "gradient"
            value = stats.loss if what == "loss" else stats.grad_norm
            self._diverged(f"the training {what} became {value} at step {stats.step}")
        self.train_losses.append(stats.loss)
        self._ema_loss = stats.loss if self._ema_loss is None else 0.95 * self._ema_loss + 0.05 * stats.loss
        reason = self.watch.update(stats.loss)
        if reason:
            self._diverged(f"training diverged by step {stats.step}: {reason}", self.step - self.watch.over + 1)
        self._bar.update(1)
        self._bar.set_postfix_str(self._progress(), refresh=False)
        return dt

    def _chars_per_s(self) -> float:
        return self.config.bptt_k1 * self.config.batch / self._ema_dt if self._ema_dt else math.nan

    def _progress(self) -> str:
        """The one figure of the progress bar and the plain progress lines: smoothed training bits/char."""
        speed = self._chars_per_s()
        return (f"train {bits(self._ema_loss):.3f} bits/char (smoothed)"
                + (f", {speed:,.0f} chars/s" if math.isfinite(speed) else ""))

    def _write_row(self) -> None:
        if self._row is not None:
            self.log.add(*self._row)
            self._row = None

    def _announce(self) -> None:
        cfg, m = self.config, self.model
        n_params = sum(p.size for p in self.params.values())
        verb = f"resuming at step {self.step}" if self.step else "training"
        limit = [f"until step {cfg.steps:,}"] if cfg.steps else []
        if self.budget_seconds:
            minutes = round((self.budget_seconds - self.train_seconds) / 60, 4)
            limit.append(f"for {count(minutes, 'minute', spec='g')}" + (" more" if self.train_seconds else ""))
        self._say(
            f"{verb}: {m.cell} {m.layers}×{m.hidden} ({count(n_params, 'parameter', spec=',')}, "
            f"{count(len(self.vocabulary), 'character')}) on "
            f"{self.source}: {len(self.train_ids):,} training / {len(self.val_ids):,} validation characters\n"
            f"  seq {cfg.seq}, batch {cfg.batch}, k1 {cfg.bptt_k1}, k2 {cfg.bptt_k2}, {cfg.optimizer} lr {cfg.lr:g}"
            f"{'' if cfg.lr_schedule == 'constant' else ' ' + cfg.lr_schedule}, clip {cfg.clip:g}, "
            f"dropout {m.dropout:g}, engine {self.engine_name}{self._ranks()}; {' or '.join(limit) or 'until Ctrl-C'}\n"
            f"  writing to {self.out}/ (latest.npz, best.npz, {PLOT_NAME}, {METRICS_NAME}); Ctrl-C stops and saves"
        )
        if self.recipe:
            self._say("  chosen for this text and budget:\n" + "\n".join(f"    {c.line()}" for c in self.recipe))

    def _ranks(self) -> str:
        if self.dp is None:
            return ""
        return f", {self.dp.size} ranks × {count(self.config.batch // self.dp.size, 'stream')}"

    def _diverged(self, what: str, bad_from: int | None = None) -> None:
        """Stop the run without saving (a NaN, or a loss far above its best), naming the checkpoint to go back
        to: the last one saved before step ``bad_from``, where the loss began to climb (default: this step)."""
        self._bar.close()
        self._plot()
        bad_from = self.step if bad_from is None else bad_from
        if self.saved_step is not None and self.saved_step < bad_from:
            where = f"the last good checkpoint is {self.out / 'latest.npz'} (step {self.saved_step})"
        elif self.best["step"] and self.best["step"] < bad_from:
            where = (f"the last good checkpoint is {self.out / 'best.npz'} (step {self.best['step']}, "
                     f"{self.best['val_bpc']:.3f} bits/char); latest.npz was saved after the loss began to climb")
        elif self.saved_step is None:
            where = "no checkpoint had been saved yet"
        else:
            where = f"every checkpoint was saved after the loss began to climb at step {bad_from}"
        raise RuntimeError(f"{what}; stopped without saving it: {where}; try a lower --lr or --clip")

    # ------------------------------------------------- validation, saving

    def validate(self, stop: StopRequest | None = None) -> float:
        """Validation bits/char: every held-out character but the first, scored once, state carried."""
        cfg, dp = self.config, self.dp
        total, count, state = 0.0, 0.0, None
        for x, y, mask in iter_eval_chunks(self.val_ids, cfg.seq, cfg.batch):
            if stop is not None and stop.requested and dp is None:  # ranks finish together: no stop mid-way
                return math.nan
            if dp is not None:  # this rank's streams of the held-out text
                x, y, mask = dp.shard(x), dp.shard(y), dp.shard(mask)
            with np.errstate(all="ignore"):
                r = self.trainer.evaluate({INPUT_NAME: x, TARGET_NAME: y}, {LOSS_NAME: mask}, init_states=state,
                                          check_finite=False)  # the state is the engine's own; NaN: see below
            total += float(r.step_losses[LOSS_NAME].sum(dtype=np.float64))
            count += float(mask.sum())
            state = {k: np.array(v, copy=True) for k, v in r.final_states.items()}
        if dp is not None:
            total, count = dp.total([total, count])
        return bits(total / count)

    def _evaluate_and_save(self, stop) -> None:
        val = self.validate(stop)
        if self.dp is None and stop.requested:  # interrupted mid-way: keep the checkpoints as they are
            return
        reason = self.watch.validation(val, self.best["val_bpc"])
        if reason:
            self._diverged(f"training diverged by step {self.step}: {reason}")
        if self._row is not None and self._row[0] == self.step:
            self._row[3] = val
        self.val_points.append((self.step, val))
        improved = val < self.best["val_bpc"]
        if improved:
            self.best = {"val_bpc": val, "step": self.step}
        self._save(("latest", "best") if improved else ("latest",))
        self._plot()
        train = f"train {bits(self._ema_loss):.3f}, " if self._ema_loss is not None else ""
        best = " (best)" if improved else f" (best {self.best['val_bpc']:.3f} at step {self.best['step']})"
        chars_per_s = self._chars_per_s()
        speed = f", {chars_per_s:,.0f} chars/s" if math.isfinite(chars_per_s) else ""
        self._say(f"step {self.step}: {train}validation {val:.3f} bits/char{best}{speed}")

    def checkpoint(self) -> tuple[dict, dict]:
        """The ``(arrays, meta)`` of a checkpoint of the run as it stands."""
        arrays, meta = checkpoint_contents(
            self.model, self.config, self.vocabulary.to_list(), self.params,
            trainer=self.trainer.state_meta(), data=self.batcher.state(), text=self.text_meta,
            best=self.best, step=self.step, train_seconds=self.train_seconds, engine=self.engine_name,
            budget_seconds=self.budget_seconds,
        )
        arrays.update(self.trainer.state_arrays())
        arrays["history/train_loss"] = np.array(self.train_losses, dtype=np.float64)
        arrays["history/val"] = np.array(self.val_points, dtype=np.float64).reshape(-1, 2)
        return arrays, meta

    def _save(self, names) -> None:
        self._write_row()
        self.log.flush()  # the log on disk reaches at least the step the checkpoint holds
        arrays, meta = self.checkpoint()  # on every rank: it gathers their carried state
        if self.is_root:  # no two ranks ever write the same file
            for name in names:
                save_checkpoint(self.out / f"{name}.npz", arrays, meta)
        self.saved_step = self.step

    def _plot(self) -> None:
        if not self.is_root:
            return
        try:
            png = plot_losses(self.train_losses, self.val_points, f"{self.model.cell} {self.model.layers}×"
                              f"{self.model.hidden} on {Path(self.source).name}")
            atomic_write_bytes(self.out / PLOT_NAME, png)
        except (OSError, ValueError) as e:  # a picture is not worth stopping a run for
            self._say(f"could not draw {self.out / PLOT_NAME}: {e}")

    def _print_sample(self) -> None:
        if not self.is_root:
            return
        if self._sampler is None:
            self._sampler = Sampler(build_graph(self.model, train=False), self.params, self.vocabulary.chars,
                                    engine=self.options.engine)
        # Its own generator: sampling must not move the training run's random numbers.
        text = self._sampler.sample(self.config.sample_length, seed=[self.config.seed, self.step])
        self._say(f"--- sample at step {self.step} ---\n{text}\n---")

    def _finish(self, stopped: str, signum: int | None) -> RunSummary:
        val = self.val_points[-1][1] if self.val_points and self.val_points[-1][0] == self.step else math.nan
        ema_loss = self._ema_loss
        summary = RunSummary(self.out, self.step, stopped, bits(ema_loss) if ema_loss is not None else math.nan,
                             val, self.best["val_bpc"], self.best["step"], signum if stopped == "interrupted" else None)
        if stopped == "interrupted":
            self._say(f"stopped by {NAMES.get(signum, 'a signal')} at step {self.step}; saved "
                      f"{self.out / 'latest.npz'}; continue with: unrolled train --resume {self.out}")
        else:
            self._say(f"done: step {self.step}, validation {val:.3f} bits/char "
                      f"(best {self.best['val_bpc']:.3f} at step {self.best['step']}), "
                      f"{self.train_seconds / 60:.1f} minutes of training; "
                      f"sample with: unrolled sample {self.out}")
        return summary

    def _say(self, text: str) -> None:
        if self.is_root:
            tqdm.write(text, file=self.stream)

    def last_good(self) -> str:
        """Where to go back to after a failure: the last checkpoint this run saved, or its resumed one."""
        if self.saved_step is None:
            return "no checkpoint had been saved yet"
        return f"the last good checkpoint is {self.out / 'latest.npz'} (step {self.saved_step})"


def _saved_step(path: Path) -> int | None:
    """The step a checkpoint was saved at, or None when it cannot be read."""
    try:
        return int(load_checkpoint(path)[1]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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


def _on_root(dp, make):
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


class _NoLog:
    """The metrics log of a rank that does not write (every rank but 0)."""

    def add(self, *row) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------- picture


def plot_losses(train_losses: list[float], val_points: list[tuple[int, float]], title: str) -> bytes:
    """A PNG of training bits/char per update (raw and smoothed) and validation bits/char."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train_losses:
        y = np.array(train_losses) / math.log(2)
        x = np.arange(1, len(y) + 1)
        ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8)
        w = max(1, len(y) // 50)
        if w > 1:
            smooth = np.convolve(y, np.ones(w) / w, mode="valid")
            ax.plot(x[w - 1:], smooth, color="tab:blue", linewidth=1.5, label="training")
        else:
            ax.lines[-1].set_label("training")
            ax.lines[-1].set_alpha(1.0)
    if val_points:
        s, v = zip(*val_points)
        ax.plot(s, v, "o-", color="tab:orange", markersize=4, label="validation")
    ax.set_xlabel("update")
    ax.set_ylabel("bits per character")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if train_losses or val_points:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
