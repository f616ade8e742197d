"""What every model picture starts from: a GSA model folder, the layer and heads asked for, real text, and each
GSA layer's own inputs on that text.

Why the teacher tap: a converted model run in *passthrough* computes its original softmax attention, and each
GSA layer's ``teacher`` tap receives the host's ``q, k, v``, mask and exact output (the seam distillation trains
on). One forward therefore gives, per layer, the inputs both attentions see; GSA's own attention is then the
layer's own ``attend`` on them, so the pictures show what the model computes, not a re-derivation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gsa_core.calibration import to_gsa_space
from gsa_core.errors import ConfigError
from gsa_core.masks import MaskSpec

#: Tokens read from the text by default (the q/k clouds and the coverage statistics).
DEFAULT_TOKENS = 512
MAX_TOKENS = 8192


@dataclass
class VizModel:
    """A loaded GSA model: ``layers`` maps the model's layer index to ``(name, GSALayer)``, in order."""

    path: Path
    model: Any
    tokenizer: Any
    layers: dict[int, tuple[str, Any]]

    def choices(self) -> str:
        """The GSA layers, for messages: ``0 (transformer.h.0.attn.attention), 2 (...)``."""
        return ", ".join(f"{i} ({name})" for i, (name, _) in self.layers.items())


def load_gsa_model(path: str | Path) -> VizModel:
    """Load a GSA model folder (``gsa train --attention gsa``, ``gsa convert`` or ``gsa distill``'s ``model/``);
    a folder that is not one is a :class:`ConfigError` saying what it is."""
    from transformers.utils import logging as hf_logging

    from gsa_plugins.adapters import gsa_layers, load_converted
    from gsa_plugins.adapters.hf import is_gsa_checkpoint, load_tokenizer, read_checkpoint_config

    hf_logging.disable_progress_bar()  # the "Loading weights" bar is not part of a picture command's output
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file() and (folder / "model" / "config.json").is_file():
        raise ConfigError(f"{folder} is a run folder; its model is {folder / 'model'}: give that")
    config = read_checkpoint_config(folder)
    if not is_gsa_checkpoint(config):
        kind = config.get("model_type", "unknown")
        raise ConfigError(f"{folder} is not a GSA model (its config.json is a plain {kind!r} model with no 'gsa' "
                          "section): give a folder written by gsa convert, gsa distill (its model/) or "
                          "gsa train --attention gsa")
    model = load_converted(folder).eval()
    tokenizer = load_tokenizer(folder)
    found = list(gsa_layers(model).items())
    layers = {int(layer.layer if layer.layer is not None else i): (name, layer) for i, (name, layer) in
              enumerate(found)}
    if not layers:
        raise ConfigError(f"{folder} has a GSA config but no GSA layer (every layer was left exact)")
    return VizModel(folder, model, tokenizer, dict(sorted(layers.items())))


def pick_layers(viz: VizModel, layer: int | str | None) -> list[int]:
    """``None``: the first GSA layer; ``"all"``: every one; an index: that one (it must be a GSA layer)."""
    if layer is None:
        return [next(iter(viz.layers))]
    if layer == "all":
        return list(viz.layers)
    try:
        index = int(layer)
    except (TypeError, ValueError):
        raise ConfigError(f"--layer must be a layer index or 'all', got {layer!r}; GSA layers: "
                          f"{viz.choices()}") from None
    if index not in viz.layers:
        raise ConfigError(f"--layer {index} is not a GSA layer of {viz.path}; its GSA layers are {viz.choices()}")
    return [index]


def pick_heads(n_heads: int, head: int | str | None, *, default: str | int = 0) -> list[int]:
    """``"all"``: every head; an index: that one, ``0 <= head < n_heads``."""
    head = default if head is None else head
    if head == "all":
        return list(range(n_heads))
    try:
        index = int(head)
    except (TypeError, ValueError):
        raise ConfigError(f"--head must be a head index (0-{n_heads - 1}) or 'all', got {head!r}") from None
    if not 0 <= index < n_heads:
        raise ConfigError(f"--head {index} is out of range: the layer has {n_heads} heads (0-{n_heads - 1}, or all)")
    return [index]


