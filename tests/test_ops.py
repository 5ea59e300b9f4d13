"""Every op's vector-Jacobian product against central finite differences, one line per op.

The helper builds the operands, draws a random cotangent ``g`` for the
output and compares ``vjp(g)`` with the numerical gradient of
``sum(g * forward(...))`` in float64. A parameter operand has no batch axis;
its broadcast gradient is summed with :func:`ops.unbroadcast`, as the
engines do. Extreme inputs (sigmoid at ±300, logits of 1e4) come last.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from helpers import numeric_grad, relative_error

from unrolled.graph import ops
from unrolled.graph.ops import OPS, ArgSpec, unbroadcast

B = 3


class V:
    """A vertex operand: a dense ``[B, n]`` batch, kept away from relu's kink at 0."""

    def __init__(self, n: int):
        self.n = n

    def make(self, rng):
        return rng.choice([-1.0, 1.0], (B, self.n)) * rng.uniform(0.1, 1.5, (B, self.n))

    def spec(self, name):
        return ArgSpec(name, (self.n,))


class P:
    """A parameter operand: its own shape, no batch axis."""

    def __init__(self, *shape: int):
        self.shape = shape

    def make(self, rng):
        return rng.normal(size=self.shape)

    def spec(self, name):
        return ArgSpec(name, self.shape, is_param=True)


class I:  # noqa: E742 - the letter reads as "index" next to V and P
    """An index operand: ``[B]`` class numbers below ``n`` (repeats on purpose)."""

    def __init__(self, n: int):
        self.n = n

    def make(self, rng):
        return np.array([1, self.n - 1, 1][:B])

    def spec(self, name):
        return ArgSpec(name, (self.n,), is_index=True)


# One line per op (several for ops with parameter operands): op, operands, attributes.
CASES = [
    ("matmul", [P(3, 4), V(4)], {}),
    ("linear", [P(3, 4), V(4), P(3)], {}),
    ("add", [V(4), V(4)], {}),
    ("add", [P(4), V(4)], {}),
    ("add", [V(4), P(4)], {}),
    ("sub", [V(4), V(4)], {}),
    ("sub", [P(4), V(4)], {}),
    ("mul", [V(4), V(4)], {}),
    ("mul", [V(4), P(4)], {}),
    ("scale", [V(4)], {"c": -1.7}),
    ("one_minus", [V(4)], {}),
    ("concat", [V(2), V(3), V(1)], {}),
    ("slice", [V(5)], {"start": 1, "stop": 4}),
    ("tanh", [V(4)], {}),
    ("sigmoid", [V(4)], {}),
    ("relu", [V(4)], {}),
    ("identity", [V(4)], {}),
    ("softplus", [V(4)], {}),
    ("exp", [V(4)], {}),
    ("softmax", [V(4)], {}),
    ("log_softmax", [V(4)], {}),
    ("embedding", [P(5, 3), I(5)], {}),
    ("one_hot", [I(5)], {"n": 5}),
    ("cross_entropy", [V(4), I(4)], {}),
    ("mse", [V(4), V(4)], {}),
]


def case_id(case) -> str:
    op, args, _ = case
    return op + "".join("_param" + str(i) for i, a in enumerate(args) if isinstance(a, P) and op in ("add", "sub", "mul"))


def check_vjp(op: str, operands, attrs: dict, rng) -> dict[int, float]:
    """The VJP of ``op`` against central differences; returns the relative error per differentiable operand."""
    spec = OPS[op]
    attrs = dict(attrs, dtype=np.float64)
    args = [a.make(rng) for a in operands]
    size = spec.shape([a.spec(f"a{i}") for i, a in enumerate(operands)], attrs)
    out = spec.forward(args, attrs)
    assert out.shape == (B, size), f"{op}: the shape rule says [{size}] but forward gave {out.shape}"
    cotangent = rng.normal(size=out.shape)
    grads = spec.vjp(cotangent, args, out, attrs)
    assert len(grads) == len(args)
    errors = {}
    for i, (a, ga) in enumerate(zip(operands, grads)):
        if isinstance(a, I):
            assert ga is None, f"{op}: an index operand has no gradient"
            continue
        assert ga is not None, f"{op}: operand {i} is differentiable but the VJP returned None"
        if isinstance(a, P):
            ga = unbroadcast(ga, a.shape)
        assert ga.shape == args[i].shape
        numeric = numeric_grad(lambda: float(np.sum(cotangent * spec.forward(args, attrs))), args[i])
        errors[i] = relative_error(numeric, ga)
    return errors


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_vjp_matches_finite_differences(case, rng):
    op, operands, attrs = case
    errors = check_vjp(op, operands, attrs, rng)
    assert all(e <= 1e-6 for e in errors.values()), f"{op}: relative errors {errors}"


