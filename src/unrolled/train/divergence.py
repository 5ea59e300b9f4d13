"""Telling a diverging training run from a noisy one, before it overwrites anything good.

A learning rate far too high does not always give NaN: the loss can stay
finite and huge (thousands of bits per character) while the run goes on
saving it. The yardstick here is the uniform guess, which costs
``ln V`` nats per character for a vocabulary of ``V``: a fresh model starts
near it and training only goes down from there. A run has diverged when

- its smoothed training loss has stayed above its best smoothed loss (or
  the uniform guess, if lower) plus a whole uniform guess, for
  ``PATIENCE`` updates in a row; or
- a validation pass scores worse than the best validation so far (or the
  uniform guess, if lower) plus a whole uniform guess.

A single bad batch moves the smoothed loss too little, for too short a
time, to trip either rule.
"""

from __future__ import annotations

import math

PATIENCE = 50  # updates in a row above the limit
SMOOTHING = 0.05  # weight of the newest loss in the smoothed one


class DivergenceWatch:
    """Feed it each update's loss and each validation figure; it says when the run has diverged."""

    def __init__(self, vocab_size: int):
        self.uniform = math.log(max(vocab_size, 2))  # nats per character of a uniform guess
        self.smoothed: float | None = None
        self.best = self.uniform
        self.over = 0  # updates in a row above the limit

    def update(self, loss: float) -> str | None:
        """The reason the run has diverged, after this update's loss (nats/char), or None."""
        self.smoothed = loss if self.smoothed is None else (1 - SMOOTHING) * self.smoothed + SMOOTHING * loss
        best, limit = self.best, self.best + self.uniform
        self.best = min(self.best, self.smoothed)
        self.over = self.over + 1 if self.smoothed > limit else 0
        if self.over < PATIENCE:
            return None
        return (f"the smoothed training loss, {_bits(self.smoothed):,.3f} bits/char, has stayed above "
                f"{_bits(limit):.3f} (its best, {_bits(best):.3f}, plus {_bits(self.uniform):.3f}, the cost of a "
                f"uniform guess) for {PATIENCE} updates")

    def validation(self, val_bpc: float, best_val_bpc: float) -> str | None:
        """The reason the run has diverged, given this validation figure (bits/char), or None."""
        uniform = _bits(self.uniform)
        limit = min(best_val_bpc, uniform) + uniform
        if val_bpc <= limit:
            return None
        return (f"validation scored {val_bpc:,.3f} bits/char, above {limit:.3f} (the best so far, or a uniform "
                f"guess if worse, plus {uniform:.3f}, the cost of a uniform guess)")


def _bits(nats: float) -> float:
    return nats / math.log(2)
