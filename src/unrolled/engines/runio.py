"""What goes into an engine run and what comes out, shared by every engine.

Checking the caller's arrays here, once, means both engines reject the same
mistakes with the same sentence, and agree on shapes: inputs ``[T, B, F]``
(``[T, B]`` integers for index inputs), masks ``[T, B]`` (or ``[T]``),
states ``[B, F]`` for a vertex delayed by one step and ``[D, B, F]``
(oldest first) for one whose deepest delay is ``D > 1``. Every float array
the caller passes is scanned once for NaN and infinities (``check_finite``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from unrolled.graph.folded import Graph, Param

COMBINE = ("sum", "mean")


@dataclass
class RunResult:
    """Everything one forward/backward pass over a chunk produces.

    ``loss``: the total loss (a float). ``grads``: one array per parameter,
    its copies' contributions combined (summed, or averaged over the copies).
    ``input_grads``: ``[T, B, F]`` per dense input. ``init_grads``: the
    gradient with respect to each initial state, shaped like the state.
    ``final_states``: each vertex a delay reads, by name, with its last
    ``D`` values (``D``: its deepest delay): ``[B, F]`` when D = 1,
    ``[D, B, F]`` oldest first when D > 1 (the shape ``init_states`` takes),
    ready to pass as ``init_states`` of the next chunk. ``outputs``: ``[T, B, F]`` per
    output. ``step_losses``: ``[T, B]`` per loss, masked, before reduction.
    ``per_copy`` (reference engine, on request): for each parameter an array
    ``[copies, *shape]``, one contribution per step that uses it, the steps
    listed in ``copy_steps``.
    """

    loss: float
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    input_grads: dict[str, np.ndarray] = field(default_factory=dict)
    init_grads: dict[str, np.ndarray] = field(default_factory=dict)
    final_states: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    step_losses: dict[str, np.ndarray] = field(default_factory=dict)
    per_copy: dict[str, np.ndarray] | None = None
    copy_steps: dict[str, list[int]] | None = None


@dataclass
class Feeds:
    """The caller's arrays, checked and converted to the run's dtype."""

    T: int
    B: int
    dtype: np.dtype
    inputs: dict[str, np.ndarray]  # [T, B, F] float, or [T, B] int64
    init: dict[str, np.ndarray]  # [D, B, F] for every delayed vertex, oldest first
    masks: dict[str, np.ndarray]  # [T, B] per loss, in the run's dtype
    norms: dict[str, float]  # the divisor of each loss (1, or its mask's sum)
    final_state_grads: dict[str, np.ndarray]  # [D, B, F]
    output_grads: dict[str, np.ndarray]  # [T, B, F]
    given_init: frozenset = frozenset()  # states whose initial value the caller passed
    params: dict[str, np.ndarray] = field(default_factory=dict)  # checked; a list given is an array here


_UNSIGNED = {n: np.dtype(f"u{n}") for n in (1, 2, 4, 8)}  # a view's dtype from a string is parsed every call


def check_params(graph: Graph, params) -> tuple[dict[str, np.ndarray], np.dtype]:
    """The run's parameters as arrays of one float dtype, one per parameter of the graph.

    A list (or any sequence of numbers) is converted, as inputs are; what it
    converts to must still have the parameter's shape and a float dtype, so a
    wrong shape or an integer list is refused, not silently cast."""
    if params is None:
        if graph.params:
            raise TypeError(f"params=None, but graph '{graph.name}' has parameters {_names(graph.params)}: "
                             f"pass params=graph.init_params() or a dict of your own arrays")
        params = {}
    if not isinstance(params, Mapping):
        raise TypeError(f"params is a {type(params).__name__}; pass a dict of arrays by parameter name, "
                        f"e.g. graph.init_params()")
    extra = [name for name in params if name not in graph.params]
    if extra:
        raise ValueError(f"no parameter named {', '.join(map(repr, sorted(map(str, extra))))} in graph "
                         f"'{graph.name}'; its parameters are {_names(graph.params) or 'none'}")
    missing = [p for p in graph.params if p not in params]
    if missing:
        raise ValueError(f"no value for parameter(s) {', '.join(missing)}; use graph.init_params() to make them")
    out, first = {}, None
    for name, p in graph.params.items():
        a = params[name]
        if not isinstance(a, np.ndarray):
            a = _as_array(a, f"parameter '{name}'")
        if a.shape != p.shape:
            raise ValueError(f"parameter '{name}' is {list(a.shape)} but the graph says {list(p.shape)}")
        if a.dtype not in (np.float32, np.float64):
            raise ValueError(f"parameter '{name}' holds {a.dtype}; use float32 or float64")
        if first is None:
            first = name
        elif a.dtype != out[first].dtype:
            raise ValueError(f"parameters mix dtypes: '{name}' is {a.dtype} but '{first}' is {out[first].dtype}; "
                             f"give every parameter one dtype (float32 or float64)")
        out[name] = a
    return out, (out[first].dtype if first is not None else np.dtype(np.float64))


def _as_array(a, what: str) -> np.ndarray:
    """``a`` as an array of numbers; a ragged list or an object is refused, naming it."""
    try:
        a = np.asarray(a)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"{what} is not a rectangular array of numbers ({e}); pass a NumPy array") from None
    if a.dtype.kind not in "biufc":
        raise ValueError(f"{what} holds {a.dtype} values, not numbers; pass a NumPy array of floats")
    return a


def _names(names) -> str:
    return ", ".join(sorted(names))


SKIP_HINT = " (check_finite=False skips this scan)"


def scan_arrays(params=None, inputs=None, init_states=None, *, hint: str = SKIP_HINT) -> None:
    """Refuse NaN or an infinity in a caller's parameters, inputs or initial states, naming the array
    and the place of the first one: the one rule of :func:`prepare`'s scan, also for loops (the
    trainer) that scan what their caller gave them and run the engine on it unscanned."""
    for name, a in (params or {}).items():
        _refuse_nonfinite(a, f"parameter '{name}'", "", hint)
    for name, a in (inputs or {}).items():
        _refuse_nonfinite(a, f"input '{name}'", "t, b, feature", hint)
    for name, a in (init_states or {}).items():
        _refuse_nonfinite(a, f"init_states['{name}']", "b, feature" if np.ndim(a) == 2 else "slot, b, feature", hint)


def _refuse_nonfinite(a, what: str, axes: str = "", hint: str = SKIP_HINT) -> None:
    """Refuse an array holding NaN or an infinity, saying where the first one is (see :func:`prepare`)."""
    bad = _nonfinite(a if isinstance(a, np.ndarray) else np.asarray(a), axes)
    if bad:
        raise ValueError(f"{what} {bad}: a run needs finite values{hint}")


def _nonfinite(a: np.ndarray, axes: str = "") -> str | None:
    """Where ``a``'s first NaN or infinity is, in words (``axes`` names the index's parts), or None.

    One pass over a float array: its dot product with itself, which is NaN or infinite when any of
    its numbers is (and, rarely, when the squares overflow: then ``np.isfinite`` decides); an integer
    array (an index input) cannot hold either and is not read. The dot product reads the array at
    BLAS's pace and makes no array of flags, as ``np.isfinite(a).all()`` does."""
    if a.dtype.kind != "f":
        return None
    flat_a = a.reshape(-1)
    if math.isfinite(float(np.vdot(flat_a, flat_a))) or np.isfinite(a).all():
        return None
    flat = int(np.flatnonzero(~np.isfinite(a))[0])
    where = ", ".join(str(int(i)) for i in np.unravel_index(flat, a.shape))
    return f"holds {a.flat[flat]} at [{where}]" + (f" ([{axes}])" if axes else "")