def test_every_op_has_a_case():
    """Adding an op to the table without a line in CASES fails here."""
    assert set(OPS) == {c[0] for c in CASES}


def test_unbroadcast_sums_the_batch_axis_only():
    g = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(unbroadcast(g, (4,)), g.sum(axis=0))
    np.testing.assert_array_equal(unbroadcast(g, (3, 4)), g)


def test_param_operand_broadcasts_over_the_batch(rng):
    """add(b [F], x [B, F]) adds b to every row; b's gradient is the batch sum of the cotangent."""
    b, x = rng.normal(size=4), rng.normal(size=(B, 4))
    out = OPS["add"].forward([b, x], {})
    np.testing.assert_array_equal(out, x + b[None, :])
    cot = rng.normal(size=(B, 4))
    gb, gx = OPS["add"].vjp(cot, [b, x], out, {})
    np.testing.assert_allclose(unbroadcast(gb, b.shape), cot.sum(axis=0), rtol=1e-15)
    np.testing.assert_array_equal(gx, cot)


def test_one_hot_and_embedding_values():
    idx = np.array([2, 0, 2])
    np.testing.assert_array_equal(OPS["one_hot"].forward([idx], {"n": 3, "dtype": np.float32}),
                                  np.eye(3, dtype=np.float32)[idx])
    assert OPS["one_hot"].forward([idx], {"n": 3, "dtype": np.float32}).dtype == np.float32
    E = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(OPS["embedding"].forward([E, idx], {}), E[idx])
    # a token that occurs twice in the batch collects both rows' gradients
    gE, gi = OPS["embedding"].vjp(np.ones((3, 4)), [E, idx], E[idx], {})
    np.testing.assert_array_equal(gE, [[1] * 4, [0] * 4, [2] * 4])
    assert gi is None


def test_losses_by_hand():
    logits = np.log(np.array([[1.0, 2.0, 1.0]]))  # probabilities 1/4, 1/2, 1/4
    np.testing.assert_allclose(OPS["cross_entropy"].forward([logits, np.array([1])], {}), [[np.log(2)]])
    p, y = np.array([[1.0, 2.0]]), np.array([[0.0, 0.0]])
    np.testing.assert_allclose(OPS["mse"].forward([p, y], {}), [[2.5]])  # mean over features


# ------------------------------------------------------------ extreme inputs


@pytest.fixture
def strict():
    """Any NumPy floating-point event or warning is an error here, whatever conftest says."""
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_saturates_without_warnings(strict, dtype):
    x = np.array([[300.0, -300.0, 1000.0, -1000.0, 0.0]], dtype=dtype)
    s = OPS["sigmoid"].forward([x], {})
    assert s.dtype == dtype
    assert s[0, 0] == 1.0 and s[0, 2] == 1.0 and s[0, 4] == 0.5
    assert 0.0 <= s[0, 1] <= 1e-130 and s[0, 3] == 0.0
    if dtype == np.float64:
        np.testing.assert_allclose(s[0, 1], np.exp(-300.0), rtol=1e-12)
    else:
        assert s[0, 1] == 0.0  # below float32's smallest number
    np.testing.assert_array_equal(s + OPS["sigmoid"].forward([-x], {}), 1.0)
    (grad,) = OPS["sigmoid"].vjp(np.ones_like(x), [x], s, {})
    assert np.all(np.isfinite(grad)) and grad.dtype == dtype
    assert grad[0, 0] == 0.0 and grad[0, 1] <= 1e-130 and grad[0, 4] == 0.25


