"""What a training run tells its user and its log: messages, the progress bar, speeds, metrics rows.

Only rank 0 prints and writes (under ``mpiexec`` every other rank gets a
report that says nothing and a log that keeps nothing). With a terminal the
progress shows as a bar on standard error; without one (output piped to a
file) a plain progress line is printed every :data:`PROGRESS_SECONDS`
instead. A row of ``metrics.csv`` (:mod:`unrolled.train.runlog`) is written
one update late, once that update's validation (if any) is known.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from unrolled.train.runlog import METRICS_NAME, MetricsLog
from unrolled.words import count

from . import run_budget
from .loss_plot import PLOT_NAME
from .model import bits

PROGRESS_SECONDS = 5.0  # between plain progress lines when there is no terminal for the progress bar


class RunReport:
    """The run's messages, progress bar, smoothed loss and speed, and its metrics log."""

    def __init__(self, stream: TextIO, is_root: bool):
        self.stream, self.is_root = stream, is_root
        self.chars_per_update = 0  # k1 × batch: characters one update trains on
        self.ema_loss: float | None = None  # smoothed training loss of this invocation, nats/char
        self.ema_dt: float | None = None  # smoothed seconds per update
        self.first_step = 0  # the step this invocation started at
        self.bar: tqdm | None = None
        self.log: MetricsLog | _NoLog = _NoLog()
        self.row: list | None = None  # the last update's row of the log, written once its validation is known
        self._shown = 0.0  # when the last plain progress line was printed (no terminal)

    def say(self, text: str) -> None:
        if self.is_root:
            tqdm.write(text, file=self.stream)

    def open(self, out: Path, step: int, total_steps: int, chars_per_update: int) -> None:
        """Start the bar and the metrics log of an invocation that starts at ``step``."""
        self.first_step, self.chars_per_update = step, chars_per_update
        self.bar = tqdm(total=total_steps or None, initial=step, unit="step", dynamic_ncols=True,
                        disable=None if self.is_root else True, file=sys.stderr, leave=False)
        self.log = MetricsLog(out, step) if self.is_root else _NoLog()
        self.row = None

    def close(self) -> None:
        self.bar.close()
        self.write_row()
        self.log.close()

    def start_plain_lines(self) -> None:
        self._shown = run_budget.clock()

    def plain_line_due(self) -> bool:
        """Whether to print a plain progress line now (no terminal for the bar, and a while since the last)."""
        if self.bar.disable and self.is_root and run_budget.clock() - self._shown >= PROGRESS_SECONDS:
            self._shown = run_budget.clock()
            return True
        return False

    def timed(self, step: int, dt: float, compile_dt: float) -> None:
        """Fold one update's seconds into the speed; the first updates may still load code."""
        if compile_dt == 0.0 and step > self.first_step + 1:
            self.ema_dt = dt if self.ema_dt is None else 0.9 * self.ema_dt + 0.1 * dt

    def start_row(self, step: int, train_seconds: float, stats) -> None:
        """Write the previous update's row and hold this one's, its validation not yet known."""
        self.write_row()
        self.row = [step, train_seconds, bits(stats.loss), math.nan, stats.lr, stats.grad_norm, self.chars_per_s()]

    def add_validation(self, step: int, val_bpc: float) -> None:
        if self.row is not None and self.row[0] == step:
            self.row[3] = val_bpc

    def smooth_loss(self, loss: float) -> None:
        self.ema_loss = loss if self.ema_loss is None else 0.95 * self.ema_loss + 0.05 * loss

    def advance(self) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(self.progress(), refresh=False)

    def write_row(self) -> None:
        if self.row is not None:
            self.log.add(*self.row)
            self.row = None

    def flush(self) -> None:
        """Write the held row, so that the log on disk reaches the step a checkpoint holds."""
        self.write_row()
        self.log.flush()

    def chars_per_s(self) -> float:
        return self.chars_per_update / self.ema_dt if self.ema_dt else math.nan

    def speed(self) -> str:
        chars_per_s = self.chars_per_s()
        return f", {chars_per_s:,.0f} chars/s" if math.isfinite(chars_per_s) else ""

    def progress(self) -> str:
        """The one figure of the progress bar and the plain progress lines: smoothed training bits/char."""
        return f"train {bits(self.ema_loss):.3f} bits/char (smoothed)" + self.speed()

    def train_bpc(self) -> float:
        return bits(self.ema_loss) if self.ema_loss is not None else math.nan


class _NoLog:
    """The metrics log of a rank that does not write (every rank but 0)."""

    def add(self, *row) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def announcement(run) -> str:
    """What a :class:`~unrolled.charlm.training_run.TrainingRun` says as it starts: the model, the text,
    the settings, the limits, where it writes, and what the recipe chose."""
    cfg, m, budget = run.config, run.model, run.budget
    n_params = sum(p.size for p in run.params.values())
    verb = f"resuming at step {run.step}" if run.step else "training"
    limit = [f"until step {cfg.steps:,}"] if cfg.steps else []
    if budget.budget_seconds:
        minutes = round((budget.budget_seconds - budget.train_seconds) / 60, 4)
        limit.append(f"for {count(minutes, 'minute', spec='g')}" + (" more" if budget.train_seconds else ""))
    ranks = "" if run.dp is None else f", {run.dp.size} ranks × {count(cfg.batch // run.dp.size, 'stream')}"
    text = (
        f"{verb}: {m.cell} {m.layers}×{m.hidden} ({count(n_params, 'parameter', spec=',')}, "
        f"{count(len(run.vocabulary), 'character')}) on "
        f"{run.source}: {len(run.train_ids):,} training / {len(run.val_ids):,} validation characters\n"
        f"  seq {cfg.seq}, batch {cfg.batch}, k1 {cfg.bptt_k1}, k2 {cfg.bptt_k2}, {cfg.optimizer} lr {cfg.lr:g}"
        f"{'' if cfg.lr_schedule == 'constant' else ' ' + cfg.lr_schedule}, clip {cfg.clip:g}, "
        f"dropout {m.dropout:g}, engine {run.engine_name}{ranks}; {' or '.join(limit) or 'until Ctrl-C'}\n"
        f"  writing to {run.out}/ (latest.npz, best.npz, {PLOT_NAME}, {METRICS_NAME}); Ctrl-C stops and saves"
    )
    if run.recipe:
        text += "\n  chosen for this text and budget:\n" + "\n".join(f"    {c.line()}" for c in run.recipe)
    return text
