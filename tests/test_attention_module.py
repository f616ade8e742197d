"""GSAAttention and GSAMultiheadAttention: shapes, backends by name, masks in torch's conventions, training."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from torch import nn

from gsa_core import GSAAttention, GSAConfig, GSAMultiheadAttention, MaskNotSupportedError, MaskSpec
from gsa_core.attention import backends_supporting, mask_from_torch
from gsa_core.registry import NoParams
from gsa_core.testing import relative_rmse
from gsa_core.testing.strategies import padding_mask
from gsa_plugins.backends.auto import AutoBackend, AutoParams
from gsa_plugins.backends.dense import DenseBackend
from gsa_plugins.backends.sparse import SparseBackend


def config(backend="dense", n_splats=8, **params) -> GSAConfig:
    return GSAConfig.from_dict({"bank": {"n_splats": n_splats}, "backend": {"name": backend, "params": params}})


def qkv(batch=2, heads=2, n_q=7, n_k=7, d=4, dv=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, n_q, d, generator=g), torch.randn(batch, heads, n_k, d, generator=g),
            torch.randn(batch, heads, n_k, dv, generator=g))


def mha(seed=0, **kw) -> GSAMultiheadAttention:
    torch.manual_seed(seed)
    kw.setdefault("config", config())
    return GSAMultiheadAttention(16, 4, **kw)


def by_spec(module: GSAMultiheadAttention, query, key, value, mask: MaskSpec) -> torch.Tensor:
    """The module's computation with an explicit MaskSpec (batch_first inputs)."""
    q, k, v = (module._split(p(x)) for p, x in ((module.q_proj, query), (module.k_proj, key), (module.v_proj, value)))
    out = module.attention(q, k, v, mask)
    return module.out_proj(out.transpose(1, 2).reshape(query.shape[0], query.shape[1], module.embed_dim))


# ----------------------------------------------------------------------------- GSAAttention
@pytest.mark.parametrize("n_q, n_k, dv", [(7, 7, 4), (3, 9, 5), (9, 2, 1)])
def test_gsa_attention_shapes(n_q, n_k, dv):
    torch.manual_seed(0)
    attn = GSAAttention(2, 4, config())
    q, k, v = qkv(n_q=n_q, n_k=n_k, dv=dv)
    out = attn(q, k, v)
    assert out.shape == (2, 2, n_q, dv) and torch.isfinite(out).all()
    assert attn.bank.capacity == 8 and attn.bank.n_heads == 2 and attn.bank.head_dim == 4
    assert attn.last_info["backend"] == "dense"
    assert len({tuple(c) for c in attn.bank.centers.detach()[0].tolist()}) == 8  # splats start distinct


def test_bank_follows_the_config():
    cfg = GSAConfig.from_dict({"bank": {"n_splats": 5, "covariance": "full", "log_normalizer": True,
                                        "init_scale": 0.5}})
    attn = GSAAttention(3, 4, cfg)
    assert attn.bank.capacity == 5 and attn.bank.covariance == "full" and attn.bank.log_normalizer
    assert torch.allclose(attn.bank.scale_tril().diagonal(dim1=-2, dim2=-1), torch.tensor(0.5))
    assert attn.backend_name == "auto" and isinstance(attn.backend, AutoBackend)
    attn.initialize(torch.randn(3, 50, 4), torch.randn(3, 50, 4))  # the configured initializer, by name
    assert torch.isfinite(attn.bank.centers).all()


@pytest.mark.parametrize("name, params, kind", [
    ("dense", {}, DenseBackend), ("sparse", {"top_k": 16}, SparseBackend), ("kernel", {}, None), ("auto", {}, None),
])
def test_backends_by_name_agree(name, params, kind):
    torch.manual_seed(0)
    ref = GSAAttention(2, 4, config("dense"))
    attn = GSAAttention(2, 4, config(name, **params))
    attn.load_state_dict(ref.state_dict())
    assert attn.backend_name == name
    if kind is not None:
        assert isinstance(attn.backend, kind)
    q, k, v = qkv(n_q=20, n_k=20)
    for mask in (MaskSpec(causal=True), MaskSpec(causal=True, key_padding=padding_mask(2, 20, 1, side="left"))):
        assert relative_rmse(attn(q, k, v, mask), ref(q, k, v, mask)) <= 1e-4


