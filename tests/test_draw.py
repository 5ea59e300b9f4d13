"""Pictures of graphs: checked by their properties, not by their pixels.

The DOT text must hold exactly the unrolled graph's nodes and edges, with
delay edges and shared parameters marked; rendered files must exist and not
be blank; the layout must put time left to right, inputs below outputs.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

import pytest

from unrolled.cli import main
from unrolled.cli.draw_cmd import build_network
from unrolled.graph.folded import Graph
from unrolled.models import cells
from unrolled.models.small_networks import small_network
from unrolled.viz import draw

NODE_LINE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" \[(.*)\];$')
EDGE_LINE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)" -> "((?:[^"\\]|\\.)*)" \[(.*)\];$')


def parse_dot(text: str):
    """Node ids with their attribute text, and (src, dst, attributes) per edge, from to_dot's one-per-line text."""
    nodes, edges = {}, []
    for line in text.splitlines():
        e = EDGE_LINE.match(line)
        if e:
            edges.append((e.group(1), e.group(2), e.group(3)))
            continue
        n = NODE_LINE.match(line)
        if n:
            assert n.group(1) not in nodes, f"node {n.group(1)} defined twice"
            nodes[n.group(1)] = n.group(2)
    return nodes, edges


def deep_delay_graph() -> Graph:
    """A state read one and two steps back, with a learned initial state: the unusual cases at once."""
    g = Graph("deep")
    x = g.input("x", 2)
    h = g.state("h", 3, init="learned")
    W = g.param("W", (3, 8))
    g.tanh(g.matmul(W, g.concat(x, h.prev, h.delay(2), name="xhh"), name="a"), name="h")
    y = g.output(g.matmul(g.param("V", (2, 3)), h, name="y"))
    g.loss("mse", y, g.input("target", 2))
    return g


GRAPHS = {
    "elman": lambda: small_network("elman"),
    "jordan": lambda: small_network("jordan"),
    "gru": lambda: small_network("gru"),
    "lstm-2-layers": lambda: build_network("lstm", layers=2),
    "deep": deep_delay_graph,
}


@pytest.mark.parametrize("name", sorted(GRAPHS))
@pytest.mark.parametrize("T", [1, 4])
def test_unrolled_dot_holds_exactly_the_unrolled_graph(name, T):
    dag = GRAPHS[name]().unroll(T)
    nodes, edges = parse_dot(draw.to_dot(dag))
    assert len(nodes) == len(dag.nodes)
    assert len(edges) == len(dag.edges)
    assert set(nodes) == {str(n) for n in dag.nodes}
    assert Counter((s, d) for s, d, _ in edges) == Counter((str(s), str(d)) for s, d in dag.edges)


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_unrolled_dot_marks_delay_edges_and_shared_parameters(name):
    dag = GRAPHS[name]().unroll(3)
    nodes, edges = parse_dot(draw.to_dot(dag))
    crossing = Counter((str(s), str(d)) for s, d in dag.edges if s.t is not None and s.t != d.t)
    delays = Counter((s, d) for s, d, attrs in edges if 'class="delay"' in attrs)
    assert delays == crossing and delays
    users = dag.params_of()
    for p, readers in users.items():
        assert 'class="param shared"' in nodes[p]
        assert f"shared by {len(readers)}" in nodes[p]
        from_p = [a for s, _, a in edges if s == p]
        assert len(from_p) == len(readers) and all('class="param"' in a for a in from_p)


