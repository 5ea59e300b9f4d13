"""Draw the folded graph of a network, or its graph unrolled over T steps.

WHAT is a cell name (elman, jordan, lstm, gru: a small classifier around
the cell, sized by --inputs/--hidden/--outputs/--layers), a checkpoint (a
.npz file or a run folder written by `unrolled train`), or module:function,
a function of no arguments returning a Graph (the current directory is
searched for the module).

FILE ends in .svg, .png or .dot. SVG and PNG are rendered by Graphviz's
`dot` when it is installed and by matplotlib otherwise (--renderer picks).

examples:
  unrolled draw elman -o elman.svg
  unrolled draw elman --unroll 4 -o elman4.png
  unrolled draw lstm --layers 2 --unroll 5 -o lstm.png
  unrolled draw runs/shakespeare --unroll 3 -o model.dot
  unrolled draw mynets:encoder -o encoder.svg
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from unrolled.graph.folded import Graph
from unrolled.graph.unroll import UnrolledGraph
from unrolled.models import cells
from unrolled.viz import draw as drawing
from unrolled.viz.draw import FORMATS, RENDERERS
from unrolled.words import count as _count

from . import UsageError

MAX_DRAWN_NODES = 2_000  # an unrolled picture larger than this is unreadable at any size


def add_arguments(p) -> None:
    p.add_argument("what", metavar="WHAT", help="a cell name, a checkpoint (.npz or run folder), or module:function")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the picture: .svg, .png or .dot")
    p.add_argument("--unroll", type=int, metavar="T", help="draw the graph unrolled over T steps (default: folded)")
    p.add_argument("--renderer", choices=RENDERERS, default="auto",
                   help="auto (Graphviz when installed, else matplotlib), graphviz or matplotlib")
    add_network_arguments(p, hidden=4, inputs=3, outputs=3)


def add_network_arguments(p, *, hidden: int, inputs: int, outputs: int) -> None:
    """The options that size a network built from a cell name (shared with `unrolled diagnose`)."""
    group = p.add_argument_group("a network built from a cell name")
    group.add_argument("--layers", type=int, default=1, metavar="N", help="stacked layers of the cell (default 1)")
    group.add_argument("--hidden", type=int, default=hidden, metavar="N", help=f"hidden size (default {hidden})")
    if inputs:
        group.add_argument("--inputs", type=int, default=inputs, metavar="N", help=f"input size (default {inputs})")
        group.add_argument("--outputs", type=int, default=outputs, metavar="N",
                           help=f"output classes (default {outputs})")
    group.add_argument("--forget-bias", type=float, default=0.0, metavar="B",
                       help="LSTM: starting value of the forget gate's bias (default 0)")


def run(args) -> int:
    path = Path(args.output)
    check_extension(path, FORMATS)
    if args.unroll is not None and args.unroll < 1:
        raise UsageError(f"--unroll {args.unroll}: unroll over at least 1 step")
    model = load_model(args.what, layers=args.layers, hidden=args.hidden, inputs=args.inputs,
                       outputs=args.outputs, forget_bias=args.forget_bias)
    T = args.unroll if args.unroll is not None else model.unroll
    if T is not None:
        check_drawable(model.graph, T)
    what = model.graph if T is None else model.graph.unroll(T)
    drawing.draw(what, path, renderer=args.renderer)
    if isinstance(what, UnrolledGraph):
        shown = f"{model.graph.name} unrolled over T={what.T}: {len(what.nodes)} nodes, {len(what.edges)} edges"
    else:
        g = model.graph
        shown = (f"folded graph of {g.name}: {_count(len(g.params), 'parameter')}, "
                 f"{_count(len(g.vertices) - len(g.delays), 'vertex', 'vertices')}, "
                 f"{_count(len(g.delays), 'delay edge')}")
    how = ""
    if path.suffix.lower() != ".dot":
        how = " with Graphviz" if args.renderer != "matplotlib" and drawing.dot_program() else " with matplotlib"
    print(f"wrote {path}{how} ({shown})")
    return 0


def check_drawable(graph: Graph, T: int) -> None:
    """Refuse an unrolled picture too large to read, before spending minutes laying it out."""
    one, two = len(graph.unroll(1).nodes), len(graph.unroll(2).nodes)
    per_step, shared = two - one, 2 * one - two
    nodes = shared + per_step * T
    if nodes > MAX_DRAWN_NODES:
        most = max(1, (MAX_DRAWN_NODES - shared) // max(per_step, 1))
        raise UsageError(f"--unroll {T}: the picture would have {nodes:,} nodes; more than {MAX_DRAWN_NODES:,} "
                         f"cannot be read and take minutes to lay out; every step looks the same, so draw at most "
                         f"--unroll {most}")


def check_extension(path: Path, formats) -> None:
    if path.suffix.lower() not in formats:
        raise UsageError(f"cannot write '{path}': the file name must end in {', '.join(formats)}")


# ------------------------------------------------------ what WHAT names


@dataclass
class Model:
    """A graph named on the command line, with its parameters when WHAT carries them."""

    graph: Graph
    params: dict | None = None  # a checkpoint's (or a function's) parameters; None: fresh ones are needed
    meta: dict = field(default_factory=dict)  # a checkpoint's JSON meta
    kind: str = "cell"  # cell, checkpoint or function
    unroll: int | None = None  # a function that returned an unrolled graph: its T


def load_model(what: str, *, layers: int = 1, hidden: int = 4, inputs: int = 3, outputs: int = 3,
               forget_bias: float = 0.0) -> Model:
    """Resolve WHAT: a cell name, a checkpoint file or run folder, or ``module:function``."""
    if what in cells.CELLS:
        return Model(build_network(what, inputs=inputs, hidden=hidden, outputs=outputs, layers=layers,
                                   forget_bias=forget_bias))
    path = Path(what)
    if path.exists() or what.endswith(".npz"):
        return _from_checkpoint(path)
    if ":" in what:
        return _from_function(what)
    raise UsageError(
        f"unknown WHAT '{what}': give a cell name ({', '.join(cells.CELLS)}), a checkpoint (a .npz file or a "
        f"run folder) or module:function returning a Graph"
    )


def build_network(cell: str, *, inputs: int = 3, hidden: int = 4, outputs: int = 3, layers: int = 1,
                  forget_bias: float = 0.0) -> Graph:
    """A small classifier around a cell: ``x -> cell (× layers) -> linear y -> cross-entropy with target``.

    The shape of ``gradcheck.small_network``, with layers and sizes to choose.
    """
    for name, value in (("--inputs", inputs), ("--hidden", hidden), ("--outputs", outputs), ("--layers", layers)):
        if value < 1:
            raise UsageError(f"{name} {value}: it must be at least 1")
    g = Graph(cell if layers == 1 else f"{cell}-{layers}-layers")
    x = g.input("x", inputs)
    kw = {"forget_bias": forget_bias} if cell == "lstm" and forget_bias else {}
    if cell == "jordan" and layers == 1:
        _, y = cells.jordan(g, x, hidden, outputs)  # the output is the fed-back state itself
    else:
        h = cells.layer(g, cell, x, hidden, **kw) if layers == 1 else cells.stack(g, cell, x, hidden, layers, **kw)
        y = g.linear(g.param("out.W", (outputs, hidden)), h, g.param("out.b", (outputs,), init="zeros"), name="y")
    g.output(y)
    g.loss("cross_entropy", y, g.index_input("target", outputs), name="loss")
    return g.check()


def _from_checkpoint(path: Path) -> Model:
    try:
        from unrolled.charlm.model import graph_from_checkpoint
    except ImportError as e:
        raise RuntimeError(
            f"cannot read checkpoint '{path}': this installation has no language-model support "
            f"(unrolled.charlm.model.graph_from_checkpoint: {e})"
        ) from None
    graph, params, meta = graph_from_checkpoint(path)
    return Model(graph, params, meta, kind="checkpoint")


def _from_function(what: str) -> Model:
    module_name, _, function_name = what.rpartition(":")
    if not module_name or not function_name:
        raise UsageError(f"'{what}' is not module:function; write it as e.g. mynets:elman")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: modules in the current folder are found
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module '{module_name}' (from '{what}'): {e}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"module '{module_name}' has no function '{function_name}' (from '{what}')")
    try:
        result = function()
    except Exception as e:  # the user's code: report it in one line like every other mistake
        raise RuntimeError(f"{what}() raised {type(e).__name__}: {e}") from None
    params, unroll = None, None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        result, params = result
    if isinstance(result, UnrolledGraph):
        result, unroll = result.graph, result.T
    if not isinstance(result, Graph):
        raise ValueError(f"{what}() returned {type(result).__name__}; it must return a Graph (or (Graph, params))")
    return Model(result.check(), params, kind="function", unroll=unroll)
