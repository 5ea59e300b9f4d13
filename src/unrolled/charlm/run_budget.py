"""The clock and the limits of a training run: when it stops, how far through it is, which rate it uses.

A run stops at ``--steps`` updates or after ``--minutes`` of updates,
whichever comes first. The minutes count seconds spent in updates only:
compiling (the first run on a machine), validation, sampling and saving are
left out. Those seconds and the budget are kept in the checkpoint, so a
resumed run trains for the rest of its budget, and a learning rate that
follows the budget's progress (:mod:`unrolled.charlm.recipe`) goes on from
where it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from unrolled.train.lr_schedules import Cosine
from unrolled.words import count

from . import recipe
from .model import TrainConfig

clock = time.perf_counter  # the clock of --minutes and speeds (a module attribute, so that tests can set it)


@dataclass
class Budget:
    """How long a run trains: ``steps`` updates, or ``budget_seconds`` of updates (0 = no such limit)."""

    steps: int  # the run stops at this step; 0 = no step limit
    budget_seconds: float  # the run stops when train_seconds reaches it; 0 = no time limit
    train_seconds: float = 0.0  # time spent in updates, over all invocations

    def spent(self, step: int) -> bool:
        """Whether the run has reached its step limit or spent its seconds."""
        return bool(self.steps and step >= self.steps) or bool(
            self.budget_seconds and self.train_seconds >= self.budget_seconds)

    def fraction(self, step: int) -> float:
        """How far through its budget the run is (:func:`recipe.progress`)."""
        return recipe.progress(step, self.steps, self.train_seconds, self.budget_seconds)

    def refuse_if_spent(self, step: int) -> None:
        """Refuse to start a run that has nothing left to do, saying how to give it more."""
        if self.steps and step >= self.steps:
            raise ValueError(f"the run has already done {count(step, 'step')} (--steps {self.steps}); "
                             f"pass a larger --steps to continue it")
        if self.budget_seconds and self.train_seconds >= self.budget_seconds:
            raise ValueError(f"the run has already spent its {self.budget_seconds / 60:g} minutes of training; "
                             f"pass --minutes M to train M minutes more")

    def resume(self, saved_budget: float | None, train_flags: dict, minutes: float) -> None:
        """A resumed run's time limit: the rest of its budget; with --minutes M, M more minutes; with a new
        --steps alone, none (the steps decide)."""
        more = self.train_seconds + minutes * 60.0 if minutes else 0.0
        if "minutes" in train_flags:
            self.budget_seconds = more
        elif "steps" in train_flags:
            self.budget_seconds = 0.0
        elif saved_budget is not None:
            self.budget_seconds = float(saved_budget)
        else:  # written before runs kept their budget: --minutes counted per invocation
            self.budget_seconds = more


def follows_progress(cfg: TrainConfig) -> bool:
    """Whether the learning rate follows the budget's progress rather than a schedule of steps.

    A cosine over a time budget, or over the budget's last part, follows the
    run's progress; a plain cosine over --steps is a schedule of steps."""
    return cfg.lr_schedule == "cosine" and (bool(cfg.minutes) or cfg.decay < 1.0)


def progress_lr(cfg: TrainConfig, step: int, fraction: float) -> float:
    """The rate of update ``step + 1`` under a cosine that follows the budget's progress (warm-up first)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup + 1)
    return Cosine(cfg.lr, 1).at_fraction(recipe.decayed(fraction, cfg.decay))

