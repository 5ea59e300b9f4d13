"""Generation of many rows on several threads (feedrows.py): each thread samples rows of its own,
and a split run gives each row what a run of its part alone gives, bit for bit, from the same
random numbers; the split is taken above LOOP_ROWS rows when there are threads for it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from test_generate import char_model  # noqa: E402

from unrolled.engines.compiled import feedsplit, rowsplit  # noqa: E402
from unrolled.engines.compiled.feedback import Generator  # noqa: E402
from unrolled.engines.compiled.kernels.sampling import LOOP_ROWS  # noqa: E402


class Uniforms:
    """A stand-in for the caller's generator that hands out given uniform numbers: a part run
    alone then draws from the same numbers its rows got in the whole batch."""

    def __init__(self, u: np.ndarray):
        self.u = u

    def random(self, shape):
        assert shape == self.u.shape, (shape, self.u.shape)
        return self.u


def states_of(g, B: int, dtype, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal((B, v.size)).astype(dtype) * 0.5
            for v in g.vertices.values() if v.kind == "op" and v.name in ("l0.h", "l0.c", "l1.h", "l1.c")}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_split_run_gives_each_row_what_its_part_alone_gives(dtype):
    g = char_model(V=23, H=40, cell="lstm", layers=2)
    params = g.init_params(2, dtype)
    B, P, length = 19, 3, 70
    prime = np.random.default_rng(0).integers(0, 23, size=(P, B))
    u = np.random.default_rng(1).random((P + length, B))
    init = states_of(g, B, dtype, 4)
    split = Generator(g, "tok", "y", jit=True, threads=3)
    tokens, finals = split.run(params, length=length, prime=prime, rng=Uniforms(u), init_states=init,
                               temperature=0.9)
    assert split.ran_on == 3 and tokens.shape == (length, B)
    alone = Generator(g, "tok", "y", jit=True, threads=1)
    for lo, hi in rowsplit.even(B, 3):
        t, f = alone.run(params, length=length, prime=prime[:, lo:hi], rng=Uniforms(u[:, lo:hi]),
                         init_states={k: v[lo:hi] for k, v in init.items()}, temperature=0.9)
        np.testing.assert_array_equal(tokens[:, lo:hi], t)
        assert finals.keys() == f.keys()
        for k in f:
            np.testing.assert_array_equal(finals[k][lo:hi], f[k], err_msg=k)


def test_rows_split_above_loop_rows_when_threads_are_there(monkeypatch):
    g = char_model(V=11, H=16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    auto = Generator(g, "tok", "y", jit=True)
    n, why = auto.threads_for(32, np.float32)
    if feedsplit.usable_cores() >= 2:
        assert n == 2 and "rows split" in why, why
    assert auto.threads_for(LOOP_ROWS, np.float32)[0] == 1  # a small model's few rows: one thread, whole
    assert Generator(g, "tok", "y", jit=True, threads=4).threads_for(12, np.float32)[0] == 3  # 4 rows a part
    assert Generator(g, "tok", "y", jit=True, threads=1).threads_for(32, np.float32)[0] == 1
    assert Generator(g, "tok", "y", jit=False, threads=2).threads_for(32, np.float32)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert auto.threads_for(32, np.float32)[0] == 1


def test_a_split_run_samples_every_row_and_states_continue_it():
    """The parts' tokens and states come back in row order: continuing from the split run's states
    gives what one longer run gives."""
    g = char_model(V=11, H=16)
    params = g.init_params(0, np.float64)
    prime = np.arange(12).reshape(1, 12) % 11
    u = np.random.default_rng(3).random((61, 12))
    gen = Generator(g, "tok", "y", jit=True, threads=2)
    whole, _ = gen.run(params, length=60, prime=prime, rng=Uniforms(u))
    first, states = gen.run(params, length=30, prime=prime, rng=Uniforms(u[:31]))
    rest, _ = gen.run(params, length=30, prime=first[-1:], rng=Uniforms(u[30:]), init_states=states)
    assert gen.ran_on == 2
    np.testing.assert_array_equal(np.concatenate([first, rest]), whole)


def test_initial_states_are_checked_against_the_whole_batch_before_the_rows_split():
    g = char_model(V=11, H=16, layers=1)
    gen = Generator(g, "tok", "y", jit=True, threads=2)
    prime = np.zeros((1, 32), dtype=int)
    bad = {"l0.h": np.zeros((33, 16))}  # one row too many: each part's rows of it would look right
    with pytest.raises(ValueError, match=r"init_states\['l0.h'\] has shape \[33, 16\]; it must be \[32, 16\]"):
        gen.run(g.init_params(0), length=5, prime=prime, rng=np.random.default_rng(0), init_states=bad)
