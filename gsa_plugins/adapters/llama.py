"""``llama``: Llama-architecture models (rotary embeddings, grouped-query attention) through
transformers' ``AttentionInterface``. The whole family adapter is this declaration; calibration uses
the capture points of the attached GSA layers (post-rotary queries and keys, key heads repeated)."""

from __future__ import annotations

from gsa_plugins.adapters.interface import InterfaceAdapter


class LlamaAdapter(InterfaceAdapter):
    """Llama architecture: causal self-attention, rotary embeddings, grouped-query heads."""

    name = "llama"
    model_types = ("llama",)
    attention_classes = ("LlamaAttention",)
