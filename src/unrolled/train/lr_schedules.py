"""Learning-rate schedules: the learning rate as a pure function of the step.

A schedule is a small frozen dataclass with ``lr_at(step) -> float``, so a
resumed run needs nothing but the step counter to land on the same rate, and
``to_dict()`` / ``schedule_from_dict()`` carry it through a checkpoint as JSON.
Steps count from 0 (the first update uses ``lr_at(0)``).

- :class:`Constant`: ``lr``.
- :class:`StepDecay`: ``lr · gamma^(step // step_size)`` (torch ``StepLR``).
- :class:`Exponential`: ``lr · gamma^step`` (torch ``ExponentialLR``).
- :class:`Cosine`: from ``lr`` down to ``min_lr`` along half a cosine over
  ``total_steps``, then held at ``min_lr`` (torch ``CosineAnnealingLR`` with
  ``T_max = total_steps``, ``eta_min = min_lr``, which instead climbs back up
  after ``T_max``). ``at_fraction(f)`` gives the same curve over a fraction of
  a budget, for a run limited by time rather than steps.
- :class:`Warmup`: a linear ramp over ``warmup_steps`` steps in front of any
  of them, ``lr_at(s) = base.lr_at(0) · (s + 1) / (warmup_steps + 1)`` for
  ``s < warmup_steps``; after it the base schedule starts from its own step 0,
  ``lr_at(warmup_steps + s) = base.lr_at(s)``. The ramp never uses a zero rate
  (a wasted step) and rises strictly up to the base rate.

:func:`make_schedule` builds the usual combinations from flat options, where
``total_steps`` is the whole run, warm-up included.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


def _positive_int(owner: str, what: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{owner} schedule: {what} must be a whole number, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{owner} schedule: {what} must be at least {minimum}, got {value!r}")
    return int(value)


def _rate(owner: str, what: str, value, high: float = math.inf) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner} schedule: {what} must be a number, got {value!r}") from None
    if not (math.isfinite(x) and 0 <= x <= high):
        raise ValueError(f"{owner} schedule: {what} must be in [0, {high}], got {value!r}")
    return x


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int,)) and not hasattr(step, "__index__"):
        raise ValueError(f"a schedule's step must be a whole number, got {step!r}")
    step = int(step)
    if step < 0:
        raise ValueError(f"a schedule's step counts from 0, got {step}")
    return step


class Schedule:
    """Base class: ``lr_at(step)`` and a JSON form."""

    kind = "schedule"

    def lr_at(self, step: int) -> float:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """JSON-able; :func:`schedule_from_dict` rebuilds the schedule."""
        out = {"kind": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Schedule) else v
        return out

    @staticmethod
    def from_dict(d: dict) -> Schedule:
        return schedule_from_dict(d)


@dataclass(frozen=True)
class Constant(Schedule):
    lr: float  # the learning rate at every step
    kind = "constant"

    def __post_init__(self):
        object.__setattr__(self, "lr", _rate(self.kind, "lr", self.lr))

    def lr_at(self, step: int) -> float:
        _check_step(step)
        return self.lr


@dataclass(frozen=True)
class StepDecay(Schedule):
    lr: float  # the rate for the first step_size steps
    step_size: int  # multiply by gamma every this many steps
    gamma: float = 0.1  # the factor, torch StepLR's default
    kind = "step"

    def __post_init__(self):
        object.__setattr__(self, "lr", _rate(self.kind, "lr", self.lr))
        object.__setattr__(self, "step_size", _positive_int(self.kind, "step_size", self.step_size))
        object.__setattr__(self, "gamma", _rate(self.kind, "gamma", self.gamma, high=1.0))

    def lr_at(self, step: int) -> float:
        return self.lr * self.gamma ** (_check_step(step) // self.step_size)


@dataclass(frozen=True)
class Exponential(Schedule):
    lr: float  # the rate at step 0
    gamma: float  # the factor per step
    kind = "exponential"

    def __post_init__(self):
        object.__setattr__(self, "lr", _rate(self.kind, "lr", self.lr))
        object.__setattr__(self, "gamma", _rate(self.kind, "gamma", self.gamma, high=1.0))

    def lr_at(self, step: int) -> float:
        return self.lr * self.gamma ** _check_step(step)


@dataclass(frozen=True)
class Cosine(Schedule):
    lr: float  # the rate at step 0
    total_steps: int  # the rate reaches min_lr at this step and stays there
    min_lr: float = 0.0  # the floor
    kind = "cosine"

    def __post_init__(self):
        object.__setattr__(self, "lr", _rate(self.kind, "lr", self.lr))
        object.__setattr__(self, "total_steps", _positive_int(self.kind, "total_steps", self.total_steps))
        object.__setattr__(self, "min_lr", _rate(self.kind, "min_lr", self.min_lr))
        if self.min_lr > self.lr:
            raise ValueError(f"cosine schedule: min_lr {self.min_lr} is above lr {self.lr}; the rate only goes down")

    def lr_at(self, step: int) -> float:
        return self.at_fraction(min(_check_step(step), self.total_steps) / self.total_steps)

    def at_fraction(self, fraction: float) -> float:
        """The rate a fraction of the way through the decay (0: lr, 1 and beyond: min_lr): the same curve
        for a run whose budget is a time, not a number of steps (``train --minutes``)."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * fraction)) / 2


