"""Optimizers: turn each parameter's combined gradient into an update, in place.

They work on plain dicts of NumPy arrays (``params[name]`` updated from
``grads[name]``), so they know nothing about graphs or engines, and the
update rules are those of ``torch.optim`` line for line (same defaults, same
order of operations), which lets the tests hold them to PyTorch in float64.

Each optimizer keeps its per-parameter state (momentum buffers, moment
estimates) in the parameters' own dtype: a float32 model stays float32.
Everything it remembers is exported by :meth:`Optimizer.state_arrays` (arrays
named ``"<slot>/<parameter>"``, e.g. ``"exp_avg/W_h"``) and
:meth:`Optimizer.state_meta` (JSON: name, hyperparameters, step counts), and
:meth:`Optimizer.load_state` puts it back, so a resumed run continues with
bit-identical updates.

The learning rate given at construction is the default; ``step(..., lr=x)``
overrides it for one step, which is how a schedule drives the optimizer.
"""

from __future__ import annotations

import inspect
import math
from typing import ClassVar

import numpy as np

from unrolled.engines.compiled import background

Arrays = dict[str, np.ndarray]


def _number(owner: str, what: str, value, low: float = 0.0, high: float = math.inf,
            high_open: bool = False) -> float:
    """``value`` as a Python float (never a NumPy scalar, whose strong dtype
    would promote float32 arithmetic to float64), checked to lie in range."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {what} must be a number, got {value!r}") from None
    too_high = x >= high if high_open else x > high
    if not math.isfinite(x) or x < low or too_high:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{owner}: {what} must be in [{low}, {high}{bracket}, got {value!r}")
    return x


def _shape(a: np.ndarray) -> str:
    return str(list(a.shape))


class Optimizer:
    """What every optimizer shares: argument checks, lazily created state
    slots, step counts, and export/import of that state.

    Subclasses set ``name`` and ``slots`` and implement ``_update`` for one
    parameter.
    """

    name: ClassVar[str] = "optimizer"
    slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, lr: float):
        self.lr = _number(self.name, "lr", lr)
        self._state: dict[str, Arrays] = {slot: {} for slot in self.slots}
        self._steps: dict[str, int] = {}  # per parameter, as torch keeps them
        self._kernels = None  # this step's Numba kernels (numba_kernels()), or None for NumPy's rules
        self._fitted: dict[str, tuple] = {}  # parameter -> (shape, dtype) its state arrays were checked against

    # -- the update ---------------------------------------------------------

    def step(self, params: Arrays, grads: Arrays, lr: float | None = None) -> None:
        """Update every array of ``params`` in place from ``grads`` (same
        names, same shapes). ``lr`` overrides the default learning rate for
        this step only. ``grads`` is not modified."""
        lr = self.lr if lr is None else _number(self.name, "lr", lr)
        if params.keys() != grads.keys():
            self._check_names(params, grads)
        # Check everything before touching anything: a bad array must not
        # leave half of the parameters updated.
        work = [(name, p, self._checked_grad(name, p, grads[name])) for name, p in params.items()]
        self._kernels = numba_kernels()  # once a step: the per-parameter calls are most of a small model's step
        steps = self._steps
        for name, p, g in work:
            steps[name] = step = steps.get(name, 0) + 1
            self._update(name, p, g, lr, step)

    def _checked_grad(self, name: str, p, g) -> np.ndarray:
        if type(g) is np.ndarray and type(p) is np.ndarray and g.dtype is p.dtype and g.shape == p.shape \
                and self._fitted.get(name) == (p.shape, p.dtype):
            return g  # the usual case, checked in one line: small models call this every few microseconds
        if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
            kind = p.dtype if isinstance(p, np.ndarray) else type(p).__name__
            raise ValueError(f"parameter '{name}' is {kind}; optimizers update floating-point NumPy arrays in place")
        g = np.asarray(g)
        if g.shape != p.shape:
            raise ValueError(f"gradient of '{name}' is {_shape(g)} but the parameter is {_shape(p)}; they must match")
        self._check_state_shapes(name, p)
        self._fitted[name] = (p.shape, p.dtype)  # its state fits; slots made later are made from p
        return g.astype(p.dtype) if g.dtype != p.dtype else g  # work in the parameter's dtype, never promote

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float, step: int) -> None:
        raise NotImplementedError

    def _slot(self, slot: str, name: str, p: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """The state array ``slot`` of parameter ``name``, created on first use."""
        table = self._state[slot]
        if name not in table:  # like p: C-ordered where p is, which the kernels take unchecked
            table[name] = np.full_like(p, fill)
        return table[name]

    def _check_names(self, params: Arrays, grads: Arrays) -> None:
        missing = [n for n in params if n not in grads]
        if missing:
            raise ValueError(f"no gradient for parameter '{missing[0]}'; every parameter needs one (got gradients for {', '.join(sorted(grads)) or 'nothing'})")
        extra = [n for n in grads if n not in params]
        if extra:
            raise ValueError(f"gradient '{extra[0]}' has no parameter of that name; parameters: {', '.join(sorted(params))}")

    def _stale_state(self, name: str, p: np.ndarray) -> tuple[str, np.ndarray] | None:
        """The first state array of ``name`` (slot, array) that does not fit ``p``, or None."""
        for slot, table in self._state.items():
            s = table.get(name)
            if s is not None and (s.shape != p.shape or s.dtype != p.dtype):
                return slot, s
        return None

    def _check_state_shapes(self, name: str, p: np.ndarray) -> None:
        stale = self._stale_state(name, p)
        if stale is not None:
            slot, s = stale
            raise ValueError(
                f"{self.name} state '{slot}/{name}' is {_shape(s)} {s.dtype} but parameter '{name}' is "
                f"{_shape(p)} {p.dtype}; the optimizer state was saved for a different model"
            )

    # -- configuration and state --------------------------------------------

    def hyperparameters(self) -> dict:
        """The constructor's arguments, JSON-able: ``type(self)(**h)`` rebuilds it."""
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        return {n: (list(v) if isinstance(v, tuple) else v) for n in names for v in [getattr(self, n)]}

    def state_arrays(self) -> Arrays:
        """Copies of every state array, named ``"<slot>/<parameter>"``."""
        return {f"{slot}/{name}": a.copy() for slot, table in self._state.items() for name, a in sorted(table.items())}

    def state_meta(self) -> dict:
        """JSON-able: ``{"name", "hyperparameters", "steps": {parameter: count}}``."""
        return {"name": self.name, "hyperparameters": self.hyperparameters(), "steps": dict(sorted(self._steps.items()))}

    def load_state(self, arrays: Arrays, meta: dict) -> None:
        """Replace hyperparameters, step counts and state arrays with saved
        ones (from :meth:`state_arrays` / :meth:`state_meta`)."""
        if not isinstance(meta, dict) or meta.get("name") != self.name:
            found = meta.get("name") if isinstance(meta, dict) else meta
            raise ValueError(f"the saved optimizer state is for {found!r}, but this optimizer is '{self.name}'; resume with the same optimizer")
        hyper = meta.get("hyperparameters", {})
        try:
            type(self).__init__(self, **hyper)  # re-runs the constructor's checks on the saved values
        except TypeError as e:
            raise ValueError(f"saved {self.name} hyperparameters {sorted(hyper)} do not fit this version: {e}") from None
        self._steps = {str(k): int(v) for k, v in meta.get("steps", {}).items()}
        self._fitted = {}  # the loaded arrays are checked against the parameters on the next step
        for key, a in arrays.items():
            slot, sep, name = key.partition("/")
            if not sep or slot not in self._state:
                raise ValueError(f"saved optimizer array '{key}' is not a '{self.name}' state; expected names like "
                                 f"'<slot>/<parameter>' with slot one of {', '.join(self.slots) or 'none'}")
            self._state[slot][name] = np.array(a, copy=True, order="C")  # the kernels take state unchecked

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


