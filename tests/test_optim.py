"""Optimizers against torch.optim in float64, and exact resume from saved state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unrolled.train.optim import OPTIMIZERS, Adam, make_optimizer, optimizer_from_state

SHAPES = {"W": (4, 3), "b": (3,), "h0/x": (2, 2, 2)}
TORCH = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
CASES = [
    ("sgd", 0.1, {}),
    ("sgd", 0.1, {"weight_decay": 0.1}),
    ("sgd", 0.05, {"momentum": 0.9}),
    ("sgd", 0.05, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("sgd", 0.05, {"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.02}),
    ("adagrad", 0.1, {}),
    ("adagrad", 0.1, {"lr_decay": 0.05, "weight_decay": 0.1, "initial_accumulator_value": 0.3}),
    ("rmsprop", 0.01, {}),
    ("rmsprop", 0.01, {"momentum": 0.9, "weight_decay": 0.05}),
    ("rmsprop", 0.01, {"centered": True, "momentum": 0.5, "alpha": 0.9}),
    ("adam", 0.01, {}),
    ("adam", 0.01, {"weight_decay": 0.1, "betas": (0.8, 0.99)}),
    ("adam", 0.01, {"amsgrad": True, "eps": 1e-6}),
    ("adamw", 0.01, {}),
    ("adamw", 0.01, {"weight_decay": 0.3, "amsgrad": True}),
]


def _problem(rng, steps, dtype=np.float64):
    params = {n: rng.normal(size=s).astype(dtype) for n, s in SHAPES.items()}
    grads = [{n: rng.normal(size=s).astype(dtype) for n, s in SHAPES.items()} for _ in range(steps)]
    return params, grads


def _torch_run(name, lr, kw, params, grads, lrs):
    tparams = {n: torch.tensor(p, requires_grad=True) for n, p in params.items()}
    extra = {} if name == "sgd" else {"foreach": False}
    opt = TORCH[name](list(tparams.values()), lr=lr, **kw, **extra)
    for g, step_lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = step_lr
        for n, t in tparams.items():
            t.grad = torch.tensor(g[n])
        opt.step()
    return {n: t.detach().numpy() for n, t in tparams.items()}


@pytest.mark.parametrize("name, lr, kw", CASES, ids=[f"{c[0]}-{'-'.join(c[2]) or 'plain'}" for c in CASES])
def test_matches_torch_float64(name, lr, kw, rng):
    params, grads = _problem(rng, 10)
    lrs = [lr * (1 + 0.1 * k) for k in range(10)]  # exercises the per-step override
    expected = _torch_run(name, lr, kw, params, grads, lrs)
    opt = make_optimizer(name, lr, **kw)
    ours = {n: p.copy() for n, p in params.items()}
    for g, step_lr in zip(grads, lrs):
        opt.step(ours, g, lr=step_lr)
    for n in params:
        np.testing.assert_allclose(ours[n], expected[n], rtol=1e-12, atol=1e-14, err_msg=n)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_float32_stays_float32_and_matches_torch(name, rng):
    kw = {"momentum": 0.9} if name in ("sgd", "rmsprop") else {}
    params, grads = _problem(rng, 5, np.float32)
    expected = _torch_run(name, 0.01, kw, params, grads, [0.01] * 5)
    opt = make_optimizer(name, 0.01, **kw)
    ours = {n: p.copy() for n, p in params.items()}
    for g in grads:
        opt.step(ours, {n: a.astype(np.float64) for n, a in g.items()})  # grads are cast down, not params up
    for n in params:
        assert ours[n].dtype == np.float32
        np.testing.assert_allclose(ours[n], expected[n], rtol=2e-5, atol=1e-6)
    assert all(a.dtype == np.float32 for a in opt.state_arrays().values())


def test_grads_are_not_modified(rng):
    params, grads = _problem(rng, 1)
    before = {n: g.copy() for n, g in grads[0].items()}
    make_optimizer("sgd", 0.1, momentum=0.9, weight_decay=0.1).step(params, grads[0])
    make_optimizer("adam", 0.1, weight_decay=0.1).step(params, grads[0])
    for n in before:
        np.testing.assert_array_equal(grads[0][n], before[n])


@pytest.mark.parametrize("name, lr, kw", CASES, ids=[f"{c[0]}-{'-'.join(c[2]) or 'plain'}" for c in CASES])
def test_resume_mid_run_is_bit_identical(name, lr, kw, rng):
    params, grads = _problem(rng, 8)
    straight = {n: p.copy() for n, p in params.items()}
    opt = make_optimizer(name, lr, **kw)
    for g in grads:
        opt.step(straight, g)

    first = {n: p.copy() for n, p in params.items()}
    opt1 = make_optimizer(name, lr, **kw)
    for g in grads[:4]:
        opt1.step(first, g)
    arrays, meta = opt1.state_arrays(), json.loads(json.dumps(opt1.state_meta()))
    resumed = {n: p.copy() for n, p in first.items()}
    opt2 = optimizer_from_state(arrays, meta)
    opt3 = make_optimizer(name, 123.0)  # a different lr: load_state restores the saved one
    opt3.load_state(arrays, meta)
    again = {n: p.copy() for n, p in first.items()}
    for g in grads[4:]:
        opt2.step(resumed, g)
        opt3.step(again, g)
    for n in params:
        np.testing.assert_array_equal(resumed[n], straight[n])
        np.testing.assert_array_equal(again[n], straight[n])
    assert opt2.state_meta() == opt.state_meta()


def test_state_meta_is_plain_json():
    opt = Adam(0.01, betas=(0.5, 0.6))
    meta = opt.state_meta()
    assert json.loads(json.dumps(meta)) == meta
    assert meta == {"name": "adam", "steps": {},
                    "hyperparameters": {"lr": 0.01, "betas": [0.5, 0.6], "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}}


def test_torch_defaults():
    assert make_optimizer("adamw", 1e-3).weight_decay == 0.01
    assert make_optimizer("adagrad", 1e-2).eps == 1e-10
    rms = make_optimizer("RMSprop", 1e-2)
    assert (rms.alpha, rms.eps) == (0.99, 1e-8)


def test_unknown_optimizer_lists_known_names():
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'; known optimizers: adagrad, adam, adamw, rmsprop, sgd"):
        make_optimizer("adamx", 0.1)


def test_unknown_hyperparameter_lists_accepted_ones():
    with pytest.raises(ValueError, match="optimizer 'sgd' has no hyperparameter 'beta'; it takes lr, momentum"):
        make_optimizer("sgd", 0.1, beta=0.9)


@pytest.mark.parametrize("kw, match", [
    ({"lr": -1.0}, r"sgd: lr must be in \[0.0, inf\]"),
    ({"lr": 0.1, "nesterov": True}, "nesterov needs momentum > 0"),
    ({"lr": float("nan")}, "lr must be in"),
])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer("sgd", **kw)


def test_bad_betas():
    with pytest.raises(ValueError, match=r"adam: betas\[1\] must be in \[0.0, 1.0\), got 1.0"):
        make_optimizer("adam", 0.1, betas=(0.9, 1.0))


def test_mismatched_grads_are_rejected_before_any_update(rng):
    params, grads = _problem(rng, 1)
    g = dict(grads[0])
    original = {n: p.copy() for n, p in params.items()}
    opt = make_optimizer("sgd", 0.1)
    with pytest.raises(ValueError, match="no gradient for parameter 'b'"):
        opt.step(params, {k: v for k, v in g.items() if k != "b"})
    with pytest.raises(ValueError, match="gradient 'c' has no parameter"):
        opt.step(params, {**g, "c": g["b"]})
    with pytest.raises(ValueError, match=r"gradient of 'h0/x' is \[2, 2\] but the parameter is \[2, 2, 2\]"):
        opt.step(params, {**g, "h0/x": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="parameter 'W' is int64"):
        opt.step({**params, "W": np.zeros((4, 3), dtype=np.int64)}, g)
    for n in params:
        np.testing.assert_array_equal(params[n], original[n])


def test_loading_state_of_another_optimizer_or_model_fails(rng):
    params, grads = _problem(rng, 1)
    adam = make_optimizer("adam", 0.1)
    adam.step(params, grads[0])
    with pytest.raises(ValueError, match="saved optimizer state is for 'adam', but this optimizer is 'sgd'"):
        make_optimizer("sgd", 0.1).load_state(adam.state_arrays(), adam.state_meta())
    with pytest.raises(ValueError, match="'bogus/W' is not a 'adam' state"):
        make_optimizer("adam", 0.1).load_state({"bogus/W": np.zeros(2)}, adam.state_meta())
    other = make_optimizer("adam", 0.1)
    other.load_state(adam.state_arrays(), adam.state_meta())
    with pytest.raises(ValueError, match=r"state 'exp_avg/W' is \[4, 3\] float64 but parameter 'W' is \[3, 3\]"):
        other.step({"W": np.zeros((3, 3))}, {"W": np.zeros((3, 3))})


def test_state_loaded_over_a_stepped_optimizer_is_checked_again(rng):
    """The per-step check remembers which parameters' state fitted; a load must make it look again."""
    params, grads = _problem(rng, 1)
    small = {"W": np.zeros((3, 3)), "b": np.zeros(3), "h0/x": np.zeros((2, 2, 2))}
    other = make_optimizer("adam", 0.1)
    other.step(small, {k: np.ones_like(a) for k, a in small.items()})
    adam = make_optimizer("adam", 0.1)
    adam.step(params, grads[0])
    other.load_state(adam.state_arrays(), adam.state_meta())
    with pytest.raises(ValueError, match=r"state 'exp_avg/W' is \[4, 3\] float64 but parameter 'W' is \[3, 3\]"):
        other.step(small, {k: np.ones_like(a) for k, a in small.items()})


