"""Exact resume: an interrupted-and-resumed run computes the same losses as an uninterrupted one, bit for bit.

The model is small but exercises every piece of state a resume must put
back: Adam's moments, a warm-up schedule, the batcher's position (with an
epoch wrap inside the run, where the carried state is reset), the state
carried between chunks and the k2 - k1 replay buffer of truncated BPTT,
and the generator behind the dropout masks.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest

from unrolled.charlm.model import load_model
from unrolled.cli import main
from unrolled.train.checkpoint import load_checkpoint
from unrolled.train.trainer import Trainer

WORDS = "the cat sat on a mat and the dog ran to the red barn while small birds sang".split()


def corpus(n_lines: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 8)) for _ in range(n_lines)) + "\n"



SETTINGS = ["--engine", "reference", "--cell", "lstm", "--hidden", "12", "--layers", "2", "--dropout", "0.25",
            "--seq", "8", "--k1", "4", "--k2", "8", "--batch", "4", "--warmup", "3",
            "--eval-every", "5", "--sample-every", "7", "--sample-length", "10"]
STEPS = 16


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text(corpus(7))  # ~300 characters: an epoch is ~13 chunks of 4 × 4 (after validation is held out)
    return p


def history(folder):
    arrays, meta = load_checkpoint(folder / "latest.npz")
    return arrays, meta


def test_epoch_wraps_within_the_run(text_file):
    from unrolled.charlm.batching import StreamBatcher

    n = len(text_file.read_text())
    train = n - round(n * 0.1)
    assert StreamBatcher(np.zeros(train, dtype=np.int64), 4, 4).chunks_per_epoch < STEPS


def test_resumed_run_matches_uninterrupted_run(tmp_path, text_file, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", str(text_file), *SETTINGS, "--steps", str(STEPS), "--out", str(whole)]) == 0
    assert main(["train", str(text_file), *SETTINGS, "--steps", "6", "--out", str(split)]) == 0
    assert main(["train", "--resume", str(split), "--steps", "11"]) == 0  # reads the file it was trained on
    assert main(["train", "--resume", str(split), "--steps", str(STEPS), "--eval-every", "3"]) == 0
    a, meta_a = history(whole)
    b, meta_b = history(split)
    assert meta_a["step"] == meta_b["step"] == STEPS
    np.testing.assert_array_equal(a["history/train_loss"], b["history/train_loss"])  # bitwise
    for name in a:
        if name.startswith(("param.", "optimizer/", "tbptt/")):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert meta_a["trainer"]["rng"] == meta_b["trainer"]["rng"]
    assert meta_a["data"] == meta_b["data"]
    assert "resuming at step 6" in capsys.readouterr().out


def test_ctrl_c_saves_and_resumes_exactly(tmp_path, text_file, monkeypatch, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    handler = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN when the suite runs in the background
    assert main(["train", str(text_file), *SETTINGS, "--steps", str(STEPS), "--out", str(whole)]) == 0
    original = Trainer.train_step

    def interrupted(self, inputs, *a, **kw):
        stats = original(self, inputs, *a, **kw)
        if self.step_count == 9:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during update 9
        return stats

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    rc = main(["train", str(text_file), *SETTINGS, "--steps", str(STEPS), "--out", str(split)])
    out = capsys.readouterr().out
    assert rc == 130
    assert "stopped by Ctrl-C at step 9" in out and f"--resume {split}" in out
    assert history(split)[1]["step"] == 9
    monkeypatch.setattr(Trainer, "train_step", original)
    assert signal.getsignal(signal.SIGINT) is handler  # the handler was put back

    assert main(["train", "--resume", str(split)]) == 0
    a, _ = history(whole)
    b, _ = history(split)
    np.testing.assert_array_equal(a["history/train_loss"], b["history/train_loss"])
    np.testing.assert_array_equal(a["param.out.W"], b["param.out.W"])


def test_resume_keeps_the_model_and_settings(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", str(text_file), *SETTINGS, "--steps", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    rc = main(["train", "--resume", str(out), "--hidden", "32"])
    err = capsys.readouterr().err
    assert rc == 1 and "--hidden 32 differs from the resumed run's 12" in err and len(err.splitlines()) == 1
    rc = main(["train", "--resume", str(out), "--lr", "0.5"])
    err = capsys.readouterr().err
    assert rc == 1 and "--lr 0.5 differs" in err and "--steps" in err
    rc = main(["train", "--resume", str(out), "--steps", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and "already done 2 steps" in err


def test_resume_on_another_text_goes_on_in_a_new_folder(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(["train", str(text_file), *SETTINGS, "--steps", "2", "--out", str(out)]) == 0
    before = (out / "latest.npz").read_bytes()
    other = tmp_path / "other.txt"
    other.write_text(corpus(7, seed=5))  # same characters, other text
    capsys.readouterr()
    rc = main(["train", str(other), "--resume", str(out), "--steps", "4"])
    err = capsys.readouterr().err
    assert rc == 1 and "other.txt is not the text the run in" in err and "add --out NEWDIR" in err
    assert len(err.splitlines()) == 1 and (out / "latest.npz").read_bytes() == before
    assert main(["train", str(other), "--resume", str(out), "--steps", "4", "--out", str(tmp_path / "ft")]) == 0
    assert "resuming on a new text" in capsys.readouterr().out
    assert history(tmp_path / "ft")[1]["step"] == 4 and (out / "latest.npz").read_bytes() == before

    new_chars = tmp_path / "new.txt"
    new_chars.write_text(corpus(7) + "XYZ")
    rc = main(["train", str(new_chars), "--resume", str(out), "--steps", "4", "--out", str(tmp_path / "ft2")])
    err = capsys.readouterr().err
    assert rc == 1 and "character 'X' (U+0058)" in err and "(3 such in all); pass --skip-unknown" in err
    assert main(["train", str(new_chars), "--resume", str(out), "--steps", "4", "--out", str(tmp_path / "ft2"),
                 "--skip-unknown"]) == 0
    assert "leaving out 3 characters" in capsys.readouterr().out


def test_text_is_found_relative_to_the_run_folder(tmp_path, capsys):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "tiny.txt").write_text(corpus(7))
    run = project / "runs" / "a"
    assert main(["train", str(project / "data" / "tiny.txt"), *SETTINGS, "--steps", "2", "--out", str(run)]) == 0
    text = history(run)[1]["text"]
    assert text["files"] == ["../../data/tiny.txt"] and text["bytes"] == [len(corpus(7))]
    moved = tmp_path / "elsewhere"
    project.rename(moved)  # the project moves as a whole: the run still finds its text
    assert main(["train", "--resume", str(moved / "runs" / "a"), "--steps", "3"]) == 0
    assert history(moved / "runs" / "a")[1]["step"] == 3

    (moved / "data" / "tiny.txt").rename(tmp_path / "tiny.txt")  # the text alone moves
    capsys.readouterr()
    rc = main(["train", "--resume", str(moved / "runs" / "a"), "--steps", "4"])
    err = capsys.readouterr().err
    assert rc == 1 and "tiny.txt (recorded in" in err and "is not there; if it moved, name it: unrolled train NEWPATH" in err
    assert main(["train", str(tmp_path / "tiny.txt"), "--resume", str(moved / "runs" / "a"), "--steps", "4"]) == 0
    assert "new text" not in capsys.readouterr().out  # the same text under another name: an exact resume


def _retext(run, tmp_path, **changes):
    """A copy of the run's checkpoint whose text record is changed (with a valid checksum: anyone can make one)."""
    from unrolled.train.checkpoint import save_checkpoint

    arrays, meta = load_checkpoint(run / "latest.npz")
    meta["text"] = {**meta["text"], **changes}
    (tmp_path / "hostile").mkdir(exist_ok=True)
    save_checkpoint(tmp_path / "hostile" / "latest.npz", arrays, meta)
    return tmp_path / "hostile"