def test_tanh_saturates(strict):
    x = np.array([[300.0, -300.0]])
    t = OPS["tanh"].forward([x], {})
    np.testing.assert_array_equal(t, [[1.0, -1.0]])
    np.testing.assert_array_equal(OPS["tanh"].vjp(np.ones_like(x), [x], t, {})[0], [[0.0, 0.0]])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_family_with_huge_logits(strict, dtype):
    x = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, -1e4]], dtype=dtype)
    cot = np.array([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0]], dtype=dtype)

    s = OPS["softmax"].forward([x], {})
    np.testing.assert_array_equal(s, [[1, 0, 0], [0.5, 0.5, 0]])
    (gs,) = OPS["softmax"].vjp(cot, [x], s, {})
    assert np.all(np.isfinite(gs))

    ls = OPS["log_softmax"].forward([x], {})
    np.testing.assert_allclose(ls, [[0, -1e4, -2e4], [-np.log(2), -np.log(2), -2e4 - np.log(2)]], rtol=1e-6)
    (gl,) = OPS["log_softmax"].vjp(cot, [x], ls, {})
    assert np.all(np.isfinite(gl))
    np.testing.assert_allclose(gl[0], cot[0] - np.array([1, 0, 0]) * cot[0].sum(), rtol=1e-6)

    target = np.array([2, 0])
    xe = OPS["cross_entropy"].forward([x, target], {})
    np.testing.assert_allclose(xe, [[2e4], [np.log(2)]], rtol=1e-6)
    gx, gt = OPS["cross_entropy"].vjp(np.ones((2, 1), dtype=dtype), [x, target], xe, {})
    np.testing.assert_allclose(gx, [[1, 0, -1], [-0.5, 0.5, 0]], atol=1e-6)
    assert gt is None
    for a in (s, gs, ls, gl, xe, gx):
        assert a.dtype == dtype and np.all(np.isfinite(a))


def test_sigmoid_helper_is_exported_for_other_engines():
    """The compiled engine and the PyTorch comparisons use the same stable helpers."""
    x = np.linspace(-50, 50, 11)
    np.testing.assert_allclose(ops.sigmoid(x), 1 / (1 + np.exp(-x)), rtol=1e-14)
    np.testing.assert_allclose(ops.log_softmax(x[None]), np.log(ops.softmax(x[None])), rtol=1e-12, atol=1e-12)


def test_cross_entropy_rows_match_the_cross_entropy_op():
    """The compiled engine's cross-entropy (value and kept softmax, one Numba pass a row) equals
    the op's, extreme logits too."""
    pytest.importorskip("numba")
    from unrolled.engines.compiled.kernels.rows import cross_entropy_rows
    from unrolled.graph.ops import softmax

    rng = np.random.default_rng(0)
    for dtype, rtol in ((np.float64, 1e-12), (np.float32, 1e-6)):
        z = (rng.normal(size=(6, 5)) * 3).astype(dtype)
        z[0] = [1000, 0, -1000, 5, 5]
        t = np.array([2, 0, 1, 4, 3, 2])
        nll, probs = np.full((6, 1), np.nan, dtype=dtype), np.full_like(z, np.nan)
        cross_entropy_rows(nll, z, t, probs)
        np.testing.assert_allclose(nll, OPS["cross_entropy"].forward([z, t], {}), rtol=rtol)
        np.testing.assert_allclose(probs, softmax(z), rtol=rtol, atol=1e-30)
        assert nll[0, 0] == pytest.approx(2000, rel=1e-6)


def test_what_each_vjp_reads_comes_from_its_formula():
    """The step loops keep for every step what a VJP reads (schedule._stored): operands, output."""
    needs = {name: OPS[name].formula.needs for name in ops.ELEMENTWISE}
    assert needs == {"add": "", "sub": "", "mul": "args", "scale": "", "one_minus": "", "tanh": "out",
                     "sigmoid": "out", "relu": "args", "identity": "", "softplus": "args", "exp": "out"}


