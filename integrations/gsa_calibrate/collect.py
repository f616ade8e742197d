"""Forward-hook collection of per-head query/key vectors from Hugging Face models."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gsa_core.bank import CovarianceKind, SplatBank
from gsa_core.calibration import ROLES, AttentionLayer, to_gsa_space
from gsa_plugins.adapters.bert import bert_attention_layers


def token_batches(
    tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16, max_length: int = 128
) -> list[dict[str, Tensor]]:
    """Tokenised, padded and truncated batches (``input_ids``, ``attention_mask``, ...), in text order."""
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batches.append(dict(enc))
    return batches


def heads_of(x: Tensor, mask: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """``[B, T, H*d]`` projections -> ``[H, n, d]`` over the tokens where ``mask [B, T]`` is True."""
    rows = x[mask]
    return rows.reshape(rows.shape[0], n_heads, head_dim).transpose(0, 1)


class LayerCapture:
    """Context manager: forward hooks keep the latest output of each ``(layer, role)``.

    ``capture.outputs[(name, role)]`` is the module output of the last forward (for ``attention``, its
    first element), detached. Hooks are removed on exit, also after an exception.
    """

    def __init__(self, layers: Sequence[AttentionLayer], roles: Iterable[str] = ("query", "key")) -> None:
        self.layers = list(layers)
        self.roles = tuple(roles)
        self.outputs: dict[tuple[str, str], Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> LayerCapture:
        for layer in self.layers:
            for role in self.roles:
                module = layer.module(role)
                if module is None:
                    raise ValueError(f"layer {layer.name!r} has no {role} module to capture")
                self._handles.append(module.register_forward_hook(self._hook(layer.name, role)))
        return self

    def _hook(self, name: str, role: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple | list) else output
            self.outputs[(name, role)] = out.detach()

        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def run_batches(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]]
) -> Iterator[tuple[Mapping[str, Tensor], Tensor]]:
    """Run each batch through ``model`` (eval mode, no grad); yield ``(batch, attention_mask as bool)``."""
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                if "attention_mask" not in batch:
                    raise ValueError("every batch needs an attention_mask (1 = real token, 0 = padding)")
                inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                model(**inputs)
                yield inputs, inputs["attention_mask"].bool()
    finally:
        model.train(was_training)


def collect_qk(
    model: nn.Module,
    layers: Sequence[AttentionLayer],
    batches: Iterable[Mapping[str, Tensor]],
    *,
    max_tokens: int | None = None,
    gsa_space: bool = True,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-layer ``(q [H, N, d], k [H, N, d])`` fp32 on the CPU over the real tokens of ``batches``.

    Padding tokens (``attention_mask == 0``) are excluded; query ``i`` and key ``i`` come from the same
    token. Stops once ``max_tokens`` tokens are collected (the last batch is truncated). With
    ``gsa_space`` the vectors are scaled by ``gsa_core.calibration.to_gsa_space`` for the layer's
    ``scaling``, so they can go straight to ``calibrate_banks``.
    """
    if not layers:
        raise ValueError("collect_qk needs at least one AttentionLayer")
    parts: dict[tuple[str, str], list[Tensor]] = {(lay.name, r): [] for lay in layers for r in ("query", "key")}
    total = 0
    with LayerCapture(layers, ("query", "key")) as capture, contextlib.closing(run_batches(model, batches)) as runs:
        for _, mask in runs:
            take = int(mask.sum()) if max_tokens is None else min(int(mask.sum()), max_tokens - total)
            for layer in layers:
                for role in ("query", "key"):
                    x = heads_of(capture.outputs[(layer.name, role)], mask, layer.n_heads, layer.head_dim)
                    parts[(layer.name, role)].append(x[:, :take].float().cpu())
            total += take
            if max_tokens is not None and total >= max_tokens:
                break
    out = {}
    for layer in layers:
        q, k = (torch.cat(parts[(layer.name, r)], 1).contiguous() for r in ("query", "key"))
        if gsa_space:
            q, k = to_gsa_space(q, layer.scaling), to_gsa_space(k, layer.scaling)
        out[layer.name] = (q, k)
    return out


def make_banks(
    layers: Sequence[AttentionLayer], capacity: int, covariance: CovarianceKind = "diagonal", **kwargs: Any
) -> dict[str, SplatBank]:
    """One fresh :class:`SplatBank` per layer, keyed by layer name."""
    return {lay.name: SplatBank(lay.n_heads, lay.head_dim, capacity, covariance, **kwargs) for lay in layers}


__all__ = ["ROLES", "AttentionLayer", "LayerCapture", "bert_attention_layers", "collect_qk", "heads_of",
           "make_banks", "run_batches", "token_batches"]