@dataclass(frozen=True)
class Warmup(Schedule):
    base: Schedule  # the schedule that takes over after the ramp, from its own step 0
    warmup_steps: int  # length of the linear ramp
    kind = "warmup"

    def __post_init__(self):
        if not isinstance(self.base, Schedule) or isinstance(self.base, Warmup):
            raise ValueError(f"warmup schedule: base must be a constant, step, exponential or cosine schedule, got {self.base!r}")
        object.__setattr__(self, "warmup_steps", _positive_int(self.kind, "warmup_steps", self.warmup_steps, minimum=0))

    def lr_at(self, step: int) -> float:
        step = _check_step(step)
        if step < self.warmup_steps:
            return self.base.lr_at(0) * (step + 1) / (self.warmup_steps + 1)
        return self.base.lr_at(step - self.warmup_steps)


KINDS: dict[str, type[Schedule]] = {cls.kind: cls for cls in (Constant, StepDecay, Exponential, Cosine, Warmup)}


def schedule_from_dict(d: dict) -> Schedule:
    """Inverse of :meth:`Schedule.to_dict`."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"a schedule must be a dict with a 'kind' ({', '.join(KINDS)}), got {d!r}")
    cls = KINDS.get(d["kind"])
    if cls is None:
        raise ValueError(f"unknown schedule kind {d['kind']!r}; known kinds: {', '.join(KINDS)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    args = {k: v for k, v in d.items() if k != "kind"}
    extra = sorted(set(args) - set(fields))
    if extra:
        raise ValueError(f"{cls.kind} schedule has no field {extra[0]!r}; its fields: {', '.join(fields)}")
    missing = [n for n, f in fields.items() if n not in args and f.default is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{cls.kind} schedule needs {missing[0]!r}; its fields: {', '.join(fields)}")
    if cls is Warmup:
        args["base"] = schedule_from_dict(args["base"])
    return cls(**args)


def make_schedule(kind: str, lr: float, *, total_steps: int | None = None, warmup_steps: int = 0,
                  step_size: int | None = None, gamma: float | None = None, min_lr: float = 0.0) -> Schedule:
    """A schedule from flat options, as a command line has them.

    ``kind`` is constant, step, exponential or cosine. For cosine,
    ``total_steps`` is the length of the whole run including the warm-up, so
    the rate reaches ``min_lr`` on the run's last step whatever the warm-up.
    ``warmup_steps > 0`` puts a :class:`Warmup` in front.
    """
    if kind == "constant":
        base: Schedule = Constant(lr)
    elif kind == "step":
        if step_size is None:
            raise ValueError("step schedule needs step_size (decay every how many steps)")
        base = StepDecay(lr, step_size, 0.1 if gamma is None else gamma)
    elif kind == "exponential":
        if gamma is None:
            raise ValueError("exponential schedule needs gamma (the factor per step, e.g. 0.999)")
        base = Exponential(lr, gamma)
    elif kind == "cosine":
        if total_steps is None:
            raise ValueError("cosine schedule needs total_steps (the length of the run)")
        decay = int(total_steps) - int(warmup_steps)
        if decay < 1:
            raise ValueError(f"cosine schedule: total_steps {total_steps} leaves no steps after a warm-up of "
                             f"{warmup_steps}; lower the warm-up or train longer")
        base = Cosine(lr, decay, min_lr)
    else:
        raise ValueError(f"unknown schedule {kind!r}; known schedules: constant, step, exponential, cosine")
    return Warmup(base, warmup_steps) if warmup_steps else base
