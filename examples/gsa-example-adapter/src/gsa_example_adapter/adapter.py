"""A GSA model adapter for GPT-2: the whole family support is this declaration.

GPT-2 calls its attention through transformers' ``AttentionInterface``, so the shared
``InterfaceAdapter`` does the work: it registers the ``gsa`` attention function, attaches a splat bank
to every ``GPT2Attention`` module (self-attention, and cross-attention when the model has it) and keeps
passthrough bit-exact by calling GPT-2's own attention function. Like every module a GSA plugin
registers, it does not import ``transformers`` at import time.
"""

from gsa_plugins.adapters.base import ModelMismatchError
from gsa_plugins.adapters.interface import InterfaceAdapter


class GPT2Adapter(InterfaceAdapter):
    """GPT-2: one splat bank per GPT2Attention module (self- and cross-attention)."""

    name = "gpt2"
    model_types = ("gpt2",)
    attention_classes = ("GPT2Attention",)  # is_cross_attention=True instances are cross-attention

    def resolve(self, model, params):
        params = super().resolve(model, params)
        if getattr(model.config, "reorder_and_upcast_attn", False) and params.attn_implementation == "eager":
            # GPT-2 then bypasses the attention interface with its own upcast path: not wrapped here.
            raise ModelMismatchError("GPT-2 with reorder_and_upcast_attn=True and eager attention is not supported")
        return params
