"""The folded graph: building it, printing it, and rejecting what cannot be unrolled.

Each negative test builds a broken graph on purpose and matches the
message: it must name the offending vertices (and sizes) and say what to do.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import GRAPHS

from unrolled.graph.folded import Graph, Vertex
from unrolled.graph.unroll import unroll
from unrolled.models import cells


def elman_100() -> Graph:
    """The docstring's example: x [75], h [100]."""
    g = Graph("elman")
    x = g.input("x", 75)
    h = g.state("h", 100)
    W = g.param("W", (100, 175))
    V = g.param("V", (75, 100))
    a = g.matmul(W, g.concat(x, h.prev, name="xh"), name="a")
    g.tanh(a, name="h")
    y = g.output(g.matmul(V, h, name="y"))
    g.loss("cross_entropy", y, g.index_input("target", 75), name="xent")
    return g.check()


def all_of(*words: str) -> str:
    """A regex that matches a message containing every one of ``words`` (in any order)."""
    return "".join(f"(?=.*{re.escape(w)})" for w in words)


# ------------------------------------------------------------ text form


def test_print_shows_one_line_per_vertex():
    g = elman_100()
    lines = str(g).splitlines()
    assert lines[0] == "graph elman"
    body = [l.strip() for l in lines[1:]]
    assert "h : [100] = tanh(a)  # state" in body
    assert "h_prev : [100] = delay(h, 1, init=zeros)" in body
    assert "xh : [175] = concat(x, h_prev)" in body
    assert "a : [100] = matmul(W, xh)" in body
    assert "x : [75] = input" in body
    assert "target : [75] = index_input" in body
    assert "W : param [100, 175] init=xavier" in body
    assert any(l.startswith("y : [75] = matmul(V, h)") and "output" in l for l in body)
    assert any(l.startswith("xent : [1] = cross_entropy(y, target)") and "loss (mean)" in l for l in body)
    # exactly one line per vertex and one per parameter, nothing else
    heads = [l.split(" : ")[0] for l in body]
    assert sorted(heads) == sorted(list(g.vertices) + list(g.params))
    assert repr(g) == str(g)


def test_print_lists_vertices_in_computing_order():
    """Each vertex is printed after the vertices it reads in the same step (delays first)."""
    for build in GRAPHS.values():
        g = build()
        heads = [l.strip().split(" : ")[0] for l in str(g).splitlines()[1:]]
        pos = {name: i for i, name in enumerate(heads)}
        for v in g.vertices.values():
            if v.kind == "op":
                for a in v.args:
                    assert pos[a.name] < pos[v.name], f"{g.name}: {a.name} printed after its reader {v.name}"


def test_print_shows_depth_and_initial_state_kind():
    g = Graph("d")
    x = g.input("x", 2)
    h = g.state("h", 2, init="learned")
    g.tanh(g.add(x, g.add(h.prev, h.delay(3), name="hh"), name="a"), name="h")
    text = str(g)
    assert "h_prev : [2] = delay(h, 1, init=learned)" in text
    assert "h_prev3 : [2] = delay(h, 3, init=learned)" in text
    assert "h.init : param [2] init=zeros" in text


def test_print_works_on_a_broken_graph():
    g = Graph("broken")
    x = g.input("x", 3)
    h = g.state("h", 3)
    g.add(x, h.prev, name="a")
    assert "h : [3] = <state, not yet defined>" in str(g)
    g.tanh(g.add(x, h, name="b"), name="h")  # a cycle without delay
    assert "b : [3] = add(x, h)" in str(g)


def test_builder_api_shapes():
    g = Graph("s")
    x = g.input("x", 6)
    parts = g.split(x, [1, 2, 3], names=["p1", "p2", "p3"])
    assert [p.size for p in parts] == [1, 2, 3]
    assert [p.attrs for p in parts] == [{"start": 0, "stop": 1}, {"start": 1, "stop": 3}, {"start": 3, "stop": 6}]
    assert [p.size for p in g.split(x, 3)] == [2, 2, 2]
    tok = g.index_input("tok", 7)
    assert g.one_hot(tok).size == 7
    assert g.embedding(g.param("E", (7, 5)), tok).size == 5
    assert g.scale(x, 2).attrs == {"c": 2.0}


