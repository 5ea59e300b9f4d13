"""`unrolled sample`, in-process: deterministic text under a seed, the prime, and every bad checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from unrolled.charlm.model import MODEL_FORMAT, ModelConfig, TrainConfig, checkpoint_contents, init_params
from unrolled.cli import build_parser, main
from unrolled.train import checkpoint
from unrolled.train.checkpoint import load_checkpoint, save_checkpoint

VOCAB = list("\n .,abcdefghijklmnopqrstuvwxyz")


@pytest.fixture
def ckpt(tmp_path):
    config = ModelConfig(cell="lstm", hidden=16, layers=2, vocab_size=len(VOCAB))
    arrays, meta = checkpoint_contents(config, TrainConfig(), VOCAB, init_params(config, 0), step=0)
    path = tmp_path / "run" / "latest.npz"
    path.parent.mkdir()
    save_checkpoint(path, arrays, meta)
    return path


def sample(capsys, *args) -> str:
    rc = main(["sample", *args, "--engine", "reference"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def failure(capsys, *args) -> str:
    rc = main(["sample", *args, "--engine", "reference"])
    err = capsys.readouterr().err
    assert rc != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_same_seed_same_text(ckpt, capsys):
    a = sample(capsys, str(ckpt), "--length", "60", "--seed", "7")
    assert a == sample(capsys, str(ckpt), "--length", "60", "--seed", "7")
    assert a != sample(capsys, str(ckpt), "--length", "60", "--seed", "8")
    assert len(a.rstrip("\n")) <= 60 and set(a) <= set(VOCAB)


def test_run_folder_prime_and_options(ckpt, capsys):
    text = sample(capsys, str(ckpt.parent), "--prime", "the cat", "--length", "30", "--temperature", "0.5",
                  "--top-k", "3")
    assert text.startswith("the cat") and len(text) >= len("the cat") + 30
    greedy = {sample(capsys, str(ckpt), "--temperature", "0", "--length", "20", "--seed", str(s)) for s in range(3)}
    assert len(greedy) == 1  # temperature 0 ignores the seed
    assert sample(capsys, str(ckpt), "--length", "0", "--prime", "ab") == "ab\n"


def test_trained_run_samples(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("abc abd abe\n" * 60)
    out = tmp_path / "run"
    assert main(["train", str(text), "--engine", "reference", "--hidden", "16", "--layers", "1", "--seq", "8",
                 "--batch", "4", "--steps", "3", "--sample-every", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    a = sample(capsys, str(out), "--length", "40", "--seed", "1")
    assert a == sample(capsys, str(out / "best.npz"), "--length", "40", "--seed", "1")
    assert set(a) <= set("abcde \n")


def test_help_explains_temperature(capsys):
    sub = build_parser()._subparsers._group_actions[0].choices["sample"]
    text = sub.format_help()
    assert "low temperatures" in text and "high temperatures" in text


def test_prime_character_outside_the_vocabulary(ckpt, capsys):
    err = failure(capsys, str(ckpt), "--prime", "hello World")
    assert "'W'" in err and "position 7" in err and "--prime" in err


def test_bad_numbers_are_usage_errors(ckpt, capsys):
    assert main(["sample", str(ckpt), "--length", "-1"]) == 2
    assert main(["sample", str(ckpt), "--temperature", "-0.5"]) == 2
    assert main(["sample", str(ckpt), "--top-k", "-2"]) == 2
    capsys.readouterr()


# ------------------------------------------------------------ bad checkpoints


def test_missing_checkpoint(tmp_path, capsys):
    err = failure(capsys, str(tmp_path / "nope.npz"))
    assert "does not exist" in err


def test_truncated_checkpoint(ckpt, capsys):
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    err = failure(capsys, str(ckpt))
    assert str(ckpt) in err


def test_tampered_checkpoint(ckpt, capsys):
    arrays, _ = load_checkpoint(ckpt)
    data = bytearray(ckpt.read_bytes())
    needle = arrays["param.out.W"].tobytes()[:16]
    at = bytes(data).index(needle)
    data[at + 3] ^= 0x40  # one bit of one weight
    ckpt.write_bytes(bytes(data))
    err = failure(capsys, str(ckpt))
    assert "checksum mismatch" in err


def test_foreign_files(tmp_path, capsys):
    text = tmp_path / "notes.npz"
    text.write_text("just some text")
    assert "not an unrolled checkpoint" in failure(capsys, str(text))
    plain = tmp_path / "plain.npz"
    np.savez(plain, W=np.zeros(3))
    assert "not an unrolled checkpoint" in failure(capsys, str(plain))
    other = tmp_path / "other.npz"
    save_checkpoint(other, {"W": np.zeros(3)}, {"kind": "seq2seq"})
    assert "not a language-model checkpoint" in failure(capsys, str(other))


def test_incompatible_versions(ckpt, tmp_path, capsys, monkeypatch):
    arrays, meta = load_checkpoint(ckpt)
    save_checkpoint(tmp_path / "model2.npz", arrays, {**meta, "model_format": MODEL_FORMAT + 1})
    err = failure(capsys, str(tmp_path / "model2.npz"))
    assert f"format {MODEL_FORMAT + 1}" in err
    monkeypatch.setattr(checkpoint, "VERSION", checkpoint.VERSION + 1)
    save_checkpoint(tmp_path / "file2.npz", arrays, meta)
    monkeypatch.undo()
    err = failure(capsys, str(tmp_path / "file2.npz"))
    assert "version" in err and "upgrade" in err
