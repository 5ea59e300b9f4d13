"""Batches of character ids for training and validation, time-major ``[T, B]``.

The pipeline past reading is ``Vocabulary.encode`` -> :func:`split_train_val`
-> :class:`StreamBatcher` for training and :func:`iter_eval_chunks` for
validation. Everything here is plain int64 NumPy arrays, time-major like every
array in unrolled.

Training batches follow the classic stateful scheme (Zaremba et al.): the
corpus is cut into ``B`` equal streams and each batch holds the next ``T``
characters of every stream, so the state an RNN ends one batch with is the
right state to start the next one with (truncated BPTT with carried state).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator

import numpy as np

from unrolled.words import count


def _ids(ids, what: str = "ids") -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValueError(f"{what} must be a 1-D array of integer character ids, got {a.dtype} {list(a.shape)}")
    return a.astype(np.int64, copy=False)


def _whole(owner: str, what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {what} must be a whole number of at least 1, got {value!r}")
    return int(value)


def split_train_val(ids, val_fraction: float, *, min_train: int = 2, min_val: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)``: the last ``val_fraction`` of ``ids`` held out (views,
    not copies). ``val_fraction=0`` gives an empty validation part. Each
    part must hold at least ``min_train`` / ``min_val`` ids (2 = one to
    read, one to predict; a trainer passes ``seq_len * batch_size + 1``)."""
    ids = _ids(ids)
    try:
        f = float(val_fraction)
    except (TypeError, ValueError):
        f = math.nan
    if not 0 <= f < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {val_fraction!r}")
    n = len(ids)
    n_val = int(round(n * f))
    train, val = ids[: n - n_val], ids[n - n_val :]
    if f > 0 and len(val) < min_val:
        raise ValueError(f"the validation part would be {count(len(val), 'character')} ({f:g} of {n}), fewer than the {min_val} "
                         "it needs; raise the validation fraction or use a longer text")
    if len(train) < min_train:
        raise ValueError(f"the training part would be {count(len(train), 'character')} ({1 - f:g} of {n}), fewer than the "
                         f"{min_train} it needs; lower the validation fraction, lower seq_len or batch_size, or use a longer text")
    return train, val


