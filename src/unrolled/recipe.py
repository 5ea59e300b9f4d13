"""The recipe `unrolled train` picks from the text and the budget, for the settings the user left out.

A fixed recipe (char-rnn's: a constant rate, no dropout) wastes a fast
engine: the more updates a budget allows, the sooner it overfits, and the
held-out score it ends with is worse than the best it passed through. So a
fresh run chooses, from numbers it knows before the first update:

- **Schedule.** With a budget (``--steps``, ``--minutes`` or both) the
  learning rate holds at ``--lr``, then decays along half a cosine to 0 over
  the budget's last :data:`DECAY` (:func:`decayed`), so the last updates
  refine instead of wander. A decay over the whole budget starves a short
  run, which is still far from fitting its text, of the rate it learns with;
  the held rate keeps that, and the decay still ends the run on its best.
  The run's *progress* is the larger of ``step / steps`` and ``seconds /
  budget`` (:func:`progress`). With no budget (Ctrl-C ends the run) the rate
  stays constant.
- **Dropout**, from the passes the budget makes over the training text,
  ``passes = steps · k1 · B / training characters``: a run that reads its
  text fewer than :data:`FEW_PASSES` times has nothing to overfit and gets
  none; a longer one gets :data:`DROPOUT`, and a text shorter than
  :data:`SMALL_TEXT` (where even a few passes overfit) :data:`SMALL_DROPOUT`.
  A ``--minutes`` budget counts as a long one: how many passes it makes is
  not known before it starts.
- **Size**: 2 layers of :data:`HIDDEN`, or of :data:`SMALL_HIDDEN` for a text
  shorter than :data:`SMALL_TEXT`, whose parameters would otherwise
  outnumber its characters many times over.

The thresholds come from the runs in ``benchmarks/QUALITY.md``
(``benchmarks/quality_recipes.py``), on more than one text. Every choice is
printed at the start of the run, each with the flag that overrides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .words import count

FEW_PASSES = 2.0  # below this many passes over the training text a run gets no dropout
SMALL_TEXT = 100_000  # training characters below which a text is small: a smaller model, more dropout
DECAY = 0.3  # the last fraction of the budget the rate decays over; it holds at --lr before
DROPOUT = 0.2  # dropout of a run that reads its text many times
SMALL_DROPOUT = 0.3  # the same, on a small text
HIDDEN = 128  # state size of each of the 2 layers
SMALL_HIDDEN = 64  # the same, on a small text
LAYERS = 2


@dataclass(frozen=True)
class Choice:
    """One setting the recipe chose: the config field, its value, why, and the flag that sets it instead."""

    field: str  # the ModelConfig or TrainConfig field
    value: object
    why: str
    flag: str  # how to override it, e.g. "--dropout P"

    def line(self) -> str:
        return f"{self.why} (override: {self.flag})"


def passes(train_chars: int, steps: int, k1: int, batch: int) -> float:
    """Passes over the training text that ``steps`` updates of ``k1 × batch`` characters make (inf: no step limit)."""
    return steps * k1 * batch / train_chars if steps else math.inf


def choose(train_chars: int, *, steps: int, minutes: float, k1: int, batch: int, lr: float, warmup: int = 0,
           given: frozenset = frozenset(), lr_schedule: str = "") -> list[Choice]:
    """The recipe's choices for the fields not in ``given`` (the config fields the user set; ``lr_schedule``
    is the user's schedule when it is one of them)."""
    limited = bool(minutes or steps > warmup)  # a warm-up as long as the steps leaves nothing to decay
    n = passes(train_chars, 0 if minutes else steps, k1, batch)
    small = train_chars < SMALL_TEXT
    out = []
    if "lr_schedule" not in given:
        if limited:
            out.append(Choice("lr_schedule", "cosine", f"learning rate {lr:g} decaying along a cosine to 0 at the "
                              f"end of the {_budget(steps, minutes)}", "--lr-schedule constant"))
        else:
            why = "no --steps or --minutes to decay over" if not steps else f"the --warmup {warmup} fills the budget"
            out.append(Choice("lr_schedule", "constant", f"learning rate {lr:g}, constant: {why}", "--lr-schedule cosine"))
    schedule = next((c.value for c in out if c.field == "lr_schedule"), lr_schedule)
    if "decay" not in given and schedule == "cosine":
        out.append(Choice("decay", DECAY, f"the rate holds at {lr:g} for the first {1 - DECAY:.0%} of the budget and "
                          f"decays over the last {DECAY:.0%}", "--decay 1"))
    if "dropout" not in given:
        if n < FEW_PASSES:
            value, why = 0.0, f"no dropout: the budget reads the text {n:.2g} times, too few to overfit"
        else:
            value = SMALL_DROPOUT if small else DROPOUT
            reads = "a time budget may read it many times" if minutes or not steps else f"the budget reads it {n:.3g} times"
            why = f"dropout {value:g}: {train_chars:,} training characters, and {reads}"
        out.append(Choice("dropout", value, why, "--dropout P"))
    if "hidden" not in given:
        hidden = SMALL_HIDDEN if small else HIDDEN
        size = "under" if small else "at least"
        out.append(Choice("hidden", hidden, f"state size {hidden}: {size} {SMALL_TEXT:,} training characters",
                          "--hidden N"))
    if "layers" not in given:
        out.append(Choice("layers", LAYERS, f"{LAYERS} layers", "--layers N"))
    return out


def _budget(steps: int, minutes: float) -> str:
    parts = ([count(steps, "update", spec=",")] if steps else []) + ([count(minutes, "minute", spec="g")] if minutes else [])
    return " or ".join(parts) + (" (whichever comes first)" if len(parts) > 1 else "")


def decayed(progress: float, decay: float) -> float:
    """How far through the decay a run ``progress`` through its budget is, when the rate decays over the
    budget's last ``decay`` fraction and holds before it (0 until then, 1 at the end)."""
    return max(0.0, 1.0 - (1.0 - progress) / decay)


def progress(step: int, steps: int, seconds: float, budget_seconds: float) -> float:
    """How far through its budget a run is, from 0 to 1: the larger of its step and time fractions."""
    fractions = ([step / steps] if steps else []) + ([seconds / budget_seconds] if budget_seconds else [])
    return min(max(fractions, default=0.0), 1.0)