def test_checkpoint_named_files_are_read_only_if_they_are_the_text(tmp_path, text_file, capsys):
    import zlib

    out = tmp_path / "run"
    assert main(["train", str(text_file), *SETTINGS, "--steps", "2", "--out", str(out)]) == 0
    secret = tmp_path / "secret.txt"
    secret.write_text("Q" * 40 + "\n")
    size, crc = secret.stat().st_size, zlib.crc32(secret.read_bytes())
    cases = [
        ({"files": [str(secret)]}, "(its size differs); name the training text: unrolled train FILE --resume"),
        ({"files": [str(secret)], "bytes": [size]}, "(their checksum differs); name the training text"),
        ({"files": ["/dev/zero"], "bytes": [0]}, "is not a regular file, so it is not read; name the training text"),
        ({"files": [str(secret)], "bytes": [size], "crc32": crc, "encoding": "rot13"}, "'rot13' is not a text encoding"),
        ({"files": ["-"]}, "was trained on standard input; pipe the same text again"),
        ({"files": 5}, "its field 'text.files' is 5, not a list of paths"),
        ({"bytes": "many"}, "its field 'text.bytes' is 'many', not a list of one file size per file"),
    ]
    for changes, needle in cases:
        capsys.readouterr()
        rc = main(["train", "--resume", str(_retext(out, tmp_path, **changes)), "--steps", "4"])
        err = capsys.readouterr().err
        assert rc == 1 and needle in err and len(err.splitlines()) == 1, (changes, err)
        assert "Q" not in err.replace(str(tmp_path), "")  # nothing of the file is quoted
    old = {k: v for k, v in history(out)[1]["text"].items() if k not in ("bytes", "crc32")}
    meta = load_checkpoint(out / "latest.npz")[1]
    arrays = load_checkpoint(out / "latest.npz")[0]
    meta["text"] = old
    from unrolled.train.checkpoint import save_checkpoint
    save_checkpoint(out / "latest.npz", arrays, meta)
    rc = main(["train", "--resume", str(out), "--steps", "4"])
    assert rc == 1 and "does not record its text's size and checksum" in capsys.readouterr().err
    assert main(["train", str(text_file), "--resume", str(out), "--steps", "4"]) == 0


