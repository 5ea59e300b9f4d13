"""Render a scene with matplotlib: the fallback when Graphviz is not installed.

Boxes sit at the positions of :func:`layout`; edges that span several
layers curve through their waypoints, and delay edges run along their
lanes through the gaps between rows, so no edge crosses a box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .layout import Layout, layout
from .scene import Scene, SceneEdge, SceneNode
from .styles import DELAY_COLOR, FILL, PARAM_COLORS


@dataclass
class _Geometry:
    """Sizes of the matplotlib picture: one unit is one node slot across and one layer up."""

    inch_x: float  # inches per unit across
    inch_y: float  # inches per layer
    box_w: float  # node box, in units
    box_h: float
    font: float  # points


def _geometry(sc: Scene) -> _Geometry:
    if sc.unrolled:
        return _Geometry(inch_x=0.74, inch_y=0.42, box_w=0.9, box_h=0.56, font=6.5)
    return _Geometry(inch_x=1.1, inch_y=0.72, box_w=0.9, box_h=0.62, font=8)


def render_matplotlib(sc: Scene, path: Path) -> None:
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    lay = layout(sc)
    geo = _geometry(sc)
    xs = [x for x, _ in lay.pos.values()] + list(lay.lanes.values())
    ys = [y for _, y in lay.pos.values()]
    x_lo, x_hi = min(xs) - 0.8, max(xs) + 0.8
    y_lo, y_hi = min(ys) - 0.7, max(ys) + (1.2 if sc.unrolled else 0.7)
    handles = [Patch(facecolor=FILL[k], edgecolor="#444444", label=k)
               for k in ("input", "state", "op", "output", "loss", "param")
               if any(n.kind == k for n in sc.nodes)]
    handles.append(Line2D([], [], color=DELAY_COLOR, linestyle="--", label="delay edge"))
    if sc.unrolled:
        handles.append(Line2D([], [], color=PARAM_COLORS[0], lw=0.8, label="parameter → the copies using it"))
    width_in = max(5.0, (x_hi - x_lo) * geo.inch_x)
    ncol = max(1, min(len(handles), int(width_in / 1.3)))
    legend_in = 0.2 + 0.2 * -(-len(handles) // ncol)
    title_in = 0.45
    height_in = max(2.5, (y_hi - y_lo) * geo.inch_y) + legend_in + title_in
    with matplotlib.rc_context({"svg.fonttype": "none", "font.family": "DejaVu Sans"}):
        fig = Figure(figsize=(width_in, height_in))
        ax = fig.add_axes((0, legend_in / height_in, 1, 1 - (legend_in + title_in) / height_in))
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(y_lo, y_hi)
        ax.axis("off")
        fig.suptitle(sc.title, fontsize=geo.font + 4, y=1 - 0.12 / height_in, va="top")
        if sc.unrolled:
            _draw_columns(ax, sc, lay.pos, geo)
        for n in sc.nodes:
            _draw_node(ax, n, lay.pos[n.id], geo)
        for i, e in enumerate(sc.edges):
            _draw_edge(ax, sc, i, e, lay, geo)
        fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=geo.font + 0.5,
                   frameon=False, borderaxespad=0.3)
        dpi = min(150.0, 9000.0 / max(width_in, height_in))  # keep big pictures under ~9000 pixels
        fig.savefig(path, dpi=dpi, facecolor="white")


def _draw_columns(ax, sc: Scene, pos, geo: _Geometry) -> None:
    """Light bands behind each step's column, with a 't=…' header."""
    from matplotlib.patches import Rectangle

    columns: dict[int, list[float]] = {}
    for n in sc.nodes:
        if n.step is not None:
            columns.setdefault(n.step, []).append(pos[n.id][0])
    stepped = [pos[n.id][1] for n in sc.nodes if n.step is not None]
    top, bottom = max(stepped) + 0.55, min(stepped) - 0.5
    for step, xs in sorted(columns.items()):
        lo, hi = min(xs) - 0.5, max(xs) + 0.5
        shade = "#fbf3df" if step < 0 else ("#f2f2f2" if step % 2 == 0 else "#e9eef5")
        ax.add_artist(Rectangle((lo, bottom), hi - lo, top - bottom, facecolor=shade, edgecolor="none", zorder=0))
        ax.text((lo + hi) / 2, top + 0.1, "initial" if step < 0 else f"t={step}", ha="center", va="bottom",
                fontsize=geo.font + 2, fontweight="bold", color="#444444")


def _draw_node(ax, n: SceneNode, xy, geo: _Geometry) -> None:
    from matplotlib.patches import FancyBboxPatch

    x, y = xy
    w, h = geo.box_w, geo.box_h
    if n.kind == "param":
        style, edge, lw = "square,pad=0", n.color, 1.4
    else:
        style, edge, lw = "round,pad=0,rounding_size=0.12", "#444444", 0.7
    ax.add_artist(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=style, facecolor=FILL[n.kind],
                                edgecolor=edge, linewidth=lw, linestyle="--" if n.kind == "init" else "-",
                                zorder=3))
    ax.text(x, y, n.short, ha="center", va="center", fontsize=geo.font, zorder=4, linespacing=1.05)


