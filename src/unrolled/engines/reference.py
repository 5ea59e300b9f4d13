"""The reference engine: back-propagation through time, literally.

It builds ``unroll(graph, T)``, evaluates every node in topological order
keeping every value, then walks the nodes in reverse applying each op's VJP.
A parameter node collects one contribution from each copy that reads it;
those contributions, kept apart on request, are the per-copy gradients a
student wants to see, and their sum is the gradient of the total loss.

It is the specification of what every other engine must return: simple,
obviously right, and slow.
"""

from __future__ import annotations

import numpy as np

from unrolled.graph.folded import Graph
from unrolled.graph.ops import OPS, unbroadcast
from unrolled.graph.unroll import Node, UnrolledGraph, unroll

from .runio import Binding, Feeds, RunResult, as_state, check_combine, prepare


def run(
    graph: Graph,
    params: dict[str, np.ndarray],
    inputs: dict[str, np.ndarray] | None = None,
    *,
    init_states: dict[str, np.ndarray] | None = None,
    masks: dict[str, np.ndarray] | None = None,
    combine: str = "sum",
    per_copy: bool = False,
    backward: bool = True,
    steps: int | None = None,
    batch: int | None = None,
    final_state_grads: dict[str, np.ndarray] | None = None,
    output_grads: dict[str, np.ndarray] | None = None,
    check_finite: bool = True,
) -> RunResult:
    """Forward over the unrolled graph and, unless ``backward=False``, BPTT back through it.

    ``params``: one array per parameter (``graph.init_params()``), one
    float dtype for all. ``inputs``: ``[T, B, F]`` per dense input, ``[T, B]``
    integers per index input. ``masks``: ``[T, B]`` (or ``[T]``) weights per
    loss, 0 or more.

    ``init_states`` and ``RunResult.final_states`` are keyed by the vertex a
    delay reads (``h`` for ``h.prev``) and shaped by its deepest delay ``D``:
    ``[B, F]`` when D = 1, ``[D, B, F]`` when D > 1 (its last D values,
    oldest first: ``[0]`` is what ``h.delay(D)`` reads at step 0). A run's
    ``final_states`` are the next chunk's ``init_states``, as they are.

    ``combine="sum"`` gives each parameter the sum of its copies'
    contributions (the gradient of the total loss); ``"mean"`` divides it by
    the number of copies. ``final_state_grads`` and ``output_grads`` add
    outside gradients (from a model this one feeds) to the seeds of the
    backward pass. ``check_finite=False`` skips the scan of the caller's
    arrays for NaN and infinities (see :func:`unrolled.engines.runio.prepare`).
    """
    check_combine(combine)
    feeds = prepare(
        graph, params, inputs, init_states, masks, steps=steps, batch=batch,
        final_state_grads=final_state_grads, output_grads=output_grads, check_finite=check_finite,
    )
    params = feeds.params
    dag = unroll(graph, feeds.T)
    values = _forward(dag, params, feeds)
    result = _collect_forward(dag, values, feeds)
    if backward:
        _backward(dag, params, feeds, values, result, combine, per_copy)
    return result


class ReferenceEngine:
    """The reference engine bound to a graph, with the same interface as the compiled engine.

    It runs the graph as it was when the engine was made: a graph changed
    since is refused (see :class:`unrolled.engines.runio.Binding`), as the compiled
    engine refuses it; make a new engine after changing a graph."""

    name = "reference"

    def __init__(self, graph: Graph):
        self.graph = graph.check()
        self._binding = Binding.of(graph)

    def run(self, params, inputs=None, **kw) -> RunResult:
        """See :func:`run` (the same arguments after ``graph``)."""
        self._binding.check()
        return run(self.graph, params, inputs, **kw)

    def explain(self, T: int, B: int, dtype=np.float64) -> str:
        """One strategy, whatever the graph and batch: the compiled engine's ``explain`` has choices."""
        return (f"reference engine, graph '{self.graph.name}', {T} steps x {B} rows of {np.dtype(dtype).name}: "
                "unrolls the graph into a DAG of T copies and walks it vertex by vertex (the specification)")


# ------------------------------------------------------------------ forward


def _forward(dag: UnrolledGraph, params, feeds: Feeds) -> dict[Node, np.ndarray]:
    values: dict[Node, np.ndarray] = {}
    for node in dag.topological_order():
        kind = dag.kind[node]
        if kind == "param":
            values[node] = params[node.name]
        elif kind == "init":
            values[node] = feeds.init[node.name][node.t + feeds.init[node.name].shape[0]]
        elif kind == "input":
            values[node] = feeds.inputs[node.name][node.t]
        else:
            v = dag.vertex[node]
            args = [values[a] for a in dag.args[node]]
            try:
                values[node] = OPS[v.op].forward(args, dict(v.attrs, dtype=feeds.dtype))
            except (FloatingPointError, ValueError) as e:
                raise RuntimeError(f"while computing vertex '{v.name}' = {v.op}(...) at step {node.t}: {e}") from e
    return values