def test_cross_attention_with_padding_on_both_sides():
    torch.manual_seed(1)
    q, k, v = qkv(n_q=6, n_k=11, dv=3, seed=1)
    mask = MaskSpec(key_padding=padding_mask(2, 11, 2), query_padding=padding_mask(2, 6, 3))
    outs = {}
    for name, params in (("dense", {}), ("kernel", {}), ("sparse", {"top_k": 8})):
        torch.manual_seed(1)
        attn = GSAAttention(2, 4, config(name, **params))
        outs[name] = out = attn(q, k, v, mask)
        pad = ~mask.key_padding[:, None, :, None]
        k2, v2 = torch.where(pad, torch.randn(k.shape), k), torch.where(pad, torch.randn(v.shape), v)
        torch.testing.assert_close(attn(q, k2, v2, mask), out, rtol=1e-5, atol=1e-6)
        assert torch.all(out[~mask.query_padding[:, None, :].expand(-1, 2, -1)] == 0)
    assert relative_rmse(outs["kernel"], outs["dense"]) <= 1e-4
    assert relative_rmse(outs["sparse"], outs["dense"]) <= 1e-4


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q[:, :1], k, v), "heads"),
    (lambda q, k, v: (q[..., :3], k, v), "head dim"),
    (lambda q, k, v: (q[:1], k, v), "batch"),
    (lambda q, k, v: (q, k, v[..., :5, :]), "same length"),
    (lambda q, k, v: (q[0], k, v), "4 dims|dims"),
])
def test_gsa_attention_input_errors(bad, match):
    attn = GSAAttention(2, 4, config())
    with pytest.raises(ValueError, match=match):
        attn(*bad(*qkv()))


def test_mask_shape_errors_are_clear():
    attn = GSAAttention(2, 4, config())
    with pytest.raises(ValueError, match="key_padding"):
        attn(*qkv(), MaskSpec(key_padding=torch.ones(2, 3, dtype=torch.bool)))


# ----------------------------------------------------------------------------- unsupported masks
def test_mask_not_supported_names_the_kinds_and_the_able_backends():
    attn = GSAAttention(2, 4, config("sparse"))
    with pytest.raises(MaskNotSupportedError) as info:
        attn(*qkv(), MaskSpec(causal=True, window=3))
    msg = str(info.value)
    assert "window" in msg and "'sparse'" in msg
    able = msg.split("can serve this mask:")[1]
    assert "dense" in able and "auto" in able and "sparse" not in able and "kernel" not in able
    with pytest.raises(MaskNotSupportedError, match="arbitrary"):
        attn(*qkv(), MaskSpec(attend=torch.ones(1, 1, 7, 7, dtype=torch.bool)))


def test_able_backends_come_from_the_registry(gsa_registry):
    class Windowed:
        name = "windowed"
        supported_masks = frozenset({"causal", "window"})

        def __init__(self, params=None):
            pass

        def forward(self, q, k, v, bank, mask):
            return DenseBackend().forward(q, k, v, bank, mask)

    gsa_registry.register("backend", "windowed", Windowed, NoParams)
    assert backends_supporting(frozenset({"causal", "window"})) == ["auto", "dense", "windowed"]
    attn = GSAAttention(2, 4, config("kernel"))
    with pytest.raises(MaskNotSupportedError, match="auto, dense, windowed"):
        attn(*qkv(), MaskSpec(causal=True, window=2))


