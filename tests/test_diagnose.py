"""Gradients through time: the lag gradients against finite differences, the per-copy norms against the
reference engine, the tasks, the plots and the command line."""

from __future__ import annotations

import numpy as np
import pytest

from unrolled.cli import main
from unrolled.cli.draw_cmd import build_network
from unrolled.engines import reference
from unrolled.engines.registry import available_engines
from unrolled.engines.runio import prepare
from unrolled.graph.folded import Graph
from unrolled.viz import diagnose


def _history(a):
    a = np.asarray(a)
    return a[None] if a.ndim == 2 else a


def finite_difference_state_gradient(graph, params, inputs, masks, t, k, eps=1e-6):
    """``[B, S]``: ∂ℓ_{t,b}/∂s_{k,b} by central differences, running steps k+1..t from a nudged s_k."""
    names = list(graph.delayed())
    if k == -1:
        state = dict(prepare(graph, params, inputs, None, masks).init)
    else:
        prefix = reference.run(graph, params, {n: a[:k + 1] for n, a in inputs.items()}, backward=False)
        state = {n: _history(prefix.final_states[n]) for n in names}
    later = {n: a[k + 1:t + 1] for n, a in inputs.items()}
    later_masks = {n: m[k + 1:t + 1] for n, m in masks.items()}

    def step_loss(st) -> np.ndarray:  # [B]: each sequence's loss at step t, mask applied
        r = reference.run(graph, params, later, init_states=st, masks=later_masks, backward=False)
        return sum(r.step_losses[l.name][-1] for l in graph.losses)

    columns = []
    for n in names:
        h = state[n].copy()  # [D, B, F]
        grad = np.zeros_like(h)
        for idx in np.ndindex(h.shape[0], h.shape[2]):
            d, f = idx
            up, down = h.copy(), h.copy()
            up[d, :, f] += eps
            down[d, :, f] -= eps
            grad[d, :, f] = (step_loss({**state, n: up}) - step_loss({**state, n: down})) / (2 * eps)
        columns.append(grad.transpose(1, 0, 2).reshape(h.shape[1], -1))
    return np.concatenate(columns, axis=1)


def two_losses_elman() -> Graph:
    """An Elman network with a mean-reduced and a sum-reduced loss, to check that each is taken per sequence."""
    g = Graph("two-losses")
    x = g.input("x", 3)
    h = g.state("h", 3)
    g.tanh(g.linear(g.param("W", (3, 6)), g.concat(x, h.prev), g.param("b", (3,), init="normal:0.3")), name="h")
    y = g.output(g.matmul(g.param("V", (3, 3)), h, name="y"))
    g.loss("cross_entropy", y, g.index_input("target", 3), name="xent")
    g.loss("mse", y, g.input("goal", 3), name="mse", reduce="sum")
    return g


def deep_delay_graph() -> Graph:
    g = Graph("deep")
    x = g.input("x", 2)
    h = g.state("h", 3, init="learned")
    g.tanh(g.matmul(g.param("W", (3, 8)), g.concat(x, h.prev, h.delay(2)), name="a"), name="h")
    y = g.output(g.matmul(g.param("V", (2, 3)), h, name="y"))
    g.loss("mse", y, g.input("target", 2), name="err")
    return g


NETWORKS = {
    "elman": lambda: build_network("elman", hidden=3),
    "lstm": lambda: build_network("lstm", hidden=2, forget_bias=1.0),
    "gru-2-layers": lambda: build_network("gru", hidden=2, layers=2),
    "two-losses": two_losses_elman,
    "deep": deep_delay_graph,
}


def random_case(graph: Graph, rng, T=5, B=2):
    params = {k: v + rng.normal(0, 0.4, v.shape) for k, v in graph.init_params(rng).items()}
    inputs = diagnose.random_inputs(graph, T, B, rng)
    masks = {l.name: (rng.random((T, B)) > 0.25).astype(np.float64) for l in graph.losses}
    return params, inputs, masks


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_lag_gradients_match_finite_differences(name, rng):
    graph = NETWORKS[name]()
    params, inputs, masks = random_case(graph, rng)
    got = list(diagnose.state_gradients(graph, params, inputs, masks=masks, engine="reference"))
    active = sum(masks.values()) > 0
    expected_pairs = {(t, k) for t in range(5) for k in range(-1, t) if active[t].any()}
    assert {(t, k) for t, k, _ in got} == expected_pairs
    for t, k, g in got:
        numeric = finite_difference_state_gradient(graph, params, inputs, masks, t, k)
        assert g.shape == numeric.shape
        scale = max(np.abs(numeric).max(), 1e-8)
        assert np.abs(g - numeric).max() / scale < 1e-6, f"t={t}, k={k}"


