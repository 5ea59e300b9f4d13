"""The benchmark corpus and its `[T, B]` chunks for stateful truncated BPTT.

Vocabulary = the sorted distinct characters of the whole file. The first 90%
is the training text; it is cut into `B` evenly spaced streams, and chunk `k`
is the `k`-th run of `T` consecutive characters of every stream, with the
targets shifted by one. Consecutive calls to `Chunks.next()` therefore
continue every stream where the previous chunk stopped, so a peer may carry
its final state into the next chunk. At the end of the streams it wraps to
chunk 0 (one epoch is far longer than any benchmark).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = REPO_ROOT.parent / "shared" / "data" / "shakespeare.txt"


@dataclass
class Corpus:
    path: Path
    chars: list[str]        # the vocabulary, sorted
    ids: np.ndarray         # [N] int64, the training text as vocabulary indices

    @property
    def V(self) -> int:
        return len(self.chars)

    def index(self, ch: str) -> int:
        return self.chars.index(ch)


def corpus_path(path: str | os.PathLike | None = None) -> Path:
    """The corpus file: `path`, else $UNROLLED_BENCH_CORPUS, else ../shared/data."""
    p = Path(path or os.environ.get("UNROLLED_BENCH_CORPUS") or DEFAULT_PATH)
    if not p.is_file():
        raise FileNotFoundError(
            f"benchmark corpus {p} not found: pass --corpus FILE or set "
            f"UNROLLED_BENCH_CORPUS (BENCHMARKS.md uses ../shared/data/shakespeare.txt)"
        )
    return p


def load(path: str | os.PathLike | None = None, train_fraction: float = 0.9) -> Corpus:
    p = corpus_path(path)
    text = p.read_text(encoding="utf-8")
    chars = sorted(set(text))
    lookup = np.zeros(max(map(ord, chars)) + 1, dtype=np.int64)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = lookup[codes[: int(len(codes) * train_fraction)]]
    return Corpus(p, chars, ids)


class Chunks:
    """Consecutive `[T, B]` input/target chunks from `B` evenly spaced streams."""

    def __init__(self, corpus: Corpus, T: int, B: int):
        L = len(corpus.ids) // B
        streams = corpus.ids[: L * B].reshape(B, L)          # [B, L]
        n = (L - 1) // T
        if n < 1:
            raise ValueError(f"corpus too short for T={T}, B={B}: each stream has {L} chars")
        # Precomputed once, so fetching a chunk costs every peer the same: nothing.
        self.x = np.ascontiguousarray(streams[:, : n * T].reshape(B, n, T).transpose(1, 2, 0))       # [n, T, B]
        self.y = np.ascontiguousarray(streams[:, 1 : n * T + 1].reshape(B, n, T).transpose(1, 2, 0))  # [n, T, B]
        self.k = 0

    def __len__(self) -> int:
        return len(self.x)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """The next chunk: inputs `[T, B]` and targets `[T, B]`, int64."""
        k = self.k
        self.k = (k + 1) % len(self.x)
        return self.x[k], self.y[k]