def prepare(
    graph: Graph,
    params: dict[str, np.ndarray],
    inputs: dict[str, np.ndarray],
    init_states: dict[str, np.ndarray] | None = None,
    masks: dict[str, np.ndarray] | None = None,
    *,
    steps: int | None = None,
    batch: int | None = None,
    final_state_grads: dict[str, np.ndarray] | None = None,
    output_grads: dict[str, np.ndarray] | None = None,
    check_finite: bool = True,
) -> Feeds:
    """Check and convert a run's arrays; ``steps``/``batch`` are needed only for a graph with no inputs.

    ``check_finite`` scans every float array the caller passed (parameters,
    dense inputs, initial states, outside gradients) once for NaN and
    infinities, so that a bad value is named where it enters, not found as a
    NaN loss later; ``False`` skips that scan. Masks are always checked
    (finite, not negative): they are small."""
    graph.check()
    params, dtype = check_params(graph, params)
    out_inputs, T, B = _inputs(graph, inputs, steps, batch, dtype)
    init = _initial_states(graph, params, init_states or {}, B, dtype)
    out_masks, norms = _masks(graph, masks or {}, T, B, dtype)
    fsg = {
        name: as_history(graph, name, a, B, dtype, "final_state_grads")
        for name, a in (final_state_grads or {}).items()
    }
    ogr = _output_grads(graph, output_grads or {}, T, B, dtype)
    given = frozenset(init_states or {})
    feeds = Feeds(T, B, dtype, out_inputs, init, out_masks, norms, fsg, ogr, given, params)
    if check_finite:
        scan_feeds(feeds)
    return feeds