def test_max_lag_limits_how_far_back(rng):
    graph = NETWORKS["elman"]()
    params, inputs, masks = random_case(graph, rng, T=6)
    pairs = [(t, k) for t, k, _ in diagnose.state_gradients(graph, params, inputs, masks=masks, max_lag=2,
                                                             engine="reference")]
    assert pairs and all(1 <= t - k <= 2 for t, k in pairs)


@pytest.mark.skipif("compiled" not in available_engines(), reason="no compiled engine")
def test_engines_agree_on_lag_gradients(rng):
    graph = NETWORKS["lstm"]()
    params, inputs, masks = random_case(graph, rng)
    ref = list(diagnose.state_gradients(graph, params, inputs, masks=masks, engine="reference"))
    fast = list(diagnose.state_gradients(graph, params, inputs, masks=masks, engine="compiled"))
    assert [(t, k) for t, k, _ in ref] == [(t, k) for t, k, _ in fast]
    for (_, _, a), (_, _, b) in zip(ref, fast):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def test_lag_profile_averages_the_norms_over_steps_and_sequences(rng):
    graph = NETWORKS["lstm"]()
    params, inputs, masks = random_case(graph, rng, T=6, B=3)
    profile = diagnose.lag_profile(graph, params, inputs, masks=masks, engine="reference")
    active = sum(masks.values()) > 0
    samples = {}
    for t, k, g in diagnose.state_gradients(graph, params, inputs, masks=masks, engine="reference"):
        samples.setdefault(t - k, []).extend(np.linalg.norm(g, axis=1)[active[t]])
    for lag, values in samples.items():
        assert profile.count[lag - 1] == len(values)
        assert profile.mean[lag - 1] == pytest.approx(np.mean(values))
        assert profile.low[lag - 1] <= profile.mean[lag - 1] <= profile.high[lag - 1] or len(values) < 3
    assert profile.at(1) == profile.mean[0] and np.isnan(profile.at(99))
    assert list(profile.lags) == list(range(1, 7))


def test_an_untrained_elman_networks_gradient_fades_with_the_lag(rng):
    graph = build_network("elman", inputs=4, hidden=16, outputs=4)
    task = diagnose.DelayTask(symbols=4, delay=1)
    inputs, mask = task.batch(16, 4, rng)
    profile = diagnose.lag_profile(graph, graph.init_params(0), inputs, masks={"loss": mask}, engine="reference")
    assert profile.at(15) < 0.1 * profile.at(1)


def test_copy_norms_are_the_norms_of_the_reference_engines_per_copy_gradients(rng):
    graph = deep_delay_graph()  # its learned initial state has a copy before step 0, left out
    params, inputs, masks = random_case(graph, rng)
    copies = diagnose.copy_gradient_norms(graph, params, inputs, masks=masks)
    result = reference.run(graph, params, inputs, masks=masks, per_copy=True)
    assert copies.weights == ["W", "V"]
    assert copies.norms.shape == (5, 2)
    for j, name in enumerate(copies.weights):
        for copy, t in zip(result.per_copy[name], result.copy_steps[name]):
            assert copies.norms[t, j] == pytest.approx(np.linalg.norm(copy))
        assert np.linalg.norm(result.per_copy[name].sum(axis=0) - result.grads[name]) < 1e-12


def test_delay_task_asks_for_the_symbol_delay_steps_back(rng):
    task = diagnose.DelayTask(symbols=3, delay=2)
    inputs, mask = task.batch(7, 4, rng)
    symbols = inputs["x"].argmax(axis=2)
    assert inputs["x"].shape == (7, 4, 3) and np.all(inputs["x"].sum(axis=2) == 1)
    np.testing.assert_array_equal(inputs["target"][2:], symbols[:-2])
    assert np.all(mask[:2] == 0) and np.all(mask[2:] == 1)
    with pytest.raises(ValueError, match="longer than 7 steps"):
        diagnose.DelayTask(delay=7).batch(7, 1, rng)


def test_latch_task_holds_the_last_marked_symbol(rng):
    task = diagnose.LatchTask(symbols=3, marker_rate=0.3)
    inputs, mask = task.batch(30, 5, rng)
    x = inputs["x"]
    assert x.shape == (30, 5, 4) and np.all(x[0, :, 3] == 1)
    for b in range(5):
        held = None
        for t in range(30):
            if x[t, b, 3]:
                held = x[t, b, :3].argmax()
            assert inputs["target"][t, b] == held
    assert np.all(mask == 1)


def test_tasks_check_the_graph_they_feed():
    task = diagnose.DelayTask(symbols=4)
    assert task.fits(build_network("elman", inputs=4, outputs=4))
    with pytest.raises(ValueError, match="dense input 'x' of size 4"):
        task.check(build_network("elman", inputs=3, outputs=3))
    assert diagnose.LatchTask(symbols=4).fits(build_network("gru", inputs=5, outputs=4))


