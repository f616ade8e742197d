"""``auto``: the fastest registered backend that can serve the mask at this length, exactly.

A backend is skipped when it cannot serve the mask, or when it says it is not exact for the bank
(an ``is_exact(bank) -> bool`` method: ``sparse`` with ``top_k`` below the alive slots changes the
attention, so ``auto`` never picks it silently). ``dense`` is the fallback for everything.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.masks import MASK_KINDS, MaskSpec
from gsa_core.registry import Registry, StrategyParams, get_registry


class AutoParams(StrategyParams):
    # Measured on the 2-core CPU (causal fwd+bwd, B=8, H=4, d=16, K=32): dense wins up to n=16
    # (3.3 vs 6.9 ms), kernel from n=32 (9.3 vs 14.3 ms) and by 13x at n=128.
    dense_max_pairs: int = Field(512, ge=1, description="use dense up to this many query-key pairs")
    preference: list[str] = Field(
        default_factory=lambda: ["kernel", "sparse", "dense"],
        description="backends tried in order for longer inputs",
    )


class AutoBackend:
    """Dispatches each call to the first backend in ``preference`` that supports the mask exactly."""

    name = "auto"
    supported_masks = frozenset(MASK_KINDS)

    def __init__(self, params: AutoParams | None = None) -> None:
        self.params = params or AutoParams()
        self._cache: dict[tuple[int, str], Any] = {}

    def _backend(self, registry: Registry, name: str) -> Any:
        key = (id(registry), name)  # built once per registry in scope, with default params
        if key not in self._cache:
            self._cache[key] = registry.build("backend", name)
        return self._cache[key]

    def choose(self, mask: MaskSpec, n_q: int, n_k: int, bank: SplatBank | None = None) -> Any:
        """The backend that serves ``mask`` for ``n_q x n_k`` (exactly for ``bank``, when given)."""
        registry = get_registry()
        order = ["dense"] if n_q * n_k <= self.params.dense_max_pairs else self.params.preference
        kinds = mask.kinds(n_q, n_k)
        available = set(registry.names("backend"))
        for name in order:
            if name == self.name or name not in available:
                continue
            backend = self._backend(registry, name)
            if not kinds <= backend.supported_masks:
                continue
            is_exact = getattr(backend, "is_exact", None)
            if bank is not None and callable(is_exact) and not is_exact(bank):
                continue
            return backend
        return self._backend(registry, "dense")

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec
    ) -> tuple[Tensor, dict[str, Any]]:
        return self.choose(mask, q.shape[-2], k.shape[-2], bank).forward(q, k, v, bank, mask)