class StreamBatcher:
    """Training batches ``(x, y)``, each ``[T, B]`` int64, ``y`` = ``x`` one
    character later.

    The corpus (minus its last character, which is only ever a target) is cut
    into ``B`` equal streams starting at ``b · L``, ``L = (n - 1) // B``;
    batch ``k`` holds characters ``[b·L + k·T, b·L + (k+1)·T)`` of each
    stream. After ``chunks_per_epoch = L // T`` batches the streams wrap to
    their starts and ``epoch`` counts up (a remainder of fewer than ``T``
    characters per stream is not used). Because the streams jump back at that
    point, a trainer carrying RNN state between batches should reset it
    whenever ``at_epoch_start`` is true.

    ``state()`` / ``load_state()`` save and restore the position (JSON), so a
    resumed run gets exactly the batches it would have had.
    """

    def __init__(self, ids, seq_len: int, batch_size: int):
        self.ids = _ids(ids, "the training text")
        self.seq_len = _whole("batcher", "seq_len", seq_len)
        self.batch_size = _whole("batcher", "batch_size", batch_size)
        T, B, n = self.seq_len, self.batch_size, len(self.ids)
        if n < T * B + 1:
            raise ValueError(f"the text has {count(n, 'character')}, too few for {count(B, 'stream')} of {count(T, 'character')} "
                             f"(needs seq_len × batch_size + 1 = {T * B + 1}); lower batch_size or seq_len, or use a longer text")
        self.stream_len = (n - 1) // B
        self.chunks_per_epoch = self.stream_len // T
        self.position = 0  # the next batch's index within the epoch
        self.epoch = 0  # completed passes over the corpus
        self._offsets = np.arange(T)[:, None] + (np.arange(B) * self.stream_len)[None, :]  # [T, B]
        self._crc: int | None = None

    @property
    def at_epoch_start(self) -> bool:
        """True when the next batch starts the streams over (reset carried state)."""
        return self.position == 0

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        idx = self._offsets + self.position * self.seq_len  # [T, B]
        x, y = self.ids[idx], self.ids[idx + 1]
        self.position += 1
        if self.position == self.chunks_per_epoch:
            self.position = 0
            self.epoch += 1
        return x, y

    def _text_crc(self) -> int:
        if self._crc is None:  # tells "same length, other text" apart on resume
            self._crc = zlib.crc32(np.ascontiguousarray(self.ids, dtype="<i8").view(np.uint8))
        return self._crc

    def state(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "text_length": len(self.ids), "text_crc32": self._text_crc()}

    def load_state(self, state: dict) -> None:
        want = self.state()
        if not isinstance(state, dict) or any(k not in state for k in want):
            raise ValueError(f"a saved batcher position needs the keys {', '.join(want)}; got {state!r}")
        if (state["seq_len"], state["batch_size"]) != (self.seq_len, self.batch_size):
            raise ValueError(f"the saved batcher position is for seq_len {state['seq_len']}, batch_size {state['batch_size']}, "
                             f"but this run uses seq_len {self.seq_len}, batch_size {self.batch_size}; resume with the same settings")
        if (state["text_length"], state["text_crc32"]) != (len(self.ids), self._text_crc()):
            raise ValueError(f"the saved batcher position is for another training text ({state['text_length']} characters, "
                             f"this one has {len(self.ids)}, or same length but other content); resume on the same text and split")
        position, epoch = state["position"], state["epoch"]
        if not (isinstance(position, int) and 0 <= position < self.chunks_per_epoch and isinstance(epoch, int) and epoch >= 0):
            raise ValueError(f"the saved batcher position {position} / epoch {epoch} is out of range "
                             f"(0..{self.chunks_per_epoch - 1} batches per epoch); the saved state is damaged")
        self.position, self.epoch = position, epoch


def eval_chunk_count(n_chars: int, seq_len: int, batch_size: int) -> int:
    """How many chunks :func:`iter_eval_chunks` yields for a text of ``n_chars``."""
    stream_len = -(-(n_chars - 1) // batch_size)
    return -(-stream_len // seq_len)


def iter_eval_chunks(ids, seq_len: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(x, y, mask)`` chunks, each ``[T, B]``, in which every character of
    ``ids`` but the first is a target exactly once (the first has nothing
    before it to be predicted from), for bits-per-character evaluation.

    The ``n - 1`` predictions are cut into ``B`` consecutive streams of
    ``ceil((n - 1) / B)`` and walked ``T`` at a time, so state may be carried
    from one chunk to the next as in training. Positions past a stream's end
    are padding: ``x = y = 0`` and ``mask = 0.0`` (float64, 1.0 elsewhere).
    Start each evaluation from the initial state: streams begin cold.
    A ``seq_len`` beyond a stream's length is cut to it: the chunks then
    hold the same predictions, and their size follows the text, not the flag.
    """
    ids = _ids(ids, "the evaluation text")
    T = _whole("evaluation", "seq_len", seq_len)
    B = _whole("evaluation", "batch_size", batch_size)
    n = len(ids)
    if n < 2:
        raise ValueError(f"the evaluation text has {n} character{'s' if n != 1 else ''}; it needs at least 2 "
                         "(one to read, one to predict)")
    targets = n - 1
    stream_len = -(-targets // B)
    T = min(T, stream_len)
    starts = np.arange(B) * stream_len  # [B]
    ends = np.minimum(starts + stream_len, targets)  # [B]
    for k in range(eval_chunk_count(n, T, B)):
        pos = starts[None, :] + k * T + np.arange(T)[:, None]  # [T, B] positions read
        valid = pos < ends[None, :]
        safe = np.where(valid, pos, 0)
        x = np.where(valid, ids[safe], 0)
        y = np.where(valid, ids[safe + 1], 0)
        yield x, y, valid.astype(np.float64)
