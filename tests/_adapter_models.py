"""Tiny Hugging Face models and inputs for the adapter tests (built locally, nothing downloaded)."""

from __future__ import annotations

import torch

SMALL_BANK = {"bank": {"n_splats": 8}}


def gsa_config(adapter: str, backend: str = "auto", **params: object) -> dict:
    return {**SMALL_BANK, "backend": backend, "adapter": {"name": adapter, "params": params}}


def tiny_gpt_neo(seed: int = 0, **overrides: object):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=101, max_position_embeddings=64, hidden_size=32, num_layers=2, num_heads=4,
                  attention_types=[[["global", "local"], 1]], window_size=4, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    kwargs.update(overrides)
    return GPTNeoForCausalLM(GPTNeoConfig(**kwargs)).eval()


def tiny_bert(seed: int = 0, attn: str = "sdpa", **overrides: object):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, attn_implementation=attn)
    kwargs.update(overrides)
    return BertModel(BertConfig(**kwargs), add_pooling_layer=False).eval()


def tiny_bert_decoder(seed: int = 0, attn: str = "sdpa"):
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
                        attn_implementation=attn, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return BertLMHeadModel(config).eval()


def tiny_llama(seed: int = 0, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         attn_implementation=attn, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def batch(n: int = 10, batch_size: int = 2, seed: int = 1, left_pad: int = 3, vocab: int = 101):
    """``input_ids [B, n]`` and an ``attention_mask`` whose first row is left-padded by ``left_pad``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, n), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        ids[0, :left_pad] = 0
        mask[0, :left_pad] = 0
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch (as ``generate`` computes them)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def logits(model, ids, mask, **kwargs):
    out = model(input_ids=ids, attention_mask=mask, **kwargs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def greedy(model, ids, mask, n: int = 6):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, min_new_tokens=n)
