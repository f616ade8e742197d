"""Example GSA plugin: an adapter that converts GPT-2 models to Gaussian Splat Attention."""

from gsa_example_adapter.adapter import GPT2Adapter

__all__ = ["GPT2Adapter"]
