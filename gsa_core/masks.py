"""Which keys each query may see, described once and served by every backend.

Backends differ in the masks they can compute (DESIGN.md section 2); describing a mask as data
lets ``auto`` pick a backend and lets an unsupported mask fail with a message naming who can serve it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MASK_KINDS: tuple[str, ...] = ("causal", "window", "key_padding", "query_padding", "cross", "arbitrary")


@dataclass(frozen=True)
class MaskSpec:
    """A structured attention mask.

    - ``causal``: query ``i`` sees keys at positions ``<= i + query_offset``.
    - ``window``: with ``causal``, only the last ``window`` keys (``i+off-window < j <= i+off``).
    - ``key_padding`` ``[B, n_k]`` / ``query_padding`` ``[B, n_q]``: True marks a real token.
      Padded keys are invisible; padded queries return zeros.
    - ``attend``: any boolean mask broadcastable to ``[B, H, n_q, n_k]``; True = may attend.
    - ``query_offset``: key position of query 0; defaults to ``n_k - n_q`` (queries are the last
      tokens, as during decoding with a cache).
    Queries and keys of different lengths without ``causal`` are cross-attention.
    """

    causal: bool = False
    window: int | None = None
    key_padding: Tensor | None = None
    query_padding: Tensor | None = None
    attend: Tensor | None = None
    query_offset: int | None = None

    def __post_init__(self) -> None:
        if self.window is not None:
            if not self.causal:
                raise ValueError("a sliding window needs causal=True (window counts past keys)")
            if not isinstance(self.window, int) or self.window < 1:
                raise ValueError(f"window must be a positive integer, got {self.window!r}")
        for label, t in (("key_padding", self.key_padding), ("query_padding", self.query_padding)):
            if t is not None and (t.dtype != torch.bool or t.dim() != 2):
                raise ValueError(f"{label} must be a bool tensor [batch, length], got {t.dtype} {tuple(t.shape)}")
        if self.attend is not None and self.attend.dtype != torch.bool:
            raise ValueError(f"attend must be a bool tensor, got {self.attend.dtype}")

    def offset(self, n_q: int, n_k: int) -> int:
        return n_k - n_q if self.query_offset is None else self.query_offset

    def kinds(self, n_q: int, n_k: int) -> frozenset[str]:
        """The mask kinds this spec uses for ``n_q`` queries against ``n_k`` keys."""
        used = set()
        if self.causal:
            used.add("causal")
        if self.window is not None:
            used.add("window")
        if self.key_padding is not None:
            used.add("key_padding")
        if self.query_padding is not None:
            used.add("query_padding")
        if self.attend is not None:
            used.add("arbitrary")
        if not self.causal and n_q != n_k:
            used.add("cross")
        return frozenset(used)

    def check_shapes(self, batch: int, n_q: int, n_k: int) -> None:
        """Raise a clear error when the mask tensors do not fit the inputs."""
        if self.key_padding is not None and tuple(self.key_padding.shape) != (batch, n_k):
            raise ValueError(f"key_padding must be [{batch}, {n_k}], got {tuple(self.key_padding.shape)}")
        if self.query_padding is not None and tuple(self.query_padding.shape) != (batch, n_q):
            raise ValueError(f"query_padding must be [{batch}, {n_q}], got {tuple(self.query_padding.shape)}")
        if self.attend is not None:
            try:
                torch.broadcast_shapes(self.attend.shape, (batch, 1, n_q, n_k))
            except RuntimeError:
                raise ValueError(
                    f"attend {tuple(self.attend.shape)} does not broadcast to [{batch}, H, {n_q}, {n_k}]"
                ) from None

    def allowed(self, n_q: int, n_k: int, device: torch.device | str = "cpu") -> Tensor:
        """Dense boolean mask ``[B or 1, H or 1, n_q, n_k]`` of visible keys (query padding excluded)."""
        allow = torch.ones(1, 1, n_q, n_k, dtype=torch.bool, device=device)
        if self.causal:
            q_pos = torch.arange(n_q, device=device).unsqueeze(-1) + self.offset(n_q, n_k)
            k_pos = torch.arange(n_k, device=device).unsqueeze(0)
            allow = allow & (k_pos <= q_pos)
            if self.window is not None:
                allow = allow & (k_pos > q_pos - self.window)
        if self.key_padding is not None:
            allow = allow & self.key_padding.to(device)[:, None, None, :]
        if self.attend is not None:
            attend = self.attend.to(device)
            while attend.dim() < 4:
                attend = attend.unsqueeze(0)
            allow = allow & attend
        return allow


NO_MASK = MaskSpec()
CAUSAL = MaskSpec(causal=True)
