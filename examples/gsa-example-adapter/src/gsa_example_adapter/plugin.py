"""The entry point's target: registers the adapter by name."""

from gsa_core import hookimpl
from gsa_example_adapter.adapter import GPT2Adapter


@hookimpl
def gsa_register(registry):
    registry.register("adapter", "gpt2", GPT2Adapter, GPT2Adapter.params_model)