def test_delay_of_a_delay_is_one_longer_delay_and_delays_are_shared():
    g = Graph("d")
    x = g.input("x", 2)
    h = g.state("h", 2)
    assert h.prev is h.prev
    assert h.prev.prev is h.delay(2)
    assert g.delay(h, np.int64(2)) is h.delay(2)
    assert h.delay(2).source is h and h.delay(2).depth == 2
    g.tanh(g.add(x, h.delay(2)), name="h")
    assert g.delayed() == {"h": 2}


# ------------------------------------------------------------ validation


def test_cycle_without_delay_names_every_vertex_on_it():
    g = Graph("loop")
    x = g.input("x", 3)
    h = g.state("h", 3)
    a = g.add(x, h, name="a")  # should read h.prev
    b = g.tanh(a, name="b")
    g.identity(b, name="c")
    g.tanh("c", name="h")
    with pytest.raises(ValueError, match=all_of("cycle", "has no delay edge", "did you mean `h.prev`", "'a'")) as e:
        g.check()
    cycle = re.search(r"cycle (.*) has no delay edge", str(e.value)).group(1).split(" → ")
    assert cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["a", "b", "c", "h"]
    # the arrows follow the data: a → b → c → h → a, from wherever the cycle starts
    k = cycle.index("a")
    assert (cycle[:-1] * 2)[k:k + 4] == ["a", "b", "c", "h"]
    with pytest.raises(ValueError, match="has no delay edge"):
        unroll(g, 3)


def test_cycle_through_two_states_without_delay():
    g = Graph("pair")
    x = g.input("x", 3)
    h, k = g.state("h", 3), g.state("k", 3)
    g.tanh(g.add(x, k, name="a"), name="h")
    g.add(h, x, name="k")
    with pytest.raises(ValueError, match=all_of("cycle", "a", "h", "k", "did you mean `", ".prev`")) as e:
        g.check()
    cycle = re.search(r"cycle (.*) has no delay edge", str(e.value)).group(1).split(" → ")
    assert sorted(set(cycle)) == ["a", "h", "k"]


def test_self_loop_without_delay():
    g = Graph("self")
    x = g.input("x", 2)
    h = g.state("h", 2)
    g.add(x, h, name="h")
    with pytest.raises(ValueError, match=r"cycle h → h has no delay edge.*did you mean `h.prev` instead of `h` in vertex 'h'"):
        g.check()


def test_size_mismatch_in_matmul_names_both_and_both_sizes():
    g = Graph("m")
    x = g.input("x", 75)
    W = g.param("W", (100, 175))
    with pytest.raises(ValueError, match=re.escape(
            "vertex 'a' = matmul(W, x): W is [100, 175] but x has 75 features; W's second size must equal x's size")):
        g.matmul(W, x, name="a")


def test_size_mismatch_in_elementwise_op_names_both_and_both_sizes():
    g = Graph("m")
    x, y = g.input("x", 3), g.input("y", 4)
    with pytest.raises(ValueError, match=all_of("vertex 's' = add(x, y)", "'x' has 3", "'y' has 4", "equal sizes")):
        g.add(x, y, name="s")
    b = g.param("b", (5,))
    with pytest.raises(ValueError, match=all_of("mul(x, b)", "'x' has 3", "'b' has 5")):
        g.mul(x, b)
    with pytest.raises(ValueError, match="concat cannot take parameter 'W'"):
        g.concat(x, g.param("W", (3, 3)))


@pytest.mark.parametrize("build, match", [
    (lambda g, x: g.linear(g.param("W", (4, 3)), x, g.param("b", (5,))),
     all_of("bias 'b' is [5]", "parameter [4]")),
    (lambda g, x: g.slice(x, 2, 9), all_of("slice [2:9]", "'x' of size 3")),
    (lambda g, x: g.split(x, 2), all_of("cannot split 'x' of size 3 into 2")),
    (lambda g, x: g.split(x, [1, 1]), all_of("[1, 1]", "'x' has size 3")),
    (lambda g, x: g.loss("mse", x, g.input("t", 4)), all_of("'x' has 3", "'t' has 4")),
    (lambda g, x: g.loss("cross_entropy", x, g.index_input("t", 4)), all_of("'x' has 3 classes", "target 't' has 4")),
    (lambda g, x: g.matmul(g.param("W", (3,)), x), "'W' must be a parameter matrix"),
])
def test_other_shape_errors(build, match):
    g = Graph("m")
    with pytest.raises(ValueError, match=match):
        build(g, g.input("x", 3))


