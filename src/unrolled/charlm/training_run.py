"""One training run of a character model, fresh or resumed: :class:`TrainingRun`.

Building one reads the text, settles the configs (:mod:`run_setup`), builds
the model, its engine and its :class:`~unrolled.train.trainer.Trainer`, and
makes the output folder; on resume it puts back everything the checkpoint
holds. :meth:`TrainingRun.run` then loops: the next ``[k1, B]`` chunk of the
streams -> one truncated-BPTT update, with validation, samples and
checkpoints on the way, until a limit (:mod:`run_budget`), Ctrl-C or a
failure. What it prints and logs goes through :mod:`run_report`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np

from unrolled.atomic import atomic_write_bytes
from unrolled.engines.compiled import background
from unrolled.engines.compiled.kernels import compiling
from unrolled.engines.registry import ENGINE_NAMES, make_engine
from unrolled.train.checkpoint import save_checkpoint
from unrolled.train.divergence import DivergenceWatch
from unrolled.train.interrupts import NAMES, StopRequest
from unrolled.train.lr_schedules import Schedule, make_schedule
from unrolled.train.optim import make_optimizer
from unrolled.train.runfolder import FolderLock, remove_stale_temporaries
from unrolled.train.trainer import Trainer
from unrolled.words import count

from . import recipe, run_budget
from .batching import StreamBatcher, split_train_val
from .corpus import read_corpus, read_recorded_corpus, text_record
from .loss_plot import PLOT_NAME, plot_losses
from .memory import check_fits, training_bytes
from .model import (
    INPUT_NAME,
    TARGET_NAME,
    LoadedModel,
    ModelConfig,
    bits,
    build_graph,
    checkpoint_contents,
    init_params,
    load_model,
)
from .run_budget import Budget, follows_progress, progress_lr
from .run_checkpoints import refuse_to_bury_newer, validation_bpc, where_to_go_back
from .run_options import RunOptions, RunSummary
from .run_report import RunReport, announcement
from .run_setup import (
    check_run_meta,
    check_text_length,
    default_out_dir,
    is_new_text,
    on_root,
    prepare_out_dir,
    resolve_configs,
)
from .sampling import Sampler
from .text_files import STDIN
from .vocabulary import Vocabulary, describe_at


class TrainingRun:
    """One training run, fresh or resumed; :meth:`run` trains until a limit, Ctrl-C or a failure."""

    def __init__(self, options: RunOptions, model_flags: dict | None = None, train_flags: dict | None = None):
        model_flags, train_flags = dict(model_flags or {}), dict(train_flags or {})
        self.options = options
        self.dp = options.comm
        self.is_root = self.dp is None or self.dp.is_root  # the one that prints and writes
        if self.dp is not None and STDIN in map(str, options.files):
            raise ValueError("under mpiexec only rank 0 gets standard input, and every rank reads the text: "
                             "save it to a file and name the file")
        loaded = load_model(options.resume) if options.resume else None
        if loaded:
            check_run_meta(loaded.meta, loaded.path)
        self.model, self.config = resolve_configs(model_flags, train_flags, loaded)
        self.report = RunReport(options.stream or sys.stdout, self.is_root)
        self._read_text(loaded)
        self.recipe: list[recipe.Choice] = []
        if not loaded:
            self._apply_recipe(set(model_flags) | set(train_flags))
        schedule = self._build_trainer(loaded)
        self._make_out_dir(loaded)
        self._start_history()
        if loaded:
            self._restore(loaded)
            self._resume_budget(loaded, train_flags)
            self._extend_schedule(schedule)
            if self.lr_follows_progress:  # the rate follows the budget's progress, not a saved schedule of steps
                self.trainer.schedule = None
        if self.dp is not None:
            self.dp.context = self.last_good  # what a rank that gives up waiting for the others names

    # ------------------------------------------------------------ setup

    def _read_text(self, loaded: LoadedModel | None) -> None:
        """The text (the files given, else the ones a checkpoint records, else the built-in corpus), as ids,
        split into training streams and a held-out part."""
        options = self.options
        if loaded and not options.files:
            corpus = read_recorded_corpus(loaded.meta.get("text", {}), loaded.path, options.max_text_bytes)
        else:
            corpus = read_corpus(options.files, options.encoding, options.max_text_bytes)
        self.corpus, self.text, self.source = corpus, corpus.text, corpus.name
        for note in corpus.notes:
            self._say(note)
        ids = self._encode(loaded)
        self.model.check()
        check_text_length(len(ids), self.config, self.source)
        cfg = self.config
        self.train_ids, self.val_ids = split_train_val(ids, cfg.val_fraction, min_train=cfg.bptt_k1 * cfg.batch + 1)
        self.batcher = StreamBatcher(self.train_ids, cfg.bptt_k1, cfg.batch)
        self.new_text = loaded is not None and bool(options.files) and is_new_text(loaded.meta, self.batcher)
        if self.dp is not None:
            self.dp.rows(cfg.batch)  # refuses a batch that does not split over the ranks

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

    def _build_trainer(self, loaded: LoadedModel | None) -> Schedule | None:
        """The training graph, its engine and its trainer; the schedule of steps (None when the rate follows
        the budget's progress, which :meth:`_set_lr` feeds the optimizer each update)."""
        cfg = self.config
        self.graph = build_graph(self.model, train=True)
        T = max(cfg.seq, cfg.bptt_k2)  # the longest chunk an update or a validation pass holds
        check_fits(training_bytes(self.graph, T, cfg.batch, self.model.dtype, cfg.optimizer),
                   f"training {self.model.cell} {self.model.layers}×{self.model.hidden} on chunks of "
                   f"--seq {T} × --batch {cfg.batch}", "lower --hidden, --layers, --seq or --batch")
        # A resumed run keeps its engine unless told otherwise: engines agree to rounding, not bit for bit.
        saved = loaded.meta.get("engine") if loaded else None
        engine = self.options.engine or (saved if saved in ENGINE_NAMES else None)
        if loaded:  # it continues as the saved run would have: no updates on NumPy while Numba compiles
            background.set_enabled(False)
        self.engine = make_engine(self.graph, engine)
        self.engine_name = getattr(self.engine, "name", engine or "default")
        if loaded:
            params = {k: np.array(v, copy=True) for k, v in loaded.params.items()}
        else:
            params = init_params(self.model, cfg.seed)
        self.lr_follows_progress = follows_progress(cfg)
        schedule = None if self.lr_follows_progress else make_schedule(
            cfg.lr_schedule, cfg.lr, total_steps=cfg.steps or None, warmup_steps=cfg.warmup)
        self.trainer = Trainer(self.engine, params, make_optimizer(cfg.optimizer, cfg.lr), schedule=schedule,
                               clip_norm=cfg.clip or None, k1=cfg.bptt_k1, k2=cfg.bptt_k2, seed=cfg.seed,
                               comm=self.dp)
        self.params = self.trainer.params
        return schedule

    def _make_out_dir(self, loaded: LoadedModel | None) -> None:
        """Where it writes: made only now that every setting is known to be good, so a refused run leaves
        no folder. Only the resumed run's own folder may already hold checkpoints: another run's are never
        overwritten."""
        if self.options.out is not None:
            out = Path(self.options.out)
        elif loaded:
            out = loaded.path.parent
        else:
            out = default_out_dir()
        own = loaded is not None and out.resolve() == loaded.path.parent.resolve()
        if own and self.new_text:
            raise ValueError(f"{self.source} is not the text the run in {out} was trained on; training on another text "
                             f"continues in a new folder, so that this run stays as it is: add --out NEWDIR")
        self.out = on_root(self.dp, lambda: prepare_out_dir(out, fresh=not own))
        self.text_meta = text_record(self.corpus, self.out)
        self._lock = FolderLock(self.out)  # taken by run(): one run at a time writes here
        self._resumed_from = loaded.path if own else None

    def _start_history(self) -> None:
        """A fresh run's record of itself; :meth:`_restore` puts back a resumed one's."""
        self.train_losses: list[float] = []  # nats/char of every update, in order
        self.val_points: list[tuple[int, float]] = []  # (step, validation bits/char)
        self.best = {"val_bpc": math.inf, "step": 0}
        self.budget = Budget(self.config.steps, self.config.minutes * 60.0)
        self.saved_step: int | None = None  # the step of the last checkpoint written (the last good one)
        self._sampler: Sampler | None = None
        self.watch = DivergenceWatch(len(self.vocabulary))

    @property
    def step(self) -> int:
        return self.trainer.step_count

    def _resume_budget(self, loaded: LoadedModel, train_flags: dict) -> None:
        """A resumed run's time limit (:meth:`Budget.resume`); a cosine over the budget stretches to the new end."""
        self.budget.resume(loaded.meta.get("budget_seconds"), train_flags, self.config.minutes)
        if self.lr_follows_progress and not (self.budget.budget_seconds or self.config.steps):
            raise ValueError(f"{loaded.path} decays its learning rate over its budget; give --minutes (or "
                             f"--steps) to say how long the resumed run goes on")

    def _set_lr(self) -> None:
        """Under a cosine that follows the budget's progress, the next update's rate (warm-up first)."""
        if self.lr_follows_progress:
            self.trainer.optimizer.lr = progress_lr(self.config, self.step, self.budget.fraction(self.step))

    def _restore(self, loaded: LoadedModel) -> None:
        """Put back what the checkpoint holds: the trainer's state, the streams' position, the history."""
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
            self.budget.train_seconds = float(meta.get("train_seconds", 0.0))
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
        self.budget.refuse_if_spent(self.step)
        try:
            on_root(self.dp, self._claim_folder)  # rank 0 alone writes, so it alone holds the lock
            return self._train()
        finally:
            self._lock.release()

    def _claim_folder(self) -> None:
        """Take the folder's lock; refuse to bury a newer latest.npz; remove what an interrupted save left."""
        self._lock.acquire()
        refuse_to_bury_newer(self.out, self._resumed_from, self.step)
        removed, size = remove_stale_temporaries(self.out)
        if removed:
            self._say(f"removed {count(removed, 'unfinished temporary file')} ({size / 1e6:.1f} MB) "
                      f"that an interrupted save left in {self.out}")

    def _train(self) -> RunSummary:
        stop = StopRequest("quitting at once, without saving (the last checkpoint saved stays whole)")
        self.report.open(self.out, self.step, self.config.steps, self.config.bptt_k1 * self.config.batch)
        try:
            with stop:
                self._say(announcement(self))
                stopped = self._loop(stop)
                if stopped == "done" and not (self.val_points and self.val_points[-1][0] == self.step):
                    self._evaluate_and_save(stop)
                if self.saved_step != self.step:  # interrupted, or the last validation was cut short
                    self._save(("latest",))
        finally:
            self.report.close()
        self._plot()
        return self._finish(stopped, stop.signum)

    def _loop(self, stop: StopRequest) -> str:
        """Updates until a limit ("done") or Ctrl-C ("interrupted"); validation, samples and saves on the way."""
        cfg, budget = self.config, self.budget
        self.report.start_plain_lines()
        while True:
            if self.dp is not None and budget.budget_seconds:  # every rank: rank 0's seconds, one stop, one rate
                budget.train_seconds = float(self.dp.bcast(budget.train_seconds))
            if budget.spent(self.step):  # train_seconds: updates only, compiling and validation left out
                break
            self._set_lr()
            self._update()
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self._evaluate_and_save(stop)
            elif cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not self.watch.over:
                self._save(("latest",))  # not while the loss is far above its best: that may be divergence
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self._print_sample()
            if self.report.plain_line_due():  # piped: a plain line
                total = f"/{cfg.steps:,}" if cfg.steps else ""
                self._say(f"step {self.step:,}{total}: {self.report.progress()}")
            if self._stopping(stop):
                return "interrupted"
        return "done"

    def _stopping(self, stop: StopRequest) -> bool:
        """Whether to stop now; every rank gives the same answer, so that all stop at the same update."""
        return stop.requested if self.dp is None else self.dp.any(stop.requested)

    def _update(self) -> float:
        """One update, logged and watched; its seconds, compiling left out."""
        if self.batcher.at_epoch_start:  # the streams jump back to their starts
            self.trainer.tbptt.reset()
        x, y = self.batcher.next_batch()
        if self.dp is not None:  # this rank's streams
            x, y = self.dp.shard(x), self.dp.shard(y)
        compiled, t0 = compiling.seconds(), run_budget.clock()
        with np.errstate(all="ignore"):  # a NaN is caught below, by name and step
            stats = self.trainer.train_step({INPUT_NAME: x, TARGET_NAME: y})
        compile_dt = compiling.seconds() - compiled
        dt = max(run_budget.clock() - t0 - compile_dt, 0.0)
        self.budget.train_seconds += dt
        self.report.timed(self.step, dt, compile_dt)
        self.report.start_row(self.step, self.budget.train_seconds, stats)
        if stats.skipped or not math.isfinite(stats.loss):
            what = "loss" if not math.isfinite(stats.loss) else "gradient"
            value = stats.loss if what == "loss" else stats.grad_norm
            self._diverged(f"the training {what} became {value} at step {stats.step}")
        self.train_losses.append(stats.loss)
        self.report.smooth_loss(stats.loss)
        reason = self.watch.update(stats.loss)
        if reason:
            self._diverged(f"training diverged by step {stats.step}: {reason}", self.step - self.watch.over + 1)
        self.report.advance()
        return dt

    def _diverged(self, what: str, bad_from: int | None = None) -> None:
        """Stop the run without saving (a NaN, or a loss far above its best), naming the checkpoint to go back
        to: the last one saved before step ``bad_from``, where the loss began to climb (default: this step)."""
        self.report.bar.close()
        self._plot()
        where = where_to_go_back(self.out, self.saved_step, self.best, self.step if bad_from is None else bad_from)
        raise RuntimeError(f"{what}; stopped without saving it: {where}; try a lower --lr or --clip")

    # ------------------------------------------------- validation, saving

    def validate(self, stop: StopRequest | None = None) -> float:
        """Validation bits/char of the held-out text (:func:`run_checkpoints.validation_bpc`)."""
        return validation_bpc(self.trainer, self.val_ids, self.config.seq, self.config.batch, self.dp, stop)

    def _evaluate_and_save(self, stop) -> None:
        val = self.validate(stop)
        if self.dp is None and stop.requested:  # interrupted mid-way: keep the checkpoints as they are
            return
        reason = self.watch.validation(val, self.best["val_bpc"])
        if reason:
            self._diverged(f"training diverged by step {self.step}: {reason}")
        self.report.add_validation(self.step, val)
        self.val_points.append((self.step, val))
        improved = val < self.best["val_bpc"]
        if improved:
            self.best = {"val_bpc": val, "step": self.step}
        self._save(("latest", "best") if improved else ("latest",))
        self._plot()
        ema_loss = self.report.ema_loss
        train = f"train {bits(ema_loss):.3f}, " if ema_loss is not None else ""
        best = " (best)" if improved else f" (best {self.best['val_bpc']:.3f} at step {self.best['step']})"
        self._say(f"step {self.step}: {train}validation {val:.3f} bits/char{best}{self.report.speed()}")

    def checkpoint(self) -> tuple[dict, dict]:
        """The ``(arrays, meta)`` of a checkpoint of the run as it stands."""
        arrays, meta = checkpoint_contents(
            self.model, self.config, self.vocabulary.to_list(), self.params,
            trainer=self.trainer.state_meta(), data=self.batcher.state(), text=self.text_meta,
            best=self.best, step=self.step, train_seconds=self.budget.train_seconds, engine=self.engine_name,
            budget_seconds=self.budget.budget_seconds,
        )
        arrays.update(self.trainer.state_arrays())
        arrays["history/train_loss"] = np.array(self.train_losses, dtype=np.float64)
        arrays["history/val"] = np.array(self.val_points, dtype=np.float64).reshape(-1, 2)
        return arrays, meta

    def _save(self, names) -> None:
        self.report.flush()  # the log on disk reaches at least the step the checkpoint holds
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
        summary = RunSummary(self.out, self.step, stopped, self.report.train_bpc(), val, self.best["val_bpc"],
                             self.best["step"], signum if stopped == "interrupted" else None)
        if stopped == "interrupted":
            self._say(f"stopped by {NAMES.get(signum, 'a signal')} at step {self.step}; saved "
                      f"{self.out / 'latest.npz'}; continue with: unrolled train --resume {self.out}")
        else:
            self._say(f"done: step {self.step}, validation {val:.3f} bits/char "
                      f"(best {self.best['val_bpc']:.3f} at step {self.best['step']}), "
                      f"{self.budget.train_seconds / 60:.1f} minutes of training; "
                      f"sample with: unrolled sample {self.out}")
        return summary

    def _say(self, text: str) -> None:
        self.report.say(text)

    def last_good(self) -> str:
        """Where to go back to after a failure: the last checkpoint this run saved, or its resumed one."""
        if self.saved_step is None:
            return "no checkpoint had been saved yet"
        return f"the last good checkpoint is {self.out / 'latest.npz'} (step {self.saved_step})"
