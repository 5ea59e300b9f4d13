"""benchmarks/stretches.py: the split sampler's loop with a cycle count around each stretch draws the
same tokens as the loop itself, and counts cycles in every stretch that works on each thread."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from test_generate import char_model  # noqa: E402

from benchmarks import stretches  # noqa: E402
from unrolled.engines.compiled.feedback import Generator  # noqa: E402


def test_instrumented_loop_draws_the_same_tokens_and_counts_each_stretch():
    g = char_model(V=7, H=32)
    params = {k: v.astype(np.float32) for k, v in g.init_params(3).items()}
    prime = np.array([[1]])

    def run(gen):
        return gen.run(params, length=60, prime=prime, rng=np.random.default_rng(11))

    gen = Generator(g, "tok", "y", jit=True, threads=2)
    plain = run(gen)
    assert gen.ran_on == 2
    ticks, names = stretches.time_stretches(gen)
    timed = run(gen)
    np.testing.assert_array_equal(plain[0], timed[0])
    for k in plain[1]:
        np.testing.assert_array_equal(plain[1][k], timed[1][k], err_msg=k)

    assert names[0] == "feed" and "sample" in names and any(n.startswith("wait") for n in names)
    products = [i for i, n in enumerate(names) if n.endswith(".z")]  # each layer's gate product
    assert len(products) == 2
    assert (ticks[:, products] > 0).all()  # both threads work in each shared product
    assert ticks[0, names.index("sample")] > 0 and ticks[1, names.index("sample")] < ticks[0, names.index("sample")]


def test_instrument_refuses_a_generator_that_never_split():
    gen = Generator(char_model(), "tok", "y", jit=True, threads=1)
    gen.run(char_model().init_params(0), length=3, prime=np.array([[0]]), rng=np.random.default_rng(0))
    with pytest.raises(SystemExit, match="1 thread"):
        stretches.time_stretches(gen)
