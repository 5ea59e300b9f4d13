"""`unrolled evaluate`, in-process: bits/char and perplexity, unknown characters, bad input."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from unrolled.cli import main
from unrolled.train.checkpoint import load_checkpoint

WORDS = "the cat sat on a mat and the dog ran to the red barn while small birds sang".split()


def corpus(n_lines: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 8)) for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    text = folder / "train.txt"
    text.write_text(corpus(60))
    out = folder / "run"
    rc = main(["train", str(text), "--engine", "reference", "--hidden", "16", "--layers", "1", "--seq", "8",
               "--batch", "4", "--lr", "0.01", "--steps", "12", "--sample-every", "0", "--out", str(out)])
    assert rc == 0
    return text, out


def evaluate(capsys, *args) -> str:
    rc = main(["evaluate", *args, "--engine", "reference"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def figures(out: str) -> tuple[float, float]:
    m = re.search(r"bits/char ([\d.]+)\s+perplexity ([\d.]+)", out)
    return float(m.group(1)), float(m.group(2))


def test_bits_per_char_and_perplexity(run, capsys):
    text, out = run
    printed = evaluate(capsys, str(out), str(text))
    bpc, ppl = figures(printed)
    assert 0 < bpc < math.log2(len(set(text.read_text())))
    assert ppl == pytest.approx(2 ** bpc, rel=1e-3)
    assert "out of vocabulary: none" in printed


def test_validation_split_reproduces_the_training_figure(run, tmp_path, capsys):
    text, out = run
    full = text.read_text()
    val = full[len(full) - round(len(full) * 0.1):]
    (tmp_path / "val.txt").write_text(val)
    bpc, _ = figures(evaluate(capsys, str(out / "latest.npz"), str(tmp_path / "val.txt")))
    arrays, _ = load_checkpoint(out / "latest.npz")
    assert bpc == pytest.approx(arrays["history/val"][-1, 1], abs=1e-4)


def test_unknown_characters_are_skipped_and_reported(run, tmp_path, capsys):
    text, out = run
    clean = corpus(5, seed=3)
    (tmp_path / "clean.txt").write_text(clean)
    (tmp_path / "dirty.txt").write_text(clean.replace("cat", "caté", 2).replace("dog", "dQZog", 1))
    base, _ = figures(evaluate(capsys, str(out), str(tmp_path / "clean.txt")))
    printed = evaluate(capsys, str(out), str(tmp_path / "dirty.txt"))
    bpc, _ = figures(printed)
    line = next(l for l in printed.splitlines() if l.startswith("out of vocabulary"))
    assert "4 characters (3 distinct" in line and "'é' ×2" in line and "skipped" in line and "log2(" in line
    assert bpc == pytest.approx(base, abs=1e-4)  # skipping leaves exactly the clean text
    charged = float(re.search(r"would be ([\d.]+)", line).group(1))
    assert charged > bpc


def test_help_documents_the_unknown_rule(capsys):
    assert main(["evaluate", "--help"]) == 0
    text = capsys.readouterr().out
    assert "skipped" in text and "log2(V)" in text


def one_line(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_bad_input(run, tmp_path, capsys):
    text, out = run
    one_line(capsys, main(["evaluate", str(out), str(tmp_path / "missing.txt")]), "missing.txt", "no such file")
    (tmp_path / "empty.txt").write_text("")
    one_line(capsys, main(["evaluate", str(out), str(tmp_path / "empty.txt")]), "empty")
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02" * 50)
    one_line(capsys, main(["evaluate", str(out), str(tmp_path / "bin.dat")]), "binary")
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    one_line(capsys, main(["evaluate", str(out), str(tmp_path / "latin.txt")]), "--encoding")
    (tmp_path / "alien.txt").write_text("ZZZZ")
    one_line(capsys, main(["evaluate", str(out), str(tmp_path / "alien.txt")]), "at least 2")
    one_line(capsys, main(["evaluate", str(tmp_path), str(text)]), "neither latest.npz nor best.npz")
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes((out / "latest.npz").read_bytes()[:5000])
    one_line(capsys, main(["evaluate", str(truncated), str(text)]), "cut.npz")


def test_another_text_is_scored_by_hand(run, tmp_path, capsys):
    """A text the model was not trained on (another word order, not the held-out part): evaluate's
    bits/char is the mean cross-entropy of its next-character predictions, worked out from the logits."""
    from unrolled.charlm.model import INPUT_NAME, LOGITS_NAME, TARGET_NAME, load_model
    from unrolled.engines.registry import make_engine

    other = corpus(4, seed=11)
    (tmp_path / "other.txt").write_text(other)
    bpc, _ = figures(evaluate(capsys, str(run[1]), str(tmp_path / "other.txt"), "--seq", str(len(other)),
                              "--batch", "1"))
    model = load_model(run[1])
    ids = np.array([model.vocabulary.index(c) for c in other])[:, None]  # [T, 1]
    r = make_engine(model.graph, "reference").run(model.params, {INPUT_NAME: ids[:-1], TARGET_NAME: ids[1:]},
                                                  backward=False)
    logits = r.outputs[LOGITS_NAME][:, 0].astype(np.float64)  # [T, V]
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    by_hand = -logp[np.arange(len(ids) - 1), ids[1:, 0]].mean() / math.log(2)
    assert bpc == pytest.approx(by_hand, abs=1e-4)
    # the default chunking (the checkpoint's --seq and --batch) gives nearly the same figure
    assert figures(evaluate(capsys, str(run[1]), str(tmp_path / "other.txt")))[0] == pytest.approx(bpc, abs=0.05)
