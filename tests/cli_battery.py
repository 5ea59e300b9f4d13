"""The command line under faults, hostile files and everyday use: a battery of cases, each with its expectation.

Every case runs ``python -m unrolled ...`` in a process of its own, in a temporary folder, on tiny texts
and tiny models (--hidden 16, a few steps), and declares what it expects:

- ``error``: a non-zero exit and one line on stderr (argparse's usage lines aside), no traceback, naming
  the flag or file at fault; nothing that existed before is changed, and no run folder is left behind;
- ``ok``: exit 0 and a result that checks (the checkpoint loads and names the right step, the numbers
  printed are finite, the file written is there);
- ``either``: a clean refusal or a correct result (e.g. "extend the schedule, or refuse and say how").

Each outcome is one of: clean error, correct behaviour, traceback (a traceback, a native crash or a
death by signal), silent wrong answer (exit 0 on bad input, or a result that does not check), data lost
(something that existed before is gone or overwritten by something older, or a success that produced
nothing usable), other (a hang, an error that is not one line or does not name its cause, a refusal of
a good command, a folder left behind). It prints the tally and each case that is not clean or correct:

    PYTHONPATH=src python tests/cli_battery.py [-k SUBSTRING] [-v]

This file is not collected by pytest (its name does not start with ``test_``); tests/test_cli_battery.py
checks its classifier.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SRC = Path(__file__).resolve().parents[1] / "src"
README = Path(__file__).resolve().parents[1] / "README.md"
CLEAN, CORRECT, TRACEBACK, SILENT, LOST, OTHER = ("clean error", "correct behaviour", "traceback",
                                                  "silent wrong answer", "data lost", "other")
CATEGORIES = (CLEAN, CORRECT, TRACEBACK, SILENT, LOST, OTHER)
NATIVE = re.compile(r"corrupt|double free|free\(\)|munmap_chunk|Segmentation fault|Fatal Python|Bus error|"
                    r"core dumped|Aborted|MemoryError")
SMALL = ["--hidden", "16", "--layers", "1", "--seq", "10", "--batch", "4", "--sample-every", "0"]
WORDS = "the quick brown fox jumps over a lazy dog while seven ravens sing of rivers and stone".split()
WORDING = re.compile(r"(?<![\d.,])1 (minutes|characters|updates|steps|files|seconds|predictions)\b")


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    peak_mb: float = 0.0


@dataclass
class Case:
    name: str
    argv: list  # after `unrolled`; strings, with {root} expanded
    expect: str = "error"  # error | ok | either
    needles: tuple = ()  # what the error line must name (case-insensitive)
    check: Callable | None = None  # (ctx, outcome) -> None or (category, why), for ok/either successes
    setup: Callable | None = None  # (ctx) -> None, before the run
    stdin: bytes | None = None
    env: dict = field(default_factory=dict)
    no_new: str | None = None  # a path (under root) that a refused command must not create
    guard: tuple = ()  # paths (under root) that a refused command must leave as they were
    timeout: float = 120
    runner: Callable | None = None  # (ctx) -> (category, why): a case that drives processes itself
    rc: int = 0  # the exit code of an `ok` run


class Context:
    """The temporary folder with the shared text and runs, and how to run the command line in it."""

    def __init__(self, root: Path):
        self.root = root
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
        self.env.pop("UNROLLED_JIT", None)
        self.env["COLUMNS"] = "200"

    def path(self, rel: str) -> Path:
        return self.root / rel

    def expand(self, argv) -> list[str]:
        return [str(a).replace("{root}", str(self.root)) for a in argv]

    def popen(self, argv, *, stdin=None, env=None, stdout=None, stderr=None):
        return subprocess.Popen([sys.executable, "-m", "unrolled", *self.expand(argv)], cwd=self.root,
                                env={**self.env, **(env or {})}, stdin=stdin or subprocess.DEVNULL,
                                stdout=stdout, stderr=stderr, start_new_session=True)

    def run(self, argv, *, stdin: bytes | None = None, env=None, timeout: float = 120) -> Outcome:
        """Run one command with its output in files (never a pipe that fills), and its own peak memory."""
        with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
            if stdin is not None:
                fin.write(stdin)
                fin.seek(0)
            start = time.monotonic()
            proc = self.popen(argv, stdin=fin if stdin is not None else None, env=env, stdout=fout, stderr=ferr)
            return self._wait(proc, fout, ferr, start, timeout)

    def _wait(self, proc, fout, ferr, start, timeout) -> Outcome:
        fired = []

        def kill():
            fired.append(1)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        fout.seek(0)
        ferr.seek(0)
        return Outcome(proc.returncode, fout.read().decode("utf-8", "replace"), ferr.read().decode("utf-8", "replace"),
                       time.monotonic() - start, bool(fired), usage.ru_maxrss / 1024)

    def train_run(self, rel: str, *extra, text="t.txt", steps=6) -> Path:
        """A finished tiny run at ``rel`` (made by the command line itself), or the battery cannot go on."""
        o = self.run(["train", text, "--out", rel, *SMALL, "--steps", str(steps), "--eval-every", "3", *extra],
                     timeout=300)
        if o.rc != 0:
            raise SystemExit(f"cannot make the run {rel}: {o.stderr[-2000:]}")
        return self.path(rel)

    def copy_run(self, src: str, dst: str) -> Path:
        shutil.copytree(self.path(src), self.path(dst))
        return self.path(dst)


# -- judging -----------------------------------------------------------------------------------------------


def error_lines(stderr: str) -> list[str]:
    """The lines of an error message: argparse's usage block and our 'compiling' notice left out."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("compiling (first run only)")]
    if lines and lines[0].startswith("usage:"):
        rest = [i for i, ln in enumerate(lines) if ln.startswith("unrolled") and "error" in ln]
        lines = lines[rest[0]:] if rest else lines
    return lines


def crashed(o: Outcome) -> str | None:
    """Why ``o`` counts as a crash: a traceback, a native failure, a death by signal."""
    if "Traceback" in o.stderr or "Exception ignored" in o.stderr:
        return "traceback: " + o.stderr.strip()[-400:]
    if NATIVE.search(o.stderr):
        return "native failure: " + o.stderr.strip()[-300:]
    if o.rc < 0:
        return f"killed by {signal.Signals(-o.rc).name}"
    return None