def test_brief_training_lowers_the_loss():
    graph = build_network("elman", inputs=3, hidden=8, outputs=3)
    task = diagnose.DelayTask(symbols=3, delay=1)
    params, losses = diagnose.train(graph, graph.init_params(0), task, 60, T=10, B=8, lr=0.05, engine="reference")
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert set(params) == set(graph.params)


def _small_diagnoses(rng):
    out = []
    for cell in ("elman", "lstm"):
        graph = build_network(cell, inputs=3, hidden=4, outputs=3)
        inputs, mask = diagnose.DelayTask(symbols=3, delay=2).batch(10, 2, rng)
        out.append(diagnose.diagnose(graph, graph.init_params(0), inputs, masks={"loss": mask},
                                     label=f"{cell} untrained", max_lag=8, engine="reference"))
    return out


def test_plot_writes_a_picture_that_is_not_blank(tmp_path, rng):
    import matplotlib.image

    results = _small_diagnoses(rng)
    image = matplotlib.image.imread(str(diagnose.plot(results, tmp_path / "d.png")))
    assert image.shape[0] > 200 and float(image[..., :3].var()) > 1e-3
    svg = diagnose.plot(results, tmp_path / "d.svg").read_text()
    assert "<svg" in svg and "<path" in svg and "lag t − k" in svg and "elman untrained" in svg
    with pytest.raises(ValueError, match="must end in .png"):
        diagnose.plot(results, tmp_path / "d.gif")
    table = diagnose.summary(results, lags=(1, 5))
    assert "elman untrained" in table and "lag 5" in table and "ratio to lag 1" in table


# ---------------------------------------------------------------- command line


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


SMALL = ["--steps", "10", "--batch", "2", "--max-lag", "6", "--hidden", "4", "--delay", "2"]


def test_cli_diagnoses_untrained_and_trained_networks(tmp_path, capsys):
    import matplotlib.image

    out_file = tmp_path / "d.png"
    code, out, err = run_cli(["diagnose", "elman", "lstm", *SMALL, "--train-steps", "3", "-o", str(out_file)],
                             capsys)
    assert code == 0, err
    for label in ("elman untrained", "elman trained 3 steps", "lstm untrained", "lstm trained 3 steps"):
        assert label in out
    assert "lag 5" in out and f"wrote {out_file}" in out
    assert float(matplotlib.image.imread(str(out_file))[..., :3].var()) > 1e-3


def test_cli_latch_task_and_svg(tmp_path, capsys):
    code, out, err = run_cli(["diagnose", "gru", *SMALL, "--task", "latch", "-o", str(tmp_path / "d.svg")], capsys)
    assert code == 0, err
    assert "<svg" in (tmp_path / "d.svg").read_text()


@pytest.mark.parametrize("argv, message", [
    (["diagnose", "elman", "-o", "d.jpg"], "must end in .png, .svg, .pdf"),
    (["diagnose", "boltzmann", "-o", "d.png"], "unknown WHAT 'boltzmann'"),
    (["diagnose", "elman", "--delay", "50", "-o", "d.png"], "--delay 50"),
    (["diagnose", "elman", "--steps", "0", "-o", "d.png"], "--steps 0"),
])
def test_cli_mistakes_are_one_line_and_nonzero(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(argv, capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and message in err
    assert not list(tmp_path.iterdir())


def test_cli_diagnoses_a_checkpoint_on_text(tmp_path, capsys):
    charmodel = pytest.importorskip("unrolled.charlm.model")
    from unrolled.train.checkpoint import save_checkpoint

    config = charmodel.ModelConfig(cell="lstm", hidden=4, layers=1, vocab_size=5, dtype="float64")
    arrays, meta = charmodel.checkpoint_contents(config, charmodel.TrainConfig(seq=6, batch=2), list("abcd "),
                                                 charmodel.init_params(config, 0))
    save_checkpoint(tmp_path / "m.npz", arrays, meta)
    (tmp_path / "t.txt").write_text("abba cadab dabba cab " * 5)
    code, out, err = run_cli(["diagnose", str(tmp_path / "m.npz"), "--text", str(tmp_path / "t.txt"), "--steps",
                              "8", "--batch", "2", "--max-lag", "5", "-o", str(tmp_path / "m.png")], capsys)
    assert code == 0, err
    assert "m.npz" in out
    code, out, err = run_cli(["diagnose", str(tmp_path / "m.npz"), "--train-steps", "2", "-o",
                              str(tmp_path / "m2.png")], capsys)
    assert code != 0 and "already trained" in err and len(err.strip().splitlines()) == 1


def test_a_graph_without_delays_has_no_gradients_through_time(rng):
    g = Graph("feedforward")
    y = g.output(g.matmul(g.param("W", (2, 3)), g.input("x", 3), name="y"))
    g.loss("mse", y, g.input("target", 2))
    inputs = diagnose.random_inputs(g, 4, 2, rng)
    with pytest.raises(ValueError, match="no delay edge"):
        diagnose.lag_profile(g, g.init_params(0), inputs)
