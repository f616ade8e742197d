"""``auto``: the fastest registered backend that can serve the mask at this length."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from gsa_core.bank import SplatBank
from gsa_core.masks import MASK_KINDS, MaskSpec
from gsa_core.registry import StrategyParams, get_registry


class AutoParams(StrategyParams):
    dense_max_pairs: int = Field(256 * 256, ge=1, description="use dense up to this many query-key pairs")
    preference: list[str] = Field(
        default_factory=lambda: ["kernel", "sparse", "dense"],
        description="backends tried in order for longer inputs",
    )


class AutoBackend:
    """Dispatches each call to the first backend in ``preference`` that supports the mask."""

    name = "auto"
    supported_masks = frozenset(MASK_KINDS)

    def __init__(self, params: AutoParams | None = None) -> None:
        self.params = params or AutoParams()
        self._cache: dict[str, Any] = {}

    def choose(self, mask: MaskSpec, n_q: int, n_k: int) -> Any:
        registry = get_registry()
        order = ["dense"] if n_q * n_k <= self.params.dense_max_pairs else self.params.preference
        kinds = mask.kinds(n_q, n_k)
        for name in order:
            if name not in registry.names("backend"):
                continue
            if name not in self._cache:
                self._cache[name] = registry.build("backend", name)
            backend = self._cache[name]
            if kinds <= backend.supported_masks:
                return backend
        return self._cache.setdefault("dense", registry.build("backend", "dense"))

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec
    ) -> tuple[Tensor, dict[str, Any]]:
        return self.choose(mask, q.shape[-2], k.shape[-2]).forward(q, k, v, bank, mask)
