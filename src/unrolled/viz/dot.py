"""DOT text of a scene, and Graphviz's ``dot`` to render it.

The folded graph is left to ``dot`` to lay out. The unrolled graph carries
fixed positions from :func:`layout` (one column per step), which Graphviz
keeps when run as ``dot -Kneato -n2``. Every node and edge carries a
``class`` attribute (``param``, ``delay``, ``init``, ...), so a stylesheet
or a test can find them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .layout import layout
from .scene import Scene, SceneEdge, SceneNode, scene
from .styles import DELAY_COLOR, FILL

INSTALL_GRAPHVIZ = (
    "install Graphviz (`apt install graphviz` on Debian/Ubuntu, `brew install graphviz` on macOS, "
    "`conda install -c conda-forge graphviz` in a conda environment)"
)


class GraphvizMissing(RuntimeError):
    """Graphviz rendering was asked for but its ``dot`` program is not installed."""


def to_dot(what, unroll: int | None = None) -> str:
    """DOT text of a folded graph, or of the unrolled DAG (``unroll=T`` or an :class:`UnrolledGraph`).

    One line per node and one per edge: the unrolled graph's text has exactly
    ``len(dag.nodes)`` node lines and ``len(dag.edges)`` edge lines. The
    folded graph is left to ``dot`` to lay out. The unrolled graph carries
    fixed positions (``pos``, one column per step) that Graphviz keeps when run
    as ``dot -Kneato -n2``; plain ``dot`` ignores them and lays it out anew.
    """
    sc = what if isinstance(what, Scene) else scene(what, unroll)
    lines = [f"digraph {_quote(sc.title)} {{"]
    if sc.unrolled:
        lines += [
            "  // fixed positions: render with  dot -Kneato -n2 -Tsvg FILE.dot -o FILE.svg",
            f"  label={_quote(sc.title)}; labelloc=t; fontname=Helvetica; fontsize=16; splines=true;",
            '  node [fontname=Helvetica, fontsize=9, shape=box, style="rounded,filled", margin="0.05,0.02"];',
            "  edge [fontname=Helvetica, fontsize=8, arrowsize=0.5];",
        ]
        lines += _unrolled_dot_body(sc)
    else:
        lines += [
            f"  label={_quote(sc.title)}; labelloc=t; fontname=Helvetica; fontsize=14;",
            "  rankdir=BT; nodesep=0.2; ranksep=0.3;",
            '  node [fontname=Helvetica, fontsize=10, shape=box, style="rounded,filled", height=0.3];',
            "  edge [fontname=Helvetica, fontsize=9, arrowsize=0.6];",
        ]
        lines += [_dot_node(n) for n in sc.nodes]
    lines += [_dot_edge(sc, e) for e in sc.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


DOT_INCH_X, DOT_INCH_Y = 1.2, 0.62  # inches per slot and per layer in the unrolled graph's fixed layout


def _unrolled_dot_body(sc: Scene) -> list[str]:
    lay = layout(sc)
    pt = {nid: (x * DOT_INCH_X * 72, y * DOT_INCH_Y * 72) for nid, (x, y) in lay.pos.items()}
    half_w, half_h = 0.5 * DOT_INCH_X * 72, 0.5 * DOT_INCH_Y * 72

    def box(ids: list[str], room_above: float, room_below: float = 0.0) -> str:
        xs, ys = [pt[i][0] for i in ids], [pt[i][1] for i in ids]
        return (f"{min(xs) - half_w:.0f},{min(ys) - half_h - room_below:.0f},"
                f"{max(xs) + half_w:.0f},{max(ys) + half_h + room_above:.0f}")

    lines = []
    columns = [("cluster_init", "initial", -1)] + [(f"cluster_t{t}", f"t={t}", t) for t in range(sc.T)]
    for cluster, label, step in columns:
        members = [n for n in sc.nodes if n.step == step]
        if not members:
            continue
        style = ('style="rounded,dashed"' if step == -1
                 else 'style="rounded,filled"; fillcolor="#f4f4f4"; color="#cccccc"')
        lines.append(f"  subgraph {cluster} {{ label={_quote(label)}; fontsize=12; {style}; "
                     f'bb="{box([n.id for n in members], 18)}";')
        lines += ["  " + _dot_node(n, pt[n.id]) for n in members]
        lines.append("  }")
    params = [n for n in sc.nodes if n.kind == "param"]
    if params:
        lines.append('  subgraph cluster_params { label="parameters: one each, shared by every step"; fontsize=12; '
                     f'labelloc=b; style="rounded,dashed"; bb="{box([n.id for n in params], 0, 14)}";')
        lines += ["  " + _dot_node(n, pt[n.id]) for n in params]
        lines.append("  }")
    return lines


def _dot_node(n: SceneNode, pos: tuple[float, float] | None = None) -> str:
    attrs = {"label": n.label, "fillcolor": FILL[n.kind], "class": n.kind}
    if pos is not None:
        attrs["pos"] = f"{pos[0]:.1f},{pos[1]:.1f}!"
    if n.kind == "param":
        attrs["style"] = "filled"
        if n.shared_by:
            attrs["class"] = "param shared"
            attrs["comment"] = f"one parameter shared by {n.shared_by} copies"
            attrs["color"] = n.color
            attrs["penwidth"] = "2"
    elif n.kind == "init":
        attrs["style"] = "rounded,filled,dashed"
    return f"  {_quote(n.id)} [{_dot_attrs(attrs)}];"


def _dot_edge(sc: Scene, e: SceneEdge) -> str:
    attrs: dict[str, str] = {"class": e.kind}
    if e.kind == "delay":
        attrs.update(color=DELAY_COLOR, fontcolor=DELAY_COLOR, style="dashed", constraint="false", penwidth="1.2")
        if not sc.unrolled or e.depth > 1:
            attrs["label"] = f"d={e.depth}"
        attrs["comment"] = f"delay edge, depth {e.depth}"
    elif e.kind == "param":
        if sc.unrolled:
            attrs.update(color=sc.node(e.src).color, penwidth="0.6", constraint="false")
        else:
            attrs.update(color="#777777")
    elif e.kind == "init":
        attrs.update(style="dotted", label="init", constraint="false")
    return f"  {_quote(e.src)} -> {_quote(e.dst)} [{_dot_attrs(attrs)}];"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_attrs(attrs: dict[str, str]) -> str:
    return ", ".join(f"{k}={_quote(str(v))}" for k, v in attrs.items())


def dot_program() -> str | None:
    """The path of Graphviz's ``dot``, or None when it is not installed (``UNROLLED_DOT`` overrides)."""
    return os.environ.get("UNROLLED_DOT") or shutil.which("dot")


def render_graphviz(dot: str, text: str, path: Path, fmt: str, fixed: bool) -> None:
    layout_flags = ["-Kneato", "-n2"] if fixed else []  # keep the positions to_dot wrote
    try:
        done = subprocess.run([dot, *layout_flags, f"-T{fmt}", "-o", str(path)], input=text, capture_output=True,
                              text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"Graphviz could not render '{path}': {e}") from None
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise RuntimeError(f"Graphviz could not render '{path}': {first}")
