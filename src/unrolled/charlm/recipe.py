"""The recipe `unrolled train` picks from the text and the budget, for the settings the user left out.

A fixed recipe (char-rnn's: a constant rate, no dropout) wastes a fast
engine: the more updates a budget allows, the sooner it overfits, and the
held-out score it ends with is worse than the best it passed through. So a
fresh run chooses, from numbers it knows before the first update:

- **Long or short.** A budget of fewer than :data:`LONG_STEPS` updates is
  *short*: the model is still far from fitting its text, and every update at
  the full rate counts. Short runs measured on two texts ended best with
  char-rnn's constant rate and no dropout, so a short run gets exactly that.
  A ``--minutes`` budget counts as long (how many updates it makes is not
  known before it starts; this engine makes many).
- **Schedule** (long budgets). The learning rate holds at ``--lr``, then
  decays along half a cosine to 0 over the budget's last :data:`DECAY`
  (:func:`decayed`), so the run ends on its best instead of wandering past it.
  The run's *progress* is the larger of ``step / steps`` and ``seconds /
  budget`` (:func:`progress`). With no budget the rate stays constant.
- **Dropout** (long budgets), from the passes the budget makes over the
  training text, ``passes = steps · k1 · B / training characters``: fewer
  than :data:`FEW_PASSES` get none; more get :data:`DROPOUT`, or
  :data:`SMALL_DROPOUT` on a text shorter than :data:`SMALL_TEXT`. A
  ``--minutes`` budget counts as many passes.
- **Size**: 2 layers of :data:`HIDDEN` whatever the text's length: on texts
  of 36,000 characters, 2 × 64 ended far behind 2 × 128 after the same
  updates (QUALITY.md); a larger model for a long budget is left to the
  10-minute runs to decide.

The short-run rule comes from the runs in ``benchmarks/QUALITY.md``
(``benchmarks/quality_recipes.py``, two texts); :data:`LONG_STEPS` is half
the update at which char-rnn's recipe passed its best held-out score on
shakespeare.txt (issue 22), and the long-run settings are to be confirmed by
the 10-minute runs listed there. Every choice is printed at the start of the
run, each with the flag that overrides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from unrolled.words import count

LONG_STEPS = 5_000  # a budget of fewer updates is short: a constant rate and no dropout (--minutes is long)
FEW_PASSES = 2.0  # below this many passes over the training text a run gets no dropout
SMALL_TEXT = 100_000  # training characters below which a text is small: more dropout
DECAY = 0.3  # the last fraction of the budget the rate decays over; it holds at --lr before
DROPOUT = 0.2  # dropout of a run that reads its text many times
SMALL_DROPOUT = 0.3  # the same, on a small text
HIDDEN = 128  # state size of each of the 2 layers
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
    long = bool(minutes) or steps >= LONG_STEPS  # no budget at all: steps is 0, the rate stays constant
    n = passes(train_chars, 0 if minutes else steps, k1, batch)
    small = train_chars < SMALL_TEXT
    budget = _budget(steps, minutes)
    out = []
    if "lr_schedule" not in given:
        if long and (minutes or steps > warmup):
            out.append(Choice("lr_schedule", "cosine", f"learning rate {lr:g}, decaying along a cosine to 0 by the "
                              f"end of the {budget}", "--lr-schedule constant"))
        else:
            why = (f"the {budget} are too few to give up the rate for (a decay pays from {LONG_STEPS:,})" if steps
                   else "no --steps or --minutes to decay over")
            out.append(Choice("lr_schedule", "constant", f"learning rate {lr:g}, constant: {why}", "--lr-schedule cosine"))
    schedule = next((c.value for c in out if c.field == "lr_schedule"), lr_schedule)
    if "decay" not in given and schedule == "cosine":
        out.append(Choice("decay", DECAY, f"the rate holds at {lr:g} for the first {1 - DECAY:.0%} of the budget and "
                          f"decays over the last {DECAY:.0%}", "--decay 1"))
    if "dropout" not in given:
        if not long:
            value, why = 0.0, (f"no dropout: the {budget} are too few to overfit (dropout from {LONG_STEPS:,})"
                               if steps else "no dropout: no --steps or --minutes to size it by")
        elif n < FEW_PASSES:
            value, why = 0.0, f"no dropout: the budget reads the text {n:.2g} times, too few to overfit"
        else:
            value = SMALL_DROPOUT if small else DROPOUT
            reads = "a time budget may read it many times" if minutes else f"the budget reads it {n:.3g} times"
            why = f"dropout {value:g}: {train_chars:,} training characters, and {reads}"
        out.append(Choice("dropout", value, why, "--dropout P"))
    if "hidden" not in given:
        out.append(Choice("hidden", HIDDEN, f"state size {HIDDEN}", "--hidden N"))
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
