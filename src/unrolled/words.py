"""Counts in sentences: "1 character", "2 characters", "1 minute", "0.5 minutes".

Every message that puts a number before a noun goes through :func:`count`,
so that the singular rule lives in one place rather than in each f-string.
"""

from __future__ import annotations


def count(n, one: str, many: str | None = None, *, spec: str = "") -> str:
    """``n`` and its noun, singular only for exactly 1; ``spec`` formats ``n`` (e.g. ``","`` or ``"g"``)."""
    noun = one if n == 1 else (many or one + "s")
    return f"{n:{spec}} {noun}"
