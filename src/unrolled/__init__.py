"""unrolled: recurrent networks as the textbook draws them.

A recurrent network is a directed graph of vector vertices whose cycles pass
through delay edges (:mod:`unrolled.graph`); unrolling it over T steps gives
an acyclic graph sharing its weights (:mod:`unrolled.unroll`); back-
propagation through time trains it, literally on the unrolled graph
(:mod:`unrolled.reference`) or fast from the folded one
(:mod:`unrolled.compiled`). See README.md.
"""

from .engines import make_engine
from .graph import Graph, Param, Vertex
from .unroll import unroll

__version__ = "0.1.0"
__all__ = ["Graph", "Param", "Vertex", "make_engine", "unroll", "__version__"]
