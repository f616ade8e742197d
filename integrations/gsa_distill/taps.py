"""Stage 1's seam: per-layer attention-output error of GSA against the host's own exact attention.

The model runs in passthrough (every layer computes its original attention, so every layer sees the
original inputs); each converted layer's ``teacher`` tap receives the host's ``q, k, v`` and exact output
and runs GSA on the same (detached) inputs. Only splat parameters get gradients; the error of one layer
never flows into another, which is what makes stage 1 cheap and stable.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from gsa_core.masks import MaskSpec
from gsa_plugins.adapters.layers import GSALayer


class LayerTaps:
    """Context manager: install taps on ``layers``; after each forward, ``err[name]`` holds the summed squared
    error over real query tokens (a tensor with grad when grad is enabled) and ``ref[name]`` the summed
    squared exact output (a float), both over this process's rows."""

    def __init__(self, layers: Mapping[str, GSALayer]) -> None:
        self.layers = dict(layers)
        self.real: Tensor | None = None
        self.err: dict[str, Tensor] = {}
        self.ref: dict[str, float] = {}

    def start(self, attention_mask: Tensor) -> None:
        """Before a forward: the ``[B, T]`` mask of real query tokens; clears the previous sums."""
        self.real = attention_mask.bool()
        self.err, self.ref = {}, {}

    def _tap(self, name: str, layer: GSALayer):
        def tap(q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec, out: Tensor) -> None:
            assert self.real is not None, "LayerTaps.start(mask) must run before the forward"
            pred = layer.attend(q.detach(), k.detach(), v.detach(), spec)
            target = out.detach().to(pred.dtype)
            real = self.real[:, None, -pred.shape[-2]:, None].to(pred.dtype)  # [B, 1, n_q, 1]
            self.err[name] = ((pred - target).square() * real).sum()
            self.ref[name] = float((target.square() * real).sum())
        return tap

    def __enter__(self) -> LayerTaps:
        for name, layer in self.layers.items():
            layer.teacher = self._tap(name, layer)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers.values():
            layer.teacher = None


@torch.no_grad()
def layer_errors(model: torch.nn.Module, layers: Mapping[str, GSALayer], batches) -> dict[str, dict[str, float]]:
    """Per layer over ``batches``: ``rel_err = sqrt(sum err^2 / sum ref^2)`` and the mean squared error per
    real-token channel, with the model in passthrough (each layer on its original inputs)."""
    from gsa_plugins.adapters import set_passthrough

    err = dict.fromkeys(layers, 0.0)
    ref = dict.fromkeys(layers, 0.0)
    count = 0
    before = {name: layer.passthrough for name, layer in layers.items()}
    set_passthrough(model, True)
    try:
        with LayerTaps(layers) as taps:
            for batch in batches:
                taps.start(batch["attention_mask"])
                model(**batch)
                for name in layers:
                    err[name] += float(taps.err[name])
                    ref[name] += taps.ref[name]
                layer = next(iter(layers.values()))
                count += int(batch["attention_mask"].sum()) * layer.n_heads * layer.head_dim
    finally:
        for name, layer in layers.items():
            layer.passthrough = before[name]
        set_passthrough(model, all(before.values()))
    return {name: {"rel_err": (err[name] / ref[name]) ** 0.5 if ref[name] > 0 else float("nan"),
                   "mse": err[name] / max(1, count)} for name in layers}


__all__ = ["LayerTaps", "layer_errors"]
