"""The GSA attention modules.

- :class:`GSAAttention`: multi-head GSA over already-projected ``q, k, v [B, H, n, d]``, with a splat
  bank and a backend built from a :class:`~gsa_core.config.GSAConfig`;
- :class:`GSAMultiheadAttention`: the shape of ``torch.nn.MultiheadAttention`` (own projections,
  torch's mask conventions) for models built from scratch.

Knows no model family and never imports ``transformers``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from gsa_core.bank import SplatBank
from gsa_core.config import GSAConfig
from gsa_core.errors import MaskNotSupportedError, NonFiniteInputError
from gsa_core.masks import MaskSpec
from gsa_core.registry import get_registry


def backends_supporting(kinds: frozenset[str]) -> list[str]:
    """Names of the registered backends whose ``supported_masks`` include every kind in ``kinds``."""
    registry = get_registry()
    names = []
    for comp in registry.components("backend"):
        supported = getattr(comp.factory, "supported_masks", None)
        if not isinstance(supported, (set, frozenset)):
            try:  # an instance attribute only: build it once with default params
                supported = getattr(registry.build("backend", comp.name), "supported_masks", None)
            except Exception:  # a backend that cannot be built serves nothing
                continue
        if isinstance(supported, (set, frozenset)) and kinds <= supported:
            names.append(comp.name)
    return names


class GSAAttention(nn.Module):
    """Multi-head Gaussian Splat Attention over projected queries, keys and values.

    ``forward(q [B, H, n_q, d], k [B, H, n_k, d], v [B, H, n_k, d_v], mask) -> [B, H, n_q, d_v]``
    in ``v``'s dtype. The splat bank (``self.bank``) has the shape ``config.bank`` gives; its centers
    start as a unit Gaussian drawn from torch's global generator (like ``nn.Linear``'s weights) and
    :meth:`initialize` re-initialises it with the configured initializer from calibration data.
    """

    def __init__(self, n_heads: int, head_dim: int, config: GSAConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else GSAConfig()
        bank_cfg = self.config.bank
        self.n_heads, self.head_dim = n_heads, head_dim
        self.bank = SplatBank(
            n_heads, head_dim, bank_cfg.n_splats, bank_cfg.covariance,
            log_normalizer=bank_cfg.log_normalizer, init_scale=bank_cfg.init_scale,
        )
        self.backend_name = self.config.backend.name
        self.backend = self.config.backend.build()
        self.last_info: dict[str, Any] = {}
        #: the layer's name in its model, when whoever builds it knows one: errors name it
        self.label: str | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Unit-Gaussian centers (identical splats would get identical gradients and never separate)."""
        with torch.no_grad():
            self.bank.centers.normal_()

    def initialize(self, queries: Tensor | None = None, keys: Tensor | None = None, *,
                   generator: torch.Generator | None = None) -> None:
        """Run the configured initializer on calibration vectors ``[H, N, d]`` (or none)."""
        if generator is None:
            generator = torch.Generator().manual_seed(self.config.seed)
        initializer = self.config.initializer.build()
        initializer.initialize(self.bank, queries, keys, generator=generator)

    # ------------------------------------------------------------------ checks
    def _check_inputs(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        h, d = self.n_heads, self.head_dim
        for label, t, want_dim in (("q", q, d), ("k", k, d), ("v", v, None)):
            if t.dim() != 4:
                raise ValueError(f"GSAAttention expects {label} as [batch, {h} heads, length, dim], "
                                 f"got {t.dim()} dims {tuple(t.shape)}")
            if t.shape[1] != h:
                raise ValueError(f"{label} has {t.shape[1]} heads, this GSAAttention has {h} "
                                 f"(shape {tuple(t.shape)}; expected [batch, heads, length, dim])")
            if want_dim is not None and t.shape[-1] != want_dim:
                raise ValueError(f"{label} has head dim {t.shape[-1]}, this GSAAttention has head_dim={d} "
                                 f"(shape {tuple(t.shape)})")
        if not (q.shape[0] == k.shape[0] == v.shape[0]):
            raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"k and v must have the same length, got {k.shape[2]} and {v.shape[2]}")

    def check_mask(self, mask: MaskSpec, n_q: int, n_k: int) -> None:
        """Raise :class:`MaskNotSupportedError` naming the kinds and the backends that can serve them."""
        kinds = mask.kinds(n_q, n_k)
        supported = self.backend.supported_masks
        unsupported = kinds - supported
        if not unsupported:
            return
        able = backends_supporting(kinds)
        raise MaskNotSupportedError(
            f"backend {self.backend_name!r} cannot serve mask kind(s) {', '.join(sorted(unsupported))} "
            f"(this mask uses {', '.join(sorted(kinds))}; {self.backend_name!r} supports "
            f"{', '.join(sorted(supported)) or 'none'}). Registered backends that can serve this mask: "
            f"{', '.join(able) if able else '(none)'}; set config.backend to one of them."
        )

    # ------------------------------------------------------------------ forward
    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec | None = None) -> Tensor:
        self._check_inputs(q, k, v)
        mask = mask if mask is not None else MaskSpec()
        batch, _, n_q, _ = q.shape
        n_k = k.shape[2]
        self.check_mask(mask, n_q, n_k)
        mask.check_shapes(batch, n_q, n_k)
        with self.naming_errors():
            out, info = self.backend.forward(q, k, v, self.bank, mask)
        self.last_info = info
        return out

    @contextlib.contextmanager
    def naming_errors(self) -> Iterator[None]:
        """Errors about the inputs raised inside name this layer (:attr:`label`), when it has one."""
        try:
            yield
        except NonFiniteInputError as exc:
            if self.label is None:
                raise
            raise exc.at_layer(self.label) from None

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, head_dim={self.head_dim}, backend={self.backend_name!r}"