@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_state_loaded_in_fortran_order_updates_as_saved(name, rng):
    """Loaded state is stored C-ordered, the layout the one-pass kernels read without checking."""
    params, grads = _problem(rng, 3)
    opt = make_optimizer(name, 0.1)
    opt.step(params, grads[0])
    arrays, meta = opt.state_arrays(), opt.state_meta()
    twin = {k: a.copy() for k, a in params.items()}
    a, b = make_optimizer(name, 0.1), make_optimizer(name, 0.1)
    a.load_state(arrays, meta)
    b.load_state({k: np.asfortranarray(v) for k, v in arrays.items()}, meta)
    for g in grads[1:]:
        a.step(params, g)
        b.step(twin, g)
    for k in params:
        np.testing.assert_array_equal(params[k], twin[k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, lr, kw", [c for c in CASES if c[0] in ("adagrad", "adam", "adamw")],
                         ids=lambda c: str(c))
def test_numba_kernels_are_bit_identical_to_numpy(name, lr, kw, dtype, rng, monkeypatch):
    """The one-pass Numba updates (taken when Numba may run) give exactly the NumPy rule's bits."""
    pytest.importorskip("numba")
    from unrolled.engines.compiled.kernels import optimizers as optim_kernels
    from unrolled.train import optim

    params, grads = _problem(rng, 6, dtype)
    runs = {}
    for kernels in (False, optim_kernels):
        monkeypatch.setattr(optim, "_KERNELS", kernels)
        opt = make_optimizer(name, lr, **kw)
        ours = {n: p.copy() for n, p in params.items()}
        for k, g in enumerate(grads):
            opt.step(ours, g, lr=lr * (1 + 0.1 * k))
        runs[kernels is not False] = (ours, opt.state_arrays())
    (p0, s0), (p1, s1) = runs[False], runs[True]
    for n in params:
        np.testing.assert_array_equal(p1[n], p0[n], err_msg=n)
    assert set(s0) == set(s1)
    for n in s0:
        np.testing.assert_array_equal(s1[n], s0[n], err_msg=n)
