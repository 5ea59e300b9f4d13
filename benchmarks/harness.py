"""Benchmark harness: every (workload, system) pair in a fresh process, one at a time.

    python -m benchmarks.harness [W1 W2 ...] [--json] [--systems unrolled,torch,jax,numpy]
                                 [--seconds S] [--reps N] [--warmup K] [--threads 2] [--scaling 1,2]

First the machine's fp32 matrix-product peak is measured (`benchmarks.peak`),
then each workload is run by each system in turn (`benchmarks.worker`), never
two at once. The table gives, per workload and system, the median chars/s
with min-max, the ratio of `unrolled` to each peer (same run, same machine:
the only figures that count), achieved GFLOP/s and % of the peak, and the
final training loss per character (flagged when it is not below 0.9 ln V,
i.e. the loop did not learn). W5 reports peak resident memory above the
baseline instead. W6 reports the seconds from a fresh process to the end of
its first update, with empty and then warm compile caches. A peer with more
than one configuration (PyTorch: eager and `torch.compile`) runs each in its
own process and the fastest that learned is reported. W2 and W3 are also run
at each `--scaling` thread count. `--json` prints one JSON object instead of
the table.

A system that is not installed, does not cover a workload, or fails is
reported with its error and left out of the ratios; the run goes on.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import corpus as corpus_mod
from . import targets, workloads
from .worker import COVERS, SYSTEMS, THREAD_VARIABLES

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBJECT = "unrolled"
LOSS_FRACTION = 0.9   # a learned loss is below this fraction of ln V
BUSY = 0.25           # cores used by other processes above which a row is marked BUSY


# ---------------------------------------------------------------------------
# running the subprocesses


def child_env(threads: int) -> dict:
    """The environment of every worker: the repo importable, threads limited."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), str(REPO_ROOT / "src")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    for var in THREAD_VARIABLES:   # --threads decides, not what the calling shell had
        env[var] = str(threads)
    # BENCHMARKS.md: NumPy's OpenBLAS misses AVX-512 on Zen 5 and falls back to
    # AVX2 kernels at half speed; this hint is only safe where AVX-512 exists.
    if "OPENBLAS_CORETYPE" not in env and _has_avx512():
        env["OPENBLAS_CORETYPE"] = "SkylakeX"
    return env


@functools.cache
def _proc_cpuinfo() -> str:
    """/proc/cpuinfo, read once: every worker's environment and the report ask it."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpuinfo(text: str | None = None) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (``text``: its contents, for tests); {} elsewhere."""
    if text is None:
        text = _proc_cpuinfo()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: the cores of one machine match
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _cpu_flags(info: dict[str, str] | None = None) -> set[str]:
    return set((cpuinfo() if info is None else info).get("flags", "").split())


