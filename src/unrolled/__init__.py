"""unrolled: recurrent networks as the textbook draws them.

A recurrent network is a directed graph of vector vertices whose cycles pass
through delay edges (:mod:`unrolled.graph.folded`); unrolling it over T steps gives
an acyclic graph sharing its weights (:mod:`unrolled.graph.unroll`); back-
propagation through time trains it, literally on the unrolled graph
(:mod:`unrolled.engines.reference`) or fast from the folded one
(:mod:`unrolled.engines.compiled.engine`). See README.md.

The names below load on first use (PEP 562): ``import unrolled`` itself imports
nothing, so that the ``unrolled`` command can take over Ctrl-C and SIGTERM
(launch.py) before NumPy and the rest load.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["Graph", "Param", "Vertex", "cells", "make_engine", "unroll", "__version__"]

_WHERE = {  # public name -> the module that defines it ("cells" is a module itself)
    "Graph": "unrolled.graph.folded",
    "Param": "unrolled.graph.folded",
    "Vertex": "unrolled.graph.folded",
    "make_engine": "unrolled.engines.registry",
    "unroll": "unrolled.graph.unroll",
    "cells": "unrolled.models.cells",
}


def __getattr__(name: str):
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'unrolled' has no attribute {name!r}")
    module = importlib.import_module(where)
    value = module if name == "cells" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
