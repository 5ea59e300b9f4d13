"""Taking a model elsewhere: ONNX (any graph, its recurrence as a ``Scan``) and
PyTorch-layout weights in and out (safetensors).

The packages these need (``onnx``, ``onnxruntime``, ``safetensors``) are the
``export`` extra, imported only when a function here is called, so that the
core library never needs them; :func:`need` turns their absence into one
sentence that names the extra.

The library call for any folded graph is ``unrolled.export.export_onnx(graph,
params, path)`` (or :func:`to_onnx` for the model in memory), and
:class:`OnnxRunner` runs such a model in ONNX Runtime like an engine run.
"""

from __future__ import annotations

import importlib

EXTRA_HINT = 'pip install "unrolled[export]"'


class MissingExtra(RuntimeError):
    """A package of the ``export`` extra is not installed."""


def need(module: str):
    """Import ``module`` (a package of the export extra), or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingExtra(f"this needs the package '{top}', which is not installed: {EXTRA_HINT}") from None


from .onnx import OnnxRunner, export_onnx, to_onnx  # noqa: E402  (after need: onnx.py imports it)

__all__ = ["EXTRA_HINT", "MissingExtra", "OnnxRunner", "export_onnx", "need", "to_onnx"]