def _collect_forward(dag: UnrolledGraph, values, feeds: Feeds) -> RunResult:
    g, T = dag.graph, feeds.T
    step_losses = {
        l.name: np.stack([values[Node(l.name, t)][:, 0] for t in range(T)]) * feeds.masks[l.name]
        for l in g.losses
    }
    loss = sum(float(step_losses[l.name].sum(dtype=np.float64)) / feeds.norms[l.name] for l in g.losses)
    outputs = {v.name: np.stack([values[_node(v, t)] for t in range(T)]) for v in g.outputs}
    finals = {
        name: as_state(np.stack([values[Node(name, t)] for t in range(T - D, T)]))
        for name, D in g.delayed().items()
    }
    return RunResult(loss=loss, outputs=outputs, step_losses=step_losses, final_states=finals)


# ----------------------------------------------------------------- backward


def _backward(dag: UnrolledGraph, params, feeds: Feeds, values, result: RunResult, combine, per_copy) -> None:
    g, T, dtype = dag.graph, feeds.T, feeds.dtype
    grads: dict[Node, np.ndarray] = {}

    def add(node: Node, grad: np.ndarray) -> None:
        grads[node] = grads[node] + grad if node in grads else grad

    for l in g.losses:
        seed = (feeds.masks[l.name] / feeds.norms[l.name]).astype(dtype)
        for t in range(T):
            add(Node(l.name, t), seed[t][:, None])
    for name, a in feeds.output_grads.items():
        for t in range(T):
            add(_node(g.vertices[name], t), a[t])
    for name, a in feeds.final_state_grads.items():
        D = a.shape[0]
        for k, t in enumerate(range(T - D, T)):
            add(Node(name, t), a[k])

    # every copy counts, even one no gradient reaches (its contribution is zero)
    copies: dict[str, dict[int, np.ndarray]] = {p: {} for p in g.params}
    for p, users in dag.params_of().items():
        for user in users:
            if dag.kind[user] == "op" or user.name not in feeds.given_init:
                copies[p][user.t] = np.zeros(params[p].shape, dtype=dtype)
    for node in reversed(dag.topological_order()):
        if node not in grads or dag.kind[node] == "param":
            continue
        gout = grads[node]
        if dag.kind[node] == "init":
            _init_param_contribution(dag, node, gout, feeds, copies)
            continue
        if dag.kind[node] != "op":
            continue
        v = dag.vertex[node]
        arg_nodes = dag.args[node]
        arg_values = [values[a] for a in arg_nodes]
        try:
            arg_grads = OPS[v.op].vjp(gout, arg_values, values[node], dict(v.attrs, dtype=dtype))
        except (FloatingPointError, ValueError) as e:
            raise RuntimeError(f"while differentiating vertex '{v.name}' = {v.op}(...) at step {node.t}: {e}") from e
        for a, ga in zip(arg_nodes, arg_grads):
            if ga is None:
                continue
            if dag.kind[a] == "param":
                contribution = unbroadcast(ga, params[a.name].shape)
                bucket = copies[a.name]
                bucket[node.t] = bucket[node.t] + contribution if node.t in bucket else contribution
            else:
                add(a, ga)
    _fill_gradients(dag, params, feeds, grads, copies, result, combine, per_copy)


def _node(v, t: int) -> Node:
    """The unrolled node holding vertex ``v`` at step ``t`` (a delay vertex is its source, earlier)."""
    return Node(v.source.name, t - v.depth) if v.kind == "delay" else Node(v.name, t)


def _init_param_contribution(dag, node: Node, gout, feeds: Feeds, copies) -> None:
    """A learned initial state receives the gradient of every initial-state slot it fills."""
    if not dag.args[node] or node.name in feeds.given_init:
        return
    p = dag.args[node][0].name
    copies[p][node.t] = gout.sum(axis=0)


def _fill_gradients(dag, params, feeds: Feeds, grads, copies, result: RunResult, combine, per_copy) -> None:
    g, T = dag.graph, feeds.T
    for name, p in g.params.items():
        steps = sorted(copies[name])
        stacked = [copies[name][t] for t in steps]
        total = np.sum(stacked, axis=0) if stacked else np.zeros(p.shape, dtype=feeds.dtype)
        if combine == "mean" and steps:
            total = total / len(steps)
        result.grads[name] = total.astype(feeds.dtype, copy=False)
        if per_copy:
            result.per_copy = result.per_copy or {}
            result.copy_steps = result.copy_steps or {}
            result.per_copy[name] = np.array(stacked, dtype=feeds.dtype).reshape((len(steps),) + p.shape)
            result.copy_steps[name] = steps
    zero = lambda shape: np.zeros(shape, dtype=feeds.dtype)  # noqa: E731
    for v in g.inputs:
        if v.kind == "input":
            result.input_grads[v.name] = np.stack(
                [grads.get(Node(v.name, t), zero((feeds.B, v.size))) for t in range(T)]
            )
    for name, hist in feeds.init.items():
        D = hist.shape[0]
        result.init_grads[name] = as_state(
            np.stack([grads.get(Node(name, t), zero(hist.shape[1:])) for t in range(-D, 0)])
        )
