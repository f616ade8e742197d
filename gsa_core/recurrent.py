"""What every recurrent backend shares: batch-stackable states, and prefill/step written once over extend/absorb.

The recurrent contract (:class:`gsa_core.protocols.RecurrentBackend`) is functional, in the manner of
flash-linear-attention's ops: a state goes in, a new state comes out, the input state is never
modified. So a server can keep a state after a conversation prefix, continue it twice, and stack the
states of several sessions (each with its own length) along the batch to decode them in one call.

- :class:`BatchState`: a dataclass of tensors whose first dimension is the batch; ``select``, ``split``,
  ``stack`` and ``nbytes`` come for free. :func:`stack_states` / :func:`split_state` are the same as
  functions.
- :class:`RecurrentOps`: ``prefill``, ``step`` and the causal forward at any query offset, written once
  in terms of a backend's ``init_state``, ``extend`` and ``absorb``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from gsa_core.bank import SplatBank, compute_dtype
from gsa_core.errors import MaskNotSupportedError
from gsa_core.masks import MaskSpec
from gsa_core.numerics import check_finite

S = TypeVar("S", bound="BatchState")
#: The mask kinds the recurrent form serves: causal, with key and query padding.
CAUSAL_KINDS = frozenset({"causal", "key_padding", "query_padding"})


@dataclasses.dataclass
class BatchState:
    """Base of recurrent states: every field is a tensor whose first dimension is the batch.

    Treat instances as immutable: backends return new states and never write into the ones they are
    given (so one state can be continued several ways). The size never depends on how many tokens the
    state has seen.
    """

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.tensors().values())).shape[0])

    def nbytes(self) -> int:
        """Bytes held by the state (independent of how many tokens it has seen)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def map(self: S, fn: Callable[[Tensor], Tensor]) -> S:
        """The state with ``fn`` applied to every tensor (reorder beams, move devices, repeat rows)."""
        return type(self)(**{name: fn(t) for name, t in self.tensors().items()})

    def select(self: S, index: int | slice | Tensor) -> S:
        """Rows ``index`` of the batch (an int keeps its batch dimension of 1)."""
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"state row {index} out of range for a batch of {self.batch_size}")
            index = slice(index % self.batch_size, index % self.batch_size + 1)
        return self.map(lambda t: t[index])

    def split(self: S) -> list[S]:
        """One state per sequence (batch 1 each); :meth:`stack` undoes it."""
        return [self.select(i) for i in range(self.batch_size)]

    @classmethod
    def stack(cls: type[S], states: Sequence[S]) -> S:
        """The states of several batches as one batch, in order (their rows concatenated)."""
        if not states:
            raise ValueError("stack needs at least one state")
        for s in states:
            if type(s) is not cls:
                raise TypeError(f"cannot stack a {type(s).__name__} with {cls.__name__} states")
        first = states[0].tensors()
        for s in states[1:]:
            for name, t in s.tensors().items():
                ref = first[name]
                if t.shape[1:] != ref.shape[1:] or t.dtype != ref.dtype or t.device != ref.device:
                    raise ValueError(
                        f"cannot stack states whose {name!r} differ: {tuple(ref.shape)} {ref.dtype} {ref.device} vs "
                        f"{tuple(t.shape)} {t.dtype} {t.device} (same bank, value dim, dtype and device needed)"
                    )
        return cls(**{name: torch.cat([s.tensors()[name] for s in states]) for name in first})


def stack_states(states: Sequence[S]) -> S:
    """Stack the states of several sequences (or batches) along the batch, in order."""
    if not states:
        raise ValueError("stack_states needs at least one state")
    return type(states[0]).stack(states)


def split_state(state: S) -> list[S]:
    """One state per sequence of ``state``'s batch."""
    return state.split()


# ----------------------------------------------------------------------------- shared wrappers
def _pad_tokens(x: Tensor, length: int) -> Tensor:
    extra = length - x.shape[-2]
    return x if extra <= 0 else F.pad(x, (0, 0, 0, extra))


