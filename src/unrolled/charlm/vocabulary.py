"""The vocabulary of a character model: each character it reads and writes, with its id.

Kept apart from reading and batching because a checkpoint carries it (as a
list) and sampling and evaluation need it without any text to train on.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from unrolled.words import count


def _describe(ch: str) -> str:
    return f"character {ch!r} (U+{ord(ch):04X})"


def describe_at(text: str, offset: int) -> str:
    """The character at ``offset`` of ``text`` and where it is, for messages."""
    return f"{_describe(text[offset])} {_where(text, offset)}"


def _where(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"at offset {offset} (line {line}, column {column})"


class Vocabulary:
    """The characters a model reads and writes, each with an integer id.

    Ids are positions in ``chars``; :meth:`from_text` sorts the distinct
    characters, so the same text always gives the same ids.

    Unknown characters (not in the vocabulary): ``encode(text)`` refuses
    them, naming the first one and where it is; ``encode(text,
    unknown="skip")`` drops them and also returns how many it dropped, so an
    evaluation can report them (they are not scored: the model has no
    probability for them).
    """

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("a vocabulary needs at least one character")
        seen: set[str] = set()
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"a vocabulary holds single characters; got {c!r}")
            if c in seen:
                raise ValueError(f"{_describe(c)} appears twice in the vocabulary; each character needs one id")
            seen.add(c)
        self._chars = tuple(chars)
        self._index = {c: i for i, c in enumerate(chars)}
        codes = np.array([ord(c) for c in chars], dtype=np.int64)
        self._order = np.argsort(codes)  # for a vectorized encode: code point -> id
        self._sorted_codes = codes[self._order]
        self._char_array = np.array(chars, dtype="<U1")  # for a vectorized decode

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        if not text:
            raise ValueError("cannot build a vocabulary from an empty text")
        return cls(sorted(set(text)))

    @classmethod
    def from_list(cls, chars: list[str]) -> Vocabulary:
        """Inverse of :meth:`to_list` (e.g. from a checkpoint's JSON)."""
        if not isinstance(chars, (list, tuple)):
            raise ValueError(f"a saved vocabulary is a list of characters, got {type(chars).__name__}")
        return cls(chars)

    def to_list(self) -> list[str]:
        return list(self._chars)

    @property
    def chars(self) -> tuple[str, ...]:
        return self._chars

    @property
    def size(self) -> int:
        return len(self._chars)

    def __len__(self) -> int:
        return len(self._chars)

    def __contains__(self, ch: object) -> bool:
        return ch in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._chars == other._chars

    def __hash__(self) -> int:
        return hash(self._chars)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} characters: {''.join(self._chars)[:40]!r})"

    def index_of(self, ch: str) -> int:
        """The id of one character."""
        i = self._index.get(ch)
        if i is None:
            raise ValueError(f"{_describe(ch)} is not in the model's vocabulary of {count(len(self), 'character')}")
        return i

    def encode(self, text: str, unknown: str = "error"):
        """``text`` as ids, an int64 array ``[len(text)]``.

        ``unknown="error"`` (default) raises on a character outside the
        vocabulary; ``unknown="skip"`` drops such characters and returns
        ``(ids, n_unknown)`` instead.
        """
        if unknown not in ("error", "skip"):
            raise ValueError(f"unknown={unknown!r}; use 'error' or 'skip'")
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_codes, codes), len(self) - 1)
        known = self._sorted_codes[pos] == codes
        if unknown == "skip":
            return self._order[pos[known]], int(codes.size - np.count_nonzero(known))
        if not known.all():
            first = int(np.argmin(known))
            raise ValueError(f"{_describe(text[first])} {_where(text, first)} is not in the model's vocabulary "
                             f"of {count(len(self), 'character')}; remove it from the text or skip unknown characters")
        return self._order[pos]

    def decode(self, ids) -> str:
        """The text of a 1-D sequence of ids."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return ""
        if ids.dtype.kind not in "iu":
            raise ValueError(f"ids to decode must be integers, got {ids.dtype}")
        if ids.ndim != 1:
            raise ValueError(f"decode takes a 1-D sequence of ids, got shape {list(ids.shape)}; decode one stream at a time")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= len(self):
            bad = lo if lo < 0 else hi
            raise ValueError(f"id {bad} is outside the vocabulary of {count(len(self), 'character')} (ids 0..{len(self) - 1})")
        return self._char_array[ids].tobytes().decode("utf-32-le", "surrogatepass")