# ----------------------------------------------------------------------------- torch conventions
def _allowed_from_torch(mask: Tensor, name: str) -> Tensor:
    """torch mask -> bool "may attend": a bool mask's True means *not allowed*; a float mask is
    additive and must be 0 (allowed) or ``-inf`` / the dtype's minimum (not allowed)."""
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or float tensor (as in torch), got {mask.dtype}")
    blocked = (mask == float("-inf")) | (mask <= torch.finfo(mask.dtype).min)
    allowed = mask == 0
    if not bool((allowed | blocked).all()):
        raise ValueError(
            f"{name}: GSA serves boolean masks only, so an additive float mask must hold 0 (attend) or -inf "
            f"(masked); got other values. Pass a bool mask (True = not allowed) instead."
        )
    return allowed


def _causal_offset(allowed: Tensor) -> int | None:
    """The query offset if ``allowed [L, S]`` is a causal mask (top-left or bottom-right aligned)."""
    n_q, n_k = allowed.shape
    rows = torch.arange(n_q, device=allowed.device).unsqueeze(1)
    cols = torch.arange(n_k, device=allowed.device).unsqueeze(0)
    for offset in dict.fromkeys((0, n_k - n_q)):
        if torch.equal(allowed, cols <= rows + offset):
            return offset
    return None


