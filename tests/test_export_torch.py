"""PyTorch weights both ways: a model trained here runs in torch.nn, a torch.nn model runs here.

Out: ``unrolled export RUN -o w.safetensors`` loaded into ``nn.LSTM`` /
``nn.GRU`` / ``nn.RNN`` + ``nn.Linear`` (+ ``nn.Embedding``), exactly as the
README shows, gives the engine's logits to 1e-5. In: a torch model's state
dict becomes a checkpoint whose logits are torch's, and that ``sample`` and
``evaluate`` accept. Bad files get one line naming the tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from unrolled.charlm.model import INPUT_NAME, LOGITS_NAME, TARGET_NAME, load_model  # noqa: E402
from unrolled.cli import main  # noqa: E402
from unrolled.engines.reference import run as reference_run  # noqa: E402

TOL = 1e-5
TEXT = "the cat sat on a mat and the dog ran to the red barn\n" * 6
MODULES = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "elman": torch.nn.RNN}


def train(folder, cell: str, *extra: str):
    text = folder / "train.txt"
    text.write_text(TEXT)
    out = folder / f"run-{cell}"
    rc = main(["train", str(text), "--engine", "reference", "--cell", cell, "--hidden", "6", "--seq", "6",
               "--batch", "3", "--lr", "0.02", "--steps", "3", "--sample-every", "0", "--out", str(out), *extra])
    assert rc == 0
    return out


def torch_model(path):
    """The README's lines: the safetensors file into torch modules, and a function giving logits."""
    sd = load_file(path)
    with safe_open(path, "pt") as f:
        cfg = json.loads(f.metadata()["unrolled.model"])
    V, H, L, E = cfg["vocab_size"], cfg["hidden"], cfg["layers"], cfg["embedding"]
    rnn = MODULES[cfg["cell"]](E or V, H, num_layers=L)
    head = torch.nn.Linear(H, V)
    rnn.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("rnn.")})
    head.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("head.")})
    embed = None
    if E:
        embed = torch.nn.Embedding(V, E)
        embed.load_state_dict({"weight": sd["embedding.weight"]})

    def logits(x: np.ndarray) -> np.ndarray:  # x: [T, B] ids
        with torch.no_grad():
            xt = torch.tensor(x)
            inp = embed(xt) if embed is not None else torch.nn.functional.one_hot(xt, V).float()
            return head(rnn(inp)[0]).numpy()

    return logits


def our_logits(model, x: np.ndarray) -> np.ndarray:
    r = reference_run(model.graph, model.params, {INPUT_NAME: x, TARGET_NAME: x}, backward=False)
    return r.outputs[LOGITS_NAME]


@pytest.mark.parametrize("cell, extra", [("lstm", ["--layers", "2"]), ("gru", ["--layers", "2", "--embedding", "4"]),
                                         ("elman", ["--layers", "1"])])
def test_a_model_trained_here_runs_in_torch(tmp_path, cell, extra):
    run = train(tmp_path, cell, *extra)
    path = tmp_path / "w.safetensors"
    assert main(["export", str(run), "-o", str(path)]) == 0
    model = load_model(run)
    x = np.random.default_rng(0).integers(0, model.model.vocab_size, (9, 3))
    np.testing.assert_allclose(torch_model(str(path))(x), our_logits(model, x), rtol=TOL, atol=TOL)
    # and back: the same weights as a checkpoint give the same logits and the same score
    back = tmp_path / "back.npz"
    assert main(["export", str(path), "-o", str(back)]) == 0
    np.testing.assert_allclose(our_logits(load_model(back), x), our_logits(model, x), rtol=TOL, atol=TOL)


