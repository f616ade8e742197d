"""``bert``: BERT-family models through transformers' ``AttentionInterface``.

Self-attention (bidirectional, or causal in a decoder) and cross-attention (``add_cross_attention``:
queries from the decoder, keys/values from the encoder, padding on both sides) each get a splat bank.
BERT scales logits by ``1/sqrt(d)``; GSA sees ``q, k * d^-1/4`` (``gsa_core.calibration.to_gsa_space``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from gsa_plugins.adapters.base import only_converted
from gsa_plugins.adapters.interface import InterfaceAdapter

if TYPE_CHECKING:
    from gsa_calibrate.collect import AttentionLayer


class BertAdapter(InterfaceAdapter):
    """BERT: self- and cross-attention (BertModel, BertForMaskedLM, BertLMHeadModel decoders, ...)."""

    name = "bert"
    model_types = ("bert",)
    attention_classes = ("BertSelfAttention",)
    cross_attention_classes = ("BertCrossAttention",)

    def attention_layers(self, model: nn.Module) -> list[AttentionLayer]:
        """The self-attention layers, from ``gsa_calibrate.collect.bert_attention_layers`` (query/key/value
        Linear modules; before conversion all of them, after it those with a splat bank). Cross-attention
        layers are left out: their keys come from another sequence, which that collector does not feed."""
        from gsa_calibrate.collect import bert_attention_layers

        cross = {s.name for s in self.sites(model) if s.kind == "cross"}
        return only_converted(model, [layer for layer in bert_attention_layers(model) if layer.name not in cross])