def numba_kernels():
    """:mod:`unrolled.engines.compiled.kernels.optimizers` when Numba may run (installed, and UNROLLED_JIT is
    not "0"), else None; None too while an engine's child process compiles them (background.py): until then
    the NumPy update runs, and the first updates never wait for the compiler."""
    global _KERNELS
    if background.compiling():
        return None
    if _KERNELS is None:
        from unrolled.engines.compiled.kernels.jitcache import numba_allowed

        _KERNELS = False
        if numba_allowed("auto", set(), "the optimizers"):
            from unrolled.engines.compiled.kernels import optimizers as optim_kernels

            _KERNELS = optim_kernels
    return _KERNELS or None


_KERNELS = None  # resolved on first use: importing Numba costs a second


def compile_kernels(params: dict[str, np.ndarray]) -> None:
    """Run the Numba passes of the optimizers and of the clipping once on arrays shaped like ``params``,
    so that they compile: an engine's child process calls this (background.py) after its own run."""
    from .clip import clip_by_global_norm, clip_by_value

    grads = {k: np.zeros_like(a) for k, a in params.items()}
    clip_by_global_norm(grads, 5.0)
    clip_by_value(grads, 5.0)
    for name in ("adam", "adagrad"):
        make_optimizer(name, 1e-3).step({k: np.zeros_like(a) for k, a in params.items()}, grads)


