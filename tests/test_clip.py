"""Gradient clipping against torch.nn.utils, plus the overflow and NaN cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unrolled.train.clip import clip_by_global_norm, clip_by_value, global_norm


def _grads(rng, scale=1.0, dtype=np.float64):
    return {"W": (scale * rng.normal(size=(5, 4))).astype(dtype), "b": (scale * rng.normal(size=4)).astype(dtype),
            "x/y": (scale * rng.normal(size=(2, 3, 2))).astype(dtype)}


def _torch_clip_norm(grads, max_norm):
    ts = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads.values()]
    for t, g in zip(ts, grads.values()):
        t.grad = torch.tensor(g)
    norm = torch.nn.utils.clip_grad_norm_(ts, max_norm, foreach=False)
    return float(norm), [t.grad.numpy() for t in ts]


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_global_norm_matches_torch(max_norm, rng):
    grads = _grads(rng)
    norm_t, clipped_t = _torch_clip_norm(grads, max_norm)
    norm = clip_by_global_norm(grads, max_norm)
    assert norm == pytest.approx(norm_t, rel=1e-13)
    for ours, theirs in zip(grads.values(), clipped_t):
        np.testing.assert_allclose(ours, theirs, rtol=1e-13, atol=0)


def test_clipped_norm_is_max_norm_and_returned_norm_is_before(rng):
    grads = _grads(rng, scale=10.0)
    before = global_norm(grads)
    assert clip_by_global_norm(grads, 1.0) == before
    assert global_norm(grads) == pytest.approx(1.0, rel=1e-5)


def test_value_clip_matches_torch(rng):
    grads = _grads(rng)
    ts = [torch.tensor(g) for g in grads.values()]
    params = [torch.zeros(t.shape, dtype=torch.float64, requires_grad=True) for t in ts]
    for p, t in zip(params, ts):
        p.grad = t.clone()
    torch.nn.utils.clip_grad_value_(params, 0.7)
    clip_by_value(grads, 0.7)
    for ours, p in zip(grads.values(), params):
        np.testing.assert_array_equal(ours, p.grad.numpy())
    assert max(np.abs(g).max() for g in grads.values()) == 0.7


def test_float32_stays_float32_and_does_not_overflow():
    grads = {"W": np.full((1000,), 1e30, dtype=np.float32)}  # squares overflow float32
    norm = clip_by_global_norm(grads, 1.0)
    assert norm == pytest.approx(1e30 * math.sqrt(1000), rel=1e-6)
    assert grads["W"].dtype == np.float32
    assert float(np.linalg.norm(grads["W"].astype(np.float64))) == pytest.approx(1.0, rel=1e-5)


def test_huge_and_tiny_float64():
    assert global_norm({"a": np.array([3e200, 4e200])}) == pytest.approx(5e200)
    assert global_norm({"a": np.array([3e-200]), "b": np.array([4e-200])}) == pytest.approx(5e-200)
    assert global_norm({"a": np.array([1e300, 1e-300])}) == pytest.approx(1e300)


def test_zero_and_empty():
    grads = {"a": np.zeros(3), "b": np.zeros((0, 2))}
    assert clip_by_global_norm(grads, 1.0) == 0.0
    assert global_norm({}) == 0.0


def test_non_finite_norm_is_returned_and_grads_untouched():
    grads = {"a": np.array([1.0, np.inf]), "b": np.array([2.0])}
    assert clip_by_global_norm(grads, 1.0) == math.inf
    np.testing.assert_array_equal(grads["b"], [2.0])
    assert math.isnan(global_norm({"a": np.array([np.inf, np.nan])}))
    assert math.isnan(global_norm({"a": np.array([np.inf]), "b": np.array([np.nan])}))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "x"])
def test_bad_limits(bad):
    with pytest.raises(ValueError, match="must be a positive number"):
        clip_by_global_norm({"a": np.ones(2)}, bad)
    with pytest.raises(ValueError, match="must be a positive number"):
        clip_by_value({"a": np.ones(2)}, bad)


def test_numba_sum_of_squares_matches_numpy_norm(rng, monkeypatch):
    """float32 gradients take Numba's one pass when it may run: the same norm, non-finite ones still caught."""
    pytest.importorskip("numba")
    from unrolled.engines.compiled.kernels import optimizers as optim_kernels
    from unrolled.train import optim

    grads = {"W": rng.normal(size=(40, 30)).astype(np.float32) * 1e18, "b": rng.normal(size=7).astype(np.float32)}
    monkeypatch.setattr(optim, "_KERNELS", False)
    expected = global_norm(grads)
    monkeypatch.setattr(optim, "_KERNELS", optim_kernels)
    assert global_norm(grads) == pytest.approx(expected, rel=1e-12)
    assert global_norm({"a": np.array([np.inf, 1], dtype=np.float32)}) == math.inf
    assert math.isnan(global_norm({"a": np.array([np.inf, np.nan], dtype=np.float32)}))


def test_numba_clip_by_value_matches_numpy(rng, monkeypatch):
    """The one-pass clamp gives np.clip's result bit for bit: NaN kept, infinities clamped, both precisions."""
    pytest.importorskip("numba")
    from unrolled.engines.compiled.kernels import optimizers as optim_kernels
    from unrolled.train import optim

    def grads():
        out = {}
        for dtype in (np.float32, np.float64):
            a = (rng.normal(size=(6, 5)) * 4).astype(dtype)
            a[0, :3] = [np.nan, np.inf, -np.inf]
            out[f"W{np.dtype(dtype).itemsize}"] = a
        out["strided"] = (rng.normal(size=(8, 8)) * 4)[:, ::2]  # not contiguous: NumPy's path
        return out

    expected, got = grads(), {}
    for k, v in expected.items():
        got[k] = v.copy() if v.flags.c_contiguous else np.lib.stride_tricks.as_strided(v.base.copy(), v.shape, v.strides)
    monkeypatch.setattr(optim, "_KERNELS", False)
    clip_by_value(expected, 2.5)
    monkeypatch.setattr(optim, "_KERNELS", optim_kernels)
    clip_by_value(got, 2.5)
    for k in expected:
        assert got[k].dtype == expected[k].dtype
        np.testing.assert_array_equal(got[k], expected[k])
    assert np.isnan(got["W4"][0, 0]) and got["W8"][0, 1] == 2.5 and got["W8"][0, 2] == -2.5
