"""The measuring protocol of BENCHMARKS.md, shared by every system.

A peer builds its model and hands a zero-argument `step` to `time_steps`
(one training step on the next chunk, or one whole generation); it hands a
zero-argument `step` to `peak_rss_during` for the memory workload. The
timing, the statistics and the memory accounting live here, once, so every
system is measured the same way.
"""

from __future__ import annotations

import gc
import math
import statistics
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Protocol:
    seconds: float = 2.0   # minimum length of one timed repetition
    reps: int = 5          # timed repetitions; the median is reported
    warmup: int = 3        # untimed steps before the first repetition
    loss_steps: int = 20   # the final loss is the mean over this many last steps
    seed: int = 0          # seeds the weights and the sampling
    threads: int = 2       # compute threads every system may use (BENCHMARKS.md: 2)
    variant: str = ""      # a peer's configuration, e.g. torch "eager" or "compile" ("" = its default)

    def as_dict(self) -> dict:
        return asdict(self)


def time_steps(
    step: Callable[[], Any],
    protocol: Protocol,
    units_per_step: int,
    sync: Callable[[], None] = lambda: None,
    loss_scale: float = 1.0,
) -> dict:
    """Warm up, then time `protocol.reps` repetitions of consecutive steps.

    `step()` does one step and returns its loss (a float, a 0-d array, or a
    lazy device scalar; None when there is no loss). `sync()` waits for work a
    system has dispatched but not finished, so that a repetition's clock
    stops only when its steps are done. Each repetition runs steps until at
    least `protocol.seconds` have passed. The loss of the last
    `protocol.loss_steps` steps (times `loss_scale`, to make it per
    character) is averaged after the clock has stopped.
    """
    losses: deque = deque(maxlen=max(1, protocol.loss_steps))
    for _ in range(protocol.warmup):
        losses.append(step())
    sync()
    rates, steps = [], 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(protocol.reps):
        n = 0
        t0 = time.perf_counter()
        while True:
            losses.append(step())
            n += 1
            if time.perf_counter() - t0 >= protocol.seconds:
                break
        sync()
        elapsed = time.perf_counter() - t0
        rates.append(units_per_step * n / elapsed)
        steps += n
    cores_used = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    values = [float(l) for l in losses if l is not None]
    final_loss = statistics.fmean(values) * loss_scale if values else None
    if final_loss is not None and not math.isfinite(final_loss):
        final_loss = None  # JSON has no NaN; the harness flags a missing loss
    return {
        "chars_per_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "reps": rates,
        "steps": steps,
        "final_loss": final_loss,
        "cores_used": cores_used,   # process CPU time / wall time while timed
    }


# ---------------------------------------------------------------------------
# memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024


class _RssSampler(threading.Thread):
    """Fallback when VmHWM cannot be reset: sample VmRSS every ~0.5 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kib = _status_kib("VmRSS")
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak_kib = max(self.peak_kib, _status_kib("VmRSS"))
            time.sleep(0.0005)


def peak_rss_during(step: Callable[[], Any]) -> dict:
    """Peak resident memory during `step()` above the resident set before it.

    Call it after imports and set-up (model, optimizer, data, compilation),
    so that only what the step itself allocates counts. `step` must not
    return before its work is finished (block on lazy results).
    """
    gc.collect()
    exact = _reset_high_water_mark()
    sampler = None
    if not exact:
        sampler = _RssSampler()
        sampler.start()
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    step()
    step_s = time.perf_counter() - t0
    if exact:
        peak = _status_kib("VmHWM")
    else:
        sampler.stop.set()
        sampler.join()
        peak = max(sampler.peak_kib, _status_kib("VmRSS"))
    return {
        "peak_mib": (peak - before) / 1024,
        "baseline_mib": before / 1024,
        "step_s": step_s,
        "method": "VmHWM after clear_refs" if exact else "VmRSS sampled every 0.5 ms",
    }

