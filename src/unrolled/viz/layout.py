"""Where each node of a scene goes: a layered (Sugiyama-style) layout, time on x when unrolled.

The matplotlib renderer draws at these positions, and the unrolled graph's
DOT text carries them, so both renderers place a step's column alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .scene import Scene, SceneNode


@dataclass
class Layout:
    """Where things go, in slot units (x across, y = layer, up): for the matplotlib renderer, and as the
    fixed positions in the unrolled graph's DOT text.

    ``pos``: each node's centre. ``waypoints[i]``: for an edge that spans
    several layers, the points it passes through on the way (one per layer
    between its ends, each holding a slot of its own, so it never crosses a
    box). ``lanes[i]``: for a delay edge, the x of the vertical lane it runs
    along, beside the graph (folded) or in the gap before its reader's
    column (unrolled).
    """

    pos: dict[str, tuple[float, float]]
    waypoints: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    lanes: dict[int, float] = field(default_factory=dict)


NODE_WIDTH, DUMMY_WIDTH = 1.0, 0.45  # slots taken in a row by a box and by an edge passing through


def layout(sc: Scene) -> Layout:
    """Positions for a scene: a layered (Sugiyama-style) layout; time on x for the unrolled graph."""
    return _unrolled_layout(sc) if sc.unrolled else _folded_layout(sc)


def _folded_layout(sc: Scene) -> Layout:
    layer = {n.id: n.layer for n in sc.nodes}
    links = [(i, e.src, e.dst) for i, e in enumerate(sc.edges) if e.kind != "delay"]
    xs = _layered(layer, links)
    out = Layout({n.id: (xs[n.id], float(n.layer)) for n in sc.nodes})
    out.waypoints = _waypoints(links, layer, xs)
    # Backward arrows run in lanes beside the graph, nested: the longest outermost.
    left, right = min(xs.values()), max(xs.values())
    centre = (left + right) / 2
    delays = [(i, e) for i, e in enumerate(sc.edges) if e.kind == "delay"]
    delays.sort(key=lambda ie: abs(layer[ie[1].src] - layer[ie[1].dst]))
    used = {"left": 0, "right": 0}
    for i, e in delays:
        side = "right" if xs[e.src] + xs[e.dst] >= 2 * centre else "left"
        used[side] += 1
        out.lanes[i] = right + 0.35 + 0.3 * used[side] if side == "right" else left - 0.35 - 0.3 * used[side]
    return out


def _unrolled_layout(sc: Scene) -> Layout:
    # One template column, laid out once and repeated for every step.
    layer = {n.group: n.layer for n in sc.nodes if n.step == 0}
    group_of = {n.id: n.group for n in sc.nodes}
    links = [(i, group_of[e.src], group_of[e.dst]) for i, e in enumerate(sc.edges)
             if e.kind == "data" and sc.node(e.dst).step == 0]
    xs = _layered(layer, links)
    lo = min(xs.values()) - NODE_WIDTH / 2
    col_w = max(xs.values()) + NODE_WIDTH / 2 - lo
    xs = {g: x - lo for g, x in xs.items()}  # template x from 0 to col_w
    states = sorted({group_of[e.src] for e in sc.edges if e.kind == "delay"})
    gap = max(0.8, 0.3 * (len(states) + 1))
    inits: dict[int, list[SceneNode]] = {}
    for n in sc.nodes:
        if n.kind == "init":
            inits.setdefault(n.layer, []).append(n)
    init_w = max((len(r) for r in inits.values()), default=0) * NODE_WIDTH
    x0 = init_w + gap if init_w else 0.0

    def column_left(step: int) -> float:
        return x0 + step * (col_w + gap)

    out = Layout({})
    for n in sc.nodes:
        if n.step is not None and n.step >= 0:
            out.pos[n.id] = (column_left(n.step) + xs[n.group], float(n.layer))
    for y, row in inits.items():
        row.sort(key=lambda n: int(n.id.rsplit("@", 1)[1]))
        for i, n in enumerate(row):
            out.pos[n.id] = (init_w - (len(row) - i - 0.5) * NODE_WIDTH, float(y))
    template_waypoints = _waypoints(links, layer, xs)
    for i, e in enumerate(sc.edges):
        dst = sc.node(e.dst)
        if e.kind == "data":
            same = next((j for j, a, b in links if a == group_of[e.src] and b == dst.group), None)
            if same in template_waypoints:
                out.waypoints[i] = [(column_left(dst.step) + x, y) for x, y in template_waypoints[same]]
        elif e.kind == "delay":
            k = states.index(group_of[e.src])
            out.lanes[i] = column_left(dst.step) - gap / 2 + (k - (len(states) - 1) / 2) * (gap / (len(states) + 1))
    # Parameters: one row below everything, spread across the width, each near its users.
    params = [n for n in sc.nodes if n.kind == "param"]
    if params:
        users: dict[str, list[float]] = {n.id: [] for n in params}
        for e in sc.edges:
            if e.kind == "param" and e.dst in out.pos:
                users[e.src].append(out.pos[e.dst][0])
        params.sort(key=lambda n: sum(users[n.id]) / max(len(users[n.id]), 1))
        right = column_left(sc.T) - gap - NODE_WIDTH / 2
        left = NODE_WIDTH / 2
        step = (right - left) / (len(params) - 1) if len(params) > 1 else 0.0
        start = left if len(params) > 1 else (left + right) / 2
        bottom = min(y for _, y in out.pos.values()) - 1.5
        for i, n in enumerate(params):
            out.pos[n.id] = (start + i * step, bottom)
    return out


def _layered(layer: dict[str, int], links: list[tuple[int, str, str]], sweeps: int = 6) -> dict[str, float]:
    """An x for every node and every waypoint, each row ordered to cut crossings.

    A link spanning several layers gets a dummy in each layer between its
    ends; the rows are then ordered by the barycentre heuristic (each item
    moved to the mean x of its neighbours in the row below, then above, a few
    sweeps) and packed, boxes one slot wide, dummies narrower.
    """
    rows: dict[int, list[str]] = {}
    for nid, y in layer.items():
        rows.setdefault(y, []).append(nid)
    below: dict[str, list[str]] = {}
    above: dict[str, list[str]] = {}
    for i, a, b in links:
        chain = [a] + [f"\0{i}:{y}" for y in range(layer[a] + 1, layer[b])] + [b]
        for y, d in zip(range(layer[a] + 1, layer[b]), chain[1:-1]):
            rows.setdefault(y, []).append(d)
        for u, v in zip(chain, chain[1:]):
            below.setdefault(v, []).append(u)
            above.setdefault(u, []).append(v)
    rows = dict(sorted(rows.items()))

    def pack() -> dict[str, float]:
        xs = {}
        for ids in rows.values():
            widths = [DUMMY_WIDTH if d.startswith("\0") else NODE_WIDTH for d in ids]
            x = -sum(widths) / 2
            for d, w in zip(ids, widths):
                xs[d] = x + w / 2
                x += w
        return xs

    for sweep in range(sweeps):
        neighbours, order = (below, list(rows)) if sweep % 2 == 0 else (above, list(rows)[::-1])
        for y in order:
            xs = pack()

            def centre(d: str) -> float:
                near = [xs[m] for m in neighbours.get(d, [])]
                return sum(near) / len(near) if near else xs[d]

            rows[y] = sorted(rows[y], key=lambda d: (centre(d), xs[d]))
    return pack()


def _waypoints(links, layer, xs) -> dict[int, list[tuple[float, float]]]:
    return {
        i: [(xs[f"\0{i}:{y}"], float(y)) for y in range(layer[a] + 1, layer[b])]
        for i, a, b in links
        if layer[b] - layer[a] > 1
    }
