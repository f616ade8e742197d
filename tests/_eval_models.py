"""Tiny saved models (softmax, GSA, GSA with a recall cache) and a passkey tokenizer, for the eval tests."""

from __future__ import annotations

from pathlib import Path

import torch

RECALL = {"name": "self-recall", "params": {"budget": 4, "block": 8}}


def passkey_tokenizer():
    from gsa_eval.passkey_corpus import draft_texts
    from gsa_train.tokenizer import train_tokenizer

    return train_tokenizer(draft_texts(60, 64, 2, 0), vocab_size=300, min_frequency=1, model_max_length=1 << 20)


def build_models(root: Path, positions: int = 256) -> dict[str, Path]:
    """``{softmax, gsa, recall}`` folders, each a random tiny GPT-Neo (the same weights) with the tokenizer."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from gsa_plugins.adapters import convert

    tokenizer = passkey_tokenizer()
    folders = {}
    for name in ("softmax", "gsa", "recall"):
        torch.manual_seed(0)
        config = GPTNeoConfig(vocab_size=len(tokenizer), max_position_embeddings=positions, hidden_size=32,
                              num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
        model = GPTNeoForCausalLM(config).eval()
        if name != "softmax":
            gsa = {"backend": "kernel", "bank": {"n_splats": 4}, "adapter": {"name": "gpt-neo"}}
            convert(model, {**gsa, "recall": RECALL} if name == "recall" else gsa)
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders
