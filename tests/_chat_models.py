"""A tiny causal LM + tokenizer saved to a folder, for the chat tests (built locally, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = """Once upon a time there was a little cat. The cat liked to play in the sun.
def add(a, b):
    return a + b
Return the sum of two numbers. The function raises an error when the input is bad.
A story about a dog and a ball. The dog ran to the park and found a red ball.
""" * 20


def build_chat_model(folder: Path, *, endless: bool = False, seed: int = 0, hidden: int = 32,
                     chat_template: str | None = None) -> Path:
    """Save a tiny random GPT-Neo and a locally trained byte-level BPE tokenizer to ``folder``.

    The model only ever predicts tokens that decode to printable ASCII (readable transcripts in a terminal);
    ``endless``: it never predicts ``eos`` either (a long reply to interrupt with Ctrl+C).
    """
    from gsa_train.tokenizer import train_tokenizer
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    tokenizer = train_tokenizer([TEXT], vocab_size=300, min_frequency=1)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    config = GPTNeoConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, hidden_size=hidden, num_layers=2,
                          num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    model = GPTNeoForCausalLM(config).eval()
    banned = [i for i in range(len(tokenizer)) if not _printable(tokenizer.decode([i]))]
    if endless:
        banned.append(tokenizer.eos_token_id)
    with torch.no_grad():  # a constant feature of the final hidden state, read as a large negative logit
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias[0] = 10.0
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[banned, 0] = -10.0
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _printable(text: str) -> bool:
    return bool(text) and all(c == "\n" or 32 <= ord(c) < 127 for c in text)
