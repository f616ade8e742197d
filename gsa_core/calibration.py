"""Calibration: initialise every splat bank of a model from its own query/key vectors.

Model-agnostic: the caller collects ``q``/``k`` per layer (``gsa_calibrate`` does it with forward
hooks on Hugging Face models) and passes them here with the banks and an initializer by name.

**Score scale.** GSA scores have no ``1/sqrt(d)`` factor (DESIGN.md section 1): the covariances carry
the scale. A teacher whose logits are ``scaling * q·k`` (BERT: ``scaling = d^-1/2``; GPT-Neo: 1) is
matched by feeding GSA ``q * sqrt(scaling)`` and ``k * sqrt(scaling)``, whose plain dot product is
the teacher's logit. That factor is :func:`gsa_input_scale`; it is the one place the choice is made:
calibration, conversion and distillation all call :func:`to_gsa_space` on the teacher's ``q`` and
``k`` before any bank sees them, so calibrated banks live in the same space the converted model uses.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gsa_core.bank import SplatBank
from gsa_core.errors import CalibrationError
from gsa_core.protocols import Initializer

# The initializer conversion should use, by measurement (``gsa bench init``, benchmarks/results/init.json): on
# all-MiniLM-L6-v2 k-means splats 4x wider than their clusters were the only setting better than uniform attention
# on every layer before training. The factor was chosen on training-split text, not on the held-out evaluation.
RECOMMENDED_INITIALIZER: tuple[str, dict[str, Any]] = ("kmeans", {"scale_factor": 4.0})


# ----------------------------------------------------------------------------- score scale
ROLES = ("query", "key", "value", "attention")


@dataclass(frozen=True, eq=False)
class AttentionLayer:
    """One attention layer as calibration sees it (adapters describe their layers with it; the
    ``gsa_calibrate`` collectors hook the modules it names).

    ``query``/``key``/``value``: modules whose output is ``[B, T, n_heads * head_dim]`` (the projections);
    ``scaling``: the teacher's logit factor (``q·k * scaling``; BERT ``head_dim**-0.5``, GPT-Neo 1.0);
    ``attention``: optionally, the module whose output (or its first element) is the attention
    context ``[B, T, n_heads * head_dim]`` before the output projection (a distillation target).
    """

    name: str
    query: nn.Module
    key: nn.Module
    n_heads: int
    head_dim: int
    scaling: float = 1.0
    value: nn.Module | None = None
    attention: nn.Module | None = None

    def module(self, role: str) -> nn.Module | None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        return getattr(self, role)


def gsa_input_scale(teacher_scaling: float) -> float:
    """Factor applied to *both* ``q`` and ``k`` so that their plain dot product equals the teacher's
    logit ``teacher_scaling * q·k``: ``sqrt(teacher_scaling)`` (``d^-1/4`` for BERT's ``d^-1/2``)."""
    if not (teacher_scaling > 0 and math.isfinite(teacher_scaling)):
        raise ValueError(f"teacher_scaling must be a positive finite number, got {teacher_scaling!r}")
    return math.sqrt(teacher_scaling)


def to_gsa_space(x: Tensor, teacher_scaling: float) -> Tensor:
    """A teacher's query or key vectors in the space GSA banks see (see the module docstring)."""
    scale = gsa_input_scale(teacher_scaling)
    return x if scale == 1.0 else x * scale


# ----------------------------------------------------------------------------- validation
def validate_vectors(layer: str, bank: SplatBank, queries: Tensor | None, keys: Tensor | None) -> None:
    """Shapes ``[H, N, d]`` matching ``bank`` and finite values; errors name the layer and head."""
    for label, t in (("queries", queries), ("keys", keys)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[0] != bank.n_heads or t.shape[2] != bank.head_dim:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise CalibrationError(
                f"layer {layer!r}: {label} must be [{bank.n_heads} heads, N, {bank.head_dim}], got {shape}"
            )
        if not t.is_floating_point():
            raise CalibrationError(f"layer {layer!r}: {label} must be floating point, got {t.dtype}")
        finite = torch.isfinite(t).flatten(1).all(1)
        if not bool(finite.all()):
            heads = (~finite).nonzero().flatten().tolist()
            bad = t[heads[0]]
            kinds = [w for w, m in (("NaN", torch.isnan(bad)), ("Inf", torch.isinf(bad))) if bool(m.any())]
            token = int((~torch.isfinite(bad)).any(-1).nonzero()[0])
            raise CalibrationError(
                f"layer {layer!r}, head {heads[0]}: {label} contain {'/'.join(kinds)} (first at vector {token}); "
                f"non-finite heads in this layer: {heads}"
            )


# ----------------------------------------------------------------------------- report
@dataclass
class LayerCalibration:
    """What one bank was initialised from."""

    layer: str
    n_heads: int
    head_dim: int
    capacity: int
    alive: int
    n_queries: int
    n_keys: int
    subsampled: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CalibrationReport:
    """Per-layer details and the total wall time of :func:`calibrate_banks`."""

    initializer: str
    seed: int
    max_vectors: int | None
    layers: list[LayerCalibration] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"initializer": self.initializer, "seed": self.seed, "max_vectors": self.max_vectors,
                "seconds": self.seconds, "layers": [lay.to_dict() for lay in self.layers]}


# ----------------------------------------------------------------------------- calibration
def layer_seed(seed: int, layer: str) -> int:
    """A per-layer seed derived from ``seed`` and the layer's name (independent of layer order)."""
    digest = hashlib.sha256(f"{seed}\x00{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def subsample(
    queries: Tensor | None, keys: Tensor | None, max_vectors: int, generator: torch.Generator
) -> tuple[Tensor | None, Tensor | None, bool]:
    """At most ``max_vectors`` queries and keys per head, chosen uniformly without replacement.

    When queries and keys have the same count they are taken at the same token positions.
    """
    def pick(n: int, like: Tensor) -> Tensor:
        return torch.randperm(n, generator=generator)[:max_vectors].sort().values.to(like.device)

    n_q = 0 if queries is None else queries.shape[1]
    n_k = 0 if keys is None else keys.shape[1]
    if max(n_q, n_k) <= max_vectors:
        return queries, keys, False
    if queries is not None and keys is not None and n_q == n_k:
        idx = pick(n_q, queries)
        return queries[:, idx], keys[:, idx], True
    if queries is not None and n_q > max_vectors:
        queries = queries[:, pick(n_q, queries)]
    if keys is not None and n_k > max_vectors:
        keys = keys[:, pick(n_k, keys)]
    return queries, keys, True


def resolve_initializer(initializer: Initializer | str | tuple[str, Mapping[str, Any]]) -> tuple[Initializer, str]:
    """An initializer instance, from an instance, a registered name, or ``(name, params)``."""
    if isinstance(initializer, str | tuple):
        from gsa_core.registry import get_registry

        name, params = (initializer, None) if isinstance(initializer, str) else initializer
        return get_registry().build("initializer", name, params), name
    if not isinstance(initializer, Initializer):
        raise TypeError(f"{initializer!r} is neither an Initializer nor a registered initializer name")
    return initializer, type(initializer).__name__


@torch.no_grad()
def calibrate_banks(
    banks: Mapping[str, SplatBank],
    vectors: Mapping[str, tuple[Tensor | None, Tensor | None]],
    initializer: Initializer | str | tuple[str, Mapping[str, Any]],
    seed: int = 0,
    *,
    max_vectors: int | None = None,
) -> CalibrationReport:
    """Initialise every bank from its layer's ``(queries [H, N, d], keys [H, N, d])``.

    ``vectors`` must already be in GSA space (:func:`to_gsa_space`). Every bank needs an entry and
    every entry a bank; all inputs are validated before any bank is written, so a NaN/Inf anywhere
    raises a :class:`CalibrationError` naming the layer and head and leaves every bank untouched.
    ``max_vectors`` caps the queries (and keys) per head by seeded uniform subsampling. Each layer
    gets its own generator seeded from ``seed`` and the layer name, so the result does not depend on
    the order of the mappings.
    """
    init, name = resolve_initializer(initializer)
    if max_vectors is not None and max_vectors < 1:
        raise ValueError(f"max_vectors must be >= 1 or None, got {max_vectors!r}")
    missing = sorted(set(banks) - set(vectors))
    extra = sorted(set(vectors) - set(banks))
    if missing or extra:
        parts = ([f"no vectors for layer(s) {missing}"] if missing else []) + (
            [f"vectors for unknown layer(s) {extra}"] if extra else [])
        raise CalibrationError("; ".join(parts) + f" (banks: {sorted(banks)})")
    for layer, bank in banks.items():
        entry = vectors[layer]
        if not (isinstance(entry, tuple | list) and len(entry) == 2):
            raise CalibrationError(f"layer {layer!r}: expected a (queries, keys) pair, got {type(entry).__name__}")
        validate_vectors(layer, bank, *entry)
    report = CalibrationReport(initializer=name, seed=seed, max_vectors=max_vectors)
    start = time.perf_counter()
    for layer, bank in banks.items():
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(layer_seed(seed, layer))
        queries, keys = vectors[layer]
        subsampled = False
        if max_vectors is not None:
            queries, keys, subsampled = subsample(queries, keys, max_vectors, generator)
        init.initialize(bank, queries, keys, generator=generator)
        report.layers.append(LayerCalibration(
            layer=layer, n_heads=bank.n_heads, head_dim=bank.head_dim, capacity=bank.capacity,
            alive=int(bank.alive.sum()), n_queries=0 if queries is None else int(queries.shape[1]),
            n_keys=0 if keys is None else int(keys.shape[1]), subsampled=subsampled,
            seconds=time.perf_counter() - t0,
        ))
    report.seconds = time.perf_counter() - start
    return report