def check_state(state: Any, cls: type[BatchState], who: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise a clear error when ``state`` is not a ``cls`` whose tensors have ``shapes`` (by field name)."""
    if not isinstance(state, cls):
        raise TypeError(f"the {who} backend continues a {cls.__name__}, got {type(state).__name__}")
    for name, want in shapes.items():
        got = tuple(getattr(state, name).shape)
        if got != want:
            raise ValueError(f"state {name} {got} does not fit these inputs: expected {want} "
                             "([batch, heads, splats(, value dim)])")


def extend_inputs(q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec | None,
                  who: str) -> tuple[Tensor | None, Tensor | None]:
    """Check what an ``extend`` call gets and return its mask's ``(key_padding, query_padding)``.

    ``extend`` is causal over aligned tokens by definition: ``q, k [B, H, n, d]``, ``v [B, H, n, d_v]``,
    finite, and a mask that carries padding only.
    """
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{who}.extend takes aligned q, k [B, H, n, d] and v [B, H, n, d_v], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, n = q.shape[0], q.shape[-2]
    check_finite(q=q, k=k, v=v)
    if mask is None:
        return None, None
    if mask.window is not None or mask.attend is not None:
        raise MaskNotSupportedError(f"{who}.extend serves causal attention with padding only; it got a "
                                    f"{'window' if mask.window is not None else 'arbitrary (attend)'} mask")
    if mask.query_offset not in (None, 0):
        raise ValueError(f"{who}.extend takes aligned queries and keys (query offset 0), got {mask.query_offset}")
    if not mask.causal and n > 1:
        raise ValueError(f"{who}.extend is causal: pass MaskSpec(causal=True, key_padding=...)")
    mask.check_shapes(batch, n, n)
    return mask.key_padding, mask.query_padding


def absorb_inputs(k: Tensor, v: Tensor, key_padding: Tensor | None, who: str) -> None:
    """Check what an ``absorb`` call gets: ``k [B, H, n, d]``, ``v [B, H, n, d_v]``, ``key_padding [B, n]``, finite."""
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"{who}.absorb takes k [B, H, n, d] and v [B, H, n, d_v], got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if key_padding is not None and tuple(key_padding.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding must be [{k.shape[0]}, {k.shape[2]}], got {tuple(key_padding.shape)}")
    check_finite(k=k, v=v)


class RecurrentOps:
    """``prefill``, ``step`` and the causal forward of a recurrent backend, in terms of its own
    ``init_state``, ``extend`` and ``absorb`` (mix into a backend class that defines those)."""

    name: str
    init_state: Callable[..., Any]
    extend: Callable[..., tuple[Tensor, Any]]
    absorb: Callable[..., Any]

    def causal_attention(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec, *,
                         state: Any = None, every_key: bool = False) -> tuple[Tensor, Any]:
        """Causal attention at any query offset, as ``absorb(keys before the queries)`` +
        ``extend(aligned part)`` (+ ``absorb(keys after the last query)`` when ``every_key``).

        Query ``i`` sees keys ``<= i + mask.offset(n_q, n_k)``: queries before key 0 see nothing (zeros),
        queries past the last key are paired with invisible keys. Returns the outputs (query padding
        applied) and the state after the keys the queries saw (after every key if ``every_key``).
        """
        batch, _, n_q, _ = q.shape
        n_k = k.shape[-2]
        unsupported = mask.kinds(n_q, n_k) - CAUSAL_KINDS
        if unsupported or not mask.causal:
            raise MaskNotSupportedError(
                f"backend {self.name!r}: recurrent causal attention serves causal masks with padding only "
                f"({', '.join(sorted(CAUSAL_KINDS))}); this mask uses {', '.join(sorted(mask.kinds(n_q, n_k)))}"
            )
        mask.check_shapes(batch, n_q, n_k)
        kp = mask.key_padding
        if state is None:
            state = self.init_state(bank, batch, v.shape[-1], q.device)

        def piece(sl: slice) -> tuple[Tensor, Tensor, Tensor | None]:
            return k[..., sl, :], v[..., sl, :], None if kp is None else kp[:, sl]

        off = mask.offset(n_q, n_k)
        skip = min(n_q, max(0, -off))  # queries before key 0 see nothing
        off = max(0, off)
        if off > 0:  # keys every remaining query sees
            pk, pv, pkp = piece(slice(0, min(off, n_k)))
            state = self.absorb(pk, pv, bank, state, pkp)
        n = n_q - skip
        ka, va, kpa = piece(slice(off, off + n))
        if ka.shape[-2] < n:  # queries past the last key: pair them with invisible keys
            real = ka.shape[-2]
            ka, va = _pad_tokens(ka, n), _pad_tokens(va, n)
            have = torch.ones(batch, real, dtype=torch.bool, device=q.device) if kpa is None else kpa.to(q.device)
            kpa = torch.cat([have, torch.zeros(batch, n - real, dtype=torch.bool, device=q.device)], dim=1)
        out, state = self.extend(q[..., skip:, :], ka, va, bank, state, MaskSpec(causal=True, key_padding=kpa))
        if skip:
            out = torch.cat([out.new_zeros(*out.shape[:2], skip, out.shape[-1]), out], dim=-2)
        if every_key and off + n < n_k:  # keys after the last query (an explicit query_offset)
            rk, rv, rkp = piece(slice(off + n, n_k))
            state = self.absorb(rk, rv, bank, state, rkp)
        if mask.query_padding is not None:
            out = torch.where(mask.query_padding[:, None, :, None].to(out.device), out, torch.zeros_like(out))
        return out, state

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, mask: MaskSpec) -> tuple[Tensor, Any]:
        """Causal attention over a prompt and the state after *every* key (then :meth:`step` / ``extend``)."""
        return self.causal_attention(q, k, v, bank, mask, every_key=True)

    def step(self, q: Tensor, k: Tensor, v: Tensor, bank: SplatBank, state: Any,
             key_padding: Tensor | None = None) -> tuple[Tensor, Any]:
        """Decode new tokens ``[B, H, t, ·]`` (each query sees its own key): ``extend`` with key padding."""
        if q.shape[-2] != k.shape[-2] or k.shape[-2] != v.shape[-2]:
            raise ValueError(f"step needs as many queries as keys and values, got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        return self.extend(q, k, v, bank, state, MaskSpec(causal=True, key_padding=key_padding))


def state_dtype(bank: SplatBank) -> torch.dtype:
    """States are fp32 (fp64 for an fp64 bank, so ``gradcheck`` can run in double)."""
    return compute_dtype(bank.centers)


__all__ = [
    "CAUSAL_KINDS", "BatchState", "RecurrentOps", "absorb_inputs", "check_state", "extend_inputs", "split_state",
    "stack_states", "state_dtype",
]