def read_text(path: str | Path | None) -> str:
    """The text of ``path`` (a UTF-8 file); None: the held-out passages of the standard-library corpus (the
    documents ``gsa train`` never trains on)."""
    if path is None:
        from gsa_train.data import load_texts

        return "\n\n".join(load_texts("stdlib").heldout[:64])
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--text {file}: no such file (give a UTF-8 text file)")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"--text {file} is empty")
    return text


def encode(viz: VizModel, text: str, max_tokens: int = DEFAULT_TOKENS) -> Tensor:
    """``[1, n]`` token ids of ``text``, at most ``max_tokens`` and the model's positions."""
    if not text.strip():
        raise ConfigError("the text is empty: give some words to look at")
    limit = min(max_tokens, int(getattr(viz.model.config, "max_position_embeddings", max_tokens) or max_tokens))
    ids = viz.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:limit]
    if len(ids) < 2:
        raise ConfigError(f"the text gives {len(ids)} token(s) with this model's tokenizer; give at least two")
    return torch.tensor([ids], dtype=torch.long)


def token_labels(viz: VizModel, ids: Tensor) -> list[str]:
    """One printable label per token (for the axes of short texts)."""
    return [viz.tokenizer.decode([int(t)]).replace("\n", "⏎") or "∅" for t in ids[0]]


@dataclass
class LayerInputs:
    """One GSA layer's inputs on one text (batch of one): host-space ``q, k [H, n, d]``, ``v``, the mask and the
    host's exact output ``[H, n, d_v]``."""

    name: str
    layer: Any
    q: Tensor
    k: Tensor
    v: Tensor
    mask: MaskSpec
    exact_out: Tensor

    @property
    def n_heads(self) -> int:
        return int(self.q.shape[0])

    def gsa_space(self) -> tuple[Tensor, Tensor]:
        """``q, k`` where the splats live (their plain dot product is the host's logit)."""
        return to_gsa_space(self.q, self.layer.scaling), to_gsa_space(self.k, self.layer.scaling)

    def effective_mask(self) -> MaskSpec:
        """The mask GSA applies: the host's, plus the layer's own sliding window (as ``GSALayer.attend`` adds it)."""
        if self.layer.window is not None and self.layer.mode != "hybrid":
            return dataclasses.replace(self.mask, causal=True, window=self.layer.window)
        return self.mask


@contextlib.contextmanager
def _passthrough(viz: VizModel) -> Iterator[None]:
    from gsa_plugins.adapters import set_passthrough

    before = {i: layer.passthrough for i, (_, layer) in viz.layers.items()}
    set_passthrough(viz.model, True)
    try:
        yield
    finally:
        for i, (_, layer) in viz.layers.items():
            layer.passthrough = before[i]
            layer.teacher = None
        set_passthrough(viz.model, all(before.values()))


@torch.no_grad()
def capture(viz: VizModel, ids: Tensor, layers: Sequence[int] | None = None) -> dict[int, LayerInputs]:
    """Run ``ids [1, n]`` once through the model in passthrough; each chosen GSA layer's inputs by layer index."""
    chosen = list(viz.layers) if layers is None else list(layers)
    got: dict[int, LayerInputs] = {}

    def tap(index: int):
        name, layer = viz.layers[index]

        def receive(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec, out: Tensor) -> None:
            got[index] = LayerInputs(name, layer, q[0].float(), k[0].float(), v[0].float(), _first_row(spec),
                                     out[0].float())
        return receive

    with _passthrough(viz):
        for index in chosen:
            viz.layers[index][1].teacher = tap(index)
        viz.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    missing = [i for i in chosen if i not in got]
    if missing:
        raise ConfigError(f"layers {missing} of {viz.path} did not run on the text (no inputs captured)")
    return got


def _first_row(spec: MaskSpec) -> MaskSpec:
    """The mask of batch row 0 (the pictures use one text)."""
    def row(t: Tensor | None) -> Tensor | None:
        return None if t is None or t.shape[0] == 1 else t[:1]
    return dataclasses.replace(spec, key_padding=row(spec.key_padding), query_padding=row(spec.query_padding),
                               attend=row(spec.attend) if spec.attend is not None and spec.attend.dim() == 4 else
                               spec.attend)


__all__ = ["DEFAULT_TOKENS", "MAX_TOKENS", "LayerInputs", "VizModel", "capture", "encode", "load_gsa_model",
           "pick_heads", "pick_layers", "read_text", "token_labels"]
