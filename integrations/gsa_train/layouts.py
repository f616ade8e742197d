"""Named GPT-Neo shapes, as ``GPTNeoConfig`` factories.

Why named layouts: the benchmark, the chat default and the tests must agree on a model shape by a
word, and the reference must be recognisably the TinyStories-33M layout (alternating global/local
attention, GPT-Neo's block) scaled down to what trains in minutes on a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gsa_core.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """A GPT-Neo shape; ``vocab_size`` is the default when no tokenizer fixes it."""

    hidden_size: int
    num_layers: int
    num_heads: int
    window_size: int
    max_position_embeddings: int
    vocab_size: int
    description: str
    intermediate_size: int | None = None  # None: 4 * hidden_size (GPT-Neo's default)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


LAYOUTS: dict[str, Layout] = {
    "tinystories-33m": Layout(768, 4, 16, 256, 2048, 50257,
                              "the real TinyStories-33M shape (reference only; too big to train on a CPU here)"),
    "reference": Layout(256, 4, 8, 64, 512, 4096,
                        "TinyStories-33M scaled to train in minutes on a CPU: global/local alternating, window 64"),
    "tiny": Layout(128, 2, 4, 32, 256, 2048, "the default chat model and tests: one global and one local layer"),
    "micro": Layout(32, 2, 4, 8, 64, 300, "seconds-long tests only"),
}


def layout(name: str) -> Layout:
    """The layout called ``name``; an unknown name is an error listing the names."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ConfigError(f"unknown layout {name!r}; available layouts: {', '.join(LAYOUTS)}") from None


def gpt_neo_config(name: str, *, vocab_size: int | None = None, pad_token_id: int = 0, bos_token_id: int = 1,
                   eos_token_id: int = 1, **overrides: Any) -> Any:
    """A ``GPTNeoConfig`` for layout ``name`` (eager attention, which the GSA adapter wraps; no dropout).

    ``vocab_size`` (default: the layout's) and the special token ids come from the trained tokenizer
    (:mod:`gsa_train.tokenizer`: pad 0, bos = eos 1). ``overrides`` go to ``GPTNeoConfig`` as given.
    """
    from transformers import GPTNeoConfig

    lay = layout(name)
    if lay.num_layers % 2:
        raise ConfigError(f"layout {name!r}: GPT-Neo alternates global/local, num_layers must be even")
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size or lay.vocab_size, hidden_size=lay.hidden_size, num_layers=lay.num_layers,
        num_heads=lay.num_heads, attention_types=[[["global", "local"], lay.num_layers // 2]],
        window_size=lay.window_size, max_position_embeddings=lay.max_position_embeddings,
        intermediate_size=lay.intermediate_size, embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
    kwargs.update(overrides)
    config = GPTNeoConfig(**kwargs)
    config._attn_implementation = "eager"
    return config


def describe(name: str) -> dict[str, Any]:
    """The layout's fields as a dict (for ``train.json`` and benchmark records)."""
    return {"name": name, **asdict(layout(name))}


__all__ = ["LAYOUTS", "Layout", "describe", "gpt_neo_config", "layout"]