def _inputs(graph: Graph, inputs, T, B, dtype) -> tuple[dict[str, np.ndarray], int, int]:
    """Each input as ``[T, B, F]`` in the run's dtype (``[T, B]`` int64 for an index input), and T, B."""
    inputs = dict(inputs or {})
    known = {v.name for v in graph.inputs}
    extra = set(inputs) - known
    if extra:
        raise ValueError(f"no input named {', '.join(sorted(extra))} in graph '{graph.name}'; its inputs are {', '.join(sorted(known)) or 'none'}")
    out = {}
    for v in graph.inputs:
        if v.name not in inputs:
            raise ValueError(f"input '{v.name}' was not given: pass inputs={{'{v.name}': array}}")
        a = np.asarray(inputs[v.name])
        ndim = 2 if v.kind == "index" else 3
        if a.ndim != ndim or (v.kind == "input" and a.shape[2] != v.size):
            want = "[T, B]" if v.kind == "index" else f"[T, B, {v.size}]"
            raise ValueError(f"input '{v.name}' has shape {list(a.shape)}; it must be {want}")
        T = a.shape[0] if T is None else T
        B = a.shape[1] if B is None else B
        if a.shape[:2] != (T, B):
            raise ValueError(f"input '{v.name}' covers [T, B] = {list(a.shape[:2])} but other inputs cover {[T, B]}")
        if v.kind == "index":
            if a.dtype.kind not in "iu":  # integers (np.issubdtype costs more than the rest of the check)
                raise ValueError(f"index input '{v.name}' holds {a.dtype}; it must hold integers")
            # one pass: as unsigned, a negative index is huge, so the maximum catches both ends
            if a.size and int(a.view(_UNSIGNED[a.itemsize]).max()) >= v.size:
                bad = int(a.min()) if a.min() < 0 else int(a.max())
                raise ValueError(f"index input '{v.name}' holds {bad}, outside 0..{v.size - 1}")
            out[v.name] = a.astype(np.int64, copy=False)
        else:
            out[v.name] = np.ascontiguousarray(a, dtype=dtype)
    if T is None or B is None:
        raise ValueError(f"graph '{graph.name}' has no inputs: pass steps=T and batch=B")
    if T < 1 or B < 1:
        raise ValueError(f"a run needs at least one step and one row, got T={T}, B={B}")
    return out, T, B


def _output_grads(graph: Graph, output_grads, T: int, B: int, dtype) -> dict[str, np.ndarray]:
    out = {}
    outs = {v.name: v for v in graph.outputs}
    for name, a in output_grads.items():
        if name not in outs:
            raise ValueError(f"output_grads names '{name}', which is not an output of graph '{graph.name}'")
        a = np.asarray(a, dtype=dtype)
        if a.shape != (T, B, outs[name].size):
            raise ValueError(f"output_grads['{name}'] is {list(a.shape)}; it must be {[T, B, outs[name].size]}")
        out[name] = a
    return out