def test_state_never_defined():
    g = Graph("u")
    x = g.input("x", 3)
    h = g.state("h", 3)
    y = g.output(g.add(x, h.prev, name="y"))
    with pytest.raises(ValueError, match=all_of("state 'h' is declared but its value is never defined",
                                                "name='h'")):
        g.check()
    with pytest.raises(ValueError, match="state 'h'"):
        unroll(g, 2)
    g.tanh(y, name="h")  # defining it later repairs the graph
    assert g.check() is g


@pytest.mark.parametrize("first, second", [
    (lambda g: g.input("x", 3), lambda g: g.input("x", 4)),
    (lambda g: g.input("x", 3), lambda g: g.index_input("x", 4)),
    (lambda g: g.input("x", 3), lambda g: g.tanh("x", name="x")),
    (lambda g: g.param("x", (3,)), lambda g: g.input("x", 3)),
    (lambda g: g.input("x", 3), lambda g: g.param("x", (3,))),
    (lambda g: g.state("x", 3), lambda g: g.input("x", 3)),
])
def test_duplicate_name(first, second):
    g = Graph("dup")
    first(g)
    with pytest.raises(ValueError, match=all_of("duplicate name 'x'", "choose another name")):
        second(g)


def test_defining_a_state_twice_is_a_duplicate():
    g = Graph("dup")
    x = g.input("x", 3)
    h = g.state("h", 3)
    g.tanh(g.add(x, h.prev), name="h")
    with pytest.raises(ValueError, match="duplicate name 'h'"):
        g.tanh(x, name="h")


def test_every_operand_a_parameter_is_rejected_when_built():
    """The builder cannot make a vertex that depends only on parameters: it needs a vertex operand."""
    g = Graph("const")
    g.input("x", 3)
    b, c = g.param("b", (3,)), g.param("c", (3,))
    with pytest.raises(ValueError, match=all_of("vertex 'k' = add(b, c)", "at least one must be a vertex")):
        g.add(b, c, name="k")
    with pytest.raises(ValueError, match="tanh cannot take parameter 'b'"):
        g.tanh(b)


def _constant_vertex(g: Graph) -> Vertex:
    """A vertex computed from parameters alone, placed in the graph by hand.

    The builder refuses to make one (see the test above); this is how a graph
    loaded from elsewhere, or a future op, could still produce one, and
    check() must catch it.
    """
    b, c = g.param("b", (3,)), g.param("c", (3,))
    k = Vertex(g, "k", 3, "op", "add", (b, c), {})
    g.vertices["k"] = k
    return k


def test_output_depending_on_no_input_and_no_state():
    g = Graph("const")
    g.output(g.tanh(g.input("x", 3), name="fine"))
    g.output(g.tanh(_constant_vertex(g), name="z"))
    with pytest.raises(ValueError, match=all_of("output 'z' depends on no input and no state",
                                                "connect it to an input or a state")):
        g.check()


def test_loss_depending_on_no_input_and_no_state():
    g = Graph("const")
    g.output(g.tanh(g.input("x", 3), name="fine"))
    g.loss("cross_entropy", _constant_vertex(g), g.index_input("t", 3), name="xent")
    with pytest.raises(ValueError, match=all_of("loss 'xent' depends on no input and no state",
                                                "prediction 'k'", "connect it to an input or a state")):
        g.check()


def test_a_state_with_no_input_is_time_varying():
    """h = tanh(W·h_prev) with a learned start reads a state, so it is accepted."""
    g = Graph("free")
    h = g.state("h", 3, init="learned")
    g.output(g.tanh(g.matmul(g.param("W", (3, 3)), h.prev), name="h"))
    assert g.check() is g


@pytest.mark.parametrize("depth", [0, -1, 1.5, True, "2"])
def test_delay_depth_must_be_a_whole_number_at_least_one(depth):
    g = Graph("d")
    h = g.state("h", 3)
    with pytest.raises(ValueError, match=all_of(f"delay of 'h' by {depth!r} steps", "at least 1")):
        g.delay(h, depth)
    with pytest.raises(ValueError, match=f"delay of 'h' by {re.escape(repr(depth))} steps"):
        h.delay(depth)


def test_delay_edge_between_different_sizes_given_explicitly():
    g = Graph("d")
    h = g.state("h", 3)
    with pytest.raises(ValueError, match=all_of("delay edge h -> hp", "different sizes", "'h' is [3]",
                                                "delayed vertex is [5]", "same size")):
        g.delay(h, 1, size=5, name="hp")
    assert g.delay(h, 1, size=3).size == 3


