"""Benchmark harness: every (workload, system) pair in a fresh process, one at a time.

    python -m benchmarks.harness [W1 W2 ...] [--json] [--systems unrolled,torch,jax,numpy]
                                 [--seconds S] [--reps N] [--warmup K] [--threads 2]

First the machine's fp32 matrix-product peak is measured (`benchmarks.peak`),
then each workload is run by each system in turn (`benchmarks.worker`), never
two at once. The table gives, per workload and system, the median chars/s
with min-max, the ratio of `unrolled` to each peer (same run, same machine:
the only figures that count), achieved GFLOP/s and % of the peak, and the
final training loss per character (flagged when it is not below 0.9 ln V,
i.e. the loop did not learn). W5 reports peak resident memory above the
baseline instead. `--json` prints one JSON object instead of the table.

A system that is not installed, does not cover a workload, or fails is
reported with its error and left out of the ratios; the run goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from . import corpus as corpus_mod
from . import workloads
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
    for var in THREAD_VARIABLES:
        env.setdefault(var, str(threads))
    # BENCHMARKS.md: NumPy's OpenBLAS misses AVX-512 on Zen 5 and falls back to
    # AVX2 kernels at half speed; this hint is only safe where AVX-512 exists.
    if "OPENBLAS_CORETYPE" not in env and _has_avx512():
        env["OPENBLAS_CORETYPE"] = "SkylakeX"
    return env


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _has_avx512() -> bool:
    return {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= _cpu_flags()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    busy1, own1, wall = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter() - t0
    out = _parse(proc)
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


def collect(ids, systems, a, log) -> dict:
    env = child_env(a.threads)
    log(f"measuring the fp32 matrix-product peak ({a.threads} threads) ...")
    peak = run_child(["benchmarks.peak", "--threads", str(a.threads)], env, timeout=300)
    peak_gflops = peak.get("peak_gflops")
    V = corpus_mod.load(a.corpus).V
    flag_at = LOSS_FRACTION * math.log(V)

    results = {}
    timeout = a.timeout or 300 + 3 * a.reps * a.seconds
    common = ["--seconds", str(a.seconds), "--reps", str(a.reps), "--warmup", str(a.warmup),
              "--threads", str(a.threads)]
    if a.corpus:
        common += ["--corpus", str(a.corpus)]
    for wid in ids:
        w = workloads.get(wid)
        results[wid] = {}
        for system in systems:
            if wid not in COVERS[system]:
                results[wid][system] = {"error": f"n/a: the {system} peer does not cover {wid}"}
                continue
            log(f"{wid} {system} ...")
            t0 = time.perf_counter()
            out = run_child(["benchmarks.worker", wid, system, *common], env, timeout)
            if "error" not in out:
                out["busy"] = out.get("others_cpu", 0.0) > BUSY
            if "chars_per_s" in out:
                if peak_gflops:
                    out["pct_peak"] = 100 * out["gflops"] / peak_gflops
                if w.kind == "train":
                    loss = out.get("final_loss")
                    out["loss_ok"] = loss is not None and loss < flag_at
            log(f"{wid} {system}: {_short(out)} ({time.perf_counter() - t0:.0f} s)")
            results[wid][system] = out
        _add_ratios(w, results[wid])
    return {
        "machine_peak_gflops": peak_gflops,
        "peak_detail": peak,
        "machine": {"cpu": cpu_name(), "python": platform.python_version(),
                    "openblas_coretype": env.get("OPENBLAS_CORETYPE")},
        "protocol": {"seconds": a.seconds, "reps": a.reps, "warmup": a.warmup, "threads": a.threads,
                     "loss_flag_above": flag_at, "vocab": V},
        "workloads": results,
    }


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


def _short(out: dict) -> str:
    if "error" in out:
        return out["error"]
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
    lines = [f"machine: {report['machine']['cpu']}, {proto['threads']} threads"
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
    lines.append(f"ratio = {SUBJECT} / system, same run (W1-W4 speed: higher is better for {SUBJECT}; "
                 f"W5 memory: lower is better)")
    busy = False
    for wid, row in report["workloads"].items():
        w = workloads.get(wid)
        lines.append("")
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
    if busy:
        lines.append("")
        lines.append("warning: other processes competed for the CPUs during rows marked BUSY "
                     "(their ratios end in '?'); rerun those on a quiet machine. PyTorch with "
                     "2 threads on oversubscribed cores can slow down a hundredfold.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# command line


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.harness",
        description="Time the workloads of BENCHMARKS.md with unrolled and its peers; print ratios.")
    p.add_argument("workloads", nargs="*", metavar="W", help=f"workloads to run (default: all of {' '.join(workloads.WORKLOADS)})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, run in this order (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=2.0, help="minimum length of one timed repetition (default 2)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--threads", type=int, default=2, help="cores every system may use (default 2)")
    p.add_argument("--corpus", default=None, help="corpus file (default ../shared/data/shakespeare.txt)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a worker is abandoned")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        ids = [workloads.get(w).id for w in (a.workloads or workloads.WORKLOADS)]
        systems = [s.strip() for s in a.systems.split(",") if s.strip()]
        unknown = [s for s in systems if s not in SYSTEMS]
        if unknown or not systems:
            raise ValueError(f"unknown system {', '.join(unknown) or '(none)'}: choose from {', '.join(SYSTEMS)}")
        if a.seconds <= 0 or a.reps < 1 or a.warmup < 0 or a.threads < 1:
            raise ValueError("--seconds must be > 0, --reps >= 1, --warmup >= 0, --threads >= 1")
        corpus_mod.corpus_path(a.corpus)
    except (ValueError, FileNotFoundError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report = collect(ids, systems, a, log)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