background.register("unrolled.train.optim:compile_kernels")


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (torch.optim.SGD).

    ``g += weight_decay * p``; with momentum, ``buf = g`` on the first step,
    then ``buf = momentum * buf + (1 - dampening) * g``, and the step uses
    ``buf`` (or ``g + momentum * buf`` with ``nesterov``); ``p -= lr * step``.
    """

    name = "sgd"
    slots = ("momentum_buffer",)

    def __init__(self, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(lr)
        self.momentum = _number(self.name, "momentum", momentum)
        self.dampening = _number(self.name, "dampening", dampening)
        self.nesterov = bool(nesterov)
        self.weight_decay = _number(self.name, "weight_decay", weight_decay)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("sgd: nesterov needs momentum > 0 and dampening = 0")

    def _update(self, name, p, g, lr, step):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            buf = self._state["momentum_buffer"].get(name)
            if buf is None:
                buf = self._state["momentum_buffer"][name] = g.copy()
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= lr * g


class Adagrad(Optimizer):
    """Adagrad (torch.optim.Adagrad): ``sum += g²``;
    ``p -= lr / (1 + (t-1)·lr_decay) · g / (√sum + eps)``."""

    name = "adagrad"
    slots = ("sum",)

    def __init__(self, lr: float, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10):
        super().__init__(lr)
        self.lr_decay = _number(self.name, "lr_decay", lr_decay)
        self.weight_decay = _number(self.name, "weight_decay", weight_decay)
        self.initial_accumulator_value = _number(self.name, "initial_accumulator_value", initial_accumulator_value)
        self.eps = _number(self.name, "eps", eps)

    def _update(self, name, p, g, lr, step):
        if self.weight_decay:
            g = g + self.weight_decay * p
        clr = lr / (1 + (step - 1) * self.lr_decay)
        total = self._slot("sum", name, p, self.initial_accumulator_value)
        kernels = self._kernels
        if kernels and p.flags.c_contiguous and g.flags.c_contiguous:  # the state is made like p, in p's dtype
            kernels.adagrad(p, g, total, clr, self.eps)  # Python floats: the kernel rounds them as NumPy does
            return
        total += g * g
        std = np.sqrt(total)
        std += self.eps
        p -= clr * (g / std)


class RMSprop(Optimizer):
    """RMSprop (torch.optim.RMSprop): ``v = alpha·v + (1-alpha)·g²``; divide
    ``g`` by ``√v + eps`` (centered: ``√(v - ḡ²) + eps`` with ``ḡ`` the running
    mean of ``g``); optionally through a momentum buffer."""

    name = "rmsprop"
    slots = ("square_avg", "grad_avg", "momentum_buffer")

    def __init__(self, lr: float, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, centered: bool = False):
        super().__init__(lr)
        self.alpha = _number(self.name, "alpha", alpha, high=1.0)
        self.eps = _number(self.name, "eps", eps)
        self.weight_decay = _number(self.name, "weight_decay", weight_decay)
        self.momentum = _number(self.name, "momentum", momentum)
        self.centered = bool(centered)

    def _update(self, name, p, g, lr, step):
        if self.weight_decay:
            g = g + self.weight_decay * p
        square_avg = self._slot("square_avg", name, p)
        square_avg *= self.alpha
        square_avg += (1 - self.alpha) * (g * g)
        if self.centered:
            grad_avg = self._slot("grad_avg", name, p)
            grad_avg += (1 - self.alpha) * (g - grad_avg)
            # v - ḡ² is a variance, but rounding can push it a hair below
            # zero; torch would return NaN there, we return 0.
            avg = np.sqrt(np.maximum(square_avg - grad_avg * grad_avg, 0))
        else:
            avg = np.sqrt(square_avg)
        avg += self.eps
        if self.momentum > 0:
            buf = self._slot("momentum_buffer", name, p)
            buf *= self.momentum
            buf += g / avg
            p -= lr * buf
        else:
            p -= lr * (g / avg)


class Adam(Optimizer):
    """Adam (torch.optim.Adam). ``weight_decay`` is the classic L2 term added
    to the gradient; see :class:`AdamW` for the decoupled form.

    ``m ← β1·m + (1-β1)·g``, ``v ← β2·v + (1-β2)·g²``,
    ``p -= lr/(1-β1^t) · m / (√v/√(1-β2^t) + eps)``.
    """

    name = "adam"
    slots = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _decoupled = False

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False):
        super().__init__(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{self.name}: betas must be two numbers (beta1, beta2), got {betas!r}")
        self.betas = tuple(_number(self.name, f"betas[{i}]", b, high=1.0, high_open=True) for i, b in enumerate(betas))
        self.eps = _number(self.name, "eps", eps)
        self.weight_decay = _number(self.name, "weight_decay", weight_decay)
        self.amsgrad = bool(amsgrad)

    def _update(self, name, p, g, lr, step):
        beta1, beta2 = self.betas
        if self._one_pass(name, p, g, lr, step):
            return
        if self.weight_decay:
            if self._decoupled:
                p *= 1 - lr * self.weight_decay
            else:
                g = g + self.weight_decay * p
        exp_avg = self._slot("exp_avg", name, p)
        exp_avg_sq = self._slot("exp_avg_sq", name, p)
        exp_avg += (1 - beta1) * (g - exp_avg)  # torch's lerp_
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * (g * g)
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if self.amsgrad:
            second = self._slot("max_exp_avg_sq", name, p)
            np.maximum(second, exp_avg_sq, out=second)
        else:
            second = exp_avg_sq
        denom = np.sqrt(second) / bias_correction2_sqrt
        denom += self.eps
        p -= step_size * (exp_avg / denom)


    def _one_pass(self, name, p, g, lr, step) -> bool:
        """The same update by :func:`unrolled.engines.compiled.kernels.optimizers.adam`, where it applies; whether it ran."""
        kernels = self._kernels
        if not kernels or self.amsgrad or (self.weight_decay and not self._decoupled):
            return False
        if not (p.flags.c_contiguous and g.flags.c_contiguous):  # the state is made like p, in p's dtype
            return False
        arrays = (p, g, self._slot("exp_avg", name, p), self._slot("exp_avg_sq", name, p))
        beta1, beta2 = self.betas
        decay = 1 - lr * self.weight_decay if self.weight_decay else 1.0
        kernels.adam(*arrays, decay, 1 - beta1, beta2, 1 - beta2,  # Python floats: rounded as NumPy does
                     (1 - beta2**step) ** 0.5, self.eps, lr / (1 - beta1**step))
        return True


class AdamW(Adam):
    """AdamW (torch.optim.AdamW): Adam with decoupled weight decay,
    ``p *= 1 - lr·weight_decay`` before the Adam step (torch's default 0.01)."""

    name = "adamw"
    _decoupled = True

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False):
        super().__init__(lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (SGD, Adagrad, RMSprop, Adam, AdamW)}


