"""The folded recurrent graph: its vertices and delay edges, the op table, initializers, unroll(T).

The lowest layer: it imports NumPy and nothing native, and every engine reads it.
"""

from .folded import Graph, Loss, Param, Vertex

__all__ = ["Graph", "Loss", "Param", "Vertex"]