def _clip(a, b, geo: _Geometry) -> tuple[float, float]:
    """Where the segment from box centre ``a`` towards ``b`` leaves the box around ``a``."""
    dx, dy = (b[0] - a[0]) * geo.inch_x, (b[1] - a[1]) * geo.inch_y  # in inches, so boxes stay boxes
    hw, hh = geo.box_w / 2 * geo.inch_x, geo.box_h / 2 * geo.inch_y
    if dx == 0 and dy == 0:
        return a
    t = min(hw / abs(dx) if dx else float("inf"), hh / abs(dy) if dy else float("inf"))
    return a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t


def _draw_edge(ax, sc: Scene, i: int, e: SceneEdge, lay: Layout, geo: _Geometry) -> None:
    from matplotlib.patches import FancyArrowPatch
    from matplotlib.path import Path as MplPath

    a, b = lay.pos[e.src], lay.pos[e.dst]
    style = dict(color="#333333", lw=0.7, linestyle="-", zorder=2, mutation_scale=7)
    if e.kind == "delay":
        style.update(color=DELAY_COLOR, lw=0.9, linestyle="--")
    elif e.kind == "param":
        style.update(color=sc.node(e.src).color if sc.unrolled else "#777777")
        if sc.unrolled:
            style.update(lw=0.45, zorder=1, mutation_scale=5, alpha=0.55)
    elif e.kind == "init":
        style.update(color="#777777", linestyle=":")
    label_at = None
    if i in lay.lanes:
        # Up out of the source into the gap above its row, along that gap to the lane, down the lane,
        # along the gap below the reader, up into it: through the gaps, so it crosses no box.
        lane = lay.lanes[i]
        nudge = 0.06 * (i % 3 - 1)  # parallel delay edges do not quite overlap
        ax_, bx = (a[0] + math.copysign(geo.box_w / 4, lane - a[0]), b[0] + math.copysign(geo.box_w / 4, lane - b[0]))
        above, below = a[1] + 0.5 + nudge, b[1] - 0.5 + nudge
        points = [(ax_, a[1] + geo.box_h / 2), (ax_, above), (lane, above), (lane, below), (bx, below),
                  (bx, b[1] - geo.box_h / 2)]
        path = _rounded(points, 0.2, MplPath)
        label_at = (lane, (above + below) / 2)
    else:
        via = lay.waypoints.get(i, [])
        start = _clip(a, via[0] if via else b, geo)
        end = _clip(b, via[-1] if via else a, geo)
        path = _smooth([start, *via, end], MplPath)
    ax.add_artist(FancyArrowPatch(path=path, arrowstyle="-|>", **style))
    if label_at is not None and (not sc.unrolled or e.depth > 1):
        ax.text(*label_at, f"d={e.depth}", color=DELAY_COLOR, fontsize=geo.font, ha="center", va="center",
                zorder=5, bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none"))


def _rounded(points, radius: float, MplPath):
    """A polyline through ``points`` with its corners rounded off (quadratic Béziers)."""
    verts, codes = [points[0]], [MplPath.MOVETO]
    for k in range(1, len(points) - 1):
        p, q, r = points[k - 1], points[k], points[k + 1]
        d_in, d_out = math.dist(p, q), math.dist(q, r)
        if d_in == 0 or d_out == 0:
            continue
        cut = min(radius, d_in / 2, d_out / 2)
        enter = (q[0] + (p[0] - q[0]) * cut / d_in, q[1] + (p[1] - q[1]) * cut / d_in)
        leave = (q[0] + (r[0] - q[0]) * cut / d_out, q[1] + (r[1] - q[1]) * cut / d_out)
        verts += [enter, q, leave]
        codes += [MplPath.LINETO, MplPath.CURVE3, MplPath.CURVE3]
    verts.append(points[-1])
    codes.append(MplPath.LINETO)
    return MplPath(verts, codes)


def _smooth(points, MplPath):
    """A path through ``points``: straight for two, else a Catmull-Rom curve as cubic Béziers."""
    if len(points) == 2:
        return MplPath(points, [MplPath.MOVETO, MplPath.LINETO])
    verts, codes = [points[0]], [MplPath.MOVETO]
    ext = [points[0], *points, points[-1]]
    for k in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[k - 1], ext[k], ext[k + 1], ext[k + 2]
        c1 = (p1[0] + (p2[0] - p0[0]) / 6, p1[1] + (p2[1] - p0[1]) / 6)
        c2 = (p2[0] - (p3[0] - p1[0]) / 6, p2[1] - (p3[1] - p1[1]) / 6)
        verts += [c1, c2, p2]
        codes += [MplPath.CURVE4] * 3
    return MplPath(verts, codes)
