"""Unrolling: the explicit DAG has the right nodes and edges, is acyclic, and means the plain loop.

Nothing here trusts the unroller's own bookkeeping: acyclicity is checked by
a separate Kahn pass over ``dag.edges``, the node and edge counts by a
formula worked out from the folded graph, and the values by a plain Python
loop over time that steps the folded graph, as unroll.py's docstring says.

Counting. Let P be the number of parameters, D_v the deepest delay that
reads vertex v (v then has D_v initial-state nodes), N the number of
non-delay vertices (inputs and ops; delay vertices become edges, not
nodes), and n_v the number of operands of op vertex v. Then

    nodes = P + Σ_v D_v + T·N
    edges = T·Σ_{op v} n_v + Σ_{v with a learned initial state} D_v

(the last term: each initial-state node of a learned state reads the one
parameter ``v.init``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from helpers import GRAPHS, HIDDEN, history_depths, make_init_states, make_inputs, make_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unrolled.engines import reference
from unrolled.graph.folded import Graph, Param, Vertex
from unrolled.graph.ops import OPS
from unrolled.graph.unroll import Node, unroll

UNROLL_GRAPHS = ["classic", "elman", "jordan", "coupled", "delay2", "delay3_and_1", "lstm_stack2", "gru",
                 "learned_init", "learned_init_delay2", "lstm_learned_init", "embedding", "input_delay",
                 "two_losses"]


# ------------------------------------------------------------ independent checks


def expected_counts(g: Graph, T: int) -> tuple[int, int]:
    depth = history_depths(g)
    non_delay = [v for v in g.vertices.values() if v.kind != "delay"]
    operands = sum(len(v.args) for v in non_delay if v.kind == "op")
    learned = sum(D for name, D in depth.items() if g.vertices[name].init == "learned")
    return len(g.params) + sum(depth.values()) + T * len(non_delay), T * operands + learned


def kahn_is_acyclic(nodes, edges) -> bool:
    indegree = Counter(dst for _, dst in edges)
    out: dict = {}
    for src, dst in edges:
        out.setdefault(src, []).append(dst)
    ready = [n for n in nodes if indegree[n] == 0]
    seen = 0
    while ready:
        n = ready.pop()
        seen += 1
        for m in out.get(n, []):
            indegree[m] -= 1
            if indegree[m] == 0:
                ready.append(m)
    return seen == len(nodes)


def respects(order, edges) -> bool:
    pos = {n: i for i, n in enumerate(order)}
    return len(pos) == len(order) and all(pos[s] < pos[d] for s, d in edges)


def check_structure(g: Graph, T: int) -> None:
    """Every structural promise of unroll(g, T), checked from the folded graph."""
    dag = unroll(g, T)
    depth = history_depths(g)
    non_delay = [v for v in g.vertices.values() if v.kind != "delay"]

    # the node set, exactly
    assert len(set(dag.nodes)) == len(dag.nodes), "a node is listed twice"
    want = ({Node(p, None) for p in g.params}
            | {Node(h, t) for h, D in depth.items() for t in range(-D, 0)}
            | {Node(v.name, t) for v in non_delay for t in range(T)})
    assert set(dag.nodes) == want
    assert (len(dag.nodes), len(dag.edges)) == expected_counts(g, T)
    assert all(s in want and d in want for s, d in dag.edges)

    # acyclic, and both listed orders are topological
    assert kahn_is_acyclic(dag.nodes, dag.edges)
    assert respects(dag.nodes, dag.edges)
    assert respects(dag.topological_order(), dag.edges)
    assert sorted(map(str, dag.topological_order())) == sorted(map(str, dag.nodes))

    # every parameter once, shared by every copy
    for name, p in g.params.items():
        assert [n for n in dag.nodes if n.name == name] == [Node(name, None)]
        assert dag.kind[Node(name, None)] == "param" and dag.vertex[Node(name, None)] is p
    uses = dag.params_of()
    for name in g.params:
        per_step = sum(a is g.params[name] for v in non_delay if v.kind == "op" for a in v.args)
        initial = depth.get(name[: -len(".init")], 0) if name.endswith(".init") else 0
        assert len(uses[name]) == T * per_step + initial

    # each operand becomes the right edge; delay edges reach back d steps or to the initial state
    expected_edges = []
    for v in non_delay:
        for t in range(T):
            node = Node(v.name, t)
            assert dag.kind[node] == ("op" if v.kind == "op" else "input")
            if v.kind != "op":
                assert dag.args[node] == []
                continue
            assert len(dag.args[node]) == len(v.args)
            for a, src in zip(v.args, dag.args[node]):
                if isinstance(a, Param):
                    assert src == Node(a.name, None)
                elif a.kind == "delay":
                    h, d = a.args[0], a.attrs["depth"]
                    assert src == Node(h.name, t - d)
                    if t - d < 0:
                        assert dag.kind[src] == "init"
                    else:
                        assert dag.kind[src] == ("op" if h.kind == "op" else "input")
                else:
                    assert src == Node(a.name, t)
                expected_edges.append((src, node))
    for h, D in depth.items():
        for t in range(-D, 0):
            node = Node(h, t)
            assert dag.kind[node] == "init"
            if g.vertices[h].init == "learned":
                assert dag.args[node] == [Node(f"{h}.init", None)]
                expected_edges.append((Node(f"{h}.init", None), node))
            else:
                assert dag.args[node] == []
    assert Counter(dag.edges) == Counter(expected_edges)
    # time only runs forward
    for s, d in dag.edges:
        assert s.t is None or s.t <= d.t


def step_order(g: Graph) -> list[Vertex]:
    """One step's vertices in an order that computes them, found here by repeated sweeps."""
    todo = [v for v in g.vertices.values() if v.kind != "delay"]
    done: set[str] = set()
    order = []
    while todo:
        ready = [v for v in todo
                 if all(a.name in done for a in v.args if isinstance(a, Vertex) and a.kind != "delay")]
        assert ready, "no vertex can be computed: a cycle without delay"
        for v in ready:
            order.append(v)
            done.add(v.name)
        todo = [v for v in todo if v.name not in done]
    return order


