"""Signals at random moments: `unrolled train` and `unrolled evaluate` end cleanly and lose nothing.

Each case starts the command in a process of its own, on a batch large
enough to be split across threads (rowsplit.py), and sends Ctrl-C (SIGINT),
sometimes twice, or SIGTERM, at a random moment: while Python and Numba
load, while the first update compiles, while training, validating or
saving. A case passes when the process exits with the signal's code (or 0
when it had finished), prints no traceback and no C library message (heap
corruption, a double free, a segfault), and the checkpoint it says it saved
loads, at the step it names.

The suite runs a few cases; the full battery runs from the command line:

    PYTHONPATH=src python tests/test_interrupts.py 50 [SEED]
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = "the quick brown fox jumps over a lazy dog while seven ravens sing of rivers and stone".split()
# a batch of 32 rows: two parts of 16 where oneDNN runs the products; a short validation, saved often
TRAIN = ["--hidden", "64", "--layers", "2", "--seq", "20", "--batch", "32", "--steps", "100000",
         "--eval-every", "15", "--sample-every", "0", "--val-fraction", "0.02"]
NATIVE_FAILURES = re.compile(r"corrupt|double free|free\(\)|munmap_chunk|Segmentation|Fatal Python|Bus error|"
                             r"core dumped|Aborted")
NATIVE_SIGNALS = {int(signal.SIGSEGV), int(signal.SIGABRT), int(signal.SIGBUS), int(signal.SIGILL), int(signal.SIGFPE)}


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    env.pop("UNROLLED_JIT", None)  # the command's own engine choice: Numba loops, rows split across threads
    return env


def _text(folder: Path) -> Path:
    path = folder / "text.txt"
    if not path.exists():
        r = random.Random(1)
        path.write_text(" ".join(r.choice(WORDS) for _ in range(20000)))
    return path


def _checkpoint_step(path: Path) -> int:
    """Load the checkpoint as `unrolled sample` would (in a process of its own) and return its step."""
    code = ("import sys; from unrolled.charlm.model import load_model; "
            "print(load_model(sys.argv[1]).meta['step'])")
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=_env(), capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"{path} does not load: {done.stderr.strip()[-500:]}")
    return int(done.stdout.strip())


def one_case(folder: Path, rng: random.Random, command: str, run_for: Path | None = None) -> dict:
    """Start ``command`` (train or evaluate), signal it at a random moment, and judge how it ended."""
    text = _text(folder)
    out = folder / f"run{rng.randrange(10**9)}"
    argv = (["train", str(text), "--out", str(out), *TRAIN] if command == "train"
            else ["evaluate", str(run_for), str(text)])
    proc = subprocess.Popen([sys.executable, "-m", "unrolled", *argv], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    signals = [rng.choice([signal.SIGINT, signal.SIGINT, signal.SIGTERM])]
    if rng.random() < 0.4:
        signals.append(signal.SIGINT)  # a second press: quit at once
    delay = rng.uniform(0.2, 9.0)
    time.sleep(delay)
    for k, s in enumerate(signals):
        if k:
            time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(s)
    stdout, stderr = proc.communicate(timeout=600)
    case = {"command": command, "signals": [signal.Signals(s).name for s in signals], "rc": proc.returncode,
            "stderr": stderr, "out": out, "problem": None, "after_s": round(delay, 2),
            "stdout_tail": stdout[-300:]}  # where the run was when the signal came
    expected = {0, 128 + int(signals[0])} | {128 + int(s) for s in signals}
    if NATIVE_FAILURES.search(stderr) or -proc.returncode in NATIVE_SIGNALS:
        case["problem"] = "crash"
    elif "Traceback" in stderr:
        case["problem"] = "traceback"
    elif proc.returncode not in expected:  # e.g. killed by the signal itself, without saving
        case["problem"] = "unexpected exit"
    elif command == "train":
        said = re.search(r"at step (\d+); saved", stdout)
        latest = out / "latest.npz"
        try:
            if said:
                case["saved"] = int(said.group(1))
                if _checkpoint_step(latest) != case["saved"]:
                    case["problem"] = "data lost"
            elif latest.exists():
                _checkpoint_step(latest)
        except AssertionError as e:
            case["problem"], case["stderr"] = "data lost", str(e)
    return case


def battery(n: int, seed: int, folder: Path, report=None, evaluate_every: int = 5) -> dict:
    """``n`` cases (every ``evaluate_every``-th an evaluate of the last checkpoint saved); how they ended."""
    rng = random.Random(seed)
    tally = {"cases": 0, "clean": 0, "saved": 0, "crash": 0, "traceback": 0, "unexpected exit": 0, "data lost": 0}
    last_saved = None
    for i in range(n):
        command = "evaluate" if i % evaluate_every == evaluate_every - 1 and last_saved is not None else "train"
        case = one_case(folder, rng, command, last_saved)
        tally["cases"] += 1
        tally[case["problem"] or "clean"] += 1
        if "saved" in case:
            tally["saved"] += 1
            last_saved = case["out"]
        if report:
            report(i, case)
    return tally


def test_a_second_signal_quits_at_once_without_unwinding():
    code = ("import signal, time; from unrolled.train.interrupts import StopRequest\n"
            "with StopRequest('bye') as stop:\n"
            "    signal.raise_signal(signal.SIGTERM)\n"
            "    print('requested', stop.requested, stop.name, flush=True)\n"
            "    signal.raise_signal(signal.SIGINT)\n"
            "    time.sleep(5)\n"
            "print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and done.stdout == "requested True SIGTERM\n"
    assert done.stderr == "Ctrl-C again: bye\n"


def test_after_the_command_a_late_signal_is_ignored():
    from unrolled.train.interrupts import quit_on_signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with quit_on_signal("unrolled"):
            pass
        assert all(signal.getsignal(s) is h for s, h in before.items())  # a library call puts them back
        with quit_on_signal("unrolled", exiting=True):
            pass
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in before)  # the process is ending
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_part_workers_are_joined_before_an_interrupt_unwinds(monkeypatch):
    """The row split and the split sampler both wait for their workers through pinned.join."""
    from concurrent.futures import ThreadPoolExecutor

    from unrolled.engines.compiled import pinned

    real_wait, calls = pinned.wait, []

    def interrupted_wait(futures):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the main thread waits on its workers
        return real_wait(futures)

    monkeypatch.setattr(pinned, "wait", interrupted_wait)
    with ThreadPoolExecutor(1) as pool:
        worker = pool.submit(time.sleep, 0.3)
        try:
            pinned.join([worker])
        except KeyboardInterrupt:
            assert worker.done()  # the worker had finished writing before the interrupt went on
        else:
            raise AssertionError("the interrupt was swallowed")


def test_signals_at_random_moments_end_cleanly(tmp_path):
    n = int(os.environ.get("UNROLLED_INTERRUPT_CASES", "3"))
    seed = int(time.time()) % 1000
    failures = []
    tally = battery(n, seed=seed, folder=tmp_path, evaluate_every=3,
                    report=lambda i, c: c["problem"] and failures.append(c))
    assert tally["clean"] == n, (f"seed {seed}", tally, [
        (c["problem"], c["command"], c["signals"], f"after {c['after_s']} s", c["rc"], c["stderr"][-800:],
         c["stdout_tail"]) for c in failures])


if __name__ == "__main__":
    import tempfile

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0

    def show(i, case):
        line = f"{i:3d} {case['command']:8s} {'+'.join(case['signals']):14s} rc {case['rc']:4d}"
        line += f"  saved step {case['saved']}" if "saved" in case else ""
        print(line + (f"  {case['problem'].upper()}: {case['stderr'].strip()[-300:]}" if case["problem"] else ""),
              flush=True)

    with tempfile.TemporaryDirectory() as d:
        print(battery(count, seed, Path(d), show))
