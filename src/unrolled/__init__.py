"""unrolled: recurrent networks as the textbook draws them.

A recurrent network is a directed graph of vector vertices whose cycles pass
through delay edges (:mod:`unrolled.graph.folded`); unrolling it over T steps gives
an acyclic graph sharing its weights (:mod:`unrolled.graph.unroll`); back-
propagation through time trains it, literally on the unrolled graph
(:mod:`unrolled.engines.reference`) or fast from the folded one
(:mod:`unrolled.engines.compiled.engine`). See README.md.
"""

from unrolled.engines.registry import make_engine
from unrolled.graph.folded import Graph, Param, Vertex
from unrolled.graph.unroll import unroll
from unrolled.models import cells

__version__ = "0.1.0"
__all__ = ["Graph", "Param", "Vertex", "cells", "make_engine", "unroll", "__version__"]