def test_deeper_delays_are_labelled_with_their_depth():
    nodes, edges = parse_dot(draw.to_dot(deep_delay_graph().unroll(4)))
    labelled = [(s, d) for s, d, a in edges if 'label="d=2"' in a]
    assert ("h@0", "xhh@2") in labelled and ("h@-2", "xhh@0") in labelled
    assert ("h@1", "xhh@2") not in labelled  # depth 1 across the columns speaks for itself


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_folded_dot_draws_backward_arrows_with_their_depth(name):
    g = GRAPHS[name]()
    nodes, edges = parse_dot(draw.to_dot(g))
    assert len(nodes) == len(g.params) + len(g.vertices) - len(g.delays)
    learned = [v for v in g.delayed() if g.vertices[v].init == "learned"]
    assert len(edges) == sum(len(v.args) for v in g.vertices.values() if v.kind == "op") + len(learned)
    backward = [(s, d, a) for s, d, a in edges if 'class="delay"' in a]
    readers = [(a.source.name, v.name, a.depth) for v in g.vertices.values() if v.kind == "op"
               for a in v.args if getattr(a, "kind", None) == "delay"]
    assert sorted((s, d) for s, d, _ in backward) == sorted((s, d) for s, d, _ in readers)
    for (s, d, attrs), (_, _, depth) in zip(sorted(backward), sorted(readers)):
        assert f'label="d={depth}"' in attrs and 'constraint="false"' in attrs
    for p in g.params:
        assert 'class="param"' in nodes[p]


def test_labels_give_name_size_and_op():
    nodes, _ = parse_dot(draw.to_dot(small_network("elman")))
    assert 'label="a\\n[4] linear"' in nodes["a"]
    assert 'label="W\\n[4, 7]"' in nodes["W"]
    assert 'class="state"' in nodes["h"] and 'class="input"' in nodes["x"]


def test_unrolled_layout_runs_time_left_to_right_inputs_below_outputs_above():
    g = build_network("lstm", layers=2)
    sc = draw.scene(g, unroll=5)
    pos = draw.layout(sc).pos
    columns = {}
    for n in sc.nodes:
        if n.step is not None:
            columns.setdefault(n.step, []).append(pos[n.id][0])
    steps = sorted(columns)
    assert steps == [-1, 0, 1, 2, 3, 4]
    for a, b in zip(steps, steps[1:]):
        assert max(columns[a]) < min(columns[b]), f"column {a} overlaps column {b}"
    for t in range(5):
        assert pos[f"x@{t}"][1] < pos[f"l0.h@{t}"][1] < pos[f"l1.h@{t}"][1] < pos[f"y@{t}"][1] < pos[f"loss@{t}"][1]
        assert pos[f"l1.h@{t}"][1] == pos["l1.h@-1"][1]  # an initial state on its vertex's row
    lowest = min(y for nid, (_, y) in pos.items() if sc.node(nid).kind != "param")
    assert all(pos[p][1] < lowest for p in g.params)  # parameters in their own row below
    assert len({pos[p] for p in g.params}) == len(g.params)


def test_no_two_boxes_overlap():
    for name in GRAPHS:
        for unroll in (None, 3):
            pos = draw.layout(draw.scene(GRAPHS[name](), unroll)).pos
            spots = Counter((round(x, 6), round(y, 6)) for x, y in pos.values())
            assert max(spots.values()) == 1, name
            by_row = {}
            for x, y in pos.values():
                by_row.setdefault(y, []).append(x)
            for xs in by_row.values():
                xs.sort()
                assert all(b - a >= 0.99 for a, b in zip(xs, xs[1:])), name


def test_long_edges_get_waypoints_so_they_route_around_boxes():
    g = small_network("gru")
    sc = draw.scene(g)
    lay = draw.layout(sc)
    layer = {n.id: n.layer for n in sc.nodes}
    for i, e in enumerate(sc.edges):
        span = layer[e.dst] - layer[e.src]
        if e.kind == "delay":
            assert i in lay.lanes
        elif span > 1:
            assert len(lay.waypoints[i]) == span - 1


def _not_blank_png(path):
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].var()) > 1e-3, "the picture is blank"
    return image


@pytest.fixture
def no_graphviz(monkeypatch):
    monkeypatch.setattr(draw, "dot_program", lambda: None)


def test_png_of_folded_and_unrolled_graphs_is_not_blank(tmp_path, no_graphviz):
    g = small_network("elman")
    _not_blank_png(draw.draw(g, tmp_path / "folded.png"))
    _not_blank_png(draw.draw(g, tmp_path / "unrolled.png", unroll=4))


