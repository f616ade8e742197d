"""The models an evaluation compares: ``LABEL=PATH`` arguments, loaded, extended, and run in linear memory.

Why one streaming loop: a long input goes through the model in pieces of ``chunk`` tokens through its
generation cache (``gsa_generate``'s recurrent cache for a converted model: a state, windows and recall
caches of fixed size; transformers' ``DynamicCache`` for a softmax model, which keeps every key), and
each piece's logits are used and dropped at once. So a GSA model's memory does not grow with the length,
and the evaluations never hold ``n x vocab`` logits or an ``n x n`` mask.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gsa_core.errors import ConfigError

#: Tokens per piece of a long input (the scores of one piece are ``chunk x window`` for local layers).
DEFAULT_CHUNK = 512


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: its label in the results and its folder (``gsa train`` / ``gsa convert`` output)."""

    label: str
    path: Path


def model_spec(text: str) -> ModelSpec:
    """``LABEL=PATH`` or ``PATH`` (labelled by its folder name): an argparse type."""
    label, sep, path = text.partition("=")
    if not sep:
        label, path = Path(text).name or text, text
    if not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH or PATH, got {text!r}")
    return ModelSpec(label, Path(path))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluations' positional ``MODEL ...`` (``LABEL=PATH`` or ``PATH``)."""
    parser.add_argument("models", nargs="*", type=model_spec, metavar="MODEL",
                        help="LABEL=PATH or PATH: folders saved by gsa train or gsa convert")


def check_specs(specs: list[ModelSpec], *, max_tokens: int, positions: str | None) -> None:
    """Distinct labels, loadable folders, and positions for ``max_tokens`` (a table that is too short needs a
    registered ``positions`` strategy): checked before any model is loaded."""
    from gsa_core.positions import registered_strategies
    from gsa_core.registry import get_registry
    from gsa_plugins.adapters.hf import read_checkpoint_config

    labels = [s.label for s in specs]
    twice = sorted({lab for lab in labels if labels.count(lab) > 1})
    if twice:
        raise ConfigError(f"model labels must differ; {', '.join(twice)} given twice (use LABEL=PATH)")
    if positions is not None:
        get_registry().get("positions", positions)  # an unknown name: one error with a did-you-mean
    for spec in specs:
        rows = read_checkpoint_config(spec.path).get("max_position_embeddings")
        if positions is None and isinstance(rows, int) and rows < max_tokens:
            raise ConfigError(f"model {spec.label!r} has {rows} learned positions, and the longest input needs "
                              f"{max_tokens:,}: pass --positions NAME to extend its table for the evaluation "
                              f"(NAME: {', '.join(n for n in registered_strategies() if n != 'none')})")


@dataclass
class LoadedModel:
    """A model ready to evaluate, its tokenizer, and what the report records about it."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    info: dict[str, Any]


def attention_kind(model: Any) -> str:
    """``softmax``, or the GSA layers' decode kinds (``state``, ``hybrid``, ``recall``; window layers aside)."""
    from gsa_generate.cache import decode_plans

    plans = decode_plans(model)
    if plans is None:
        return "softmax"
    kinds = sorted({p.kind for p in plans if p.gsa is not None and p.kind != "window"})
    return "+".join(kinds) or "softmax"


def load_model(spec: ModelSpec, *, max_tokens: int, positions: str | None,
               recall: dict[str, Any] | None = None) -> LoadedModel:
    """Load ``spec`` (eval mode), extend its position table to ``max_tokens`` with strategy ``positions`` when it
    is shorter (None: leave it, and inputs past it are refused with the strategies named), and give its GSA
    layers the recall cache ``recall`` when given (``gsa_plugins.adapters.recall_switch.set_recall``)."""
    from gsa_train.loop import load_trained

    from gsa_plugins.adapters.hf import load_tokenizer
    from gsa_plugins.adapters.positions import extend_positions, extension_note, position_limit
    from gsa_plugins.adapters.recall_switch import set_recall

    model = load_trained(spec.path).eval()
    tokenizer = load_tokenizer(spec.path)
    trained = position_limit(model)
    if positions is not None and trained is not None and trained < max_tokens:
        extend_positions(model, max_tokens, positions)
    if recall is not None:
        set_recall(model, recall)
    gsa = getattr(model.config, "gsa", None)
    info = {
        "label": spec.label, "path": str(spec.path), "attention": attention_kind(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "positions": position_limit(model), "trained_positions": trained, "extension": extension_note(model),
        "recall": gsa.get("recall") if isinstance(gsa, dict) else None,
    }
    return LoadedModel(spec, model, tokenizer, info)


def new_cache(model: Any) -> Any:
    """The model's generation cache: the recurrent GSA cache when it has one, else transformers' ``DynamicCache``."""
    from gsa_generate import recurrent_cache, supports_recurrent_cache
    from transformers import DynamicCache

    return recurrent_cache(model) if supports_recurrent_cache(model) else DynamicCache(config=model.config)


def cache_bytes(cache: Any) -> int:
    """What a cache holds, in bytes (the recurrent cache counts itself; ``DynamicCache``: its key/value tensors)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def stream(model: Any, ids: Tensor, cache: Any, *, chunk: int = DEFAULT_CHUNK) -> Iterator[tuple[int, Tensor]]:
    """Feed ``ids [1, n]`` through ``model`` in pieces of ``chunk`` tokens continuing ``cache``; yields
    ``(start, logits [1, piece, vocab])`` per piece."""
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start:start + chunk]
        yield start, model(input_ids=piece, cache=cache, use_cache=True).logits


@torch.no_grad()
def greedy(model: Any, prompt: list[int], new_tokens: int, *, chunk: int = DEFAULT_CHUNK) -> tuple[list[int], Any]:
    """Greedy continuation of ``prompt`` by ``new_tokens`` tokens (the prompt prefilled in pieces); returns the
    new ids and the cache after them."""
    cache = new_cache(model)
    last: Tensor | None = None
    for _, logits in stream(model, torch.tensor([prompt], dtype=torch.long), cache, chunk=chunk):
        last = logits[:, -1]
    out: list[int] = []
    for i in range(new_tokens):
        assert last is not None
        out.append(int(last.argmax(-1)))
        if i + 1 < new_tokens:
            last = model(input_ids=torch.tensor([out[-1:]]), cache=cache, use_cache=True).logits[:, -1]
    return out, cache


#: ``generate(prompt_ids, new_tokens) -> new ids``: what the passkey scorer calls (tests pass stand-ins).
Generate = Callable[[list[int], int], list[int]]

__all__ = [
    "DEFAULT_CHUNK", "Generate", "LoadedModel", "ModelSpec", "add_model_arguments", "attention_kind", "cache_bytes",
    "check_specs", "greedy", "load_model", "model_spec", "new_cache", "stream",
]
