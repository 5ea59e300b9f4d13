"""The benchmark harness's bookkeeping, checked without timing anything.

The harness reports, per workload, the fastest configuration of a peer that
learned; the JAX peer must not wait for an update before dispatching the
next (issue 19); W6's cold start must find every compile cache empty, and
every start of every row follows the same settling start; the scaling
table's speedup is the fastest thread count over one thread.
"""

from __future__ import annotations

import ast
import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks.worker import XLA_ONE_THREAD, limit_threads  # noqa: E402


def test_pick_fastest_takes_the_fastest_variant_that_learned():
    runs = {"eager": {"chars_per_s": 100.0, "loss_ok": True},
            "compile": {"chars_per_s": 150.0, "loss_ok": True}}
    assert harness.pick_fastest(runs) == ("compile", runs["compile"])


def test_pick_fastest_passes_over_a_faster_variant_that_did_not_learn():
    runs = {"eager": {"chars_per_s": 100.0, "loss_ok": True},
            "compile": {"chars_per_s": 150.0, "loss_ok": False}}
    assert harness.pick_fastest(runs)[0] == "eager"


def test_pick_fastest_skips_a_failed_variant_and_reports_none_when_all_failed():
    runs = {"eager": {"chars_per_s": 100.0}, "compile": {"error": "TypeError: boom"}}
    assert harness.pick_fastest(runs)[0] == "eager"
    assert harness.pick_fastest({"compile": {"error": "x"}}) is None


def test_sampling_rows_have_no_loss_and_still_compete():
    runs = {"eager": {"chars_per_s": 5e3}, "compile": {"chars_per_s": 7e3}}
    assert harness.pick_fastest(runs)[0] == "compile"


