"""Reading corpora, vocabularies, train/validation split and [T, B] batching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unrolled.charlm.batching import (
    StreamBatcher,
    eval_chunk_count,
    iter_eval_chunks,
    split_train_val,
)
from unrolled.charlm.corpus import FALLBACK_CORPUS, builtin_corpus
from unrolled.charlm.text_files import read_text
from unrolled.charlm.vocabulary import Vocabulary

# -- read_text ---------------------------------------------------------------


def test_read_text_normalizes_newlines_and_bom(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffone\r\ntwo\rthree\né\n".encode("utf-8"))
    assert read_text(p) == "one\ntwo\nthree\né\n"


def test_read_text_other_encodings(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("café\n".encode("latin-1"))
    assert read_text(p, encoding="latin-1") == "café\n"
    p16 = tmp_path / "wide.txt"
    p16.write_bytes("hi there\n".encode("utf-16"))
    assert read_text(p16, encoding="utf-16") == "hi there\n"


@pytest.mark.parametrize("content, encoding, match", [
    (None, "utf-8", r"missing.txt: no such file; check the path$"),
    (b"", "utf-8", r"f.txt is empty; a corpus needs some text$"),
    (b"\xef\xbb\xbf", "utf-8", r"f.txt is empty"),
    (b"abc\x00\x01\x02", "utf-8", r"f.txt looks binary \(it contains a NUL byte at offset 3, line 1, column 4\); pass a text file$"),
    (b"line one\nna\xefve\n", "utf-8",
     r"f.txt is not valid utf-8 text: byte 0xEF at offset 11 \(line 2, column 3\); if it is Latin-1 text, pass --encoding latin-1$"),
    (b"abc", "klingon", r"unknown text encoding 'klingon' \(--encoding\); try utf-8 or latin-1$"),
    (b"abc", "rot13", r"'rot13' is not a text encoding; try utf-8 or latin-1$"),
])
def test_read_text_errors(tmp_path, content, encoding, match):
    p = tmp_path / ("missing.txt" if content is None else "f.txt")
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_text(p, encoding=encoding)


def test_read_text_folder(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a text file; pass a file inside it"):
        read_text(tmp_path)


def test_read_text_refuses_devices_without_reading_them(tmp_path):
    import os
    for dev in ("/dev/zero", "/dev/urandom"):
        if os.path.exists(dev):
            with pytest.raises(ValueError, match=f"{dev} is a character device, not a regular file; pass a text file, "
                                                 "or - to read standard input"):
                read_text(dev)


def test_read_text_refuses_a_fifo_without_waiting_for_a_writer(tmp_path):
    import os
    import threading
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    errors = []

    def read():
        try:
            read_text(fifo)
        except ValueError as e:
            errors.append(str(e))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout=10)
    if t.is_alive():  # unblock the reader before failing, so the test run does not hang
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_text waited on a FIFO")
    assert errors and "pipe is a FIFO (named pipe), not a regular file" in errors[0]


def test_read_text_bounds_the_bytes_it_reads(tmp_path):
    p = tmp_path / "big.txt"
    p.write_text("x" * 1001)
    assert read_text(p, max_bytes=1001) == "x" * 1001
    with pytest.raises(ValueError, match=r"big.txt holds more than 0.001 MB, the limit on a text read whole; "
                                         r"raise it with --max-text-mb"):
        read_text(p, max_bytes=1000)


def test_read_text_dash_is_standard_input(monkeypatch):
    import io
    import sys
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("héllo\r\nworld\n".encode())))
    assert read_text("-") == "héllo\nworld\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"y" * 5000)))
    with pytest.raises(ValueError, match="standard input holds more than 0.004 MB"):
        read_text("-", max_bytes=4000)  # read in pieces: a stream has no size to check first
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(ValueError, match="standard input is empty"):
        read_text("-")


def test_corpus_files_sorted_recursive_without_hidden_or_binary(tmp_path):
    from unrolled.charlm.text_files import corpus_files
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.md").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("c")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    (tmp_path / ".hidden.txt").write_text("h")
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    texts, skipped = corpus_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in texts] == ["a.md", "b.txt", "sub/c.txt"]
    assert [p.name for p in skipped] == ["logo.png"]


# -- the built-in corpus ----------------------------------------------------


def test_builtin_corpus_is_deterministic_stdlib_ascii():
    text = builtin_corpus()
    assert 900_000 <= len(text) <= 1_000_000
    assert text == builtin_corpus.__wrapped__()  # really re-read, not just the cache
    assert text.isascii() and "\r" not in text
    assert "def " in text and "import " in text
    assert len(set(text)) < 100


def test_builtin_corpus_respects_max_chars():
    assert len(builtin_corpus(50_000)) == 50_000
    assert builtin_corpus(50_000) == builtin_corpus()[:50_000]


def test_builtin_corpus_falls_back_without_sources(tmp_path):
    uncached = builtin_corpus.__wrapped__  # the folder changes under the same arguments
    assert uncached(stdlib_dir=str(tmp_path)) == FALLBACK_CORPUS
    assert uncached(stdlib_dir=str(tmp_path / "absent")) == FALLBACK_CORPUS
    (tmp_path / "a.py").write_bytes(b"caf\xc3\xa9 = 1\n" * 1000)  # not ASCII: skipped
    assert uncached(stdlib_dir=str(tmp_path)) == FALLBACK_CORPUS
    (tmp_path / "b.py").write_text("x = 1\n" * 2000)
    (tmp_path / "c.py").write_text("y = 2\n" * 2000)
    (tmp_path / "d.py").write_text("z = 3\n" * 2000)  # past max_chars: not read
    assert uncached(max_chars=15_000, stdlib_dir=str(tmp_path)) == "x = 1\n" * 2000 + ("y = 2\n" * 2000)[:3000]


def test_fallback_corpus_is_long_enough_to_train_on():
    assert len(FALLBACK_CORPUS) > 64 * 32 + 1
    assert FALLBACK_CORPUS.isascii()


# -- vocabulary --------------------------------------------------------------


def test_vocabulary_round_trip():
    text = "hello, world\nhé"
    v = Vocabulary.from_text(text)
    assert v.to_list() == sorted(set(text))
    ids = v.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert v.decode(ids) == text
    assert v.decode(list(ids)) == text
    assert Vocabulary.from_list(json.loads(json.dumps(v.to_list()))) == v
    assert v.index_of("h") == v.to_list().index("h")
    assert [v.index_of(c) for c in text] == ids.tolist()


def test_vocabulary_in_any_order_and_astral_characters():
    v = Vocabulary(["z", "a", "😀", "\n"])
    assert v.encode("a😀z\n").tolist() == [1, 2, 0, 3]
    assert v.decode([2, 1]) == "😀a"
    assert v.encode("") .tolist() == []
    assert v.decode([]) == ""


def test_unknown_characters():
    v = Vocabulary.from_text("abc\n")
    with pytest.raises(ValueError, match=r"^character 'é' \(U\+00E9\) is not in the model's vocabulary of 4 characters$"):
        v.index_of("é")
    with pytest.raises(ValueError, match=r"character 'é' \(U\+00E9\) at offset 5 \(line 2, column 2\) is not in the model's vocabulary of 4 characters"):
        v.encode("abc\naéb")
    ids, n_unknown = v.encode("abc\naébéé", unknown="skip")
    assert n_unknown == 3 and v.decode(ids) == "abc\nab"
    ids, n_unknown = v.encode("ab", unknown="skip")
    assert n_unknown == 0 and ids.tolist() == [1, 2]
    with pytest.raises(ValueError, match="unknown='drop'; use 'error' or 'skip'"):
        v.encode("a", unknown="drop")


@pytest.mark.parametrize("chars, match", [
    ([], "at least one character"),
    (["a", "a"], r"character 'a' \(U\+0061\) appears twice"),
    (["ab"], "single characters"),
])
def test_bad_vocabularies(chars, match):
    with pytest.raises(ValueError, match=match):
        Vocabulary(chars)


def test_bad_decode():
    v = Vocabulary.from_text("abc")
    with pytest.raises(ValueError, match=r"id 3 is outside the vocabulary of 3 characters \(ids 0..2\)"):
        v.decode([0, 3])
    with pytest.raises(ValueError, match="id -1 is outside"):
        v.decode(np.array([-1]))
    with pytest.raises(ValueError, match="must be integers"):
        v.decode([0.5])


def test_encode_is_fast_enough_for_the_builtin_corpus():
    text = builtin_corpus()
    v = Vocabulary.from_text(text)
    assert v.decode(v.encode(text)) == text


# -- split ---------------------------------------------------------------------


def test_split_train_val():
    ids = np.arange(100)
    train, val = split_train_val(ids, 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    train, val = split_train_val(ids, 0.0)
    assert len(train) == 100 and len(val) == 0
    with pytest.raises(ValueError, match=r"the validation part would be 1 character \(0.01 of 100\), fewer than the 20 it needs; raise the validation fraction"):
        split_train_val(ids, 0.01, min_val=20)
    with pytest.raises(ValueError, match=r"the training part would be 50 characters \(0.5 of 100\), fewer than the 65 it needs; lower the validation fraction"):
        split_train_val(ids, 0.5, min_train=65)
    with pytest.raises(ValueError, match=r"validation fraction must be in \[0, 1\), got 1.5"):
        split_train_val(ids, 1.5)


# -- training batches ----------------------------------------------------------


def test_stream_batcher_layout():
    ids = np.arange(23)  # n - 1 = 22 -> 2 streams of 11, 3 chunks of 3 (2 positions unused)
    b = StreamBatcher(ids, seq_len=3, batch_size=2)
    assert (b.stream_len, b.chunks_per_epoch) == (11, 3)
    x, y = b.next_batch()
    assert x.shape == (3, 2) and x.dtype == np.int64
    assert x.T.tolist() == [[0, 1, 2], [11, 12, 13]]
    np.testing.assert_array_equal(y, x + 1)
    x2, _ = b.next_batch()
    assert x2.T.tolist() == [[3, 4, 5], [14, 15, 16]]  # each stream continues where it stopped
    x3, y3 = b.next_batch()
    assert x3.T.tolist() == [[6, 7, 8], [17, 18, 19]] and y3.max() == 20
    assert b.epoch == 1 and b.at_epoch_start
    x4, _ = b.next_batch()
    np.testing.assert_array_equal(x4, x)  # wrapped
    assert b.epoch == 1 and not b.at_epoch_start


def test_stream_batcher_each_stream_is_contiguous_text(rng):
    ids = rng.integers(0, 50, size=1000)
    b = StreamBatcher(ids, seq_len=7, batch_size=5)
    xs, ys = zip(*(b.next_batch() for _ in range(b.chunks_per_epoch)))
    streams = np.concatenate(xs, axis=0)  # [K*T, B]
    for s in range(5):
        start = s * b.stream_len
        np.testing.assert_array_equal(streams[:, s], ids[start : start + len(streams)])
        np.testing.assert_array_equal(np.concatenate(ys, axis=0)[:, s], ids[start + 1 : start + 1 + len(streams)])


def test_stream_batcher_resume_gives_the_same_batches(rng):
    ids = rng.integers(0, 30, size=500)
    straight = StreamBatcher(ids, 8, 4)
    expected = [straight.next_batch() for _ in range(40)]
    first = StreamBatcher(ids, 8, 4)
    for _ in range(17):
        first.next_batch()
    saved = json.loads(json.dumps(first.state()))
    resumed = StreamBatcher(ids.copy(), 8, 4)
    resumed.load_state(saved)
    for x_exp, y_exp in expected[17:]:
        x, y = resumed.next_batch()
        np.testing.assert_array_equal(x, x_exp)
        np.testing.assert_array_equal(y, y_exp)
    assert resumed.state() == straight.state()


def test_stream_batcher_refuses_other_settings_or_text(rng):
    ids = rng.integers(0, 30, size=500)
    state = StreamBatcher(ids, 8, 4).state()
    with pytest.raises(ValueError, match="is for seq_len 8, batch_size 4, but this run uses seq_len 8, batch_size 5"):
        StreamBatcher(ids, 8, 5).load_state(state)
    other = ids.copy()
    other[3] += 1
    with pytest.raises(ValueError, match="is for another training text"):
        StreamBatcher(other, 8, 4).load_state(state)
    with pytest.raises(ValueError, match="out of range"):
        StreamBatcher(ids, 8, 4).load_state({**state, "position": 10**6})


def test_stream_batcher_too_short_text():
    with pytest.raises(ValueError, match=r"the text has 100 characters, too few for 4 streams of 32 characters \(needs seq_len × batch_size \+ 1 = 129\); lower batch_size or seq_len"):
        StreamBatcher(np.arange(100), 32, 4)
    StreamBatcher(np.arange(129), 32, 4).next_batch()  # exactly enough
    with pytest.raises(ValueError, match="seq_len must be a whole number of at least 1, got 0"):
        StreamBatcher(np.arange(100), 0, 4)
    with pytest.raises(ValueError, match="1-D array of integer"):
        StreamBatcher(np.zeros((10, 2), dtype=np.int64), 2, 2)


# -- evaluation chunks -----------------------------------------------------------


@pytest.mark.parametrize("n, T, B", [(2, 4, 3), (23, 3, 2), (100, 7, 5), (101, 10, 10), (50, 100, 1), (9, 2, 16)])
def test_eval_chunks_cover_every_target_once(n, T, B):
    ids = np.arange(n) + 1000
    chunks = list(iter_eval_chunks(ids, T, B))
    assert len(chunks) == eval_chunk_count(n, T, B)
    seen = []
    for x, y, mask in chunks:
        stream_len = -(-(n - 1) // B)  # a chunk is never longer than a stream
        assert x.shape == y.shape == mask.shape == (min(T, stream_len), B) and mask.dtype == np.float64
        on = mask == 1.0
        np.testing.assert_array_equal(y[on], x[on] + 1)  # y is the next character
        assert (x[~on] == 0).all() and (y[~on] == 0).all() and set(np.unique(mask)) <= {0.0, 1.0}
        seen.extend(y[on].tolist())
    assert sorted(seen) == list(range(1001, 1000 + n))  # each of the n - 1 targets exactly once


def test_eval_chunks_streams_continue_across_chunks():
    ids = np.arange(41)  # 40 targets, 2 streams of 20, chunks of 8
    chunks = list(iter_eval_chunks(ids, 8, 2))
    xs = np.concatenate([x for x, _, _ in chunks])
    masks = np.concatenate([m for _, _, m in chunks])
    assert xs[:20, 0].tolist() == list(range(20)) and xs[:20, 1].tolist() == list(range(20, 40))
    assert masks[:20].all() and not masks[20:].any()


def test_eval_chunks_too_short():
    with pytest.raises(ValueError, match="the evaluation text has 1 character; it needs at least 2"):
        list(iter_eval_chunks(np.arange(1), 4, 2))
