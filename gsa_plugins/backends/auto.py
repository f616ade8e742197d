"""``auto``: the fastest registered backend that can serve the mask at this length, exactly.

A backend is skipped when it cannot serve the mask, or when it says it is not exact for the bank
(an ``is_exact(bank) -> bool`` method: ``sparse`` with ``top_k`` below the alive slots changes the
attention, so ``auto`` never picks it silently). ``dense`` is the fallback for everything.

``auto`` is recurrent too: ``init_state``, ``extend``, ``absorb``, ``readout``, ``prefill`` and ``step``
go to the first backend of ``preference`` that is recurrent and exact for the bank (``kernel`` by
default), so a layer on ``auto`` decodes from a constant-size state.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.errors import MaskNotSupportedError
from gsa_core.masks import MASK_KINDS, MaskSpec
from gsa_core.protocols import RecurrentBackend, is_exact_for
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
            if bank is not None and not is_exact_for(backend, bank):
                continue
            return backend
        return self._backend(registry, "dense")

    def recurrent(self, bank: SplatBank) -> Any:
        """The backend that serves the recurrent operations for ``bank``: the first of ``preference`` that is
        a :class:`RecurrentBackend` and exact for it."""
        registry = get_registry()
        key = (id(registry), "<recurrent>")
        if key not in self._cache:  # the recurrent candidates, in order (built once per registry)
            available = set(registry.names("backend"))
            built = [self._backend(registry, n) for n in self.params.preference if n != self.name and n in available]
            self._cache[key] = [b for b in built if isinstance(b, RecurrentBackend)]
        for backend in self._cache[key]:
            if is_exact_for(backend, bank):
                return backend
        raise MaskNotSupportedError(
            f"backend 'auto' has no exact recurrent backend for this bank among its preference "
            f"{self.params.preference}; registered backends: {', '.join(registry.names('backend'))}"
        )

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec
    ) -> tuple[Tensor, dict[str, Any]]:
        return self.choose(mask, q.shape[-2], k.shape[-2], bank).forward(q, k, v, bank, mask)

    def flops(self, batch: int, heads: int, n_q: int, n_k: int, head_dim: int, value_dim: int, causal: bool,
              bank: SplatBank) -> float:
        """The FLOPs of the backend this call would go to (0 when it does not report any)."""
        chosen = self.choose(MaskSpec(causal=causal), n_q, n_k, bank)
        count = getattr(chosen, "flops", None)
        return float(count(batch, heads, n_q, n_k, head_dim, value_dim, causal, bank)) if callable(count) else 0.0

    # ------------------------------------------------------------------ RecurrentBackend (delegated)
    def init_state(self, bank: SplatBank, batch: int, value_dim: int, device: torch.device) -> Any:
        return self.recurrent(bank).init_state(bank, batch, value_dim, device)

    def extend(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, state: Any,
               mask: MaskSpec | None = None) -> tuple[Tensor, Any]:
        return self.recurrent(bank).extend(q, k, v, bank, state, mask)

    def absorb(self, k: Tensor, v: Tensor, bank: SplatBank, state: Any, key_padding: Tensor | None = None) -> Any:
        return self.recurrent(bank).absorb(k, v, bank, state, key_padding)

    def readout(self, q: Tensor, bank: SplatBank, state: Any) -> tuple[Tensor, Tensor]:
        return self.recurrent(bank).readout(q, bank, state)

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec) -> tuple[Tensor, Any]:
        return self.recurrent(bank).prefill(q, k, v, bank, mask)

    def step(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, state: Any,
             key_padding: Tensor | None = None) -> tuple[Tensor, Any]:
        return self.recurrent(bank).step(q, k, v, bank, state, key_padding)