def plain_loop(g: Graph, params, inputs, init_states=None):
    """The folded graph stepped T times by hand; returns (loss, outputs, step losses, final states)."""
    init_states = init_states or {}
    T, B = next(iter(inputs.values())).shape[:2]
    depth = history_depths(g)
    history = {}
    for name, D in depth.items():
        v = g.vertices[name]
        if name in init_states:
            start = np.reshape(init_states[name], (D, B, v.size))
        elif v.init == "learned":
            start = np.tile(params[f"{name}.init"], (D, B, 1))
        else:
            start = np.zeros((D, B, v.size))
        history[name] = list(start)  # history[name][D + s] is the value at step s
    order = step_order(g)
    outputs = {v.name: [] for v in g.outputs}
    losses = {l.name: [] for l in g.losses}
    for t in range(T):
        value = {}
        for v in order:
            if v.kind in ("input", "index"):
                value[v.name] = inputs[v.name][t]
                continue
            args = []
            for a in v.args:
                if isinstance(a, Param):
                    args.append(params[a.name])
                elif a.kind == "delay":
                    src = a.args[0].name
                    args.append(history[src][depth[src] + t - a.attrs["depth"]])
                else:
                    args.append(value[a.name])
            value[v.name] = OPS[v.op].forward(args, dict(v.attrs, dtype=np.float64))
        for name in history:
            history[name].append(value[name])
        for name in outputs:
            outputs[name].append(value[name])
        for name in losses:
            losses[name].append(value[name][:, 0])
    step_losses = {k: np.array(v) for k, v in losses.items()}
    loss = sum(step_losses[l.name].sum() / (1 if l.reduce == "sum" else T * B) for l in g.losses)
    finals = {}
    for name, D in depth.items():
        last = np.array(history[name][-D:])
        finals[name] = last[0] if D == 1 else last
    return loss, {k: np.array(v) for k, v in outputs.items()}, step_losses, finals


def check_against_plain_loop(g: Graph, params, inputs, init_states=None) -> None:
    want_loss, want_out, want_steps, want_final = plain_loop(g, params, inputs, init_states)
    got = reference.run(g, params, inputs, init_states=init_states, backward=False)
    tol = dict(rtol=1e-12, atol=1e-14)
    assert set(got.outputs) == set(want_out) and set(got.step_losses) == set(want_steps)
    assert set(got.final_states) == set(want_final)
    for k in want_out:
        np.testing.assert_allclose(got.outputs[k], want_out[k], **tol, err_msg=f"output {k}")
    for k in want_steps:
        np.testing.assert_allclose(got.step_losses[k], want_steps[k], **tol, err_msg=f"loss {k}")
    for k in want_final:
        np.testing.assert_allclose(got.final_states[k], want_final[k], **tol, err_msg=f"final state {k}")
    np.testing.assert_allclose(got.loss, want_loss, **tol)
    assert got.grads == {} and got.per_copy is None  # backward=False computes no gradients


# ------------------------------------------------------------ tests


@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("name", UNROLL_GRAPHS)
def test_structure(name, T):
    check_structure(GRAPHS[name](), T)


@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("name", UNROLL_GRAPHS)
def test_unrolled_graph_evaluates_like_the_plain_loop(name, T, rng):
    g = GRAPHS[name]()
    check_against_plain_loop(g, make_params(g, rng), make_inputs(g, T, 2, rng))