def _class_of(name: str) -> type[Optimizer]:
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; known optimizers: {', '.join(sorted(OPTIMIZERS))}")
    return cls


def make_optimizer(name: str, lr: float, **kw) -> Optimizer:
    """The optimizer called ``name`` (case-insensitive) with learning rate
    ``lr`` and hyperparameters ``kw`` (torch's names and defaults)."""
    cls = _class_of(name)
    allowed = list(inspect.signature(cls.__init__).parameters)[2:]
    unknown = [k for k in kw if k not in allowed]
    if unknown:
        raise ValueError(f"optimizer '{cls.name}' has no hyperparameter '{unknown[0]}'; it takes lr, {', '.join(allowed)}")
    return cls(lr, **kw)


def optimizer_from_state(arrays: Arrays, meta: dict) -> Optimizer:
    """Rebuild a saved optimizer, hyperparameters and state, from
    :meth:`Optimizer.state_arrays` and :meth:`Optimizer.state_meta`."""
    if not isinstance(meta, dict) or "name" not in meta:
        raise ValueError("saved optimizer metadata has no 'name'; it was not written by Optimizer.state_meta()")
    cls = _class_of(meta["name"])
    hyper = meta.get("hyperparameters", {})
    opt = cls.__new__(cls)
    try:
        cls.__init__(opt, **hyper)
    except TypeError as e:
        raise ValueError(f"saved {cls.name} hyperparameters {sorted(hyper)} do not fit this version: {e}") from None
    opt.load_state(arrays, meta)
    return opt
