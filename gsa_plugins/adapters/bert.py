"""``bert``: BERT-family models through transformers' ``AttentionInterface``.

Self-attention (bidirectional, or causal in a decoder) and cross-attention (``add_cross_attention``:
queries from the decoder, keys/values from the encoder, padding on both sides) each get a splat bank.
BERT scales logits by ``1/sqrt(d)``; GSA sees ``q, k * d^-1/4`` (``gsa_core.calibration.to_gsa_space``).
"""

from __future__ import annotations

from torch import nn

from gsa_core.calibration import AttentionLayer
from gsa_plugins.adapters.base import only_converted
from gsa_plugins.adapters.interface import InterfaceAdapter


def bert_attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The self-attention layers of a BERT-family model (``query``/``key``/``value`` Linear modules).

    Names are the modules' paths (``encoder.layer.0.attention.self``), in model order.
    """
    layers = []
    for name, module in model.named_modules():
        parts = [getattr(module, a, None) for a in ("query", "key", "value")]
        if not all(isinstance(p, nn.Linear) for p in parts):
            continue
        n_heads = getattr(module, "num_attention_heads", None)
        head_dim = getattr(module, "attention_head_size", None)
        if not isinstance(n_heads, int) or not isinstance(head_dim, int):
            continue
        scaling = float(getattr(module, "scaling", head_dim**-0.5))
        layers.append(AttentionLayer(name=name, query=module.query, key=module.key, value=module.value,
                                     n_heads=n_heads, head_dim=head_dim, scaling=scaling, attention=module))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BERT-style self-attention modules (query/key/value Linear "
                         "with num_attention_heads and attention_head_size)")
    return layers


class BertAdapter(InterfaceAdapter):
    """BERT: self- and cross-attention (BertModel, BertForMaskedLM, BertLMHeadModel decoders, ...)."""

    name = "bert"
    model_types = ("bert",)
    attention_classes = ("BertSelfAttention",)
    cross_attention_classes = ("BertCrossAttention",)

    def attention_layers(self, model: nn.Module) -> list[AttentionLayer]:
        """The self-attention layers, from :func:`bert_attention_layers` (query/key/value
        Linear modules; before conversion all of them, after it those with a splat bank). Cross-attention
        layers are left out: their keys come from another sequence, which that collector does not feed."""
        cross = {s.name for s in self.sites(model) if s.kind == "cross"}
        return only_converted(model, [layer for layer in bert_attention_layers(model) if layer.name not in cross])