def mask_from_torch(
    batch: int,
    num_heads: int,
    n_q: int,
    n_k: int,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> MaskSpec:
    """Translate ``torch.nn.MultiheadAttention``'s mask arguments into a :class:`MaskSpec`.

    ``key_padding_mask [B, S]``: True (or ``-inf``) ignores that key. ``attn_mask [L, S]`` or
    ``[B*num_heads, L, S]``: True (or ``-inf``) forbids that pair. ``is_causal``: query ``i`` sees keys
    ``j <= i`` (torch's top-left alignment); an ``attn_mask`` given with it must be that causal mask.
    A causal ``attn_mask`` becomes ``causal=True`` (which every backend serves), any other one
    ``attend`` (an "arbitrary" mask).
    """
    key_padding = None
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, n_k):
            raise ValueError(f"key_padding_mask must be [batch={batch}, source length={n_k}], "
                             f"got {tuple(key_padding_mask.shape)}")
        key_padding = _allowed_from_torch(key_padding_mask, "key_padding_mask")
    causal, offset, attend = False, None, None
    if attn_mask is not None:
        allowed = _allowed_from_torch(attn_mask, "attn_mask")
        if allowed.dim() == 3:
            if tuple(allowed.shape) != (batch * num_heads, n_q, n_k):
                raise ValueError(f"a 3-D attn_mask must be [batch*num_heads={batch * num_heads}, {n_q}, {n_k}], "
                                 f"got {tuple(allowed.shape)}")
            if bool((allowed == allowed[:1]).all()):
                allowed = allowed[0]
        elif allowed.dim() != 2 or tuple(allowed.shape) != (n_q, n_k):
            raise ValueError(f"attn_mask must be [{n_q}, {n_k}] or [batch*num_heads, {n_q}, {n_k}], "
                             f"got {tuple(allowed.shape)}")
        found = _causal_offset(allowed) if allowed.dim() == 2 else None
        if found is not None:
            causal, offset = True, found
        elif is_causal:
            raise ValueError("is_causal=True, but attn_mask is not a causal mask")
        elif allowed.dim() == 2:
            attend = allowed.view(1, 1, n_q, n_k)
        else:
            attend = allowed.view(batch, num_heads, n_q, n_k)
    elif is_causal:
        causal, offset = True, 0
    if causal and offset == n_k - n_q:
        offset = None  # MaskSpec's default alignment
    return MaskSpec(causal=causal, key_padding=key_padding, attend=attend, query_offset=offset)


class GSAMultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention``'s interface with Gaussian Splat Attention inside.

    ``forward(query, key=None, value=None, *, key_padding_mask, attn_mask, is_causal, need_weights)``
    returns ``(out, None)``; ``key`` defaults to ``query`` and ``value`` to ``key``. Masks follow torch:
    ``key_padding_mask`` True ignores a key, a bool ``attn_mask`` True forbids a pair (float masks are
    additive, 0 or ``-inf``), ``batch_first`` picks ``[B, L, E]`` or ``[L, B, E]``, and unbatched
    ``[L, E]`` inputs work. Differences: a query that sees no key returns zeros (torch gives NaN),
    ``is_causal=True`` needs no ``attn_mask``, and attention weights are never materialised.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        batch_first: bool = True,
        config: GSAConfig | None = None,
    ) -> None:
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.attention = GSAAttention(num_heads, self.head_dim, config)
        self._reset_projections()

    def _reset_projections(self) -> None:
        """torch's MultiheadAttention init: Xavier-uniform input projections, zero biases."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    @property
    def bank(self) -> SplatBank:
        return self.attention.bank

    def _split(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, None]:
        if need_weights:
            raise NotImplementedError(
                "GSAMultiheadAttention does not materialise attention weights; call it with need_weights=False"
            )
        key = query if key is None else key
        value = key if value is None else value
        unbatched = query.dim() == 2
        if unbatched:
            if key.dim() != 2 or value.dim() != 2:
                raise ValueError(f"unbatched query [L, E] needs unbatched key and value, got {tuple(key.shape)} "
                                 f"and {tuple(value.shape)}")
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        else:
            for label, t in (("query", query), ("key", key), ("value", value)):
                if t.dim() != 3:
                    raise ValueError(f"{label} must be [batch, length, dim] (batch_first) or [length, batch, dim], "
                                     f"or unbatched [length, dim]; got {tuple(t.shape)}")
            if not self.batch_first:
                query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        for label, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ValueError(f"{label} has feature size {t.shape[-1]}, expected {dim}")
        batch, n_q, _ = query.shape
        if key.shape[0] != batch or value.shape[0] != batch:
            raise ValueError(f"batch sizes differ: query {batch}, key {key.shape[0]}, value {value.shape[0]}")
        if key.shape[1] != value.shape[1]:
            raise ValueError(f"key and value must have the same length, got {key.shape[1]} and {value.shape[1]}")
        n_k = key.shape[1]
        mask = mask_from_torch(batch, self.num_heads, n_q, n_k, key_padding_mask=key_padding_mask,
                               attn_mask=attn_mask, is_causal=is_causal)
        q, k, v = self._split(self.q_proj(query)), self._split(self.k_proj(key)), self._split(self.v_proj(value))
        out = self.attention(q, k, v, mask)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, n_q, self.embed_dim))
        if unbatched:
            return out.squeeze(0), None
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
                f"batch_first={self.batch_first}")
