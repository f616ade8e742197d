"""How close a converted model is to its original: layer errors on the teacher's inputs, sentence embeddings.

Why here: distillation reports these before and after training, and ``gsa bench distill_bert`` uses the
same functions on held-out sentences, so the report and the benchmark measure one thing one way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the real tokens' vectors ``[B, T, D] -> [B, D]`` (sentence-transformers' pooling)."""
    w = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1e-9)


def last_hidden(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The last hidden state ``[B, T, D]`` of an encoder (or of a model returning hidden states)."""
    out = model(**batch)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise TypeError(f"{type(model).__name__} returned no last_hidden_state; embedding losses need an encoder")
    return hidden


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batches: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """Mean-pooled last hidden states of every row of ``batches`` ``[N, D]`` (fp32, eval mode)."""
    was = model.training
    model.eval()
    try:
        parts = [mean_pool(last_hidden(model, b), b["attention_mask"]).float() for b in batches]
    finally:
        model.train(was)
    return torch.cat(parts)


def embedding_agreement(reference: Tensor, other: Tensor) -> dict[str, Any]:
    """Per-sentence cosine between two embeddings of the same ``N`` sentences, and top-1 neighbour agreement.

    ``nn_agreement``: the share of sentences whose nearest other sentence in the pool (cosine, self
    excluded) is the same under both embeddings.
    """
    if reference.shape != other.shape or reference.dim() != 2:
        raise ValueError(f"expected two [N, D] embeddings of one shape, got {tuple(reference.shape)} and "
                         f"{tuple(other.shape)}")
    a = torch.nn.functional.normalize(reference.double(), dim=-1)
    b = torch.nn.functional.normalize(other.double(), dim=-1)
    cos = (a * b).sum(-1)
    n = a.shape[0]
    out: dict[str, Any] = {"n": n, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                           "cosine_p05": float(cos.quantile(0.05)) if n > 1 else float(cos.min())}
    if n > 1:
        eye = torch.eye(n, dtype=torch.bool)
        nn_a = (a @ a.T).masked_fill(eye, -2.0).argmax(-1)
        nn_b = (b @ b.T).masked_fill(eye, -2.0).argmax(-1)
        out["nn_agreement"] = float((nn_a == nn_b).double().mean())
    return out


def relative_errors(err: Mapping[str, float], ref: Mapping[str, float]) -> dict[str, float]:
    """``sqrt(sum (O_gsa - O)^2 / sum O^2)`` per layer from accumulated sums."""
    return {name: (err[name] / ref[name]) ** 0.5 if ref[name] > 0 else float("nan") for name in err}


__all__ = ["embedding_agreement", "last_hidden", "mean_pool", "relative_errors", "sentence_embeddings"]
