"""The plain data of a folded graph: parameters, vertices, losses.

A :class:`Vertex` carries a reference to its graph only so that ``h.prev``
reads naturally; building and checking live in :mod:`.folded` and
:mod:`.checks`, printing in :mod:`.text`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .folded import Graph


@dataclass(eq=False)
class Param:
    """A weight shared by every time step: one array, many copies in the unrolled graph."""

    name: str
    shape: tuple[int, ...]
    init: str  # an initializer spec, see initializers.py

    def __repr__(self) -> str:
        return f"Param({self.name!r}, {list(self.shape)})"


@dataclass(eq=False)
class Vertex:
    """A vector of ``size`` features at every time step.

    ``kind`` is one of: ``input`` (dense per-step data), ``index`` (integer
    per-step data, ``size`` = number of classes), ``op`` (computed by
    ``op`` from ``args``), ``delay`` (``args[0]``'s value ``attrs['depth']``
    steps ago) or ``pending`` (a declared state not yet defined).
    """

    graph: "Graph" = field(repr=False)
    name: str
    size: int
    kind: str
    op: str | None = None
    args: tuple = ()
    attrs: dict = field(default_factory=dict)
    is_state: bool = False  # declared with g.state()
    init: str = "zeros"  # how a delay reads this vertex before step 0

    @property
    def prev(self) -> "Vertex":
        """This vertex's value one step earlier (a delay edge of depth 1)."""
        return self.graph.delay(self, 1)

    def delay(self, depth: int) -> "Vertex":
        """This vertex's value ``depth`` steps earlier."""
        return self.graph.delay(self, depth)

    @property
    def source(self) -> "Vertex":
        """For a delay vertex, the vertex it reads."""
        assert self.kind == "delay"
        return self.args[0]

    @property
    def depth(self) -> int:
        return self.attrs["depth"]

    def __repr__(self) -> str:
        return f"Vertex({self.name!r}, [{self.size}], {self.kind})"


@dataclass(eq=False)
class Loss:
    """A per-step loss: ``kind(prediction, target)`` at every step, masked and reduced."""

    name: str
    vertex: Vertex  # the op vertex computing the per-row loss [B, 1]
    reduce: str  # "mean": divided by the number of unmasked (step, row) pairs; "sum": not

    @property
    def prediction(self) -> Vertex:
        return self.vertex.args[0]
