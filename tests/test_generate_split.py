"""Generation shared across threads (feedsplit.py): two threads draw the same tokens and reach the
same states as one, bit for bit; the split is taken when asked for or when the rule says it pays,
and not otherwise; a failing thread releases the others."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from test_generate import char_model, every_fused_op_model, softplus_exp_model  # noqa: E402

from unrolled.engines.compiled import feedsplit  # noqa: E402
from unrolled.engines.compiled.feedback import Generator  # noqa: E402
from unrolled.engines.compiled.kernels import spin  # noqa: E402


def run_both(g, params, prime, **kw):
    """The run on one thread and on two, checking that each took the threads it was given."""
    out = []
    for n in (1, 2):
        gen = Generator(g, "tok", "y", jit=True, threads=n)
        out.append(gen.run(params, prime=prime, rng=np.random.default_rng(7), **kw))
        assert gen.ran_on == n
    return out


def assert_identical(one, two):
    (tokens1, states1), (tokens2, states2) = one, two
    np.testing.assert_array_equal(tokens1, tokens2)
    assert states1.keys() == states2.keys()
    for k in states1:
        assert states1[k].dtype == states2[k].dtype
        np.testing.assert_array_equal(states1[k], states2[k], err_msg=k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("cell", ["lstm", "gru", "elman"])
def test_two_threads_sample_what_one_does(cell, B, dtype):
    # 48 units: shares that do not fall on the gate blocks' quarters; 11 classes: a product below one share
    g = char_model(V=11, H=48, cell=cell)
    params = {k: 2 * v for k, v in g.init_params(3, dtype).items()}
    prime = np.random.default_rng(0).integers(0, 11, size=(4, B))
    assert_identical(*run_both(g, params, prime, length=120, temperature=0.8))
    assert_identical(*run_both(g, params, prime, length=60, top_k=3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_large_lstm_stack_samples_alike_on_two_threads(dtype):
    """The sampling benchmark's shape, scaled down: a stack of two LSTM layers whose products share
    their columns by the cell's gate blocks, with a one-hot input of many classes."""
    g = char_model(V=75, H=128, cell="lstm", layers=2)
    params = g.init_params(1, dtype)
    prime = np.array([[3], [40], [7]])
    assert_identical(*run_both(g, params, prime, length=300, temperature=1.2))


@pytest.mark.parametrize("B", [1, 3])
def test_delays_of_two_slices_and_learned_states_split_alike(B):
    g = every_fused_op_model(V=5, H=40)
    params = {k: 2 * v for k, v in g.init_params(4).items()}
    prime = np.random.default_rng(0).integers(0, 5, size=(3, B))
    assert_identical(*run_both(g, params, prime, length=80))
    g = softplus_exp_model(V=5, H=36)
    params = {k: 2 * v for k, v in g.init_params(5, np.float32).items()}
    assert_identical(*run_both(g, params, prime, length=80, top_k=2))


def test_the_split_loop_waits_only_where_threads_exchange_entries():
    """An LSTM stack meets three times a step: before each layer's product (which reads the whole
    input) and before the output product, which is small and runs on thread 0, as does the sampling
    after it. Each thread computes the entries of a gate product its share of the gate loop reads
    (the same quarter of each gate block), so the loop needs no meeting after the product."""
    g = char_model(V=75, H=128, cell="lstm", layers=2)
    gen = Generator(g, "tok", "y", jit=True, threads=2)
    code = feedsplit.write(gen, 2, np.float32)
    assert code.count("barrier(BAR, 2)") == 3
    assert ("linear_pieces_own(S_v2, W_v3_cols0_64_cols128_192_cols256_320_cols384_448, P_p1, S_v3, "
            "(0, 128, 256, 384,), 64, OWN[PART])") in code and "PART == 1" in code
    assert ("linear_pieces_own(S_v2, W_v3_cols64_128_cols192_256_cols320_384_cols448_512, P_p1, S_v3, "
            "(64, 192, 320, 448,), 64, OWN[PART])") in code
    assert code.count("linear_columns(R_") == 1  # the output product, on one thread, from the whole weights
    assert "linear_columns(R_v31[t % 2], W_v32, P_p5, S_v32, 0, 75, 0)" in code


def test_a_thread_copies_the_columns_of_its_pieces_side_by_side():
    w = np.arange(4 * 8, dtype=np.float32).reshape(4, 8)
    name = feedsplit.columns_name("W_v3", [(0, 2), (4, 6)])
    bind = {"W_v3": w}
    feedsplit.bind_columns(bind, [name])
    np.testing.assert_array_equal(bind[name], w[:, [0, 1, 4, 5]])
    assert bind[name].flags.c_contiguous


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_thread_sums_its_products_a_page_away_from_the_others(dtype):
    """The blocks the threads sum their shares of a product in hold the widest product's rows, and
    from the end of one thread's rows to the next thread's block lies at least a page."""
    g = char_model(V=75, H=128, cell="lstm", layers=2)
    gen = Generator(g, "tok", "y", jit=True, threads=2)
    own = feedsplit.own_blocks(gen, 3, 4, dtype)
    item = np.dtype(dtype).itemsize
    used = 4 * 512 * item  # 4 rows of a gate product's 512 columns
    assert own.shape[0] == 3 and own.dtype == dtype
    assert own.strides[0] - used >= feedsplit.PAGE
    assert own.ctypes.data % 64 == 0 and own.strides[0] % feedsplit.PAGE == 0