def scan_feeds(feeds: Feeds) -> None:
    """NaN or an infinity in anything the caller passed (see :func:`prepare`); index inputs hold integers."""
    # a state in the caller's shape: [B, F] for a state delayed once
    scan_arrays(feeds.params, feeds.inputs, {k: as_state(feeds.init[k]) for k in feeds.given_init})
    for name, a in feeds.final_state_grads.items():
        a = as_state(a)
        _refuse_nonfinite(a, f"final_state_grads['{name}']", "b, feature" if a.ndim == 2 else "slot, b, feature")
    for name, a in feeds.output_grads.items():
        _refuse_nonfinite(a, f"output_grads['{name}']", "t, b, feature")


def as_history(graph: Graph, name: str, a, B: int, dtype, what: str) -> np.ndarray:
    """A state array as ``[D, B, F]``, accepting ``[B, F]`` when D = 1."""
    delayed = graph.delayed()
    if name not in delayed:
        raise ValueError(
            f"{what} names '{name}', which no delay reads; states of graph '{graph.name}': "
            f"{', '.join(sorted(delayed)) or 'none'}"
        )
    D, F = delayed[name], graph.vertices[name].size
    a = np.asarray(a, dtype=dtype)
    if D == 1 and a.shape == (B, F):
        a = a[None]
    if a.shape != (D, B, F):
        want = f"[{B}, {F}]" if D == 1 else f"[{D}, {B}, {F}] (the last {D} values, oldest first)"
        raise ValueError(f"{what}['{name}'] has shape {list(a.shape)}; it must be {want}")
    return a


def as_state(a: np.ndarray) -> np.ndarray:
    """The user-facing form of a ``[D, B, F]`` history: ``[B, F]`` when D = 1."""
    return a[0] if a.shape[0] == 1 else a


def _initial_states(graph, params, given, B, dtype) -> dict[str, np.ndarray]:
    out = {}
    for name, D in graph.delayed().items():
        v = graph.vertices[name]
        if name in given:
            out[name] = as_history(graph, name, given[name], B, dtype, "init_states")
        elif v.init == "given":
            raise ValueError(
                f"state '{name}' has init=given but no initial value was passed: "
                f"pass init_states={{'{name}': array of shape [{B}, {v.size}]}}"
            )
        elif v.init == "learned":
            h0 = params[graph.init_param_name(name)]
            out[name] = np.broadcast_to(h0, (D, B, v.size)).astype(dtype)
        else:
            out[name] = np.zeros((D, B, v.size), dtype=dtype)
    extra = set(given) - set(out)
    if extra:
        as_history(graph, sorted(extra)[0], None, B, dtype, "init_states")
    return out


def _masks(graph, masks, T, B, dtype):
    names = {l.name for l in graph.losses}
    extra = set(masks) - names
    if extra:
        raise ValueError(f"a mask names '{sorted(extra)[0]}', which is not a loss; losses: {', '.join(sorted(names)) or 'none'}")
    out, norms = {}, {}
    for loss in graph.losses:
        m = masks.get(loss.name)
        if m is None:  # every step counts
            out[loss.name] = _ones(T, B, dtype)
            norms[loss.name] = 1.0 if loss.reduce == "sum" else float(T * B)
            continue
        m = np.asarray(m, dtype=dtype)
        if m.shape == (T,):
            m = np.broadcast_to(m[:, None], (T, B))
        if m.shape != (T, B):
            raise ValueError(f"mask of loss '{loss.name}' is {list(m.shape)}; it must be [T, B] = {[T, B]} or [T]")
        _check_mask(m, loss.name)
        out[loss.name] = np.ascontiguousarray(m)
        total = float(m.sum())
        norms[loss.name] = 1.0 if loss.reduce == "sum" else (total if total > 0 else 1.0)
    return out, norms