def _has_avx512() -> bool:
    return {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= _cpu_flags()


def cpu_name() -> str:
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_details(info: dict[str, str] | None = None) -> dict:
    """Which processor, beyond its name: one "AMD EPYC" name covers several generations (Zen 3
    has no AVX-512, Zen 4 runs it at half width, Zen 5 at full) whose same-run ratios differ,
    so a run records the family, the model and the widest vector instructions it found."""
    info = cpuinfo() if info is None else info
    flags = _cpu_flags(info)
    widest = next((isa for isa, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx")) if flag in flags),
                  "no AVX" if flags else None)

    def number(key: str) -> int | None:
        value = info.get(key, "")
        return int(value) if value.isdigit() else None

    return {"family": number("cpu family"), "model": number("model"), "vectors": widest}


def describe_cpu(machine: dict) -> str:
    """``AMD EPYC (family 25 model 1, AVX2)``, as far as the report knows it (older reports: the name)."""
    known = []
    if machine.get("family") is not None:
        known.append(f"family {machine['family']} model {machine['model']}")
    if machine.get("vectors"):
        known.append(machine["vectors"])
    return machine["cpu"] + (f" ({', '.join(known)})" if known else "")


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_child(args: list[str], env: dict, timeout: float) -> dict:
    """Run `python -m <args>` from the repo root; its last JSON line, or an error.

    Also records `others_cpu`: how many cores other processes kept busy, on
    average, while the worker ran (the machine's busy time minus the
    worker's own). Anything well above zero means the figures are unreliable.
    """
    cmd = [sys.executable, "-m", *args]
    busy0, own0, t0 = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    spawned = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    busy1, own1, wall = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter() - t0
    out = _parse(proc)
    if "end_time" in out:   # W6: from the start of the fresh process to the end of its first update
        out["wall_s"] = out.pop("end_time") - spawned
        if "marks" in out:  # when each of its steps ended, in seconds from the spawn
            out["marks_s"] = {k: t - spawned for k, t in out.pop("marks").items()}
    if busy0 is not None and busy1 is not None and wall > 0:
        out["others_cpu"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    return out


def _parse(proc: subprocess.CompletedProcess) -> dict:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    tail = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1:] or ["no output"]
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    return {"error": f"worker {how}: {tail[0][:300]}"}


# ---------------------------------------------------------------------------
# collecting


# Peers measured in more than one configuration; the harness reports the fastest
# per workload (BENCHMARKS.md: the fastest configuration a competent user reaches for).
VARIANTS = {"torch": ("eager", "compile")}
VARIANT_KINDS = {"train", "sample"}    # W5 (memory) and W6 (start) take each variant as it is
PLAIN_NUMPY_ENV = {"UNROLLED_JIT": "0"}  # unrolled as the plain NumPy engine: nothing compiles
SCALED = ("W2", "W3")                   # reported at every --scaling thread count too


def collect(ids, systems, a, log) -> dict:
    env = child_env(a.threads)
    log(f"measuring the fp32 matrix-product peak ({a.threads} threads) ...")
    peak = run_child(["benchmarks.peak", "--threads", str(a.threads)], env, timeout=300)
    peak_gflops = peak.get("peak_gflops")
    V = corpus_mod.load(a.corpus).V
    flag_at = LOSS_FRACTION * math.log(V)
    run = _Runner(a, log, flag_at, peak_gflops)

    results = {}
    for wid in ids:
        w = workloads.get(wid)
        if w.kind == "start":
            results[wid] = run.starts(w, start_rows(systems), a.start_rounds, a.own_start_rounds)
            _add_start_ratios(results[wid])
            continue
        results[wid] = {system: run.best(w, system, a.threads) for system in systems}
        _add_ratios(w, results[wid])
    scaling = {wid: run.scaling(workloads.get(wid), results[wid], a.scaling)
               for wid in SCALED if wid in results and a.scaling}
    return {
        "machine_peak_gflops": peak_gflops,
        "peak_detail": peak,
        "machine": {"cpu": cpu_name(), **cpu_details(), "python": platform.python_version(),
                    "openblas_coretype": env.get("OPENBLAS_CORETYPE")},
        "protocol": {"seconds": a.seconds, "reps": a.reps, "warmup": a.warmup, "threads": a.threads,
                     "scaling_threads": a.scaling, "loss_flag_above": flag_at, "vocab": V},
        "workloads": results,
        "scaling": scaling,
    }


def pick_fastest(runs: dict) -> tuple[str, dict] | None:
    """The variant to report: the fastest that ran and learned (else the fastest that ran).

    `runs` maps a variant's name to its worker result. A variant that failed
    or whose loss did not fall is only chosen when no variant did better.
    None when every variant failed.
    """
    ran = {name: out for name, out in runs.items() if "chars_per_s" in out}
    if not ran:
        return None
    learned = {name: out for name, out in ran.items() if out.get("loss_ok", True)}
    pool = learned or ran
    name = max(pool, key=lambda n: pool[n]["chars_per_s"])
    return name, pool[name]


class _Runner:
    """Runs workers one at a time and annotates their results (busy, % of peak, loss check)."""

    def __init__(self, a, log, flag_at: float, peak_gflops):
        self.a, self.log, self.flag_at, self.peak = a, log, flag_at, peak_gflops
        self.timeout = a.timeout or 300 + 3 * a.reps * a.seconds

    def worker_args(self, w, system: str, threads: int, variant: str = "") -> list[str]:
        """The worker's command line (after `python -m`) for one row."""
        a = self.a
        args = ["benchmarks.worker", w.id, system, "--seconds", str(a.seconds), "--reps", str(a.reps),
                "--warmup", str(a.warmup), "--threads", str(threads)]
        args += ["--variant", variant] if variant else []
        return args + (["--corpus", str(a.corpus)] if a.corpus else [])

    def one(self, w, system: str, threads: int, variant: str = "", extra_env=None) -> dict:
        if w.id not in COVERS[system]:
            return {"error": f"n/a: the {system} peer does not cover {w.id}"}
        args = self.worker_args(w, system, threads, variant)
        label = f"{w.id} {system}{' ' + variant if variant else ''} ({threads} thread{'s' * (threads > 1)})"
        self.log(f"{label} ...")
        t0 = time.perf_counter()
        out = run_child(args, {**child_env(threads), **(extra_env or {})}, self.timeout)
        if "error" not in out:
            out["busy"] = out.get("others_cpu", 0.0) > BUSY
        if "chars_per_s" in out:
            if self.peak:
                out["pct_peak"] = 100 * out["gflops"] / self.peak
            if w.kind == "train":
                loss = out.get("final_loss")
                out["loss_ok"] = loss is not None and loss < self.flag_at
        self.log(f"{label}: {_short(out)} ({time.perf_counter() - t0:.0f} s)")
        return out

    def best(self, w, system: str, threads: int) -> dict:
        """One system's row: its only configuration, or the fastest of its variants."""
        names = VARIANTS.get(system, ()) if w.kind in VARIANT_KINDS else ()
        if not names:
            return self.one(w, system, threads)
        runs = {name: self.one(w, system, threads, name) for name in names}
        chosen = pick_fastest(runs)
        if chosen is None:
            return runs[names[0]]
        name, out = chosen
        summary = {n: {k: r[k] for k in ("chars_per_s", "compile_s", "final_loss", "error") if k in r}
                   for n, r in runs.items()}
        return {**out, "variant": name, "variants": summary}

    def scaling(self, w, row: dict, thread_counts: list[int]) -> dict:
        """chars/s of every system at each thread count (the main run's count reused), and the ratio."""
        out = {}
        for system, main in row.items():
            if "chars_per_s" not in main:
                continue
            by = {}
            for n in thread_counts:
                r = main if n == self.a.threads else self.one(w, system, n, main.get("variant", ""))
                by[str(n)] = {k: r[k] for k in ("chars_per_s", "min", "max", "cores_used", "busy", "error")
                              if k in r}
            out[system] = {"variant": main.get("variant"), "threads": by, **_speedup(by)}
        return out

    def settle(self, w) -> None:
        """W6: one untimed start of the plain NumPy engine in a cache folder of its own, the same
        before every timed start of every row.

        A start runs slower right after a start whose child compiled everything
        than right after a short one (benchmarks/RESULTS.md, 2026-12-07 10:35):
        without it, the engine's warm start, which follows its own cold start's
        compile, paid for that in every round, and the plain NumPy engine's,
        which follows a short start, never did. After a settling start every
        timed start follows the same short process."""
        self._start_aside(w, PLAIN_NUMPY_ENV, "settle")

    def compile_aside(self, w) -> None:
        """W6: an untimed cold start of the engine in a throwaway cache folder, whose child then
        compiles every loop and kernel, as the engine's own cold start does before its warm start.

        The plain NumPy engine's warm start follows it, so that the two rows
        unrolled's warm start is judged by follow the same history: a compile,
        then the settling start. The settle alone did not take the compile's
        aftermath away: over the 135 paired rounds of fifteen full runs
        (benchmarks/RESULTS.md, 2026-12-07 21:15), the engine's warm start was
        the slower of the two in 85, its cold start, which both rows begin
        alike, in 65."""
        self._start_aside(w, {}, "aside")

    def _start_aside(self, w, extra_env: dict, what: str) -> None:
        """W6: one untimed start of unrolled in a cache folder of its own, thrown away after: run for
        what it leaves the machine in (:meth:`settle`, :meth:`compile_aside`), not for its time."""
        with tempfile.TemporaryDirectory(prefix=f"unrolled-bench-{what}-") as tmp:
            env = {**child_env(self.a.threads), **extra_env, **cache_env(Path(tmp))}
            run_child(self.worker_args(w, SUBJECT, self.a.threads), env, self.timeout)

    def starts(self, w, rows, rounds: int, own_rounds: int) -> dict:
        """W6: every row's cold and warm start, `rounds` times (unrolled's rows `own_rounds` times, at
        least `rounds`), the rows taking turns within a round, in the opposite order every other
        round: no row always starts right after the same one (after a long compile, say).

        One start is a process of well under a second, and two of the same
        engine differ by a tenth of that from run to run; turns let a drift of
        the machine's speed fall on every row alike, and each row reports the
        median of its rounds (`start_summary`). unrolled's two rows, the
        engine and the plain NumPy engine its start must never exceed, run the
        same first update and differ by a few percent at most: a median of
        three ratios, each as uncertain as that, cannot tell which is ahead,
        and their starts are short enough to take more rounds."""
        compile_sources()
        samples = {label: [] for label, *_ in rows}
        own_rounds = max(rounds, own_rounds)
        for i in range(own_rounds):
            for label, system, variant, extra_env in (rows if i % 2 == 0 else rows[::-1]):
                if i < (own_rounds if system == SUBJECT else rounds):
                    samples[label].append(self.start(w, system, variant, extra_env))
        return {label: start_summary(runs) for label, runs in samples.items()}

    def start(self, w, system: str, variant: str, extra_env: dict) -> dict:
        """W6: a fresh process with empty compile caches, then one more with the caches it left,
        each right after the same untimed settling start (:meth:`settle`); the plain NumPy
        engine's warm start also after the engine's compile (:meth:`compile_aside`)."""
        with tempfile.TemporaryDirectory(prefix="unrolled-bench-cache-") as tmp:
            env = {**extra_env, **cache_env(Path(tmp))}
            self.settle(w)
            cold = self.one(w, system, self.a.threads, variant, env)
            if system == SUBJECT and extra_env == PLAIN_NUMPY_ENV:
                self.compile_aside(w)
            self.settle(w)
            warm = self.one(w, system, self.a.threads, variant, env)
        row = {"cold_s": cold.get("wall_s"), "warm_s": warm.get("wall_s"), "cold": cold, "warm": warm}
        for key in ("engine", "version"):
            if key in cold:
                row[key] = cold[key]
        if "error" in cold or "error" in warm:
            row["error"] = cold.get("error") or warm.get("error")
        row["busy"] = bool(cold.get("busy") or warm.get("busy"))
        return row


def compile_sources() -> list[Path]:
    """W6: write the `.pyc` of unrolled's and the bench's own modules, as pip does when it installs a
    package; returns the folders compiled.

    The peers come from wheels, whose install compiled their modules. A source
    checkout run where ``PYTHONDONTWRITEBYTECODE`` is set (some environments
    set it for every process) never gets its `.pyc`, and every fresh process
    would compile unrolled's modules from source again: a start no installed
    unrolled makes."""
    import compileall

    import unrolled

    folders = [Path(unrolled.__file__).parent, Path(__file__).parent]
    for folder in folders:
        compileall.compile_dir(folder, quiet=1)
    return folders


def start_summary(runs: list[dict]) -> dict:
    """One W6 row from its rounds: the median cold and warm seconds, each round kept under `rounds`.

    A row that failed in any round reports that round's error: a start that
    sometimes fails is not a start to compare."""
    first = runs[0]
    row = {key: first[key] for key in ("engine", "version", "cold", "warm") if key in first}
    row["rounds"] = [{**{k: r.get(k) for k in ("cold_s", "warm_s")},
                      **{f"{k}_marks_s": r[k]["marks_s"] for k in ("cold", "warm") if "marks_s" in r.get(k, {})}}
                     for r in runs]
    failed = [r for r in runs if "error" in r]
    if failed:
        row["error"] = failed[0]["error"]
    else:
        for key in ("cold_s", "warm_s"):
            row[key] = statistics.median(r[key] for r in runs)
    row["busy"] = any(r.get("busy") for r in runs)
    return row


def start_rows(systems) -> list[tuple[str, str, str, dict]]:
    """W6's rows: (label, system, variant, extra environment), in the order of `systems`.

    unrolled also runs as the plain NumPy engine (`UNROLLED_JIT=0`: nothing
    compiles), the figure its start must never exceed; PyTorch runs eager and
    with `torch.compile`.
    """
    rows = {
        "unrolled": [("unrolled", "unrolled", "", {}),
                     ("unrolled-numpy", "unrolled", "", PLAIN_NUMPY_ENV)],
        "torch": [("torch", "torch", "eager", {}), ("torch-compile", "torch", "compile", {})],
        "jax": [("jax", "jax", "", {})],
    }
    return [row for system in systems for row in rows.get(system, [])]


def cache_env(folder: Path) -> dict:
    """Point every system's compile cache into `folder` (empty at first: a cold start).

    unrolled writes its generated loops under UNROLLED_CACHE; Numba caches
    the machine code of those and of unrolled's kernel modules (which would
    otherwise sit next to their source, in __pycache__) under
    NUMBA_CACHE_DIR. TorchInductor and JAX have caches of their own; JAX's
    persistent cache is off unless given a folder, and its thresholds are
    lowered to zero so a warm start can use it (a JAX user's best case).
    """
    return {
        "UNROLLED_CACHE": str(folder / "unrolled"),
        "NUMBA_CACHE_DIR": str(folder / "numba"),
        "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"),
        "TRITON_CACHE_DIR": str(folder / "triton"),
        "JAX_COMPILATION_CACHE_DIR": str(folder / "jax"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _speedup(by: dict) -> dict:
    """The most threads' chars/s over one thread's, when both ran."""
    one = by.get("1", {}).get("chars_per_s")
    counts = [int(n) for n, r in by.items() if r.get("chars_per_s")]
    if not one or len(counts) < 2:
        return {}
    top = str(max(counts))
    return {"speedup": by[top]["chars_per_s"] / one, "speedup_threads": int(top)}


def _add_ratios(w, row: dict) -> None:
    """unrolled / peer: speed for chars/s workloads, memory for W5 (lower is better there)."""
    key = "peak_mib" if w.kind == "memory" else "chars_per_s"
    subject = row.get(SUBJECT, {})
    if key not in subject:
        return
    ratios = {}
    for system, out in row.items():
        if system != SUBJECT and out.get(key):
            ratios[system] = subject[key] / out[key]
    subject["ratio_to"] = ratios


def _add_start_ratios(row: dict) -> None:
    """W6: unrolled's cold and warm start over each other row's (lower is better for unrolled).

    With rounds, the median of the rounds' ratios: the two starts of a round
    ran minutes apart at most, the rounds' medians may not."""
    subject = row.get(SUBJECT, {})
    for key in ("cold_s", "warm_s"):
        if subject.get(key):
            subject[f"ratio_{key}"] = {label: _paired_ratio(subject, out, key) for label, out in row.items()
                                       if label != SUBJECT and out.get(key)}


def _paired_ratio(subject: dict, other: dict, key: str) -> float:
    """The median over the rounds both rows ran of subject / other in `key` (`start_summary` keeps every
    round; the subject may have run more)."""
    return statistics.median(mine[key] / theirs[key] for mine, theirs in zip(subject["rounds"], other["rounds"]))


def _short(out: dict) -> str:
    if "error" in out:
        return out["error"]
    if "wall_s" in out:
        return f"{out['wall_s']:.2f} s to the end of the first update"
    if "peak_mib" in out:
        return f"{out['peak_mib']:.0f} MiB"
    return f"{out['chars_per_s']:,.0f} chars/s"


# ---------------------------------------------------------------------------
# the table


def _k(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f}"


def _ratio(subject: dict, peer: dict, system: str) -> str:
    """unrolled / peer, with '?' when either was measured on a busy machine."""
    if system == SUBJECT:
        return "-"
    r = subject.get("ratio_to", {}).get(system)
    if r is None:
        return "-"
    doubtful = subject.get("busy") or peer.get("busy")
    return f"{r:.2f}x" + ("?" if doubtful else "")


def render(report: dict) -> str:
    peak = report["machine_peak_gflops"]
    detail = report["peak_detail"]
    proto = report["protocol"]
    lines = [f"machine: {describe_cpu(report['machine'])}, {proto['threads']} threads"
             + (f", OPENBLAS_CORETYPE={report['machine']['openblas_coretype']}"
                if report["machine"]["openblas_coretype"] else "")]
    if peak:
        parts = [f"{k.split('_')[0]} {v:.0f}" for k, v in detail.items() if k.endswith("_gflops") and k != "peak_gflops"]
        lines.append(f"fp32 matrix-product peak: {peak:.0f} GFLOP/s ({', '.join(parts)}; "
                     f"{detail['n']}x{detail['n']}, best of {detail['tries']})")
    else:
        lines.append(f"fp32 matrix-product peak: not measured ({detail.get('error', '?')})")
    lines.append(f"protocol: fresh process per system, {proto['warmup']} warm-up steps, "
                 f"{proto['reps']} reps >= {proto['seconds']:g} s; median [min - max]; "
                 f"loss per char flagged HIGH unless < {proto['loss_flag_above']:.2f} (0.9 ln {proto['vocab']})")
    lines.append(f"ratio = {SUBJECT} / system, same run (W1-W4, W7 speed: higher is better for {SUBJECT}; "
                 f"W5 memory and W6 seconds: lower is better)")
    busy = False
    for wid, row in report["workloads"].items():
        w = workloads.get(wid)
        lines.append("")
        if w.kind == "start":
            lines.extend(_render_start(w, row))
            busy = busy or any(out.get("busy") for out in row.values())
            continue
        flops = "" if w.kind == "memory" else f" - {w.flops_per_char / 1e3:,.0f} kFLOP/char"
        lines.append(f"{w.id} {w.name}: {w.describe()}{flops}")
        subject = row.get(SUBJECT, {})
        if w.kind == "memory":
            lines.append(f"  {'system':<9} {'peak MiB above baseline':>24} {'step s':>8} {'ratio':>7}")
        else:
            lines.append(f"  {'system':<9} {'chars/s':>9} {'[min - max]':>21} {'GFLOP/s':>8} {'%peak':>6} "
                         f"{'loss':>10} {'ratio':>7}  notes")
        for system, out in row.items():
            if "error" in out:
                lines.append(f"  {system:<9} {out['error']}")
                continue
            notes = []
            if out.get("variant"):
                notes.append(_variants_note(out))
            if out.get("compile_s") is not None:
                notes.append(f"compile {out['compile_s']:.2f} s")
            if out.get("cores_used") is not None:
                notes.append(f"{out['cores_used']:.1f} cores")
            if out.get("version"):
                notes.append(f"v{out['version']}")
            if out.get("products"):
                notes.append(out["products"])
            if out.get("busy"):
                notes.append(f"BUSY: others used {out['others_cpu']:.1f} cores")
                busy = True
            if w.kind == "memory":
                lines.append(f"  {system:<9} {out['peak_mib']:>24.0f} {out['step_s']:>8.2f} "
                             f"{_ratio(subject, out, system):>7}  {', '.join(notes)}")
                continue
            loss = out.get("final_loss")
            if w.kind != "train":
                loss_s = "-"
            elif loss is None:
                loss_s = "none HIGH"
            else:
                loss_s = f"{loss:.2f} " + ("ok" if out.get("loss_ok") else "HIGH")
            pct = f"{out['pct_peak']:.1f}%" if "pct_peak" in out else "-"
            span = f"[{_k(out['min'])} - {_k(out['max'])}]"
            lines.append(f"  {system:<9} {_k(out['chars_per_s']):>9} {span:>21} {out['gflops']:>8.2f} "
                         f"{pct:>6} {loss_s:>10} {_ratio(subject, out, system):>7}  {', '.join(notes)}")
    lines.extend(_render_scaling(report.get("scaling", {})))
    if busy:
        lines.append("")
        lines.append("warning: other processes competed for the CPUs during rows marked BUSY "
                     "(their ratios end in '?'); rerun those on a quiet machine. PyTorch with "
                     "2 threads on oversubscribed cores can slow down a hundredfold.")
    return "\n".join(lines)


def _variants_note(out: dict) -> str:
    """'compile (eager 12.3 k)': the variant reported, and what the others reached."""
    others = [f"{n} {_k(r['chars_per_s'])}" if "chars_per_s" in r else f"{n} failed"
              for n, r in out.get("variants", {}).items() if n != out["variant"]]
    return out["variant"] + (f" (fastest; {', '.join(others)})" if others else "")


def _render_start(w, row: dict) -> list[str]:
    counts = sorted({len(out.get("rounds", [])) for out in row.values()})
    rounds = " or ".join(str(n) for n in counts)
    each = (f"; the median of {rounds} rounds, ratios the median of the ratios of the rounds both rows ran"
            if counts and counts[-1] > 1 else "")
    lines = [f"{w.id} {w.name}: {w.describe()} (cold: empty compile caches; warm: the caches it left{each})",
             f"  {'system':<15} {'cold s':>8} {'warm s':>8} {'ratio cold':>11} {'ratio warm':>11}  notes"]
    subject = row.get(SUBJECT, {})
    for label, out in row.items():
        if out.get("error"):
            lines.append(f"  {label:<15} {out['error']}")
            continue
        rc = subject.get("ratio_cold_s", {}).get(label)
        rw = subject.get("ratio_warm_s", {}).get(label)
        notes = [out[k] for k in ("engine",) if out.get(k)]
        compile_s = [out[k].get("compile_s") for k in ("cold", "warm")]
        if None not in compile_s:
            notes.append(f"compile {compile_s[0]:.2f} s cold, {compile_s[1]:.2f} s warm")
        if out.get("busy"):
            notes.append("BUSY")
        lines.append(f"  {label:<15} {out['cold_s']:>8.2f} {out['warm_s']:>8.2f} "
                     f"{f'{rc:.2f}x' if rc else '-':>11} {f'{rw:.2f}x' if rw else '-':>11}  {', '.join(notes)}")
    return lines


def _render_scaling(scaling: dict) -> list[str]:
    lines = []
    for wid, row in scaling.items():
        if not row:
            continue
        counts = sorted({int(n) for r in row.values() for n in r["threads"]})
        lines += ["", f"{wid} scaling with threads: chars/s (median); speedup = most threads / 1 thread",
                  f"  {'system':<16} " + " ".join(f"{f'{n} thr':>9}" for n in counts) + f" {'speedup':>8}"]
        for system, r in row.items():
            cells = []
            for n in counts:
                one = r["threads"].get(str(n), {})
                cell = _k(one["chars_per_s"]) if "chars_per_s" in one else "failed"
                cells.append(f"{cell + ('?' if one.get('busy') else ''):>9}")
            speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
            name = system + (f" ({r['variant']})" if r.get("variant") else "")
            lines.append(f"  {name:<16} " + " ".join(cells) + f" {speed:>8}")
    return lines


# ---------------------------------------------------------------------------
# command line


def _counts(text: str) -> list[int]:
    """'1,2' -> [1, 2]; 'none' or '' -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        counts = sorted({int(n) for n in text.split(",") if n.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scaling takes thread counts like 1,2, not {text!r}") from None
    if counts and counts[0] < 1:
        raise argparse.ArgumentTypeError(f"--scaling takes thread counts >= 1, not {text!r}")
    return counts


def parse_args(argv, prog="python -m benchmarks.harness"):
    p = argparse.ArgumentParser(
        prog=prog,
        description="Time the workloads of BENCHMARKS.md (min-char-rnn's Elman network, char-rnn's LSTM 2x128, "
                    "a large LSTM, sampling, peak memory of one long BPTT step, start-up time) and batched "
                    "sampling (W7) with unrolled and each peer (PyTorch eager and compiled, JAX, min-char-rnn's "
                    "NumPy loop), each in a fresh process: median chars/s with min-max, unrolled's ratio to "
                    "each peer, GFLOP/s and % of the matrix-product peak measured in the same run, and the two "
                    "LSTM training workloads at 1 and 2 threads. --runs 3 judges the targets on the median of "
                    "three full runs. Only same-run ratios mean anything on a shared machine.")
    p.add_argument("workloads", nargs="*", metavar="W", help=f"workloads to run (default: all of {' '.join(workloads.WORKLOADS)})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, run in this order (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=2.0, help="minimum length of one timed repetition (default 2)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--threads", type=int, default=2, help="cores every system may use (default 2)")
    p.add_argument("--scaling", default="1,2", type=_counts,
                   help="thread counts at which W2 and W3 are also reported, to show scaling "
                        "(default 1,2; 'none' for none)")
    p.add_argument("--corpus", default=None, help="corpus file (default ../shared/data/shakespeare.txt)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a worker is abandoned")
    p.add_argument("--start-rounds", type=int, default=3,
                   help="W6: cold and warm starts of every row, the rows taking turns; each row reports the "
                        "median (default 3)")
    p.add_argument("--own-start-rounds", type=int, default=9,
                   help="W6: rounds of unrolled's two rows, the engine and the plain NumPy engine, whose "
                        "ratio compares differences of a few percent (default 9; at least --start-rounds)")
    p.add_argument("--runs", type=int, default=1,
                   help="full runs one after another; the targets are judged on their median (default 1; "
                        "issue 19 judges on 3)")
    return p.parse_args(argv)


def main(argv=None, prog="python -m benchmarks.harness") -> int:
    """``prog``: the name its usage errors give (`unrolled bench` runs this too)."""
    a = parse_args(argv, prog)
    try:
        ids = [workloads.get(w).id for w in (a.workloads or workloads.WORKLOADS)]
        systems = [s.strip() for s in a.systems.split(",") if s.strip()]
        unknown = [s for s in systems if s not in SYSTEMS]
        if unknown or not systems:
            raise ValueError(f"unknown system {', '.join(unknown) or '(none)'} (--systems): "
                             f"choose from {', '.join(SYSTEMS)}")
        if not a.seconds > 0 or a.reps < 1 or a.warmup < 0 or a.threads < 1 or a.runs < 1 \
                or a.start_rounds < 1 or a.own_start_rounds < 1:
            raise ValueError("--seconds must be > 0, --reps >= 1, --warmup >= 0, --threads >= 1, --runs >= 1, "
                             "--start-rounds >= 1, --own-start-rounds >= 1")
        corpus_mod.corpus_path(a.corpus)
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    reports = []
    for i in range(a.runs):
        if a.runs > 1:
            log(f"run {i + 1} of {a.runs}")
        reports.append(collect(ids, systems, a, log))
    if a.json:  # one run: its report as before; several: every report and the targets on their median
        out = reports[0] if a.runs == 1 else {"runs": reports, "targets": targets.judge(reports)}
        print(json.dumps(out, indent=1))
        return 0
    for i, report in enumerate(reports):
        if a.runs > 1:
            print(("\n" if i else "") + f"=== run {i + 1} of {a.runs} ===")
        print(render(report))
    print("\n".join(targets.render(reports)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
