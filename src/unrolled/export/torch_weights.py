"""Recurrent-cell weights in PyTorch's names and layouts, both ways, and safetensors files.

``cells.py`` keeps PyTorch's gate order, so the layouts differ only in how
the matrices are cut (for ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` layer ``k``)::

    elman, lstm:  W = [weight_ih_lk | weight_hh_lk]      b = bias_ih_lk + bias_hh_lk
    gru (r, z):   W = [weight_ih_lk[:2H] | weight_hh_lk[:2H]]
                  b = bias_ih_lk[:2H] + bias_hh_lk[:2H]
    gru (n):      Wn = weight_ih_lk[2H:]   bn = bias_ih_lk[2H:]
                  Un = weight_hh_lk[2H:]   cn = bias_hh_lk[2H:]

Going to PyTorch, a summed bias is written whole into ``bias_ih`` and
``bias_hh`` gets zeros (what the sum allows; the outputs are the same).
Everything here is NumPy arrays: torch is never imported. Files are
safetensors (no pickle), written atomically.
"""

from __future__ import annotations

import json

import numpy as np

from unrolled.atomic import atomic_write_bytes

from . import need

TORCH_MODULES = {"elman": "nn.RNN", "lstm": "nn.LSTM", "gru": "nn.GRU"}
GATES = {"elman": 1, "lstm": 4, "gru": 3}  # rows of weight_hh per hidden unit
GATES_BY_COUNT = {n: cell for cell, n in GATES.items()}


def _no_module(cell: str, where: str) -> ValueError:
    return ValueError(f"{where} is a {cell} network, which PyTorch has no module for; "
                      f"PyTorch weights exist for {', '.join(TORCH_MODULES)} only (export it to ONNX instead)")


def cell_to_torch(cell: str, params: dict[str, np.ndarray], layers: int, *, hidden: int,
                  prefix: str = "rnn.", where: str = "the model") -> dict[str, np.ndarray]:
    """``{prefix}weight_ih_l0``, … of ``layers`` stacked cells (ours prefixed ``l0.``, ``l1.``, …)."""
    if cell not in TORCH_MODULES:
        raise _no_module(cell, where)
    H, out = hidden, {}
    for k in range(layers):
        p, q = f"l{k}.", f"_l{k}"
        W, b = params[p + "W"], params[p + "b"]
        n_in = W.shape[1] - H
        w_ih, w_hh, b_ih, b_hh = W[:, :n_in], W[:, n_in:], b, np.zeros_like(b)
        if cell == "gru":
            w_ih = np.vstack([w_ih, params[p + "Wn"]])
            w_hh = np.vstack([w_hh, params[p + "Un"]])
            b_ih = np.concatenate([b, params[p + "bn"]])
            b_hh = np.concatenate([b_hh, params[p + "cn"]])
        for name, a in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh)):
            out[f"{prefix}{name}{q}"] = np.ascontiguousarray(a)
    return out


def cell_from_torch(cell: str, tensors: dict[str, np.ndarray], layers: int, *,
                    prefix: str = "rnn.") -> dict[str, np.ndarray]:
    """Our ``l<k>.W``, ``l<k>.b`` (and the GRU's ``Wn, bn, Un, cn``) from PyTorch's tensors."""
    out = {}
    for k in range(layers):
        w_ih, w_hh, b_ih, b_hh = (np.asarray(tensors[f"{prefix}{n}_l{k}"])
                                  for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        H, p = w_hh.shape[1], f"l{k}."
        if cell == "gru":
            out[p + "W"] = np.hstack([w_ih[: 2 * H], w_hh[: 2 * H]])
            out[p + "b"] = b_ih[: 2 * H] + b_hh[: 2 * H]
            out[p + "Wn"], out[p + "bn"] = w_ih[2 * H:].copy(), b_ih[2 * H:].copy()
            out[p + "Un"], out[p + "cn"] = w_hh[2 * H:].copy(), b_hh[2 * H:].copy()
        else:
            out[p + "W"] = np.hstack([w_ih, w_hh])
            out[p + "b"] = b_ih + b_hh
    return out


def expected_cell_shapes(cell: str, layers: int, n_in: int, hidden: int,
                         prefix: str = "rnn.") -> dict[str, tuple[int, ...]]:
    """The tensors ``nn.RNN/LSTM/GRU(n_in, hidden, num_layers=layers)`` holds, with their shapes."""
    rows, out = GATES[cell] * hidden, {}
    for k in range(layers):
        out[f"{prefix}weight_ih_l{k}"] = (rows, n_in if k == 0 else hidden)
        out[f"{prefix}weight_hh_l{k}"] = (rows, hidden)
        out[f"{prefix}bias_ih_l{k}"] = (rows,)
        out[f"{prefix}bias_hh_l{k}"] = (rows,)
    return out


def check_tensors(tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], where: str,
                  what: str) -> None:
    """Every expected tensor is there with its shape, finite, and nothing else is: one sentence otherwise."""
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{where}: tensor '{name}' is missing; {what} needs it, {list(shape)}")
        a = tensors[name]
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{where}: tensor '{name}' is {list(a.shape)} but {what} needs {list(shape)}")
        if a.dtype.kind != "f" or not np.all(np.isfinite(a)):
            raise ValueError(f"{where}: tensor '{name}' is {a.dtype} or holds NaN/infinite values; "
                             f"it must hold finite floats")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{where}: tensor '{extra[0]}' is not part of {what}; remove it "
                         f"(expected {', '.join(expected)})")


# ------------------------------------------------------------ safetensors files


def save_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write ``tensors`` with string ``metadata`` to ``path`` as safetensors, atomically."""
    st = need("safetensors.numpy")
    data = st.save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def load_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; a file that is not one is one sentence."""
    need("safetensors.numpy")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged or foreign files
        raise ValueError(f"{path} is not a readable safetensors file ({e}); "
                         f"save the state dict with safetensors.torch.save_file") from None
    return tensors, metadata


def json_metadata(metadata: dict[str, str], key: str, where: str):
    """A JSON value stored under ``key`` in safetensors metadata (None when absent)."""
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise ValueError(f"{where}: metadata '{key}' is not valid JSON") from None