def test_when_the_split_is_taken(monkeypatch):
    big = char_model(V=75, H=128, cell="lstm", layers=2)  # about 1 MB of float32 weights
    small = char_model(V=11, H=16)
    auto = Generator(big, "tok", "y", jit=True)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n, why = auto.threads_for(1, np.float32)
    if feedsplit.usable_cores() >= 2:
        assert n == 2, why
    assert Generator(small, "tok", "y", jit=True).threads_for(1, np.float32)[0] == 1
    assert auto.threads_for(64, np.float32)[0] == min(2, feedsplit.usable_cores())  # rows of its own a thread
    assert auto.threads_for(1, np.float16)[0] == 1
    assert Generator(big, "tok", "y", jit=False, threads=2).threads_for(1, np.float32)[0] == 1
    assert Generator(big, "tok", "y", jit=True, threads=1).threads_for(1, np.float32)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    n, why = auto.threads_for(1, np.float32)
    assert n == 1 and "OMP_NUM_THREADS=1" in why
    # asked for, it splits even a small model
    assert Generator(small, "tok", "y", jit=True, threads=2).threads_for(2, np.float64)[0] == 2


def test_one_thread_runs_when_the_rule_says_so():
    g = char_model(V=11, H=16)
    gen = Generator(g, "tok", "y", jit=True)
    gen.run(g.init_params(0), length=5, prime=np.array([[1]]), rng=np.random.default_rng(0))
    assert gen.ran_on == 1


def test_a_bad_thread_count_is_refused():
    with pytest.raises(ValueError, match="threads"):
        Generator(char_model(), "tok", "y", threads=0)


def test_a_failing_thread_releases_the_others():
    """Thread 1 fails before its first barrier: thread 0, waiting there, returns, and the failure is raised."""
    met = []

    def part(p, bar):
        if p == 1:
            raise RuntimeError("part 1 failed")
        for _ in range(3):
            if not spin.barrier(bar, 2):
                return
            met.append(p)

    with pytest.raises(RuntimeError, match="part 1 failed"):
        feedsplit.run(part, 2, [])
    assert met == []


def test_threads_that_stop_on_a_busy_machine_leave_the_rest_to_one(monkeypatch):
    """Waits that yielded the core too often stop the threads at one barrier (here the first, as if
    the run had already yielded enough); one thread finishes the run from that step, and the tokens
    and states are still those of one thread."""
    g = char_model(V=11, H=48, cell="lstm")
    params = g.init_params(3, np.float32)
    prime = np.array([[1, 2], [3, 4]])
    one = Generator(g, "tok", "y", jit=True, threads=1).run(params, length=50, prime=prime, rng=np.random.default_rng(2))

    def busy_barrier():
        bar = spin.aligned_zeros((4 * 8,), np.int64)
        bar[spin.YIELDED] = spin.YIELDS + 1
        return bar

    monkeypatch.setattr(spin, "new_barrier", busy_barrier)
    gen = Generator(g, "tok", "y", jit=True, threads=2)
    two = gen.run(params, length=50, prime=prime, rng=np.random.default_rng(2))
    assert gen.ran_on == 2 and gen.alone_from == 0
    assert_identical(one, two)


def test_the_one_thread_loop_is_compiled_before_a_shared_run_needs_it(monkeypatch):
    """The loop that finishes a run whose threads stopped is ready before the threads start: compiled
    at its first use instead, a busy moment would stall that run while Numba compiles it. Readied,
    it runs no step: the tokens are those of one thread."""
    g = char_model(V=11, H=48, cell="lstm")
    params = g.init_params(3, np.float32)
    prime = np.array([[1, 2], [3, 4]])
    gen = Generator(g, "tok", "y", jit=True, threads=2)
    first_steps = []

    def shared(fn, threads, args, real=feedsplit.run):
        first_steps.append(len(gen._fn.signatures))  # what the one-thread loop has compiled by now
        return real(fn, threads, args)

    monkeypatch.setattr(feedsplit, "run", shared)
    two = gen.run(params, length=50, prime=prime, rng=np.random.default_rng(2))
    assert gen.ran_on == 2 and gen.alone_from is None and first_steps == [1]
    one = Generator(g, "tok", "y", jit=True, threads=1).run(params, length=50, prime=prime, rng=np.random.default_rng(2))
    assert_identical(one, two)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_thread_computes_its_columns_from_its_own_copy_as_from_the_whole_weights(rows, dtype):
    """Each thread reads a contiguous copy of its columns; the entries are those the whole weights
    give, bit for bit, zero inputs (a one-hot row's) skipped alike."""
    from unrolled.engines.compiled.kernels.sampling import linear_columns, matmul_columns

    rng = np.random.default_rng(3)
    x = rng.standard_normal((rows, 203)).astype(dtype)
    x[:, 4:80] = 0  # whole groups of four zeros, and a group with one non-zero
    x[:, 41] = 1
    W = rng.standard_normal((203, 512)).astype(dtype)
    bias = rng.standard_normal(512).astype(dtype)
    bind = {"W_v3": W}
    names = [feedsplit.columns_name("W_v3", [span]) for span in ((0, 240), (240, 512))]
    feedsplit.bind_columns(bind, names)
    whole, shared = np.zeros((rows, 512), dtype), np.full((rows, 512), np.nan, dtype)
    linear_columns(x, W, bias, whole, 0, 512, 0)
    for name, (lo, hi) in zip(names, ((0, 240), (240, 512))):
        copy = bind[name]
        assert copy.flags.c_contiguous and copy.shape == (203, hi - lo)
        np.testing.assert_array_equal(copy, W[:, lo:hi])
        linear_columns(x, copy, bias, shared, lo, hi, 0)
    np.testing.assert_array_equal(shared, whole)
    np.testing.assert_allclose(whole, x @ W + bias, rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-4)
    matmul_columns(x, bind[names[1]], shared, 240, 512, 0)
    matmul_columns(x, W, whole, 240, 512, 240)
    np.testing.assert_array_equal(shared, whole)
