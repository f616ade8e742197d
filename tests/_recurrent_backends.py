"""A third-party recurrent backend written from the contract alone, and deliberately broken variants of it.

``NaiveRecurrent`` keeps the per-splat state of DESIGN.md section 2 and folds keys in one at a time in
log space (a Python loop over tokens: slow, obviously right); its ``forward`` is the naive reference.
It shares no code with the built-in ``kernel`` and ``sparse`` backends, so a model decoding through it
shows that any registered recurrent backend decodes through the same path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gsa_core.masks import MaskSpec
from gsa_core.numerics import check_finite, safe_logsumexp, safe_softmax
from gsa_core.recurrent import BatchState, RecurrentOps, absorb_inputs, extend_inputs
from gsa_core.reference import dense_attention
from gsa_core.registry import NoParams


@dataclass
class NaiveState(BatchState):
    z: Tensor  # [B, H, K] log-normaliser per splat
    m: Tensor  # [B, H, K, d_v] normalised memory


class NaiveRecurrent(RecurrentOps):
    """Exact GSA with a token-by-token recurrent state."""

    name = "naive-recurrent"
    supported_masks = frozenset({"causal", "key_padding", "query_padding", "cross", "window", "arbitrary"})

    def __init__(self, params: NoParams | None = None) -> None:
        self.params = params

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bank: Any, mask: MaskSpec) -> tuple[Tensor, dict]:
        return dense_attention(q, k, v, bank, mask), {"backend": self.name}

    def init_state(self, bank: Any, batch: int, value_dim: int, device: torch.device) -> NaiveState:
        shape = (batch, bank.n_heads, bank.capacity)
        return NaiveState(torch.full(shape, float("-inf"), device=device),
                          torch.zeros(*shape, value_dim, device=device))

    def _fold(self, bank: Any, state: NaiveState, k: Tensor, v: Tensor, real: Tensor | None) -> NaiveState:
        """One key per row: ``k [B, H, 1, d]``, ``v [B, H, 1, d_v]``, ``real [B]``."""
        lk = bank.log_features(k)[..., 0, :]
        if real is not None:
            lk = lk.masked_fill(~real[:, None, None], float("-inf"))
        z = safe_logsumexp(torch.stack((state.z, lk)), dim=0)
        ref = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
        m = torch.exp(state.z - ref).unsqueeze(-1) * state.m + torch.exp(lk - ref).unsqueeze(-1) * v[..., 0:1, :]
        return NaiveState(z, m)

    def readout(self, q: Tensor, bank: Any, state: NaiveState) -> tuple[Tensor, Tensor]:
        check_finite(q=q)
        logits = bank.log_features(q) + state.z.unsqueeze(-2)
        return safe_softmax(logits, dim=-1) @ state.m, safe_logsumexp(logits, dim=-1)

    def absorb(self, k: Tensor, v: Tensor, bank: Any, state: NaiveState, key_padding: Tensor | None = None) -> Any:
        absorb_inputs(k, v, key_padding, self.name)
        for t in range(k.shape[-2]):
            state = self._fold(bank, state, k[..., t:t + 1, :], v[..., t:t + 1, :],
                               None if key_padding is None else key_padding[:, t])
        return state

    def extend(self, q: Tensor, k: Tensor, v: Tensor, bank: Any, state: NaiveState,
               mask: MaskSpec | None = None) -> tuple[Tensor, Any]:
        key_padding, query_padding = extend_inputs(q, k, v, mask, self.name)
        outs = []
        for t in range(q.shape[-2]):
            state = self._fold(bank, state, k[..., t:t + 1, :], v[..., t:t + 1, :],
                               None if key_padding is None else key_padding[:, t])
            outs.append(self.readout(q[..., t:t + 1, :], bank, state)[0])
        out = torch.cat(outs, dim=-2) if outs else v.new_zeros(*q.shape[:-1], v.shape[-1])
        if query_padding is not None:
            out = out * query_padding[:, None, :, None]
        return out.to(v.dtype), state


# ----------------------------------------------------------------------------- broken on purpose
class ForgetsStateInPieces(NaiveRecurrent):
    """Starts every multi-token extend from an empty state: prefill-then-decode works, chunked prefill not."""

    def extend(self, q, k, v, bank, state, mask=None):
        if q.shape[-2] > 1:
            state = self.init_state(bank, q.shape[0], v.shape[-1], q.device)
        return super().extend(q, k, v, bank, state, mask)


class AbsorbIgnoresPadding(NaiveRecurrent):
    def absorb(self, k, v, bank, state, key_padding=None):
        return super().absorb(k, v, bank, state, None)


@dataclass
class ReversedStack(NaiveState):
    @classmethod
    def stack(cls, states):
        return super().stack(list(reversed(states)))


class StacksInReverse(NaiveRecurrent):
    def init_state(self, bank, batch, value_dim, device):
        s = super().init_state(bank, batch, value_dim, device)
        return ReversedStack(s.z, s.m)

    def _fold(self, bank, state, k, v, real):
        s = super()._fold(bank, state, k, v, real)
        return ReversedStack(s.z, s.m)


class WritesIntoItsInput(NaiveRecurrent):
    """Updates the state it was given in place (a server could not keep a prefix state)."""

    def extend(self, q, k, v, bank, state, mask=None):
        out, new = super().extend(q, k, v, bank, state, mask)
        state.z.copy_(new.z)
        state.m.copy_(new.m)
        return out, state


class PassesNaN(NaiveRecurrent):
    """No input check: a NaN comes out as NaN."""

    def forward(self, q, k, v, bank, mask):
        lq, lk = bank.log_features(q), bank.log_features(k)
        logw = safe_logsumexp(lq.unsqueeze(-2) + lk.unsqueeze(-3), dim=-1)
        logw = logw.masked_fill(~mask.allowed(q.shape[-2], k.shape[-2]), float("-inf"))
        out = safe_softmax(logw, dim=-1) @ v
        return (out if mask.query_padding is None else out * mask.query_padding[:, None, :, None]), {}


class CrashesOnEmpty(NaiveRecurrent):
    def forward(self, q, k, v, bank, mask):
        if q.shape[-2] == 0 or k.shape[-2] == 0:
            raise RuntimeError("cannot reshape tensor of 0 elements")
        return super().forward(q, k, v, bank, mask)