def _check_mask(m: np.ndarray, loss_name: str) -> None:
    """A mask weighs each (step, row) of a loss: a weight must be finite and not negative."""
    bad = _nonfinite(m, "t, b")
    if bad is None and m.size and m.min() < 0:
        t, b = np.unravel_index(int(np.argmin(m)), m.shape)
        bad = f"holds {m[t, b]} at [{t}, {b}] ([t, b])"
    if bad:
        raise ValueError(f"mask of loss '{loss_name}' {bad}: a mask weighs each step and row, "
                         f"1 to count it, 0 to leave it out; use finite weights of 0 or more")


@functools.lru_cache(maxsize=16)
def _ones(T: int, B: int, dtype) -> np.ndarray:
    """The mask of a loss given none: read-only, so one array serves every run of that shape."""
    m = np.ones((T, B), dtype=dtype)
    m.flags.writeable = False
    return m


def parameter_copies(graph: Graph, T: int, given_init) -> dict[str, int]:
    """How many copies of each parameter the unrolled graph has (the divisor of combine='mean'):
    one per step whose ops read it (T), plus one per initial-state slot it fills (D, for a
    learned initial state not overridden by a given one). A learned initial vector that an
    op reads too has both kinds, T + D, as the reference engine's unrolled graph counts them."""
    out: dict[str, int] = {}
    used = set()
    for v in graph.vertices.values():
        if v.kind == "op":
            used.update(a.name for a in v.args if isinstance(a, Param))
    for name in used:
        out[name] = T
    for name, D in graph.delayed().items():
        if graph.vertices[name].init == "learned" and name not in given_init:
            pname = graph.init_param_name(name)
            out[pname] = out.get(pname, 0) + D
    return out


class CopyCounts:
    """:func:`parameter_copies` of one graph, counted once for each ``(T, given_init)``: an engine
    divides by them on every run with ``combine="mean"``, and its graph cannot change under it
    (:class:`Binding`)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._counts: dict[tuple, dict[str, int]] = {}

    def __call__(self, T: int, given_init: frozenset) -> dict[str, int]:
        key = (T, given_init)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = parameter_copies(self.graph, T, given_init)
        return counts


@dataclass(frozen=True)
class Binding:
    """The graph an engine was made for, as it was then: a run refuses the graph once it has changed.

    An engine derives things from the graph when it is made (the compiled
    one its plan, its generated and compiled loops), so a later change would
    run half the old graph and half the new one; both engines refuse it the
    same way, and a new engine picks the change up."""

    graph: Graph
    version: int
    layout: dict

    @classmethod
    def of(cls, graph: Graph) -> "Binding":
        return cls(graph, graph.version, _layout(graph))

    def check(self) -> None:
        if self.graph.version == self.version:
            return
        now, was = _layout(self.graph), self.layout
        changes = []
        for what in now:
            for verb, names in (("added", now[what] - was[what]), ("removed", was[what] - now[what])):
                if names:
                    changes.append(f"{verb} {what} {', '.join(map(repr, sorted(names)))}")
        raise ValueError(f"graph '{self.graph.name}' changed after its engine was made "
                         f"({'; '.join(changes) or 'a state init or a definition changed'}): "
                         f"an engine runs the graph as it was; make a new one with make_engine(graph)")


def _layout(graph: Graph) -> dict[str, frozenset]:
    """What a change to the graph is described by: its names of each kind, and each state's init."""
    return {
        "vertex": frozenset(v.name for v in graph.vertices.values()
                            if v.kind != "delay" and all(v is not l.vertex for l in graph.losses)),
        "delay": frozenset(v.name for v in graph.delays),
        "parameter": frozenset(graph.params),
        "output": frozenset(v.name for v in graph.outputs),
        "loss": frozenset(l.name for l in graph.losses),
        "initial state": frozenset(f"{n}: init={graph.vertices[n].init}" for n in graph.delayed()),
    }


def check_combine(combine: str) -> None:
    if combine not in COMBINE:
        raise ValueError(f"combine={combine!r}; use 'sum' (the gradient of the total loss) or 'mean' (averaged over copies)")
