"""Named parameter initializers, so a graph can say how its weights start in plain text.

A spec is a name with an optional number after a colon: ``zeros``, ``ones``,
``constant:0.5``, ``normal:0.01`` (standard deviation), ``uniform:0.08``
(half-width), ``xavier`` (Glorot uniform over fan-in + fan-out), ``orthogonal``
(a random orthogonal matrix, the usual choice for recurrent weights),
``forget_bias:1.0`` (an LSTM bias ``[4H]``: zeros but the forget gate's
quarter, the second, which starts at the number).
"""

from __future__ import annotations

import numpy as np

_WITH_NUMBER = ("constant", "normal", "uniform", "forget_bias")
_PLAIN = ("zeros", "ones", "xavier", "orthogonal")
KNOWN = _PLAIN + tuple(f"{n}:X" for n in _WITH_NUMBER)


def _parse(spec: str) -> tuple[str, float | None]:
    name, _, number = str(spec).partition(":")
    if name in _PLAIN and not number:
        return name, None
    if name in _WITH_NUMBER and number:
        try:
            return name, float(number)
        except ValueError:
            pass
    raise ValueError(f"unknown initializer '{spec}'; use one of {', '.join(KNOWN)} (X a number)")


def check_spec(spec: str, param_name: str) -> None:
    try:
        _parse(spec)
    except ValueError as e:
        raise ValueError(f"parameter '{param_name}': {e}") from None


def make(spec: str, shape: tuple[int, ...], rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
    """An array of ``shape`` drawn as ``spec`` says, in ``dtype``."""
    name, number = _parse(spec)
    if name == "zeros":
        out = np.zeros(shape)
    elif name == "ones":
        out = np.ones(shape)
    elif name == "constant":
        out = np.full(shape, number)
    elif name == "normal":
        out = rng.normal(0.0, number, shape)
    elif name == "uniform":
        out = rng.uniform(-number, number, shape)
    elif name == "xavier":
        fan_out, fan_in = (shape[0], shape[1]) if len(shape) == 2 else (shape[0], shape[0])
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        out = rng.uniform(-limit, limit, shape)
    elif name == "forget_bias":
        out = np.zeros(shape)
        quarter = shape[0] // 4
        out[quarter : 2 * quarter] = number
    else:  # orthogonal
        out = _orthogonal(shape, rng)
    return np.ascontiguousarray(out, dtype=dtype)


def _orthogonal(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if len(shape) != 2:
        return rng.normal(0.0, 1.0 / np.sqrt(shape[0]), shape)
    rows, cols = shape
    a = rng.normal(size=(max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))  # make the distribution uniform (Mezzadri 2007)
    return q if rows >= cols else q.T
