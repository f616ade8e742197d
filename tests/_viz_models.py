"""Tiny saved GSA models and a run folder for the visualisation tests (built locally, seconds)."""

from __future__ import annotations

from pathlib import Path

import torch

#: GSA in both layers of a two-layer GPT-Neo (global + local, window 8), 6 slots per head.
GSA = {"backend": "dense", "bank": {"n_splats": 6}, "initializer": {"name": "kmeans"},
       "adapter": {"name": "gpt-neo", "params": {"global_layers": "gsa", "local_layers": "gsa"}}}
#: Dead slots written into the saved banks: ``{layer index: [(head, slot), ...]}``.
DEAD = {0: [(0, 5), (1, 4), (1, 5)], 1: [(2, 0)]}
SENTENCES = [
    "The parser reads the next token from the buffer and returns it.",
    "Each handler writes a byte string to the file object before the call ends.",
    "A reader decodes the value when the input is empty, or raises an error.",
    "The queue opens a new list for every line and closes it as a tuple.",
]
TEXT = " ".join(SENTENCES * 3)


def tokenizer():
    from gsa_train.tokenizer import train_tokenizer

    return train_tokenizer(SENTENCES * 20, vocab_size=300, min_frequency=1, model_max_length=256)


def build(root: Path, *, heads: int = 4) -> dict[str, Path]:
    """``{gsa, softmax}`` model folders (the same random weights; GSA banks fitted to the model's own q/k)."""
    from gsa_calibrate.collect import collect_qk
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from gsa_core.calibration import calibrate_banks
    from gsa_plugins.adapters import attention_layers, banks, convert

    tok = tokenizer()
    folders = {}
    for name in ("softmax", "gsa"):
        torch.manual_seed(0)
        config = GPTNeoConfig(vocab_size=len(tok), max_position_embeddings=256, hidden_size=8 * heads, num_layers=2,
                              num_heads=heads, attention_types=[[["global", "local"], 1]], window_size=8,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
        model = GPTNeoForCausalLM(config).eval()
        if name == "gsa":
            convert(model, GSA)
            enc = tok([TEXT], return_tensors="pt", truncation=True, max_length=256)
            vectors = collect_qk(model, attention_layers(model), [dict(enc)])
            calibrate_banks(banks(model), vectors, ("kmeans", {}), seed=0)
            for i, bank in enumerate(banks(model).values()):
                for h, s in DEAD.get(i, []):
                    if h < heads:
                        bank.alive[h, s] = False
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    return folders


_BUILT: dict[int | str, dict[str, Path]] = {}


def models(tmp_path_factory, *, heads: int = 4) -> dict[str, Path]:
    """:func:`build` once per test process (the viz test files share the folders)."""
    if heads not in _BUILT:
        _BUILT[heads] = build(tmp_path_factory.mktemp(f"viz_models_{heads}"), heads=heads)
    return _BUILT[heads]


def distilled(tmp_path_factory) -> Path:
    """A ``gsa distill`` run folder (tiny BERT, both stages adapting; ``distill.json`` and ``model/``), built once
    per test process."""
    if "distilled" not in _BUILT:
        from _distill_models import settings, tiny_bert_folder
        from gsa_distill import distill

        src = tiny_bert_folder(tmp_path_factory.mktemp("bert"))
        out = tmp_path_factory.mktemp("runs") / "distilled"
        gsa = {"bank": {"n_splats": 4}, "backend": "auto",
               "adaptation": {"enabled": True, "window": 2,
                              "scheduler": {"name": "interval", "params": {"start": 1, "every": 2}},
                              "death": {"name": "low-mass", "params": {"relative_threshold": 0.9}}, "birth": "clone"}}
        distill(settings(src, out, stage2="lora", stage2_steps=2, log_every=1, gsa=gsa), log=lambda m: None)
        _BUILT["distilled"] = {"run": out}
    return _BUILT["distilled"]["run"]


def read_png(path: Path):
    """``(height, width, channels)`` float array of a PNG (decoded by matplotlib's reader, Pillow underneath)."""
    import matplotlib.image

    return matplotlib.image.imread(path)


def one_error_line(capsys) -> str:
    """The single stderr line of a failed command (asserting there is exactly one, and no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]