# ----------------------------------------------------------------------------- auto
def test_auto_picks_an_exact_backend_that_serves_the_mask():
    auto = AutoBackend(AutoParams(dense_max_pairs=100))
    small, big = GSAAttention(1, 4, config(n_splats=4)).bank, GSAAttention(1, 4, config(n_splats=32)).bank
    assert auto.choose(MaskSpec(causal=True), 5, 5, big).name == "dense"
    assert auto.choose(MaskSpec(causal=True), 50, 50, big).name == "kernel"
    assert auto.choose(MaskSpec(causal=True, window=4), 50, 50, big).name == "dense"
    sparse_first = AutoBackend(AutoParams(dense_max_pairs=100, preference=["sparse", "dense"]))
    assert sparse_first.choose(MaskSpec(causal=True), 50, 50, big).name == "dense"  # top_k 8 < 32 alive
    assert sparse_first.choose(MaskSpec(causal=True), 50, 50, small).name == "sparse"  # exact here
    q, k, v = qkv(batch=1, heads=1, n_q=30, n_k=30)
    out, info = auto.forward(q, k, v, big, MaskSpec(causal=True))
    assert info["backend"] == "kernel"
    assert relative_rmse(out, DenseBackend().forward(q, k, v, big, MaskSpec(causal=True))[0]) <= 1e-4


# ----------------------------------------------------------------------------- GSAMultiheadAttention
def test_mha_shapes_and_layouts():
    module = mha()
    x = torch.randn(3, 5, 16)
    out, weights = module(x)
    assert out.shape == (3, 5, 16) and weights is None
    seq_first = mha(batch_first=False)
    seq_first.load_state_dict(module.state_dict())
    torch.testing.assert_close(seq_first(x.transpose(0, 1))[0].transpose(0, 1), out)
    torch.testing.assert_close(module(x[1])[0], out[1], rtol=1e-5, atol=1e-6)  # unbatched [L, E]
    cross = mha(kdim=6, vdim=10)
    out, _ = cross(torch.randn(2, 4, 16), torch.randn(2, 9, 6), torch.randn(2, 9, 10))
    assert out.shape == (2, 4, 16)


def test_mha_torch_masks_equal_mask_specs():
    module = mha(config=config("dense"))
    x = torch.randn(2, 6, 16)
    kpm = torch.tensor([[False] * 6, [True, True, False, False, False, False]])  # True = ignore (torch)
    causal_bool = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)  # True = not allowed (torch)
    causal_float = nn.Transformer.generate_square_subsequent_mask(6)
    spec = MaskSpec(causal=True, key_padding=~kpm)
    expected = by_spec(module, x, x, x, spec)
    for kwargs in ({"attn_mask": causal_bool}, {"attn_mask": causal_float}, {"is_causal": True},
                   {"attn_mask": causal_bool, "is_causal": True}):
        out, _ = module(x, key_padding_mask=kpm, **kwargs)
        torch.testing.assert_close(out, expected)
    float_kpm = torch.zeros(2, 6).masked_fill(kpm, float("-inf"))
    torch.testing.assert_close(module(x, key_padding_mask=float_kpm, is_causal=True)[0], expected)
    # an arbitrary bool mask: True = not allowed, in 2-D and per-head 3-D form
    g = torch.Generator().manual_seed(0)
    blocked = torch.rand(6, 6, generator=g) < 0.4
    expected = by_spec(module, x, x, x, MaskSpec(attend=~blocked))
    torch.testing.assert_close(module(x, attn_mask=blocked)[0], expected)
    torch.testing.assert_close(module(x, attn_mask=blocked.expand(2 * 4, 6, 6))[0], expected)
    per_head = torch.rand(2 * 4, 6, 6, generator=g) < 0.4
    expected = by_spec(module, x, x, x, MaskSpec(attend=~per_head.view(2, 4, 6, 6)))
    torch.testing.assert_close(module(x, attn_mask=per_head)[0], expected)


def test_mask_from_torch_allowed_sets_match_torch():
    kpm = torch.tensor([[False, True, False, False], [True, False, False, False]])
    attn = torch.rand(3, 4) < 0.5
    spec = mask_from_torch(2, 1, 3, 4, key_padding_mask=kpm, attn_mask=attn)
    torch_allowed = ~(attn[None, None] | kpm[:, None, None, :])
    assert torch.equal(spec.allowed(3, 4).expand(2, 1, 3, 4), torch_allowed)
    top_left = mask_from_torch(1, 1, 3, 5, is_causal=True)  # torch's is_causal is top-left aligned
    assert torch.equal(top_left.allowed(3, 5)[0, 0], torch.ones(3, 5, dtype=torch.bool).tril())
    assert top_left.kinds(3, 5) == frozenset({"causal"})
    bottom_right = mask_from_torch(1, 1, 3, 5, attn_mask=torch.ones(3, 5, dtype=torch.bool).triu(3))
    assert bottom_right.causal and bottom_right.offset(3, 5) == 2