def test_every_call_a_formula_makes_has_a_compiled_implementation():
    from unrolled.engines.compiled import fuse

    assert set(ops.FUNCTIONS) - {"abs", "max"} <= set(fuse.SCALAR_FUNCTIONS)  # abs, max: Python's own


def test_each_path_differentiates_every_structural_op_it_runs():
    """A path's structural rules are one dict per direction, keyed by ops of the table; what it
    runs is derived from the keys, so an op it can run forward it can also differentiate."""
    from unrolled.engines.compiled import codegen, feedback, wholestep

    for forward, backward in ((codegen.FORWARD, codegen.BACKWARD), (wholestep.FORWARD, wholestep.BACKWARD)):
        assert set(forward) == set(backward) and set(forward) <= set(OPS) - ops.ELEMENTWISE
    assert set(feedback.LOOP_RULES) <= set(feedback.NUMPY_RULES) <= set(OPS) - ops.ELEMENTWISE
    for supported, rules in ((codegen.INLINE, codegen.FORWARD), (wholestep.SUPPORTED, wholestep.FORWARD),
                             (feedback.JIT_OPS, feedback.NUMPY_RULES)):
        assert supported == ops.ELEMENTWISE | set(rules)


@pytest.mark.parametrize("jit", [False, True], ids=["numpy", "numba-spelling"])
def test_ufunc_spellings_compute_the_formulas(jit):
    """The step loops' ufunc calls, derived from each op's formulas (ufunc_calls.py), compute what
    the op table's NumPy rules compute, run here on NumPy (``sigmoid``: the kernels' name for σ)."""
    from unrolled.engines.compiled import codegen
    from unrolled.engines.compiled.ufunc_calls import spell

    rng = np.random.default_rng(0)
    ns = {name: getattr(np, name) for name in ("add", "subtract", "multiply", "negative", "exp", "reciprocal",
                                               "tanh", "maximum", "copyto", "greater")}
    ns["sigmoid"] = lambda x, out: np.copyto(out, ops.sigmoid(x))
    calls = codegen.loop_calls(jit)
    assert {"add", "mul", "tanh", "sigmoid", "relu", "exp"} <= codegen.Writer.NATIVE
    for name in codegen.Writer.NATIVE:
        op, attrs = OPS[name], {"c": 0.7}
        xs = [rng.normal(size=(3, 4)) for _ in range(op.arity)]
        g, y = rng.normal(size=(3, 4)), op.forward(xs, attrs)
        env = {**ns, **{f"x{i}": x for i, x in enumerate(xs)}, "g": g, "y": y, "d": np.empty((3, 4)),
               "m": np.empty((3, 4), dtype=bool)}
        names = {n: n for n in ("x0", "x1", "g", "y")} | {"c": "0.7"}
        for formula, want in [(op.formula.forward, y), *zip(op.formula.vjp, op.vjp(g, xs, y, attrs))]:
            exec("; ".join(spell(formula, names, "d", calls, mask="m")), env)
            np.testing.assert_allclose(env["d"], want, rtol=1e-14, err_msg=f"{name}: {formula}")


def test_tanh_vjp_is_spelled_in_one_buffer():
    from unrolled.engines.compiled.ufunc_calls import spell

    lines = spell(OPS["tanh"].formula.vjp[0], {"g": "G", "y": "Y"}, "D", {})
    assert lines == ["multiply(Y, Y, out=D)", "subtract(1.0, D, out=D)", "multiply(D, G, out=D)"]
    assert spell(OPS["softplus"].formula.forward, {"x0": "X"}, "D", {"max": "", "log1p": "", "exp": "",
                                                                     "abs": ""}) is None  # needs two buffers


def test_render_replaces_names_and_casts_constants():
    text = ops.render(OPS["tanh"].formula.vjp[0], {"g": "G[j]", "y": "Y[j]"}, lambda c: f"f32({c})")
    assert text == "G[j] * (f32(1.0) - Y[j] * Y[j])"