def test_resume_from_a_model_only_checkpoint_is_refused(tmp_path, text_file, capsys):
    from unrolled.charlm.model import checkpoint_contents
    from unrolled.train.checkpoint import save_checkpoint

    out = tmp_path / "run"
    assert main(["train", str(text_file), *SETTINGS, "--steps", "1", "--out", str(out)]) == 0
    m = load_model(out)
    arrays, meta = checkpoint_contents(m.model, m.train, m.vocabulary, m.params)
    save_checkpoint(tmp_path / "model_only.npz", arrays, meta)
    capsys.readouterr()
    rc = main(["train", str(text_file), "--resume", str(tmp_path / "model_only.npz"), "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert rc == 1 and "not the training state" in err


def test_resume_into_another_folder_leaves_the_original(tmp_path, text_file, capsys):
    first, branch = tmp_path / "first", tmp_path / "branch"
    assert main(["train", str(text_file), *SETTINGS, "--steps", "3", "--out", str(first)]) == 0
    before = (first / "latest.npz").read_bytes()
    assert main(["train", "--resume", str(first / "latest.npz"), "--steps", "5", "--out", str(branch)]) == 0
    assert (first / "latest.npz").read_bytes() == before
    assert history(branch)[1]["step"] == 5
    capsys.readouterr()
    rc = main(["train", "--resume", str(branch), "--steps", "6", "--out", str(first)])
    assert rc == 1 and "already holds a run" in capsys.readouterr().err