def judge_error(o: Outcome, needles=()) -> tuple[str, str]:
    """A refusal expected: one line naming the fault, non-zero exit."""
    if o.timed_out:
        return OTHER, f"hang: no exit within {o.seconds:.0f} s"
    why = crashed(o)
    if why:
        return TRACEBACK, why
    if o.rc == 0:
        return SILENT, "exit 0 on bad input; stdout: " + o.stdout.strip()[-200:]
    lines = error_lines(o.stderr)
    if len(lines) != 1:
        return OTHER, f"unclear error: {len(lines)} lines: " + " | ".join(lines)[-400:]
    missing = [n for n in needles if n.lower() not in lines[0].lower()]
    if missing:
        return OTHER, f"unclear error: does not name {missing}: {lines[0][:300]}"
    return CLEAN, lines[0]


def judge_ok(o: Outcome, expected_rc: int = 0) -> tuple[str, str] | None:
    """A success expected: None when the process ended as it should (the case's check then looks at the result)."""
    if o.timed_out:
        return OTHER, f"hang: no exit within {o.seconds:.0f} s"
    why = crashed(o)
    if why:
        return TRACEBACK, why
    if o.rc != expected_rc:
        return OTHER, f"refused a good command (rc {o.rc}): " + " | ".join(error_lines(o.stderr))[-400:]
    bad = WORDING.search(o.stdout + o.stderr)
    if bad:
        return OTHER, f"wording: {bad.group(0)!r}"
    return None


def snapshot(paths) -> dict:
    out = {}
    for p in paths:
        p = Path(p)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in files:
            out[str(q)] = hashlib.sha256(q.read_bytes()).hexdigest() if q.exists() else None
    return out


def judge(ctx: Context, case: Case) -> tuple[str, str, Outcome | None]:
    if case.setup:
        case.setup(ctx)
    if case.runner:
        cat, why = case.runner(ctx)
        return cat, why, None
    guarded = [ctx.path(g) for g in case.guard]
    before = snapshot(guarded)
    o = ctx.run(case.argv, stdin=case.stdin, env=case.env, timeout=case.timeout)
    if case.expect == "ok" or (case.expect == "either" and o.rc == 0):
        bad = judge_ok(o, case.rc)
        if bad is None and case.check:
            bad = case.check(ctx, o)
        cat, why = bad or (CORRECT, f"rc {o.rc}")
    else:
        cat, why = judge_error(o, case.needles)
    if cat in (CLEAN, CORRECT) and case.expect != "ok":
        after = snapshot(guarded)
        changed = [k for k, v in before.items() if after.get(k) != v]
        if changed:
            cat, why = LOST, f"changed or removed by a refused command: {changed}"
        elif case.no_new and ctx.path(case.no_new).exists() and o.rc != 0:
            cat, why = OTHER, f"left {case.no_new} behind after refusing"
    return cat, why, o


# -- checks ------------------------------------------------------------------------------------------------


def load_step(path: Path) -> int:
    from unrolled.charlm.model import load_model

    return int(load_model(path).meta["step"])


def checkpoint_at(rel: str, step: int):
    def check(ctx, o):
        p = ctx.path(rel)
        if not p.exists():
            return LOST, f"success but no {rel}"
        try:
            got = load_step(p)
        except (ValueError, OSError) as e:
            return LOST, f"{rel} does not load: {e}"
        return None if got == step else (SILENT, f"{rel} is at step {got}, not {step}")
    return check


def finite_bpc(ctx, o):
    m = re.search(r"bits/char (\S+)", o.stdout)
    if not m:
        return SILENT, "no bits/char printed: " + o.stdout[-200:]
    v = float(m.group(1))
    return None if math.isfinite(v) and v > 0 else (SILENT, f"bits/char {v}")


def all_of(*checks):
    def check(ctx, o):
        for c in checks:
            bad = c(ctx, o)
            if bad:
                return bad
        return None
    return check


def file_made(rel: str, min_bytes: int = 1):
    def check(ctx, o):
        p = ctx.path(rel)
        return None if p.exists() and p.stat().st_size >= min_bytes else (LOST, f"success but {rel} missing/empty")
    return check


def peak_below(mb: float):
    def check(ctx, o):
        return None if o.peak_mb < mb else (SILENT, f"used {o.peak_mb:.0f} MB (bound {mb:.0f})")
    return check


def sample_text(prime: str, length: int):
    def check(ctx, o):
        text = o.stdout.rstrip("\n")
        if not text.startswith(prime) or len(text) < length:
            return SILENT, f"sample {text[:60]!r}... of {len(text)} characters, wanted {prime!r} + {length}"
        return None
    return check


def stdout_has(pattern: str):
    def check(ctx, o):
        return None if re.search(pattern, o.stdout + o.stderr) else (SILENT, f"no {pattern!r} in the output")
    return check


# -- crafted files -----------------------------------------------------------------------------------------


def write_text(ctx, rel, text: str | bytes):
    p = ctx.path(rel)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def npy(a=None, *, shape=None, dtype=None) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    if a is not None:
        np.lib.format.write_array(buf, a, allow_pickle=True)
    else:
        np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                   "shape": shape})
    return buf.getvalue()


