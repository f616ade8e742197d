"""Tiny models for the server tests (built locally, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

#: A GPT-Neo layout converted the way the embedded default is: the global layer GSA (kernel state), the local
#: layer exact (a window of 8 keys); small enough for fast tests.
GSA_CONFIG = {"backend": "kernel", "bank": {"n_splats": 8}, "initializer": "random",
              "adapter": {"name": "gpt-neo", "params": {"global_layers": "gsa", "local_layers": "exact"}}}


def build_gsa_chat_model(folder: Path, **kwargs: object) -> Path:
    """``tests/_chat_models.build_chat_model`` converted to GSA and saved as a GSA checkpoint with its tokenizer."""
    from _chat_models import build_chat_model
    from gsa_chat.models import load_chat_model

    from gsa_plugins.adapters import convert

    soft = build_chat_model(folder.with_name(folder.name + "-softmax"), **kwargs)  # type: ignore[arg-type]
    loaded = load_chat_model(soft)
    torch.manual_seed(0)
    convert(loaded.model, GSA_CONFIG)
    folder.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def sensitive_gpt_neo(seed: int = 0, *, vocab: int = 61, window: int = 4, positions: int = 256):
    """A random GPT-Neo whose attention matters (weights 10x the default scale): a mixed-up past changes its
    tokens, so batching tests can fail."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoConfig(vocab_size=vocab, max_position_embeddings=positions, hidden_size=32, num_layers=2,
                          num_heads=4, attention_types=[[["global", "local"], 1]], window_size=window,
                          initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPTNeoForCausalLM(config).eval()