def test_delay_edge_between_different_sizes_through_a_state():
    """State h is declared [4] (so h.prev is [4]) but defined by a [3] value."""
    g = Graph("d")
    x = g.input("x", 3)
    h = g.state("h", 4)
    W = g.param("W", (3, 7))
    a = g.matmul(W, g.concat(x, h.prev), name="a")
    with pytest.raises(ValueError, match=all_of("delay edge h -> h_prev", "different sizes",
                                                "declared [4]", "tanh(a) is [3]", "make the sizes equal")):
        g.tanh(a, name="h")


def test_unknown_op_loss_and_initializer():
    g = Graph("u")
    x = g.input("x", 3)
    with pytest.raises(ValueError, match=all_of("unknown op 'conv'", "known ops:", "matmul", "tanh")):
        g.apply("conv", x)
    with pytest.raises(ValueError, match=all_of("unknown loss 'hinge'", "known losses: cross_entropy, mse")):
        g.loss("hinge", x, x)
    for spec in ("glorot", "normal", "normal:abc", "zeros:1"):
        with pytest.raises(ValueError, match=all_of(f"parameter 'W': unknown initializer '{spec}'", "xavier",
                                                    "normal:X")):
            g.param("W", (3, 3), init=spec)
    with pytest.raises(ValueError, match=all_of("init='random'", "'h'", "zeros, learned, given")):
        g.state("h", 3, init="random")
    with pytest.raises(ValueError, match=all_of("reduce='max'", "'mean' or 'sum'")):
        g.loss("mse", x, x, reduce="max")


@pytest.mark.parametrize("bad", [
    lambda g: g.input("x", 0),
    lambda g: g.input("x", 2.5),
    lambda g: g.state("x", -1),
    lambda g: g.index_input("x", 0),
])
def test_sizes_must_be_positive_whole_numbers(bad):
    with pytest.raises(ValueError, match="vertex 'x' has size"):
        bad(Graph("s"))


def test_parameter_shape_must_be_positive():
    with pytest.raises(ValueError, match=r"parameter 'W' has shape \[3, 0\]"):
        Graph("s").param("W", (3, 0))


def test_index_input_misuse():
    g = Graph("i")
    tok, x = g.index_input("tok", 5), g.input("x", 5)
    for use in (lambda: g.tanh(tok), lambda: g.add(x, tok), lambda: g.concat(x, tok),
                lambda: g.matmul(g.param("W", (2, 5)), tok)):
        with pytest.raises(ValueError, match=all_of("cannot read index input 'tok' directly",
                                                    "g.one_hot('tok')", "g.embedding(E, 'tok')")):
            use()
    with pytest.raises(ValueError, match="'x' must be an index input"):
        g.one_hot(x)
    with pytest.raises(ValueError, match="'x' must be an index input"):
        g.embedding(g.param("E", (5, 2)), x)
    with pytest.raises(ValueError, match="target 'x' must be an index input"):
        g.loss("cross_entropy", g.identity(x, name="p"), x)
    with pytest.raises(ValueError, match=all_of("F has 4 rows", "tok indexes 5 tokens")):
        g.embedding(g.param("F", (4, 2)), tok)


def test_operands_from_elsewhere_are_refused():
    g, other = Graph("g"), Graph("other")
    x = g.input("x", 3)
    with pytest.raises(TypeError, match="not a vertex of graph 'g'"):
        g.tanh(other.input("y", 3))
    with pytest.raises(TypeError, match="belongs to another graph"):
        g.add(other.param("b", (3,)), x)
    with pytest.raises(ValueError, match="no vertex named 'nope'"):
        g.tanh("nope")
    with pytest.raises(TypeError, match="tanh takes 1 operands, got 2"):
        g.apply("tanh", x, x)


def test_learned_init_adds_and_removes_its_parameter():
    g = Graph("l")
    x = g.input("x", 3)
    h = g.state("h", 3, init="learned")
    assert g.params["h.init"].shape == (3,)
    g.tanh(g.add(x, h.prev), name="h")
    g.set_init(h, "zeros")
    assert "h.init" not in g.params
    g.set_init("h", "given")
    assert h.init == "given"


def test_cells_follow_the_textbook_names():
    g = Graph("c")
    cells.lstm(g, g.input("x", 2), 3)
    assert {"i", "f", "g", "o", "c", "h"} <= set(g.vertices)
    assert g.delayed() == {"h": 1, "c": 1}
    with pytest.raises(ValueError, match="unknown cell 'rnn'"):
        cells.layer(g, "rnn", g.vertices["x"], 3)