@pytest.mark.parametrize("name", ["elman", "coupled", "delay2", "delay3_and_1", "lstm_stack2", "given_init_delay2"])
def test_plain_loop_with_given_initial_states(name, rng):
    g = GRAPHS[name]()
    check_against_plain_loop(g, make_params(g, rng), make_inputs(g, 4, 3, rng),
                             make_init_states(g, 3, rng, every=True))


def test_counts_worked_by_hand():
    """classic over T=3: params W, V; one initial h; per step x, xh, a, h, y, target, xent.

    Edges per step: concat 2 + matmul 2 + tanh 1 + matmul 2 + cross_entropy 2 = 9.
    """
    dag = unroll(GRAPHS["classic"](), 3)
    assert len(dag.nodes) == 2 + 1 + 3 * 7 == 24
    assert len(dag.edges) == 3 * 9 == 27
    assert dag.args[Node("xh", 0)] == [Node("x", 0), Node("h", -1)]
    assert dag.args[Node("xh", 2)] == [Node("x", 2), Node("h", 1)]
    assert dag.params_of()["W"] == [Node("a", 0), Node("a", 1), Node("a", 2)]


def test_learned_initial_state_counts_by_hand():
    """delay 1 and 2 of a learned h: two initial nodes, h@-2 and h@-1, each reading h.init."""
    g = GRAPHS["learned_init_delay2"]()
    dag = unroll(g, 4)
    assert dag.args[Node("h", -2)] == [Node("h.init", None)] == dag.args[Node("h", -1)]
    assert dag.args[Node("xh", 0)] == [Node("x", 0), Node("h", -1), Node("h", -2)]
    assert dag.args[Node("xh", 1)] == [Node("x", 1), Node("h", 0), Node("h", -1)]
    assert dag.args[Node("xh", 3)] == [Node("x", 3), Node("h", 2), Node("h", 1)]
    assert expected_counts(g, 4) == (len(dag.nodes), len(dag.edges))


def test_print_lists_every_node():
    dag = unroll(GRAPHS["learned_init"](), 3)
    lines = str(dag).splitlines()
    assert lines[0] == f"unrolled elman over T=3: {len(dag.nodes)} nodes, {len(dag.edges)} edges"
    assert len(lines) == 1 + len(dag.nodes)
    body = [l.strip() for l in lines[1:]]
    assert f"W : param [{HIDDEN}, {3 + HIDDEN}] (shared by all steps)" in body
    assert f"h@-1 : [{HIDDEN}] initial state (learned) <- h.init" in body
    assert "xh@2 : [7] = concat(x@2, h@1)" in body
    assert "a@0 : [4] = linear(W, xh@0, b)" in body
    assert "x@1 : [3] input" in body
    assert repr(dag) == str(dag)


@pytest.mark.parametrize("T", [0, -2, 2.5, "3"])
def test_bad_length(T):
    with pytest.raises(ValueError, match=f"cannot unroll over T={T!r} steps"):
        unroll(GRAPHS["elman"](), T)


def test_graph_unroll_method_is_unroll():
    g = GRAPHS["jordan"]()
    assert g.unroll(3).nodes == unroll(g, 3).nodes


# ------------------------------------------------------------ random cyclic graphs


@st.composite
def cyclic_graphs(draw):
    """Random valid graphs: 1-3 states, each reading x, any states' past (depth 1-3) and earlier states' present."""
    n = draw(st.integers(1, 3))
    g = Graph("random")
    x = g.input("x", 2)
    sizes = [draw(st.integers(1, 3)) for _ in range(n)]
    states = [g.state(f"h{i}", sizes[i], init=draw(st.sampled_from(["zeros", "learned"]))) for i in range(n)]
    for i in range(n):
        past = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 3)), max_size=3, unique=True))
        present = draw(st.lists(st.integers(0, i - 1), max_size=i, unique=True)) if i else []
        parts = [x] + [states[j].delay(d) for j, d in past] + [states[k] for k in present]
        W = g.param(f"W{i}", (sizes[i], sum(p.size for p in parts)))
        b = g.param(f"b{i}", (sizes[i],), init="normal:0.1")
        act = draw(st.sampled_from(["tanh", "sigmoid", "identity"]))
        g.apply(act, g.linear(W, g.concat(*parts), b), name=f"h{i}")
    y = g.output(g.linear(g.param("V", (3, sum(sizes))), g.concat(*states), g.param("c", (3,)), name="y"))
    g.loss("cross_entropy", y, g.index_input("target", 3), name="xent")
    return g


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=cyclic_graphs(), T=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_random_graphs(g, T, seed):
    rng = np.random.default_rng(seed)
    check_structure(g, T)
    check_against_plain_loop(g, make_params(g, rng), make_inputs(g, T, 2, rng))
