"""The character model taken elsewhere: to ONNX (with its vocabulary), to PyTorch's
state-dict layout and back into a checkpoint, and scored through ONNX Runtime.

The PyTorch side of a model with ``layers`` cells of ``hidden`` units over a
vocabulary of ``V`` characters (input one-hot, or an embedding of size ``E``)::

    embedding = nn.Embedding(V, E)                       # "embedding.weight", only when E > 0
    rnn = nn.LSTM(E or V, hidden, num_layers=layers)     # "rnn.*"; nn.GRU / nn.RNN for gru / elman
    head = nn.Linear(hidden, V)                          # "head.weight", "head.bias"
    logits = head(rnn(embedding(x) or one_hot(x, V).float())[0])     # x: [T, B] ids, time-major

The settings and the vocabulary travel in the safetensors metadata
(``unrolled.model``, ``unrolled.vocabulary``), and in the ONNX model's
``metadata_props``, so that each file is the whole model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from unrolled.charlm import model as cm
from unrolled.graph.ops import log_softmax
from unrolled.train.checkpoint import save_checkpoint

from .torch_weights import (
    GATES_BY_COUNT,
    TORCH_MODULES,
    cell_from_torch,
    cell_to_torch,
    check_tensors,
    expected_cell_shapes,
    json_metadata,
    load_safetensors,
    save_safetensors,
)

META_MODEL, META_TRAIN, META_VOCAB, META_KIND = "unrolled.model", "unrolled.train", "unrolled.vocabulary", "unrolled.kind"
RNN, EMBED, HEAD_W, HEAD_B = "rnn.", "embedding.weight", "head.weight", "head.bias"


def _metadata(m: cm.LoadedModel) -> dict[str, str]:
    return {META_KIND: cm.CHECKPOINT_KIND, META_MODEL: json.dumps(dataclasses.asdict(m.model)),
            META_TRAIN: json.dumps(dataclasses.asdict(m.train)), META_VOCAB: json.dumps(m.vocabulary)}


# ------------------------------------------------------------------- ONNX


def export_charmodel_onnx(m: cm.LoadedModel, path):
    """The model as ONNX: input ``x`` [T, B] int64, output ``logits`` [T, B, V], states carried."""
    from .onnx import export_onnx

    return export_onnx(m.graph, m.params, path, metadata=_metadata(m))


def score_text_onnx(path, text: str, *, seq: int | None = None, batch: int | None = None) -> cm.Score:
    """``charmodel.score_text`` through ONNX Runtime: the same chunks, states and unknown-character rule."""
    from .onnx import OnnxRunner

    runner = OnnxRunner(path)
    if runner.metadata.get(META_KIND) != cm.CHECKPOINT_KIND or META_VOCAB not in runner.metadata:
        raise ValueError(f"{path} is not a language model exported by 'unrolled export' (its metadata has no "
                         f"vocabulary); export the checkpoint again with 'unrolled export CKPT -o {Path(path).name}'")
    vocabulary = json.loads(runner.metadata[META_VOCAB])
    train = json.loads(runner.metadata.get(META_TRAIN, "{}"))

    def run_chunk(x, y, mask, state):
        outputs, finals = runner.run({cm.INPUT_NAME: x}, state)
        with np.errstate(under="ignore"):
            logp = log_softmax(outputs[cm.LOGITS_NAME])  # [T, B, V]
        picked = np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]  # [T, B]
        return -float((picked * mask.astype(picked.dtype)).sum(dtype=np.float64)), finals

    seq = seq or train.get("seq") or cm.TrainConfig.seq
    batch = batch or train.get("batch") or cm.TrainConfig.batch
    return cm.score_chunks(vocabulary, text, seq, batch, run_chunk)


# ---------------------------------------------------------------- PyTorch


def state_dict(m: cm.LoadedModel) -> dict[str, np.ndarray]:
    """The model's weights under PyTorch's names and layouts (see the module docstring)."""
    c = m.model
    out = {EMBED: m.params["embed"]} if c.embedding else {}
    out.update(cell_to_torch(c.cell, m.params, c.layers, hidden=c.hidden, prefix=RNN, where=str(m.path)))
    out[HEAD_W], out[HEAD_B] = m.params["out.W"], m.params["out.b"]
    return out


def export_torch(m: cm.LoadedModel, path) -> dict[str, np.ndarray]:
    """Write :func:`state_dict` with the settings and vocabulary to a safetensors file."""
    tensors = state_dict(m)
    save_safetensors(path, tensors, _metadata(m))
    return tensors


def model_from_state_dict(tensors: dict[str, np.ndarray], vocabulary: list[str], *, cell: str | None = None,
                          where: str = "the state dict") -> tuple[cm.ModelConfig, dict[str, np.ndarray]]:
    """Our ``(ModelConfig, params)`` from a PyTorch state dict laid out as in the module docstring.

    The cell, hidden size, layers and embedding are read from the tensors'
    shapes; ``cell``, when given, must agree with them.
    """
    hh = tensors.get(f"{RNN}weight_hh_l0")
    if hh is None or hh.ndim != 2:
        raise ValueError(f"{where}: tensor '{RNN}weight_hh_l0' is missing or not a matrix; "
                         f"a recurrent layer saved from {', '.join(TORCH_MODULES.values())} has it")
    H = hh.shape[1]
    found = GATES_BY_COUNT.get(hh.shape[0] // H) if hh.shape[0] % H == 0 else None
    if found is None:
        raise ValueError(f"{where}: tensor '{RNN}weight_hh_l0' is {list(hh.shape)}, which is no nn.RNN, nn.GRU "
                         f"or nn.LSTM layer (rows must be 1, 3 or 4 times the hidden size)")
    if cell is not None and cell != found:
        raise ValueError(f"{where} holds {found} weights ('{RNN}weight_hh_l0' is {list(hh.shape)}), "
                         f"not {cell} ones; use --cell {found}, or the weights of a {cell} model")
    layers = 0
    while f"{RNN}weight_hh_l{layers}" in tensors:
        layers += 1
    V = len(vocabulary)
    E = tensors[EMBED].shape[1] if EMBED in tensors and tensors[EMBED].ndim == 2 else 0
    expected = ({EMBED: (V, E)} if E else {}) | expected_cell_shapes(found, layers, E or V, H, RNN)
    expected |= {HEAD_W: (V, H), HEAD_B: (V,)}
    check_tensors(tensors, expected, where, f"a {layers}-layer {found} of hidden size {H} over {V} characters")
    dtype = "float64" if all(a.dtype == np.float64 for a in tensors.values()) else "float32"
    config = cm.ModelConfig(cell=found, hidden=H, layers=layers, vocab_size=V, embedding=E, dtype=dtype).check()
    params = cell_from_torch(found, tensors, layers, prefix=RNN)
    params["out.W"], params["out.b"] = tensors[HEAD_W], tensors[HEAD_B]
    if E:
        params["embed"] = tensors[EMBED]
    return config, {k: np.ascontiguousarray(v, dtype=dtype) for k, v in params.items()}


def checkpoint_from_torch(source, out, *, vocabulary: list[str] | None = None, cell: str | None = None) -> cm.LoadedModel:
    """Turn a safetensors state dict into a checkpoint that ``sample`` and ``evaluate`` accept.

    The vocabulary comes from ``vocabulary`` or else the file's metadata
    (``unrolled.vocabulary``, written by :func:`export_torch`); the training
    settings (evaluate's default chunking) from the metadata, else defaults.
    """
    tensors, metadata = load_safetensors(source)
    if vocabulary is None:
        vocabulary = json_metadata(metadata, META_VOCAB, str(source))
    if vocabulary is None:
        raise ValueError(f"{source} carries no vocabulary: pass --vocabulary FILE, a JSON list of the characters "
                         f"in id order")
    cm.Vocabulary.from_list(vocabulary)  # one sentence for a malformed list
    config, params = model_from_state_dict(tensors, vocabulary, cell=cell, where=str(source))
    saved = json_metadata(metadata, META_TRAIN, str(source))  # our own export: evaluate reads the same chunks
    train = cm.config_from_dict(cm.TrainConfig, saved, f"{source}: training config") if saved else cm.TrainConfig()
    arrays, meta = cm.checkpoint_contents(config, train, vocabulary, params, imported_from=str(source))
    save_checkpoint(out, arrays, meta)
    return cm.load_model(out)


def read_vocabulary(path) -> list[str]:
    """A vocabulary file: a JSON list of single characters, in id order."""
    try:
        chars = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e.msg}, line {e.lineno}); a vocabulary file is a JSON list of "
                         f"characters, e.g. [\"\\n\", \" \", \"a\"]") from None
    cm.Vocabulary.from_list(chars)
    return chars