def test_best_reports_the_chosen_variant_and_what_the_others_reached(monkeypatch):
    from benchmarks import workloads

    speeds = {"eager": 100.0, "compile": 80.0}

    def fake_one(self, w, system, threads, variant="", extra_env=None):
        return {"chars_per_s": speeds[variant], "loss_ok": True, "final_loss": 2.0}

    monkeypatch.setattr(harness._Runner, "one", fake_one)
    runner = harness._Runner(harness.parse_args([]), lambda msg: None, 3.9, None)
    row = runner.best(workloads.get("W2"), "torch", 2)
    assert row["variant"] == "eager" and row["chars_per_s"] == 100.0
    assert row["variants"]["compile"]["chars_per_s"] == 80.0
    # W5 (memory) runs the peer as it is: one run, no variants
    calls = []
    monkeypatch.setattr(harness._Runner, "one", lambda self, w, s, t, v="", e=None: calls.append(v) or {"peak_mib": 1})
    runner.best(workloads.get("W5"), "torch", 2)
    assert calls == [""]


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def test_jax_training_step_never_waits_for_the_update():
    """Only `sync` (called once per timed repetition) may block; the per-step function must not."""
    tree = ast.parse((ROOT / "benchmarks" / "peer_jax.py").read_text())
    step = _function(_function(tree, "_train"), "step")
    calls = {n.func.attr for n in ast.walk(step) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert not calls & {"block_until_ready", "item", "tolist"}
    assert "block_until_ready" in ast.dump(_function(_function(tree, "_train"), "sync"))


def test_jax_update_donates_parameters_optimizer_state_and_carried_state():
    tree = ast.parse((ROOT / "benchmarks" / "peer_jax.py").read_text())
    src = ast.unparse(_function(tree, "_compiled_update"))
    assert "donate_argnums=(0, 1, 2)" in src


def test_cold_start_points_every_cache_into_the_given_empty_folder(tmp_path):
    env = harness.cache_env(tmp_path)
    for var in ("UNROLLED_CACHE", "NUMBA_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR"):
        assert Path(env[var]).parent == tmp_path
    assert len({env[v] for v in ("UNROLLED_CACHE", "NUMBA_CACHE_DIR")}) == 2


def test_starts_find_unrolleds_modules_compiled_as_an_installed_package_has_them():
    """W6 compares with peers installed from wheels, whose `.pyc` pip wrote; a checkout where
    PYTHONDONTWRITEBYTECODE is set would otherwise compile its modules in every fresh process."""
    import importlib.util

    import unrolled

    folders = harness.compile_sources()
    assert Path(unrolled.__file__).parent in folders and Path(harness.__file__).parent in folders
    for source in (Path(unrolled.__file__), Path(unrolled.__file__).parent / "engines/compiled/engine.py",
                   Path(harness.__file__)):
        assert Path(importlib.util.cache_from_source(str(source))).is_file(), source


def test_start_rows_include_the_plain_numpy_engine_and_both_torch_variants():
    rows = {label: (system, variant, env) for label, system, variant, env in
            harness.start_rows(["unrolled", "torch", "jax", "numpy"])}
    assert rows["unrolled-numpy"] == ("unrolled", "", {"UNROLLED_JIT": "0"})
    assert rows["torch-compile"][:2] == ("torch", "compile")
    assert set(rows) == {"unrolled", "unrolled-numpy", "torch", "torch-compile", "jax"}


def test_start_rows_take_turns_round_by_round_and_report_their_medians():
    order = []

    class Runner(harness._Runner):
        def __init__(self):
            self.seconds = {"unrolled": iter([0.6, 0.5, 0.9]), "unrolled-numpy": iter([0.5, 0.7, 0.8])}

        def start(self, w, system, variant, extra_env):
            label = "unrolled-numpy" if extra_env else system
            order.append(label)
            s = next(self.seconds[label])
            return {"cold_s": s, "warm_s": s / 2, "cold": {}, "warm": {}, "engine": label}

    rows = harness.start_rows(["unrolled"])
    row = Runner().starts(None, rows, rounds=3, own_rounds=3)
    assert order == ["unrolled", "unrolled-numpy", "unrolled-numpy", "unrolled", "unrolled", "unrolled-numpy"]
    assert row["unrolled"]["cold_s"] == 0.6 and row["unrolled-numpy"]["warm_s"] == 0.35
    assert [r["cold_s"] for r in row["unrolled"]["rounds"]] == [0.6, 0.5, 0.9]
    harness._add_start_ratios(row)
    # the median of the rounds' ratios (1.2, 0.714, 1.125), not the ratio of the medians (0.6 / 0.7)
    assert row["unrolled"]["ratio_cold_s"]["unrolled-numpy"] == pytest.approx(1.125)


def test_unrolleds_two_start_rows_take_more_rounds_and_ratios_pair_the_rounds_both_ran():
    order = []

    class Runner(harness._Runner):
        def __init__(self):
            self.seconds = {"unrolled": iter([1.0, 2.0, 3.0, 4.0, 5.0]), "unrolled-numpy": iter([1.0] * 5),
                            "torch": iter([2.0, 4.0])}

        def start(self, w, system, variant, extra_env):
            label = "unrolled-numpy" if extra_env else system
            order.append(label)
            s = next(self.seconds[label])
            return {"cold_s": s, "warm_s": s, "cold": {}, "warm": {}}

    rows = [row for row in harness.start_rows(["unrolled", "torch"]) if row[0] != "torch-compile"]
    row = Runner().starts(None, rows, rounds=2, own_rounds=5)
    assert order == ["unrolled", "unrolled-numpy", "torch", "torch", "unrolled-numpy", "unrolled",
                     "unrolled", "unrolled-numpy", "unrolled-numpy", "unrolled", "unrolled", "unrolled-numpy"]
    assert len(row["unrolled-numpy"]["rounds"]) == 5 and len(row["torch"]["rounds"]) == 2
    assert row["unrolled"]["cold_s"] == 3.0 and row["torch"]["cold_s"] == 3.0
    harness._add_start_ratios(row)
    assert row["unrolled"]["ratio_cold_s"]["unrolled-numpy"] == 3.0  # median of 1, 2, 3, 4, 5
    assert row["unrolled"]["ratio_cold_s"]["torch"] == 0.5  # rounds 1 and 2 only: 1 / 2, 2 / 4
    assert "the median of 2 or 5 rounds" in harness._render_start(harness.workloads.get("W6"), row)[0]


def test_every_timed_start_follows_the_same_settling_start(monkeypatch):
    """W6: a start right after a long compile runs slower, so every cold and warm start of every row
    comes right after one untimed start of the plain NumPy engine, in a cache folder of its own."""
    calls = []

    def fake_child(args, env, timeout):
        calls.append((args, env))
        return {"wall_s": 0.3}

    monkeypatch.setattr(harness, "run_child", fake_child)
    a = SimpleNamespace(threads=2, seconds=1, reps=1, warmup=0, corpus=None, timeout=60)
    runner = harness._Runner(a, lambda line: None, 3.9, None)
    for system in ("torch", "unrolled"):
        calls.clear()
        row = runner.start(harness.workloads.get("W6"), system, "", {})
        assert row["cold_s"] == row["warm_s"] == 0.3
        settles, timed = calls[0::2], calls[1::2]
        assert [args[2] for args, _ in timed] == [system, system]
        for args, env in settles:
            assert args[1:3] == ["W6", "unrolled"] and env["UNROLLED_JIT"] == "0"
        folders = [Path(env["UNROLLED_CACHE"]).parent for _, env in calls]
        assert folders[1] == folders[3] and len({folders[0], folders[1], folders[2]}) == 3  # warm reuses cold's


def test_the_plain_numpy_engines_warm_start_follows_the_engines_compile_too(monkeypatch):
    """W6: the engine's warm start follows its cold start's compile; the plain NumPy engine's, which
    its ratio is taken to, follows an untimed cold start of the engine (whose child compiles) in a
    throwaway folder, then the settle: both rows' warm starts have the same history."""
    calls = []

    def fake_child(args, env, timeout):
        calls.append((args, env))
        return {"wall_s": 0.3}

    monkeypatch.setattr(harness, "run_child", fake_child)
    monkeypatch.delenv("UNROLLED_JIT", raising=False)  # the workers inherit the caller's environment
    a = SimpleNamespace(threads=2, seconds=1, reps=1, warmup=0, corpus=None, timeout=60)
    runner = harness._Runner(a, lambda line: None, 3.9, None)
    row = runner.start(harness.workloads.get("W6"), "unrolled", "", harness.PLAIN_NUMPY_ENV)
    assert row["cold_s"] == row["warm_s"] == 0.3
    settle, cold, aside, settle2, warm = calls
    for args, env in (settle, cold, settle2, warm):
        assert env["UNROLLED_JIT"] == "0"
    assert aside[0][1:3] == ["W6", "unrolled"] and aside[1].get("UNROLLED_JIT", "1") == "1"  # the engine
    folder = {name: Path(env["UNROLLED_CACHE"]).parent for name, (_, env) in zip("sca2w", calls)}
    assert folder["c"] == folder["w"] and len({folder["s"], folder["c"], folder["a"], folder["2"]}) == 4
    calls.clear()
    runner.start(harness.workloads.get("W6"), "unrolled", "", {})
    assert len(calls) == 4  # the engine's own cold start compiles: nothing aside


def test_start_history_times_a_warm_start_after_each_history_in_turns():
    from benchmarks import starthistory

    log, seconds = [], iter([0.33, 0.30, 0.28, 0.32])

    @contextlib.contextmanager
    def new_round():
        log.append("cache")
        yield (lambda: log.append("timed") or next(seconds)), {
            "after_compile": lambda: log.append("compile"), "after_short": lambda: log.append("short")}

    rows = starthistory.rounds(2, new_round, settle=lambda: log.append("settle"))
    assert log == ["cache", "compile", "settle", "timed", "short", "settle", "timed",
                   "cache", "short", "settle", "timed", "compile", "settle", "timed"]
    assert rows == [{"after_compile": 0.33, "after_short": 0.30}, {"after_short": 0.28, "after_compile": 0.32}]
    out = starthistory.summary(rows)
    assert out["ratio"] == pytest.approx((0.33 / 0.30 + 0.32 / 0.28) / 2) and out["after_short_s"] == pytest.approx(0.29)


def test_a_start_row_keeps_each_rounds_step_marks():
    runs = [{"cold_s": 0.5, "warm_s": 0.4, "cold": {"marks_s": {"run": 0.45}}, "warm": {"marks_s": {"run": 0.35}}},
            {"cold_s": 0.6, "warm_s": 0.3, "cold": {}, "warm": {}}]
    row = harness.start_summary(runs)
    assert row["rounds"][0] == {"cold_s": 0.5, "warm_s": 0.4, "cold_marks_s": {"run": 0.45}, "warm_marks_s": {"run": 0.35}}
    assert row["rounds"][1] == {"cold_s": 0.6, "warm_s": 0.3}


def test_a_start_row_that_failed_in_any_round_reports_the_error():
    runs = [{"cold_s": 0.5, "warm_s": 0.4}, {"error": "worker exit 1: boom", "busy": True}]
    row = harness.start_summary(runs)
    assert row["error"] == "worker exit 1: boom" and "cold_s" not in row and row["busy"] is True


def test_start_rounds_must_be_at_least_one(capsys):
    assert harness.main(["W6", "--start-rounds", "0"]) == 2
    assert "--start-rounds >= 1" in capsys.readouterr().err
    assert harness.main(["W6", "--own-start-rounds", "0"]) == 2
    assert "--own-start-rounds >= 1" in capsys.readouterr().err


def test_speedup_is_the_most_threads_over_one_thread():
    by = {"1": {"chars_per_s": 100.0}, "2": {"chars_per_s": 170.0}}
    assert harness._speedup(by) == {"speedup": pytest.approx(1.7), "speedup_threads": 2}
    assert harness._speedup({"2": {"chars_per_s": 170.0}}) == {}
    assert harness._speedup({"1": {"chars_per_s": 100.0}, "2": {"error": "x"}}) == {}


def test_scaling_counts_parse_and_refuse_nonsense():
    assert harness.parse_args(["--scaling", "2,1"]).scaling == [1, 2]
    assert harness.parse_args(["--scaling", "none"]).scaling == []
    assert harness.parse_args([]).scaling == [1, 2]
    with pytest.raises(SystemExit):
        harness.parse_args(["--scaling", "0"])


def test_one_thread_sets_the_thread_variables_and_keeps_xla_on_one_thread(monkeypatch):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS"):
        monkeypatch.setenv(var, "")   # so that monkeypatch restores what limit_threads sets
        monkeypatch.delenv(var)
    monkeypatch.setattr("os.sched_setaffinity", lambda pid, cpus: None, raising=False)
    limit_threads(1)
    import os

    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert XLA_ONE_THREAD in os.environ["XLA_FLAGS"]
    assert harness.child_env(1)["OMP_NUM_THREADS"] == "1"


ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma avx2 bmi2

processor\t: 1
cpu family\t: 99
model name\t: not the first processor
"""


def test_a_run_records_the_processor_generation_not_only_its_name():
    """One "AMD EPYC" name covers Zen 3 (AVX2) and Zen 4 (AVX-512), whose ratios differ."""
    zen3 = harness.cpu_details(harness.cpuinfo(ZEN3))
    assert zen3 == {"family": 25, "model": 1, "vectors": "AVX2"}
    zen4 = harness.cpu_details(harness.cpuinfo(ZEN3.replace("model\t\t: 1", "model\t\t: 17")
                                               .replace("avx2", "avx2 avx512f avx512bw")))
    assert zen4 == {"family": 25, "model": 17, "vectors": "AVX-512"}
    assert harness.describe_cpu({"cpu": "AMD EPYC", **zen3}) == "AMD EPYC (family 25 model 1, AVX2)"


def test_a_report_without_the_details_still_names_its_processor():
    """Reports written before the details were recorded (benchmarks/runs/) render as before."""
    assert harness.cpu_details({}) == {"family": None, "model": None, "vectors": None}
    assert harness.describe_cpu({"cpu": "AMD EPYC"}) == "AMD EPYC"
    assert harness.describe_cpu({"cpu": "AMD EPYC", **harness.cpu_details({})}) == "AMD EPYC"


def _report(w1_jax, w1_torch, w2_torch, cold):
    return {"workloads": {
        "W1": {"unrolled": {"ratio_to": {"jax": w1_jax, "torch": w1_torch, "numpy": 10.0}}},
        "W2": {"unrolled": {"ratio_to": {"torch": w2_torch, "jax": 3.0}}},
        "W6": {"unrolled": {"cold_s": cold, "warm_s": 0.4, "ratio_cold_s": {"unrolled-numpy": 1.1},
                            "ratio_warm_s": {"unrolled-numpy": 0.9}}},
    }}


def test_targets_are_judged_on_the_median_of_the_runs_against_the_peer_they_name():
    from benchmarks import targets

    rows = {r["target"]: r for r in targets.judge([_report(1.6, 9.0, 1.2, 0.5), _report(1.4, 9.0, 1.6, 3.5),
                                                   _report(1.7, 1.2, 1.3, 0.6)])}
    best = rows["W1 vs the best peer"]
    assert best["runs"] == [1.6, 1.4, 1.2] and best["against"] == ["jax", "jax", "torch"]  # the fastest peer
    assert best["median"] == 1.4 and best["met"] is False
    assert rows["W2 vs PyTorch"]["median"] == 1.3 and rows["W2 vs PyTorch"]["met"] is False
    assert rows["W6 cold start"]["median"] == 0.6 and rows["W6 cold start"]["met"] is True  # lower is better
    assert rows["W6 warm vs the plain NumPy engine"]["met"] is True
    assert rows["W3 vs PyTorch"]["median"] is None  # not in these reports: not judged


def test_the_targets_table_lists_only_what_the_runs_measured():
    from benchmarks import targets

    lines = targets.render([_report(1.6, 9.0, 1.2, 0.5)] * 3)
    text = "\n".join(lines)
    assert "median of the runs" in text and "W1 vs the best peer (jax)" in text
    assert "W3" not in text and "W2 vs PyTorch" in text and "MISSED" in text
    assert targets.render([{"workloads": {}}]) == []


def test_runs_must_be_at_least_one(capsys):
    assert harness.main(["W1", "--runs", "0"]) == 2
    assert "--runs >= 1" in capsys.readouterr().err


def test_splitcost_figures_an_update_from_when_its_parts_ran():
    from benchmarks import splitcost

    # the update 0-13 ms; part 0 on the caller 0.3-11.5 ms with 10.5 ms of CPU, 9 of them in
    # native calls, part 1 0.5-12.0 ms with 11.0; the parts return at 12.1, merged until 12.3
    ms = 1e-3
    marks = {"update": (0.0, 13 * ms), "run": (0.0, 12.4 * ms), "clip": (12.4 * ms, 12.5 * ms),
             "optimizer": (12.5 * ms, 13 * ms), "part0": (0.3 * ms, 11.5 * ms, 10.5 * ms),
             "part1": (0.5 * ms, 12.0 * ms, 11.0 * ms), "parts": (0.25 * ms, 12.1 * ms), "merge": (12.1 * ms, 12.3 * ms),
             "natives0": {"products": 4 * ms, "step loops": 5 * ms}, "natives1": {}}
    rows = {}
    splitcost._record_split(marks, lambda key, s: rows.setdefault(key, []).append(1e3 * s))
    got = {k: round(v[0], 6) for k, v in rows.items()}
    assert {k: v for k, v in got.items() if ":" not in k} == {
        "split update": 13.0, "part 0 wall": 11.2, "part 0 cpu": 10.5, "part 0 off core": 0.7,
        "part 1 wall": 11.5, "part 1 cpu": 11.0, "part 1 off core": 0.5, "before the parts": 0.3,
        "second part's start after the first": 0.2, "parts' ends apart": 0.5,
        "last part's end to the parts' return": 0.1, "merge": 0.2, "after the merge, in the run": 0.1,
        "clip": 0.1, "optimizer": 0.5}
    assert got["part 0: products"] == 4.0 and got["part 0: step loops"] == 5.0 and got["part 0: weight copies"] == 0
    assert got["part 0: the rest (Python, small NumPy calls)"] == 2.2
    assert got["part 1: the rest (Python, small NumPy calls)"] == 11.5


def test_steprows_names_the_row_counts_where_a_new_block_is_paid_for():
    from benchmarks import steprows

    us = {16: 9.8, 17: 12.9, 18: 13.0, 24: 14.0, 25: 17.1, 26: 17.1, 33: 21.3}
    table = [{"rows": r, "forward_us": t} for r, t in us.items()]
    assert steprows.block_edges(table) == [17, 25]  # 33 follows 26, not 32: no edge read across a gap


def test_steprows_times_right_products_of_each_row_count_both_ways():
    from benchmarks import steprows
    from unrolled.engines.compiled.kernels import onednn

    if onednn.SGEMM is None:
        pytest.skip("oneDNN is not loaded")
    table = steprows.measure(onednn.SGEMM, [1, 3], inner=4, outer=8, reps=2, rounds=1)
    assert [r["rows"] for r in table] == [1, 3]
    assert all(r[k] > 0 for r in table for k in ("forward_us", "back_us", "forward_gflops", "back_gflops"))


def test_steprows_refuses_a_backward_row_range():
    from benchmarks import steprows

    with pytest.raises(SystemExit):
        steprows.main(["--rows", "9-8"])


def test_revisions_renames_the_package_s_imports_and_leaves_prose():
    from benchmarks.revisions import renamed

    text = ('"""Runs the unrolled graph. See unrolled.engines.runio."""\n'
            "import unrolled\n"
            "from unrolled import words\n"
            "from unrolled.graph.folded import Graph\n"
            "    from unrolled.engines.compiled.kernels.arrays import jit\n"
            'HEAD = "from unrolled.engines.compiled.kernels.rows import *"\n'
            "x = 1  # the graph is unrolled. Then\n")
    assert renamed(text) == (
        '"""Runs the unrolled graph. See unrolled_rev.engines.runio."""\n'
        "import unrolled_rev\n"
        "from unrolled_rev import words\n"
        "from unrolled_rev.graph.folded import Graph\n"
        "    from unrolled_rev.engines.compiled.kernels.arrays import jit\n"
        'HEAD = "from unrolled_rev.engines.compiled.kernels.rows import *"\n'
        "x = 1  # the graph is unrolled. Then\n")
