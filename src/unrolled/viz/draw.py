"""Pictures of recurrent graphs: the folded graph with its backward arrows,
and the unrolled DAG with time running left to right.

    to_dot(graph)                       # DOT text of the folded graph
    to_dot(graph.unroll(5))             # DOT text of the unrolled DAG
    draw(graph, "elman.svg")            # .dot, .svg or .png
    draw(graph, "elman5.png", unroll=5)

Both renderers start from one description of the picture, a :class:`Scene`
(nodes with a kind, a column and a layer; edges with a kind), so the DOT text
and the matplotlib drawing show the same thing. SVG and PNG come from
Graphviz's ``dot`` when it is installed and from matplotlib otherwise;
``renderer=`` picks one explicitly.

The stages live in modules of their own: scene.py (what the picture shows),
layout.py (where each node goes), dot.py (DOT text and Graphviz),
matplotlib_render.py (the fallback renderer), styles.py (colours shared by
both). This module picks the renderer and re-exports their public names.

What the pictures say, in both renderers: data flows bottom to top (inputs
below, outputs and losses above); parameters are grey boxes; a vertex read
through a delay (a state) is yellow; delay edges are red and dashed. In the
folded graph the delay edges are the backward arrows that close the cycles,
labelled with their depth ``d=k``. In the unrolled graph there is one column
per step, the initial states in a column of their own at the left; delay edges
run from one column to a later one; each parameter is drawn once, in a row
below the columns, and linked to every copy that reads it by edges of its own
colour. In the DOT text every node and edge carries a ``class`` attribute
(``param``, ``delay``, ``init``, ...), and shared parameters are marked
``class="param shared"`` with the number of copies that read them.
"""

from __future__ import annotations

from pathlib import Path

from .dot import INSTALL_GRAPHVIZ, GraphvizMissing, dot_program, render_graphviz, to_dot
from .layout import Layout, layout
from .matplotlib_render import render_matplotlib
from .scene import Scene, SceneEdge, SceneNode, scene, vertex_layers

__all__ = ["FORMATS", "RENDERERS", "GraphvizMissing", "Layout", "Scene", "SceneEdge", "SceneNode", "dot_program",
           "draw", "layout", "render_graphviz", "render_matplotlib", "scene", "to_dot", "vertex_layers"]

FORMATS = (".dot", ".svg", ".png")
RENDERERS = ("auto", "graphviz", "matplotlib")


def draw(what, path, *, unroll: int | None = None, renderer: str = "auto") -> Path:
    """Write a picture of a folded graph, or of its unrolled DAG, to ``path`` (.dot, .svg or .png).

    ``unroll=T`` (or passing an :class:`UnrolledGraph`) draws the unrolled
    DAG. ``renderer``: ``"auto"`` uses Graphviz's ``dot`` when it is
    installed and matplotlib otherwise; ``"graphviz"`` insists on Graphviz
    (when it is missing, the DOT text is written next to ``path`` and
    :class:`GraphvizMissing` says how to install it); ``"matplotlib"`` never
    calls Graphviz. Returns the path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot draw to '{path}': the file name must end in {', '.join(FORMATS)}")
    if renderer not in RENDERERS:
        raise ValueError(f"unknown renderer '{renderer}'; use one of {', '.join(RENDERERS)}")
    sc = scene(what, unroll)
    if suffix == ".dot":
        path.write_text(to_dot(sc))
        return path
    dot = dot_program()
    if renderer == "graphviz" and dot is None:
        dot_path = path.with_suffix(".dot")
        dot_path.write_text(to_dot(sc))
        raise GraphvizMissing(
            f"cannot render '{path}' with Graphviz: its `dot` program is not installed; "
            f"{INSTALL_GRAPHVIZ}, or use the matplotlib renderer; the DOT text is in '{dot_path}'"
        )
    if dot is not None and renderer != "matplotlib":
        render_graphviz(dot, to_dot(sc), path, suffix[1:], fixed=sc.unrolled)
    else:
        render_matplotlib(sc, path)
    return path
