"""A small causal character-level language model whose attention is GSA.

Exists to exercise the whole stack end to end (config, registry, calibration, training, backends,
recurrent decoding) in about a minute on a laptop CPU; not a useful language model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gsa_core.attention import GSAMultiheadAttention
from gsa_core.config import GSAConfig
from gsa_core.masks import MaskSpec
from gsa_core.registry import get_registry


@dataclass(frozen=True)
class CharLMShape:
    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_len: int = 512


def split_heads(attn: GSAMultiheadAttention, x: Tensor) -> Tensor:
    """``[batch, n, d_model]`` projections as ``[batch, heads, n, head_dim]`` (the layout the backends take)."""
    batch, length, _ = x.shape
    return x.view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, shape: CharLMShape, config: GSAConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(shape.d_model)
        self.attn = GSAMultiheadAttention(shape.d_model, shape.n_heads, config=config)
        self.ln_mlp = nn.LayerNorm(shape.d_model)
        self.mlp = nn.Sequential(nn.Linear(shape.d_model, 4 * shape.d_model), nn.GELU(),
                                 nn.Linear(4 * shape.d_model, shape.d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_attn(x), is_causal=True)[0]
        return x + self.mlp(self.ln_mlp(x))


class CharGSALM(nn.Module):
    def __init__(self, shape: CharLMShape, config: GSAConfig) -> None:
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab_size, shape.d_model)
        self.pos = nn.Embedding(shape.max_len, shape.d_model)
        self.blocks = nn.ModuleList(Block(shape, config) for _ in range(shape.n_layers))
        self.ln_out = nn.LayerNorm(shape.d_model)
        self.head = nn.Linear(shape.d_model, shape.vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.embed(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_out(x))

    # ------------------------------------------------------------------ recurrent decoding
    @torch.no_grad()
    def generate(self, prompt: Tensor, n_new: int, *, recurrent: bool = True) -> tuple[Tensor, int]:
        """Greedy continuation of ``prompt [1, n]``; returns the tokens and the decoding state's bytes.

        ``recurrent=True`` prefills each layer's kernel state with the prompt and then feeds one
        token at a time (state size independent of length); ``False`` re-runs the full forward
        for every token (the reference).
        """
        if prompt.shape[1] + n_new > self.shape.max_len:
            raise ValueError(f"prompt + new tokens ({prompt.shape[1] + n_new}) exceed max_len {self.shape.max_len}")
        if not recurrent:
            tokens = prompt
            for _ in range(n_new):
                nxt = self(tokens)[:, -1].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, nxt], dim=1)
            return tokens, 0
        kernel = get_registry().build("backend", "kernel")
        logits, states = self._prefill(prompt, kernel)
        tokens = prompt
        for _ in range(n_new):
            nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            logits, states = self._step(nxt, tokens.shape[1] - 1, kernel, states)
        return tokens, sum(s.nbytes() for s in states)

    def _qkv(self, block: Block, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = block.attn
        return split_heads(attn, attn.q_proj(h)), split_heads(attn, attn.k_proj(h)), split_heads(attn, attn.v_proj(h))

    def _merge(self, block: Block, out: Tensor) -> Tensor:
        batch, _, n, _ = out.shape
        return block.attn.out_proj(out.transpose(1, 2).reshape(batch, n, self.shape.d_model))

    def _prefill(self, prompt: Tensor, kernel) -> tuple[Tensor, list]:
        x = self.embed(prompt) + self.pos(torch.arange(prompt.shape[1]))
        states = []
        for block in self.blocks:
            q, k, v = self._qkv(block, block.ln_attn(x))
            out, state = kernel.prefill(q, k, v, block.attn.bank, MaskSpec(causal=True))
            states.append(state)
            x = x + self._merge(block, out)
            x = x + block.mlp(block.ln_mlp(x))
        return self.head(self.ln_out(x))[:, -1], states

    def _step(self, token: Tensor, position: int, kernel, states: list) -> tuple[Tensor, list]:
        x = self.embed(token) + self.pos(torch.tensor([position]))
        new_states = []
        for block, state in zip(self.blocks, states, strict=True):
            q, k, v = self._qkv(block, block.ln_attn(x))
            out, state = kernel.step(q, k, v, block.attn.bank, state)
            new_states.append(state)
            x = x + self._merge(block, out)
            x = x + block.mlp(block.ln_mlp(x))
        return self.head(self.ln_out(x))[:, -1], new_states
