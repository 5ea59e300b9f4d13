"""Engines run a folded graph over T steps: the reference (the specification) and the compiled one.

Every engine takes the same inputs and returns the same :class:`~unrolled.engines.runio.RunResult`;
:func:`make_engine` picks one by name.
"""

from .registry import DEFAULT_ENGINE, ENGINE_NAMES, available_engines, make_engine

__all__ = ["DEFAULT_ENGINE", "ENGINE_NAMES", "available_engines", "make_engine"]