def test_mha_cross_attention_with_padding_on_both_sides():
    module = mha(config=config("kernel"))
    query, memory = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    memory_pad = ~padding_mask(2, 9, 4)  # torch: True = ignore
    query_real = padding_mask(2, 5, 5)
    out, _ = module(query, memory, memory, key_padding_mask=memory_pad)
    expected = by_spec(module, query, memory, memory, MaskSpec(key_padding=~memory_pad))
    torch.testing.assert_close(out, expected)
    # padded memory and padded queries never influence the real queries' outputs
    memory2 = torch.where(memory_pad.unsqueeze(-1), torch.randn(2, 9, 16), memory)
    query2 = torch.where(query_real.unsqueeze(-1), query, torch.randn(2, 5, 16))
    out2, _ = module(query2, memory2, memory2, key_padding_mask=memory_pad)
    torch.testing.assert_close(out2[query_real], out[query_real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"need_weights": True}, NotImplementedError, "weights"),
    ({"attn_mask": torch.full((6, 6), -1.0)}, ValueError, "0 .attend. or -inf"),
    ({"attn_mask": torch.rand(6, 6) < 0.5, "is_causal": True}, ValueError, "not a causal mask"),
    ({"attn_mask": torch.zeros(5, 6, dtype=torch.bool)}, ValueError, "attn_mask must be"),
    ({"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}, ValueError, "key_padding_mask must be"),
    ({"key_padding_mask": torch.zeros(2, 6, dtype=torch.long)}, TypeError, "bool or float"),
])
def test_mha_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        mha()(torch.randn(2, 6, 16), **kwargs)


def test_mha_shape_errors():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        GSAMultiheadAttention(10, 4)
    module = mha()
    with pytest.raises(ValueError, match="feature size"):
        module(torch.randn(2, 6, 12))
    with pytest.raises(ValueError, match="batch sizes"):
        module(torch.randn(2, 6, 16), torch.randn(3, 6, 16))
    with pytest.raises(ValueError, match="same length"):
        module(torch.randn(2, 6, 16), torch.randn(2, 6, 16), torch.randn(2, 5, 16))


def test_mha_sparse_backend_refuses_an_arbitrary_attn_mask():
    module = mha(config=config("sparse"))
    x = torch.randn(1, 6, 16)
    assert module(x, attn_mask=torch.triu(torch.ones(6, 6, dtype=torch.bool), 1))[0].shape == (1, 6, 16)
    with pytest.raises(MaskNotSupportedError, match="arbitrary"):
        module(x, attn_mask=torch.eye(6, dtype=torch.bool))


def test_state_dict_round_trip():
    module = mha(seed=0, config=config("sparse", n_splats=12, top_k=4))
    with torch.no_grad():
        module.bank.alive[:, 3] = False
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    restored = mha(seed=1, config=config("sparse", n_splats=12, top_k=4))
    x = torch.randn(2, 9, 16)
    assert not torch.allclose(restored(x, is_causal=True)[0], module(x, is_causal=True)[0])
    restored.load_state_dict(torch.load(buffer))
    assert {"attention.bank.centers", "attention.bank.alive", "q_proj.weight", "out_proj.bias"} <= set(
        restored.state_dict())
    assert torch.equal(restored.bank.alive, module.bank.alive)
    torch.testing.assert_close(restored(x, is_causal=True)[0], module(x, is_causal=True)[0])


@pytest.mark.parametrize("backend", ["dense", "kernel", "sparse"])
def test_module_trains(backend):
    """A toy causal task (predict the running mean of a signal) gets better in a few Adam steps."""
    torch.manual_seed(0)
    model = GSAMultiheadAttention(16, 2, config=config(backend, n_splats=16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(8, 12, 16)
    target = x.cumsum(1) / torch.arange(1, 13).view(1, 12, 1)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = (model(x, is_causal=True)[0] - target).square().mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert model.bank.centers.grad is not None


def test_gsa_core_never_imports_transformers():
    code = "import sys, gsa_core; from gsa_core import GSAMultiheadAttention; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