def test_a_few_dozen_vertices_over_five_steps_stay_readable(tmp_path, no_graphviz):
    g = build_network("lstm", layers=2)
    assert len(g.vertices) >= 30
    image = _not_blank_png(draw.draw(g, tmp_path / "lstm.png", unroll=5))
    height, width = image.shape[:2]
    nodes = len(g.unroll(5).nodes)
    # About 50 pixels or more across per box, and the picture within the renderer's 9000-pixel bound.
    assert width <= 9000 and height <= 9000
    assert width * height / nodes > 50 * 25


def test_svg_holds_vector_shapes_and_text(tmp_path, no_graphviz):
    path = draw.draw(small_network("lstm"), tmp_path / "lstm.svg", unroll=2)
    text = path.read_text()
    assert "<svg" in text and "<path" in text and "<text" in text
    assert "loss" in text and "t=1" in text


def test_dot_file_is_the_dot_text(tmp_path):
    g = small_network("gru")
    path = draw.draw(g, tmp_path / "gru.dot", unroll=3)
    assert path.read_text() == draw.to_dot(g.unroll(3))


def test_unknown_extension_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.dot, \.svg, \.png"):
        draw.draw(small_network("elman"), tmp_path / "x.jpg")


def test_graphviz_asked_for_but_missing_says_how_to_install_and_leaves_the_dot_text(tmp_path, no_graphviz):
    g = small_network("elman")
    with pytest.raises(draw.GraphvizMissing, match="apt install graphviz") as info:
        draw.draw(g, tmp_path / "e.svg", renderer="graphviz")
    assert "conda install" in str(info.value)
    assert (tmp_path / "e.dot").read_text() == draw.to_dot(g)
    assert not (tmp_path / "e.svg").exists()


def test_matplotlib_renderer_never_calls_graphviz(tmp_path, monkeypatch):
    monkeypatch.setattr(draw, "render_graphviz", lambda *a, **k: pytest.fail("Graphviz was called"))
    monkeypatch.setattr(draw, "dot_program", lambda: "/usr/bin/dot")
    _not_blank_png(draw.draw(small_network("elman"), tmp_path / "e.png", renderer="matplotlib"))


@pytest.mark.skipif(draw.dot_program() is None, reason="Graphviz's dot is not installed")
@pytest.mark.parametrize("unroll", [None, 3])
def test_graphviz_renders_svg_and_png(tmp_path, unroll):
    g = small_network("elman")
    svg = draw.draw(g, tmp_path / "e.svg", unroll=unroll, renderer="graphviz").read_text()
    assert "<svg" in svg
    assert ("shared by 3" in svg) if unroll else ("d=1" in svg)
    _not_blank_png(draw.draw(g, tmp_path / "e.png", unroll=unroll, renderer="graphviz"))


def test_draw_takes_only_graphs():
    with pytest.raises(TypeError, match="pass a Graph or an UnrolledGraph"):
        draw.to_dot("elman")
    with pytest.raises(ValueError, match="already unrolled over T=3"):
        draw.to_dot(small_network("elman").unroll(3), unroll=4)


# ---------------------------------------------------------------- command line


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("cell", cells.CELLS)
def test_cli_draws_each_cell_folded_and_unrolled(tmp_path, capsys, cell, no_graphviz):
    code, out, err = run_cli(["draw", cell, "-o", str(tmp_path / "f.dot")], capsys)
    assert code == 0 and err == ""
    assert 'class="delay"' in (tmp_path / "f.dot").read_text()
    code, out, err = run_cli(["draw", cell, "--unroll", "3", "-o", str(tmp_path / "u.dot")], capsys)
    assert code == 0, err
    nodes, edges = parse_dot((tmp_path / "u.dot").read_text())
    dag = build_network(cell).unroll(3)
    assert (len(nodes), len(edges)) == (len(dag.nodes), len(dag.edges))
    assert f"{len(dag.nodes)} nodes, {len(dag.edges)} edges" in out


