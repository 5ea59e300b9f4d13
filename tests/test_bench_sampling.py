"""Batched sampling (W7) as each peer writes it: every stream starts from the seed character and
draws its own tokens, so chars/s counts characters of genuinely separate texts."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import corpus as corpus_mod  # noqa: E402
from benchmarks import workloads  # noqa: E402

T, B = 40, 5


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 20, encoding="utf-8")
    return corpus_mod.load(path)


def small(B: int = B):
    """W7's shape of run at a size a test can afford: random weights, a few streams."""
    return dataclasses.replace(workloads.get("W7"), hidden=16, T=T, B=B)


def check_streams(tokens: np.ndarray, V: int, B: int = B) -> None:
    assert tokens.shape == (T, B)
    assert tokens.min() >= 0 and tokens.max() < V
    assert len({tuple(tokens[:, b]) for b in range(B)}) == B  # every stream its own text


def test_w7_samples_many_streams_of_w4s_model():
    w4, w7 = workloads.get("W4"), workloads.get("W7")
    assert (w7.kind, w7.cell, w7.hidden, w7.layers) == ("sample", w4.cell, w4.hidden, w4.layers)
    assert w7.B > 1 and w7.flops_per_char == w4.flops_per_char


def test_unrolled_draws_every_stream_on_its_own(corpus):
    from benchmarks.peer_unrolled import sampler

    generate, _ = sampler(small(), corpus, seed=0)
    check_streams(generate(), corpus.V)
    one, _ = sampler(small(B=1), corpus, seed=0)
    assert one().shape == (T, 1)


def test_torch_draws_every_stream_on_its_own(corpus):
    torch = pytest.importorskip("torch")
    from benchmarks.peer_torch import sampler

    torch.manual_seed(0)
    check_streams(torch.stack(sampler(small(), corpus)()).numpy(), corpus.V)
    one = sampler(small(B=1), corpus)()
    assert len(one) == T and all(isinstance(ix, int) for ix in one)  # W4: the token back as an int


def test_jax_draws_every_stream_on_its_own(corpus):
    jax = pytest.importorskip("jax")
    from benchmarks.peer_jax import _init, sampler

    key = jax.random.PRNGKey(0)
    params = _init(small(), corpus.V, key)
    tokens, _ = jax.jit(sampler(small(), corpus))(params, key)
    check_streams(np.asarray(tokens), corpus.V)
    one, _ = jax.jit(sampler(small(B=1), corpus))(params, key)
    assert one.shape == (T,)
