"""Choosing an engine by name: the one place that knows which engines exist."""

from __future__ import annotations

from unrolled.graph.folded import Graph

ENGINE_NAMES = ("compiled", "reference")
DEFAULT_ENGINE = "compiled"


def make_engine(graph: Graph, name: str | None = None, **options):
    """An engine bound to ``graph``: an object with ``run(params, inputs, **kw) -> RunResult``."""
    name = name or DEFAULT_ENGINE
    if name == "reference":
        from .reference import ReferenceEngine

        return ReferenceEngine(graph)
    if name == "compiled":
        from unrolled.engines.compiled.engine import CompiledEngine

        return CompiledEngine(graph, **options)
    raise ValueError(f"unknown engine '{name}'; known engines: {', '.join(ENGINE_NAMES)}")


def available_engines() -> list[str]:
    """The engines that import on this installation (the tests run every one of them)."""
    names = ["reference"]
    try:
        from .compiled import engine as compiled  # noqa: F401
    except ImportError:
        pass
    else:
        names.insert(0, "compiled")
    return names