def test_cli_renders_png_and_svg(tmp_path, capsys, no_graphviz):
    code, out, _ = run_cli(["draw", "lstm", "--unroll", "2", "-o", str(tmp_path / "l.png")], capsys)
    assert code == 0 and "with matplotlib" in out
    _not_blank_png(tmp_path / "l.png")
    code, _, _ = run_cli(["draw", "gru", "-o", str(tmp_path / "g.svg")], capsys)
    assert code == 0 and "<svg" in (tmp_path / "g.svg").read_text()


def test_cli_bad_extension_is_one_line_and_nonzero(tmp_path, capsys):
    code, out, err = run_cli(["draw", "elman", "-o", str(tmp_path / "e.jpg")], capsys)
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and ".svg" in err and "e.jpg" in err
    assert not (tmp_path / "e.jpg").exists()


def test_cli_unknown_what_is_one_line_and_nonzero(tmp_path, capsys):
    code, out, err = run_cli(["draw", "hopfield", "-o", str(tmp_path / "e.svg")], capsys)
    assert code != 0
    assert len(err.strip().splitlines()) == 1
    assert "unknown WHAT 'hopfield'" in err and "elman" in err and "module:function" in err


def test_cli_missing_graphviz_is_one_line_naming_the_install(tmp_path, capsys, no_graphviz):
    code, _, err = run_cli(["draw", "elman", "--renderer", "graphviz", "-o", str(tmp_path / "e.png")], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "apt install graphviz" in err and (tmp_path / "e.dot").exists()


def test_cli_draws_module_function(tmp_path, capsys, monkeypatch):
    (tmp_path / "draw_test_nets.py").write_text(
        "from unrolled.models.small_networks import small_network\n"
        "def net():\n    return small_network('gru')\n"
        "def unrolled():\n    return small_network('elman').unroll(2)\n"
        "def broken():\n    return 42\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    code, out, err = run_cli(["draw", "draw_test_nets:net", "-o", "g.dot"], capsys)
    assert code == 0, err
    assert parse_dot((tmp_path / "g.dot").read_text())[0].keys() >= {"Wn", "h", "xh"}
    code, out, err = run_cli(["draw", "draw_test_nets:unrolled", "-o", "u.dot"], capsys)
    assert code == 0 and "unrolled over T=2" in out
    code, out, err = run_cli(["draw", "draw_test_nets:broken", "-o", "b.dot"], capsys)
    assert code != 0 and "returned int" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["draw", "draw_test_nets:nothing", "-o", "b.dot"], capsys)
    assert code != 0 and "no function 'nothing'" in err
    code, out, err = run_cli(["draw", "no_such_module_xyz:net", "-o", "b.dot"], capsys)
    assert code != 0 and "cannot import module 'no_such_module_xyz'" in err


def test_cli_draws_a_checkpoint(tmp_path, capsys):
    charmodel = pytest.importorskip("unrolled.charlm.model")
    from unrolled.train.checkpoint import save_checkpoint

    config = charmodel.ModelConfig(cell="gru", hidden=4, layers=2, vocab_size=5, dtype="float64")
    arrays, meta = charmodel.checkpoint_contents(config, charmodel.TrainConfig(seq=6, batch=2), list("abcde"),
                                                 charmodel.init_params(config, 0))
    save_checkpoint(tmp_path / "m.npz", arrays, meta)
    code, out, err = run_cli(["draw", str(tmp_path / "m.npz"), "--unroll", "2", "-o", str(tmp_path / "m.dot")],
                             capsys)
    assert code == 0, err
    nodes, _ = parse_dot((tmp_path / "m.dot").read_text())
    assert "l1.h@1" in nodes and "out.W" in nodes
    code, _, err = run_cli(["draw", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "m.dot")], capsys)
    assert code != 0 and "missing.npz" in err and len(err.strip().splitlines()) == 1