def rewrite(src: Path, dst: Path, replace: dict | None = None, drop=(), compression=zipfile.ZIP_STORED,
            stream: dict | None = None):
    """Copy a checkpoint's members, replacing some (bytes), dropping some, or streaming (name -> (header, n zeros))."""
    replace, stream = replace or {}, stream or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression, allowZip64=True) as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            if info.filename in stream:
                header, zeros = stream[info.filename]
                with zout.open(info.filename, "w", force_zip64=True) as f:
                    f.write(header)
                    for _ in range(zeros // (1 << 20)):
                        f.write(bytes(1 << 20))
                continue
            zout.writestr(info.filename, replace.get(info.filename, zin.read(info.filename)))
    return dst


def edited(ctx, src_rel: str, dst_rel: str, edit):
    """A copy of a run folder whose latest.npz has ``edit(arrays, meta)`` applied, with a valid checksum."""
    from unrolled.train.checkpoint import load_checkpoint, save_checkpoint

    dst = ctx.path(dst_rel)
    dst.mkdir(parents=True, exist_ok=True)
    arrays, meta = load_checkpoint(ctx.path(src_rel) / "latest.npz")
    edit(arrays, meta)
    save_checkpoint(dst / "latest.npz", arrays, meta)
    return dst


def make_hostile(ctx):
    """Every hostile checkpoint under h/, built once from the base run's latest.npz."""
    import numpy as np

    h = ctx.path("h")
    h.mkdir()
    good = ctx.path("base/latest.npz")
    data = good.read_bytes()
    (h / "truncated.npz").write_bytes(data[: len(data) // 2])
    (h / "empty.npz").write_bytes(b"")
    (h / "text.npz").write_bytes(b"not a zip at all\n" * 10)
    with zipfile.ZipFile(good) as z:
        b = np.lib.format.read_array(io.BytesIO(z.read("param.out.b.npy")))
    rewrite(good, h / "checksum.npz", {"param.out.b.npy": npy(b + 1)})
    rewrite(good, h / "pickle.npz", {"param.out.b.npy": npy(np.array([{"x": 1}] * b.size, dtype=object))})
    rewrite(good, h / "absent.npz", drop=("param.out.W.npy",))
    rewrite(good, h / "nosum.npz", drop=("__sha256__.npy",))
    rewrite(good, h / "nometa.npz", drop=("__meta__.json.npy",))
    big = 400 << 20  # zeros that compress to almost nothing
    rewrite(good, h / "deflate_bomb.npz", compression=zipfile.ZIP_DEFLATED,
            stream={"history/train_loss.npy": (npy(shape=(big // 8,), dtype="<f8"), big)})
    rewrite(good, h / "bzip2_bomb.npz", compression=zipfile.ZIP_BZIP2,
            stream={"history/val.npy": (npy(shape=(big // 16, 2), dtype="<f8"), big // 4)})
    rewrite(good, h / "huge_header.npz", {"history/train_loss.npy": npy(shape=(10 ** 12,), dtype="<f8")})
    (h / "dir.npz").mkdir()
    os.symlink("/dev/zero", h / "devzero.npz")

    def meta_edit(rel, fn):
        edited(ctx, "base", f"h/{rel}", fn)
    meta_edit("seq1e8", lambda a, m: m["train"].__setitem__("seq", 1e8))
    meta_edit("seqhuge", lambda a, m: m["train"].__setitem__("seq", 10 ** 8))
    meta_edit("trainer_list", lambda a, m: m.__setitem__("trainer", [1, 2]))
    meta_edit("hidden_str", lambda a, m: m["model"].__setitem__("hidden", "x"))
    meta_edit("wrong_cell", lambda a, m: m["model"].__setitem__("cell", "gru"))
    meta_edit("vocab_short", lambda a, m: m.__setitem__("vocabulary", m["vocabulary"][:5]))
    meta_edit("step_neg", lambda a, m: m.__setitem__("step", -3))
    meta_edit("nan_param", lambda a, m: a["param.out.b"].__setitem__(0, np.nan))

    def passwd(a, m):
        m["text"].update(source="/etc/passwd", files=["/etc/passwd"])
    meta_edit("passwd", passwd)

    def passwd_rel(a, m):
        m["text"].update(files=["../../../../../../../../etc/passwd"])
    meta_edit("passwd_rel", passwd_rel)


HOSTILE = ["truncated.npz", "empty.npz", "text.npz", "checksum.npz", "pickle.npz", "absent.npz", "nosum.npz",
           "nometa.npz", "deflate_bomb.npz", "bzip2_bomb.npz", "huge_header.npz", "dir.npz", "devzero.npz",
           "seq1e8", "seqhuge", "trainer_list", "hidden_str", "wrong_cell", "vocab_short", "step_neg", "nan_param"]


# -- the cases ---------------------------------------------------------------------------------------------


def bad_flag_cases() -> list[Case]:
    """Bad values for every numeric flag of every subcommand: a one-line refusal naming the flag."""
    cases = []
    train_bad = {
        "--hidden": ["0", "-1", "1e6", "abc", "1000000", "nan"], "--layers": ["0", "-1", "100000"],
        "--seq": ["0", "-5", "1e10", "10000000000"], "--batch": ["0", "-1", "1000000000"],
        "--lr": ["-1", "nan", "inf", "0"], "--dropout": ["-0.1", "1", "1.5", "nan"], "--embedding": ["-1"],
        "--decay": ["-1", "2", "nan"], "--warmup": ["-1"], "--clip": ["-1", "nan", "inf"], "--k1": ["-1"],
        "--k2": ["-1"], "--steps": ["-1", "1e10"], "--minutes": ["-1", "nan", "inf", "0"],
        "--val-fraction": ["-0.1", "1", "1.5", "nan"], "--seed": ["-1", str(2 ** 64)],
        "--sample-every": ["-1"], "--sample-length": ["-1"], "--eval-every": ["-1"], "--checkpoint-every": ["-1"],
        "--max-text-mb": ["0", "-1", "nan"], "--cell": ["bogus"], "--optimizer": ["bogus"], "--engine": ["bogus"],
        "--encoding": ["bogus-enc"], "--lr-schedule": ["bogus"],
    }
    for flag, values in train_bad.items():
        for v in values:
            out = f"bad/train{flag}{v}"
            argv = ["train", "t.txt", "--out", out, *SMALL, "--steps", "3", flag, v]
            cases.append(Case(f"train {flag} {v}", argv, needles=(flag,), no_new=out, timeout=60))
    cases.append(Case("train --k1 0 (--help: 0 means --seq)", ["train", "t.txt", "--out", "k1zero", *SMALL, "--steps",
                                                            "3", "--k1", "0"], "ok",
                      check=checkpoint_at("k1zero/latest.npz", 3), timeout=180))
    cases.append(Case("train --k1 10 --k2 5", ["train", "t.txt", "--out", "bad/k2", *SMALL, "--k1", "10", "--k2", "5"],
                      needles=("--k2",), no_new="bad/k2"))
    sample_bad = {"--length": ["-1", "abc"], "--temperature": ["-1", "nan", "inf", "abc"],
                  "--top-k": ["-1"], "--seed": ["-1"], "--engine": ["bogus"]}
    for flag, values in sample_bad.items():
        for v in values:
            cases.append(Case(f"sample {flag} {v}", ["sample", "base", flag, v], needles=(flag,), guard=("base",)))
    eval_bad = {"--seq": ["0", "-1", "1e10"], "--batch": ["0", "-1"],
                "--max-text-mb": ["nan", "0"], "--engine": ["bogus"], "--encoding": ["bogus-enc"]}
    for flag, values in eval_bad.items():
        for v in values:
            cases.append(Case(f"evaluate {flag} {v}", ["evaluate", "base", "t.txt", flag, v], needles=(flag,),
                              guard=("base",)))
    for flag, v in [("--seq", "10000000000"), ("--batch", "100000000")]:  # memory follows the text, not the flag
        cases.append(Case(f"evaluate {flag} {v}", ["evaluate", "base", "t.txt", flag, v], "either", needles=(flag,),
                          guard=("base",), check=all_of(finite_bpc, peak_below(800))))
    for flag, v in [("--unroll", "0"), ("--unroll", "-1"), ("--hidden", "0"), ("--layers", "0"), ("--layers", "-2"),
                    ("--hidden", "1e9")]:
        cases.append(Case(f"draw {flag} {v}", ["draw", "elman", "-o", "bad/d.svg", flag, v], needles=(flag,),
                          no_new="bad/d.svg"))
    for flag, v in [("--seconds", "-1"), ("--seconds", "nan"), ("--seconds", "inf"), ("--seconds", "1e10"),
                    ("--hidden", "0"), ("--hidden", "-1"), ("--hidden", "1000000"), ("--seed", "-1")]:
        cases.append(Case(f"demo {flag} {v}", ["demo", flag, v], needles=(flag,), timeout=60))
    for flag, v in [("--steps", "0"), ("--steps", "-1"), ("--batch", "0"), ("--max-lag", "-1"), ("--delay", "0"),
                    ("--symbols", "1"), ("--marker-rate", "2"), ("--marker-rate", "nan"), ("--lr", "nan"),
                    ("--train-steps", "-1"), ("--seed", "-1"), ("--train-batch", "0")]:
        out = f"bad/g{flag}{v}.png"
        cases.append(Case(f"diagnose {flag} {v}", ["diagnose", "elman", "-o", out, flag, v], needles=(flag,),
                          no_new=out, timeout=90))
    for flag, v in [("--reps", "-1"), ("--reps", "0"), ("--seconds", "nan"), ("--seconds", "-1"), ("--threads", "0"),
                    ("--warmup", "-1"), ("--systems", "bogus"), ("--corpus", "missing.txt"), ("--scaling", "x")]:
        cases.append(Case(f"bench {flag} {v}", ["bench", "W1", flag, v], needles=(flag,), timeout=90))
    cases.append(Case("bench W9", ["bench", "W9"], needles=("W9",)))
    for flag, v in [("--steps", "0"), ("--batch", "-1"), ("--tolerance", "nan"), ("--tolerance", "-1"),
                    ("--seed", "-1")]:
        cases.append(Case(f"gradcheck {flag} {v}", ["gradcheck", "elman", flag, v], needles=(flag,)))
    cases.append(Case("gradcheck bogus", ["gradcheck", "bogus"], needles=("bogus",)))
    return cases


def text_cases() -> list[Case]:
    """Texts that are missing, empty, binary, huge, endless, a FIFO, a folder, standard input."""
    def fifo(ctx):
        if not ctx.path("fifo").exists():
            os.mkfifo(ctx.path("fifo"))

    def sparse(ctx):
        with open(ctx.path("huge.txt"), "wb") as f:
            f.truncate(3 << 30)
    cases = []
    for what, rel, needle, setup in [
        ("missing", "missing.txt", "missing.txt", None),
        ("empty", "empty.txt", "empty.txt", lambda c: write_text(c, "empty.txt", "")),
        ("binary", "bin.txt", "bin.txt", lambda c: write_text(c, "bin.txt", os.urandom(4000))),
        ("huge (sparse 3 GB)", "huge.txt", "huge.txt", sparse),
        ("/dev/zero", "/dev/zero", "/dev/zero", None),
        ("/dev/urandom", "/dev/urandom", "/dev/urandom", None),
        ("FIFO", "fifo", "fifo", fifo),
        ("empty folder", "emptydir", "emptydir", lambda c: c.path("emptydir").mkdir(exist_ok=True)),
        ("unreadable", "/proc/self/mem", "/proc/self/mem", None),
        ("too short", "short.txt", "short.txt", lambda c: write_text(c, "short.txt", "ab")),
        ("latin-1", "latin.txt", "--encoding", lambda c: write_text(c, "latin.txt", "caf\xe9 ".encode("latin-1") * 400)),
    ]:
        out = f"bad/text-{what.split()[0].strip('/')}"
        cases.append(Case(f"train text {what}", ["train", rel, "--out", out, *SMALL, "--steps", "3"],
                          needles=(needle,), setup=setup, no_new=out, timeout=60))
        if what not in ("too short",):
            cases.append(Case(f"evaluate text {what}", ["evaluate", "base", rel], needles=(needle,), setup=setup,
                              guard=("base",), timeout=60))
    cases.append(Case("train - (empty stdin)", ["train", "-", "--out", "bad/stdin", *SMALL], stdin=b"",
                      needles=("standard input",), no_new="bad/stdin"))
    text = _text(3000).encode()
    cases.append(Case("train - (stdin)", ["train", "-", "--out", "stdin_run", *SMALL, "--steps", "3"], "ok",
                      stdin=text, check=checkpoint_at("stdin_run/latest.npz", 3), timeout=180))
    cases.append(Case("evaluate - (stdin)", ["evaluate", "base", "-"], "ok", stdin=text, check=finite_bpc))

    def folder(ctx):
        for i in range(3):
            write_text(ctx, f"books/b{i}.txt", _text(1200, seed=i))
        write_text(ctx, "books/cover.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + os.urandom(300))
    cases.append(Case("train a folder", ["train", "books", "--out", "books_run", *SMALL, "--steps", "3"], "ok",
                      setup=folder, check=all_of(checkpoint_at("books_run/latest.npz", 3), stdout_has(r"3 (text )?files")),
                      timeout=180))
    cases.append(Case("evaluate unknown characters", ["evaluate", "base", "odd.txt"], "ok",
                      setup=lambda c: write_text(c, "odd.txt", _text(500) + "ÄÖÜ!?" * 20),
                      check=all_of(finite_bpc, stdout_has(r"out of vocabulary: [^n]"))))
    cases.append(Case("evaluate --seq 30000 on a tiny text", ["evaluate", "base", "tiny.txt", "--seq", "30000"],
                      "either", needles=("--seq",), setup=lambda c: write_text(c, "tiny.txt", _text(40)),
                      check=all_of(finite_bpc, peak_below(800))))
    return cases


def hostile_cases() -> list[Case]:
    """Checkpoints from anyone: each refused in one line naming the file, quickly, in little memory."""
    cases = []
    for name in HOSTILE:
        target = f"h/{name}"
        unused = name in ("trainer_list", "step_neg")  # fields of the run, which evaluate does not read
        cases.append(Case(f"evaluate hostile {name}", ["evaluate", target, "t.txt"], "either" if unused else "error",
                          needles=(name,), check=all_of(finite_bpc, peak_below(1000)),
                          guard=("h",) if name != "devzero.npz" else (), timeout=60))
        if "." not in name:  # run folders: resume must refuse them too
            needle = () if name == "passwd" else (name,)
            cases.append(Case(f"resume hostile {name}", ["train", "--resume", target, "--steps", "8"],
                              needles=needle, guard=(target,), timeout=90))
    for name in ("truncated.npz", "checksum.npz", "deflate_bomb.npz", "wrong_cell"):
        cases.append(Case(f"sample hostile {name}", ["sample", f"h/{name}", "--length", "10"], needles=(name,),
                          timeout=60))
    cases.append(Case("draw hostile wrong_cell", ["draw", "h/wrong_cell", "-o", "bad/w.svg"], needles=("wrong_cell",),
                      no_new="bad/w.svg", timeout=60))
    cases.append(Case("export hostile checksum", ["export", "h/checksum.npz", "-o", "bad/x.onnx"],
                      needles=("checksum.npz",), no_new="bad/x.onnx", timeout=60))
    cases.append(Case("resume naming /etc/passwd", [], runner=_passwd_runner))
    return cases


def _passwd_runner(ctx) -> tuple[str, str]:
    """Resuming a checkpoint that names a system file as its text: refused, and nothing of that file shown."""
    o = ctx.run(["train", "--resume", "h/passwd_rel", "--steps", "8"], timeout=90)
    cat, why = judge_error(o)
    for leak in ("root:", ":x:", "/bin/"):
        if leak in o.stdout + o.stderr:
            return SILENT, f"quotes the system file ({leak!r}): {why}"
    if cat == CLEAN and "passwd" in why and "../" not in why and "/etc/passwd" in why:
        return cat, why
    return cat, why


def everyday_cases() -> list[Case]:
    """The README's commands, as a new user would type them (tiny sizes)."""
    cases = [
        Case("--version", ["--version"], "ok", check=stdout_has(r"unrolled \d")),
        Case("no command", [], "ok", rc=2, check=stdout_has("usage:")),  # the help, and exit 2
        Case("bogus command", ["bogus"], needles=("bogus",)),
        Case("sample", ["sample", "base", "--length", "50", "--temperature", "0.8", "--prime", "the"], "ok",
             check=sample_text("the", 50)),
        Case("sample a checkpoint file", ["sample", "base/best.npz", "--length", "20"], "ok", check=sample_text("", 20)),
        Case("sample --prime with unknown characters", ["sample", "base", "--prime", "ÄÖ", "--length", "5"], "either",
             needles=("--prime",), check=sample_text("ÄÖ", 5)),
        Case("sample --length 0", ["sample", "base", "--length", "0", "--prime", "ab"], "either", needles=("--length",)),
        Case("sample --top-k 1000", ["sample", "base", "--top-k", "1000", "--length", "10"], "either", needles=("--top-k",),
             check=sample_text("", 10)),
        Case("evaluate", ["evaluate", "base", "t.txt"], "ok", check=finite_bpc),
        Case("evaluate missing checkpoint", ["evaluate", "nowhere", "t.txt"], needles=("nowhere",)),
        Case("evaluate a folder without checkpoint", ["evaluate", "emptydir2", "t.txt"], needles=("emptydir2",),
             setup=lambda c: c.path("emptydir2").mkdir(exist_ok=True)),
        Case("evaluate --onnx missing", ["evaluate", "--onnx", "none.onnx", "t.txt"], needles=("none.onnx",)),
        Case("draw lstm unrolled", ["draw", "lstm", "--layers", "2", "--unroll", "5", "-o", "out/lstm.png"], "ok",
             setup=lambda c: c.path("out").mkdir(exist_ok=True), check=file_made("out/lstm.png", 1000), timeout=180),
        Case("draw a checkpoint", ["draw", "base", "-o", "out/base.svg"], "ok", check=file_made("out/base.svg", 200)),
        Case("draw .bogus", ["draw", "elman", "-o", "out/x.bogus"], needles=(".bogus",), no_new="out/x.bogus"),
        Case("draw into a missing folder", ["draw", "elman", "-o", "nofolder/x.svg"], needles=("nofolder",)),
        Case("draw unknown cell", ["draw", "bogus", "-o", "out/b.svg"], needles=("bogus",), no_new="out/b.svg"),
        Case("draw module:function missing", ["draw", "nomod:fn", "-o", "out/m.svg"], needles=("nomod",)),
        Case("draw --unroll 100000", ["draw", "elman", "--unroll", "100000", "-o", "out/big.svg"], "either",
             needles=("--unroll",), check=file_made("out/big.svg"), timeout=120),
        Case("gradcheck lstm", ["gradcheck", "lstm"], "ok", timeout=180),
        Case("demo --seconds 1", ["demo", "--seconds", "1", "--hidden", "16"], "ok", check=stdout_has("h_prev"),
             timeout=180),
        Case("diagnose elman", ["diagnose", "elman", "--steps", "12", "--batch", "2", "--max-lag", "6", "--delay", "3",
                                "-o", "out/g.png"], "ok", check=file_made("out/g.png", 1000), timeout=240),
        Case("diagnose a checkpoint", ["diagnose", "base", "--text", "t.txt", "--steps", "12", "--batch", "2",
                                       "--max-lag", "6", "-o", "out/gc.png"], "ok", check=file_made("out/gc.png", 1000),
             timeout=240),
        Case("diagnose --text missing", ["diagnose", "base", "--text", "gone.txt", "-o", "out/gm.png"],
             needles=("gone.txt",), no_new="out/gm.png"),
        Case("export safetensors", ["export", "base", "-o", "out/w.safetensors"], "ok",
             check=file_made("out/w.safetensors", 1000), timeout=120),
        Case("export onnx", ["export", "base", "-o", "out/m.onnx"], "ok", check=file_made("out/m.onnx", 1000), timeout=180),
        Case("export .bogus", ["export", "base", "-o", "out/x.bogus"], needles=(".bogus",), no_new="out/x.bogus"),
        Case("export missing source", ["export", "nothing", "-o", "out/y.onnx"], needles=("nothing",)),
        Case("export safetensors back without vocabulary", ["export", "out/w.safetensors", "-o", "out/back.npz"],
             "either", needles=("--vocabulary",), no_new="out/back.npz", check=file_made("out/back.npz", 1000)),
        Case("export --vocabulary missing", ["export", "out/w.safetensors", "-o", "out/back2.npz", "--vocabulary",
                                             "novocab.json"], needles=("novocab.json",), no_new="out/back2.npz"),
        Case("train --out is a file", ["train", "t.txt", "--out", "t.txt", *SMALL, "--steps", "2"], needles=("t.txt",),
             guard=("t.txt",)),
        Case("train --out on an existing run", ["train", "t.txt", "--out", "base", *SMALL, "--steps", "2"],
             needles=("base",), guard=("base",)),
        Case("train --out unwritable", ["train", "t.txt", "--out", "/proc/run", *SMALL, "--steps", "2"],
             needles=("/proc/run",)),
        Case("train --steps 0 --help says", ["train", "--help"], "ok", check=stdout_has(r"0 = no step limit")),
        Case("train diverging (sgd lr 1000 clip 0)", ["train", "t.txt", "--out", "div", *SMALL, "--optimizer", "sgd",
                                                     "--lr", "1000", "--clip", "0", "--steps", "60", "--eval-every", "5"],
             "either", needles=("diverg",), check=_no_diverged_best, timeout=180),
        Case("README's Python example", [], runner=_readme_example),
        Case("library: parameters as lists", [], runner=lambda c: _library(c, "lists")),
        Case("library: params=None", [], runner=lambda c: _library(c, "none")),
        Case("library: an unknown parameter", [], runner=lambda c: _library(c, "unknown")),
        Case("piped: sample | head -c 10", [], runner=_piped_sample),
        Case("piped: sample --length 1e10 streams", [], runner=lambda c: _piped_sample(c, 10 ** 10)),
        Case("sample --temperature 0 (greedy)", ["sample", "base", "--temperature", "0", "--length", "30"], "ok",
             check=sample_text("", 30)),
        Case("piped: train prints progress", ["train", "t.txt", "--out", "piped", *SMALL, "--steps", "5"], "ok",
             check=all_of(stdout_has(r"step 5"), checkpoint_at("piped/latest.npz", 5)), timeout=180),
    ]
    for sub in ("train", "sample", "evaluate", "draw", "export", "demo", "diagnose", "bench", "gradcheck"):
        cases.append(Case(f"{sub} --help", [sub, "--help"], "ok", check=stdout_has("usage:")))
    return cases


def _no_diverged_best(ctx, o):
    best = ctx.path("div/best.npz")
    if best.exists():
        from unrolled.charlm.model import load_model

        bpc = load_model(best).meta.get("best", {}).get("val_bpc")
        if bpc is not None and bpc > 10:
            return SILENT, f"best.npz holds a diverged model ({bpc:.0f} bits/char)"
    if "diverg" not in (o.stdout + o.stderr).lower() and o.rc == 0:
        stepped = re.findall(r"step (\d+)", o.stdout)
        return (None if stepped and int(stepped[-1]) == 60 else (SILENT, "stopped early without saying why"))
    return None


def _python(ctx, code: str, timeout=120) -> Outcome:
    with tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ctx.root, env=ctx.env, stdout=fout, stderr=ferr,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        return ctx._wait(proc, fout, ferr, start, timeout)


def _readme_example(ctx):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    o = _python(ctx, blocks[0])
    return judge_ok(o) or (CORRECT, "ran")


LIBRARY = """
import sys, numpy as np
from unrolled import Graph, make_engine
g = Graph("elman")
x = g.one_hot(g.index_input("char", 5), name="x")
h = g.state("h", 4)
a = g.matmul(g.param("W", (4, 9)), g.concat(x, h.prev, name="xh"), name="a")
g.tanh(a, name="h")
y = g.output(g.matmul(g.param("V", (5, 4)), h, name="y"))
g.loss("cross_entropy", y, g.index_input("next", 5))
p = g.init_params(0)
chars = np.random.default_rng(0).integers(0, 5, (6, 2))
want = make_engine(g).run(p, {"char": chars[:-1], "next": chars[1:]}).loss
p = {KIND}
try:
    got = make_engine(g).run(p, {"char": chars[:-1], "next": chars[1:]}).loss
    print(got == want, got, want)
except (ValueError, TypeError, KeyError) as e:
    print(f"unrolled: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
"""


def _library(ctx, kind):
    edit = {"lists": "{k: v.tolist() for k, v in p.items()}", "none": "None", "unknown": "{**p, 'bogus': p['W']}"}
    needles = {"lists": ("W",), "none": ("params",), "unknown": ("bogus",)}
    o = _python(ctx, LIBRARY.replace("{KIND}", edit[kind]))
    if kind == "lists" and o.rc == 0:  # accepted as arrays would be: the same loss, or a wrong answer
        return judge_ok(o) or ((CORRECT, "lists run as arrays") if o.stdout.startswith("True") else
                               (SILENT, "lists give another loss: " + o.stdout))
    cat, why = judge_error(o, needles[kind])
    if cat == CLEAN and len(why) > 400:
        return OTHER, f"a {len(why)}-character message: {why[:200]}"
    return cat, why


def _piped_sample(ctx, length=20000):
    """The reader stops early (`| head`): exit 0 at once, nothing on stderr; a huge --length streams."""
    cmd = f"set -o pipefail; {sys.executable} -m unrolled sample base --length {length} | head -c 1000 >/dev/null"
    try:
        done = subprocess.run(["bash", "-c", cmd], cwd=ctx.root, env=ctx.env, capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return OTHER, "hang: the sample did not stop when its reader did"
    o = Outcome(done.returncode, done.stdout, done.stderr, 0)
    return judge_ok(o) or (CORRECT, "quiet when the reader stops")


# -- runs: resume, signals, concurrency, a home without a cache --------------------------------------------


def run_cases() -> list[Case]:
    return [
        Case("resume latest, more steps", ["train", "--resume", "r1", "--steps", "9"], "ok",
             setup=lambda c: c.copy_run("base", "r1"), check=checkpoint_at("r1/latest.npz", 9), timeout=180),
        Case("resume a checkpoint file", ["train", "--resume", "r2/latest.npz", "--steps", "8"], "ok",
             setup=lambda c: c.copy_run("base", "r2"), check=checkpoint_at("r2/latest.npz", 8), timeout=180),
        Case("resume best.npz older than latest.npz", [], runner=_resume_best),
        Case("resume cosine, extended", [], runner=_cosine_extended),
        Case("resume after the text moved", [], runner=_moved_text),
        Case("resume on a new text, same folder", ["train", "other.txt", "--resume", "r3", "--steps", "8"],
             setup=lambda c: (c.copy_run("base", "r3"), write_text(c, "other.txt", _text(3000, seed=5))),
             needles=("--out",), guard=("r3",)),
        Case("resume on a new text with unknown chars", ["train", "odd2.txt", "--resume", "base", "--out", "r4",
                                                         "--steps", "8"],
             setup=lambda c: write_text(c, "odd2.txt", _text(3000, seed=6) + "Q!" * 30), needles=("--skip-unknown",),
             guard=("base",), no_new="r4"),
        Case("resume on a new text --skip-unknown", ["train", "odd2.txt", "--resume", "base", "--out", "r5",
                                                     "--steps", "8", "--skip-unknown"], "ok",
             check=checkpoint_at("r5/latest.npz", 8), timeout=180),
        Case("resume changing --hidden", ["train", "--resume", "r6", "--hidden", "32", "--steps", "8"],
             setup=lambda c: c.copy_run("base", "r6"), needles=("--hidden",), guard=("r6",)),
        Case("resume a missing folder", ["train", "--resume", "gone", "--steps", "8"], needles=("gone",)),
        Case("resume an empty folder", ["train", "--resume", "emptyrun", "--steps", "8"], needles=("emptyrun",),
             setup=lambda c: c.path("emptyrun").mkdir(exist_ok=True)),
        Case("resume --steps below the step reached", ["train", "--resume", "r7", "--steps", "3"], "either",
             setup=lambda c: c.copy_run("base", "r7"), needles=("--steps",), check=checkpoint_at("r7/latest.npz", 6)),
        Case("resume cleans a killed save's .tmp", [], runner=_stale_tmp),
        Case("SIGTERM during train", [], runner=lambda c: _signal_train(c, [signal.SIGTERM], 143)),
        Case("Ctrl-C during train", [], runner=lambda c: _signal_train(c, [signal.SIGINT], 130)),
        Case("Ctrl-C twice during train", [], runner=lambda c: _signal_train(c, [signal.SIGINT, signal.SIGINT], 130)),
        Case("two trains in one folder", [], runner=_concurrent),
        Case("a train while another resumes it", [], runner=_concurrent_resume),
        Case("read-only home: --help", ["--help"], "ok", env=_no_home(), check=stdout_has("usage:")),
        Case("read-only home: train", ["train", "t.txt", "--out", "ro_run", *SMALL, "--steps", "2"], "ok",
             env=_no_home(), check=checkpoint_at("ro_run/latest.npz", 2), timeout=400),
    ]


def _no_home() -> dict:
    return {"HOME": "/proc", "XDG_CACHE_HOME": "", "XDG_CONFIG_HOME": "", "NUMBA_CACHE_DIR": "", "MPLCONFIGDIR": ""}


def _resume_best(ctx):
    """best.npz (step 3) is older than latest.npz (step 6): resuming it must not overwrite the newer latest."""
    r = ctx.copy_run("base", "rb")
    shutil.copy(ctx.path("early.npz"), r / "best.npz")
    before = hashlib.sha256((r / "latest.npz").read_bytes()).hexdigest()
    o = ctx.run(["train", "--resume", "rb/best.npz", "--steps", "8"], timeout=180)
    kept = [p for p in r.rglob("*.npz") if hashlib.sha256(p.read_bytes()).hexdigest() == before]
    if o.rc != 0:
        cat, why = judge_error(o, ("latest",))
        return (cat, why) if kept else (LOST, f"refused but latest.npz changed: {why}")
    bad = judge_ok(o)
    if bad:
        return bad
    if not kept:
        return LOST, "the newer latest.npz (step 6) was overwritten by a run from best.npz (step 3)"
    return CORRECT, "continued from best without losing latest: " + o.stdout.strip().splitlines()[-1][:150]


def _cosine_extended(ctx):
    ctx.train_run("cos", "--lr-schedule", "cosine")
    o = ctx.run(["train", "--resume", "cos", "--steps", "12"], timeout=180)
    if o.rc != 0:
        return judge_error(o, ("--steps",))
    bad = judge_ok(o) or checkpoint_at("cos/latest.npz", 12)(ctx, o)
    if bad:
        return bad
    import csv

    rows = list(csv.DictReader(ctx.path("cos/metrics.csv").open()))
    later = [float(r["lr"]) for r in rows if int(r["step"]) > 6]
    if len(later) != 6 or max(later) <= 0:
        return SILENT, f"the extended steps train at rates {later}"
    return CORRECT, f"rates after step 6: {later[0]:.2g} .. {later[-1]:.2g}"


def _moved_text(ctx):
    write_text(ctx, "mv/a.txt", _text(3000, seed=3))
    ctx.train_run("mv/run", text="mv/a.txt")
    os.rename(ctx.path("mv/a.txt"), ctx.path("mv/b.txt"))
    o = ctx.run(["train", "--resume", "mv/run", "--steps", "8"], timeout=120)
    cat, why = judge_error(o, ("a.txt",))
    if cat != CLEAN:
        return cat, "text gone: " + why
    if "again" not in why and "NEWPATH" not in why and "name" not in why:
        return OTHER, "does not say that naming the file again works: " + why
    o = ctx.run(["train", "mv/b.txt", "--resume", "mv/run", "--steps", "8"], timeout=180)
    return judge_ok(o) or checkpoint_at("mv/run/latest.npz", 8)(ctx, o) or (CORRECT, "named again, resumed")


def _stale_tmp(ctx):
    r = ctx.copy_run("base", "rt")
    stale = r / ".latest.npz.ab12cd34.tmp"  # atomic_writer's name: mkstemp's 8 characters
    stale.write_bytes(os.urandom(1 << 20))
    o = ctx.run(["train", "--resume", "rt", "--steps", "8"], timeout=180)
    bad = judge_ok(o) or checkpoint_at("rt/latest.npz", 8)(ctx, o)
    if bad:
        return bad
    left = [p.name for p in r.iterdir() if p.name.endswith(".tmp")]
    return (OTHER, f"left {left}") if left else (CORRECT, "stale temporary file removed")


def _wait_for(path: Path, pattern: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return True
        time.sleep(0.2)
    return False


def _signal_train(ctx, signals, code):
    """Start a long train, signal it once it is training, judge the exit and the checkpoint it says it saved."""
    out = f"sig{len(list(ctx.root.glob('sig*')))}"
    log = ctx.path(out + ".log")
    with open(log, "wb") as fout, tempfile.TemporaryFile() as ferr:
        start = time.monotonic()
        proc = ctx.popen(["train", "t.txt", "--out", out, *SMALL, "--steps", "100000", "--eval-every", "20"],
                         stdout=fout, stderr=ferr)
        if not _wait_for(log, r"step 2\d", 120):
            os.killpg(proc.pid, signal.SIGKILL)
        for k, s in enumerate(signals):
            time.sleep(0.3 if k else 0.1)
            proc.send_signal(s)
        o = ctx._wait(proc, open(log, "rb"), ferr, start, 120)
    if o.timed_out or crashed(o):
        return (OTHER, "hang") if o.timed_out else (TRACEBACK, crashed(o))
    if o.rc != code:
        return SILENT, f"exit {o.rc}, not {code}: {o.stderr.strip()[-200:]}"
    said = re.search(r"at step (\d+); saved", o.stdout)
    latest = ctx.path(out) / "latest.npz"
    if len(signals) == 1:
        if not said:
            return LOST, "no save reported: " + o.stdout.strip()[-200:]
        return checkpoint_at(f"{out}/latest.npz", int(said.group(1)))(ctx, o) or (CORRECT, f"saved at {said.group(1)}")
    if latest.exists():
        try:
            load_step(latest)
        except ValueError as e:
            return LOST, f"latest.npz does not load after a double Ctrl-C: {e}"
    return CORRECT, "quit at once, what was saved loads"


def _concurrent(ctx):
    """Two trains started at once with one --out: one refused in a line, the other's checkpoint intact."""
    procs, files = [], []
    start = time.monotonic()
    for seed in ("1", "2"):
        fout, ferr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        files.append((fout, ferr))
        procs.append(ctx.popen(["train", "t.txt", "--out", "both", *SMALL, "--steps", "30", "--eval-every", "10",
                                "--seed", seed], stdout=fout, stderr=ferr))
    outs = [ctx._wait(p, fo, fe, start, 240) for p, (fo, fe) in zip(procs, files)]
    for o in outs:
        if o.timed_out or crashed(o):
            return (OTHER, "hang") if o.timed_out else (TRACEBACK, crashed(o))
    ok = [o for o in outs if o.rc == 0]
    if len(ok) == 2:
        return LOST, "both runs reported success in one folder: the first is lost"
    if not ok:
        return OTHER, "both refused: " + " | ".join(error_lines(outs[0].stderr) + error_lines(outs[1].stderr))
    refused = [o for o in outs if o.rc != 0][0]
    cat, why = judge_error(refused, ("both",))
    if cat != CLEAN:
        return cat, why
    return checkpoint_at("both/latest.npz", 30)(ctx, ok[0]) or (CORRECT, why)


def _concurrent_resume(ctx):
    """A resume of a folder while a train writes there: refused, and the running train's result intact."""
    ctx.copy_run("base", "cr")
    log = ctx.path("cr.log")
    with open(log, "wb") as fout, tempfile.TemporaryFile() as ferr:
        start = time.monotonic()
        first = ctx.popen(["train", "--resume", "cr", "--steps", "60"], stdout=fout, stderr=ferr)
        _wait_for(log, r"step \d", 120)
        second = ctx.run(["train", "--resume", "cr", "--steps", "70"], timeout=120)
        o = ctx._wait(first, open(log, "rb"), ferr, start, 240)
    if crashed(o) or o.rc != 0:
        return TRACEBACK if crashed(o) else OTHER, f"the first run: rc {o.rc} {o.stderr[-300:]}"
    if second.rc == 0:
        return LOST, "both runs reported success in one folder"
    cat, why = judge_error(second, ("cr",))
    if cat != CLEAN:
        return cat, why
    return checkpoint_at("cr/latest.npz", 60)(ctx, o) or (CORRECT, why)


# -- driver ------------------------------------------------------------------------------------------------


def _text(n: int, seed: int = 0) -> str:
    import random

    r = random.Random(seed)
    words = []
    while sum(len(w) + 1 for w in words) < n:
        words.append(r.choice(WORDS))
    return (" ".join(words) + "\n")[:n]


def prepare(ctx: Context) -> None:
    """The shared text and the base run: best and latest at step 6, early.npz a copy of step 3."""
    write_text(ctx, "t.txt", _text(3000))
    ctx.train_run("base", steps=3)
    shutil.copy(ctx.path("base/latest.npz"), ctx.path("early.npz"))
    o = ctx.run(["train", "--resume", "base", "--steps", "6"], timeout=300)
    if o.rc != 0 or load_step(ctx.path("base/latest.npz")) != 6:
        raise SystemExit(f"cannot extend the base run: {o.stderr[-2000:]}")
    make_hostile(ctx)
    ctx.path("bad").mkdir()


def all_cases() -> list[Case]:
    return bad_flag_cases() + text_cases() + hostile_cases() + everyday_cases() + run_cases()


def run_battery(cases, ctx: Context, verbose=False, report=print) -> dict:
    tally = {c: 0 for c in CATEGORIES}
    problems = []
    for i, case in enumerate(cases):
        try:
            cat, why, o = judge(ctx, case)
        except Exception as e:  # the battery's own fault: show it, go on
            cat, why, o = OTHER, f"battery error: {type(e).__name__}: {e}", None
        tally[cat] += 1
        if cat not in (CLEAN, CORRECT):
            problems.append((case.name, cat, why))
        if verbose or cat not in (CLEAN, CORRECT):
            secs = f"{o.seconds:5.1f}s {o.peak_mb:5.0f}MB" if o else " " * 13
            report(f"{i:3d} {secs} {cat:20s} {case.name}: {why[:300]}")
    return {"cases": len(cases), **tally, "problems": problems}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only the cases whose name contains this")
    ap.add_argument("-v", action="store_true", help="print every case, not only the problems")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(SRC))
    cases = [c for c in all_cases() if args.k in c.name]
    root = Path(tempfile.mkdtemp(prefix="cli_battery_"))
    try:
        ctx = Context(root)
        prepare(ctx)
        t0 = time.monotonic()
        result = run_battery(cases, ctx, args.v)
        print(f"\n{result['cases']} cases in {time.monotonic() - t0:.0f} s:",
              ", ".join(f"{result[c]} {c}" for c in CATEGORIES))
        for name, cat, why in result["problems"]:
            print(f"  {cat}: {name}: {why[:300]}")
    finally:
        if args.keep:
            print("kept", root)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if not any(result[c] for c in (TRACEBACK, SILENT, LOST)) else 1


if __name__ == "__main__":
    sys.exit(main())