def test_the_lines_docs_export_md_shows_load_the_weights_into_torch(tmp_path, monkeypatch):
    """The page's Python block, run as written (``x`` given), gives the engine's logits."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    run = train(tmp_path, "gru", "--layers", "2")
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), "-o", "weights.safetensors"]) == 0
    model = load_model(run)
    x = np.random.default_rng(2).integers(0, model.model.vocab_size, (8, 2))
    scope = {"x": torch.tensor(x)}
    exec(block, scope)
    np.testing.assert_allclose(scope["logits"].detach().numpy(), our_logits(model, x), rtol=TOL, atol=TOL)


def torch_lm(cell: str, V: int, H: int, layers: int, E: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = {f"rnn.{k}": v for k, v in MODULES[cell](E or V, H, num_layers=layers).state_dict().items()}
    sd |= {f"head.{k}": v for k, v in torch.nn.Linear(H, V).state_dict().items()}
    if E:
        sd["embedding.weight"] = torch.nn.Embedding(V, E).weight.detach()
    with torch.no_grad():  # wider than torch's defaults, so that nothing is nearly linear
        return {k: v.uniform_(-0.8, 0.8) if k.startswith("rnn.") else v for k, v in sd.items()}


VOCAB = list(" abcdehmnorst\n")


@pytest.mark.parametrize("cell, layers, E", [("lstm", 2, 0), ("gru", 1, 5), ("elman", 2, 0)])
def test_a_torch_model_brought_here_gives_torch_logits(tmp_path, capsys, cell, layers, E):
    sd = torch_lm(cell, len(VOCAB), 7, layers, E, seed=layers)
    path = tmp_path / "theirs.safetensors"
    save_file(sd, str(path))  # a plain torch state dict: no metadata
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    ckpt = tmp_path / "ours.npz"
    assert main(["export", str(path), "-o", str(ckpt), "--vocabulary", str(tmp_path / "vocab.json")]) == 0
    model = load_model(ckpt)
    assert (model.model.cell, model.model.layers, model.model.hidden, model.model.embedding) == (cell, layers, 7, E)
    x = np.random.default_rng(1).integers(0, len(VOCAB), (11, 2))
    V = len(VOCAB)
    with torch.no_grad():
        rnn = MODULES[cell](E or V, 7, num_layers=layers)
        rnn.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("rnn.")})
        inp = sd["embedding.weight"][torch.tensor(x)] if E else torch.nn.functional.one_hot(torch.tensor(x), V).float()
        want = (rnn(inp)[0] @ sd["head.weight"].T + sd["head.bias"]).numpy()
    np.testing.assert_allclose(our_logits(model, x), want, rtol=TOL, atol=TOL)
    (tmp_path / "t.txt").write_text(TEXT)
    capsys.readouterr()
    assert main(["sample", str(ckpt), "--length", "20"]) == 0
    assert main(["evaluate", str(ckpt), str(tmp_path / "t.txt")]) == 0
    assert "bits/char" in capsys.readouterr().out


# ------------------------------------------------------------ bad input


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def foreign(tmp_path):
    """A torch LSTM language model as a state dict, with its vocabulary file."""
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    return torch_lm("lstm", len(VOCAB), 4, 2, 0, seed=0), tmp_path


def convert(capsys, sd, folder, *extra) -> str:
    save_file(sd, str(folder / "w.safetensors"))
    return one_line_error(capsys, ["export", str(folder / "w.safetensors"), "-o", str(folder / "m.npz"),
                                   "--vocabulary", str(folder / "vocab.json"), *extra])


def test_missing_tensor_is_named(foreign, capsys):
    sd, folder = foreign
    del sd["rnn.bias_hh_l1"]
    assert "tensor 'rnn.bias_hh_l1' is missing" in convert(capsys, sd, folder)
    assert not (folder / "m.npz").exists()


def test_misshapen_tensor_is_named(foreign, capsys):
    sd, folder = foreign
    sd["head.weight"] = sd["head.weight"][:, :3].contiguous()
    assert "tensor 'head.weight' is [14, 3] but a 2-layer lstm of hidden size 4" in convert(capsys, sd, folder)


def test_vocabulary_of_another_size_is_refused(foreign, capsys):
    sd, folder = foreign
    (folder / "vocab.json").write_text(json.dumps(VOCAB[:-1]))
    assert "tensor 'rnn.weight_ih_l0' is [16, 14] but" in convert(capsys, sd, folder)


def test_weights_of_another_cell_are_refused(foreign, capsys):
    sd, folder = foreign
    err = convert(capsys, sd, folder, "--cell", "gru")
    assert "holds lstm weights ('rnn.weight_hh_l0' is [16, 4]), not gru ones" in err


def test_unknown_tensor_is_named(foreign, capsys):
    sd, folder = foreign
    sd["decoder.extra"] = torch.zeros(3)
    assert "tensor 'decoder.extra' is not part of" in convert(capsys, sd, folder)


def test_missing_vocabulary_says_how_to_give_it(foreign, capsys):
    sd, folder = foreign
    save_file(sd, str(folder / "w.safetensors"))
    err = one_line_error(capsys, ["export", str(folder / "w.safetensors"), "-o", str(folder / "m.npz")])
    assert "carries no vocabulary: pass --vocabulary FILE" in err


def test_a_file_that_is_not_safetensors(tmp_path, capsys):
    (tmp_path / "w.safetensors").write_bytes(b"not a tensor file at all")
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    err = one_line_error(capsys, ["export", str(tmp_path / "w.safetensors"), "-o", str(tmp_path / "m.npz"),
                                  "--vocabulary", str(tmp_path / "vocab.json")])
    assert "is not a readable safetensors file" in err


def test_a_checkpoint_of_a_cell_torch_lacks(tmp_path, capsys):
    run = train(tmp_path, "jordan")
    err = one_line_error(capsys, ["export", str(run), "-o", str(tmp_path / "w.safetensors")])
    assert "is a jordan network, which PyTorch has no module for" in err
    assert not (tmp_path / "w.safetensors").exists()
