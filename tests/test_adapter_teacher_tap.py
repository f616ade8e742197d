"""In passthrough, a converted layer hands its host's inputs and exact output to ``GSALayer.teacher``.

Distillation relies on this seam: the recorded output must be the host's own attention output (the
model's result is unchanged), and the recorded inputs and mask must be what GSA attends with.
"""

from __future__ import annotations

import pytest
import torch
from _adapter_models import batch, gsa_config, logits, tiny_bert, tiny_gpt_neo

from gsa_core.masks import MaskSpec
from gsa_plugins.adapters import convert, gsa_layers, set_passthrough


def _record(model) -> list[tuple]:
    seen: list[tuple] = []
    for layer in gsa_layers(model).values():
        layer.teacher = lambda q, k, v, spec, out, _seen=seen: _seen.append((q, k, v, spec, out))
    return seen


def _softmax_reference(q, k, v, spec: MaskSpec, scaling: float) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * scaling
    allowed = spec.allowed(q.shape[-2], k.shape[-2], device=q.device)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("family", ["gpt-neo", "bert"])
def test_teacher_tap_sees_the_exact_output_and_changes_nothing(family: str) -> None:
    build = tiny_gpt_neo if family == "gpt-neo" else tiny_bert
    ids, mask = batch()
    original = logits(build(), ids, mask)
    model = convert(build(), gsa_config(family, global_layers="gsa") if family == "gpt-neo" else gsa_config(family))
    set_passthrough(model, True)
    seen = _record(model)
    assert torch.equal(logits(model, ids, mask), original)
    assert len(seen) == len(gsa_layers(model))
    for (q, k, v, spec, out), layer in zip(seen, gsa_layers(model).values(), strict=True):
        assert out.shape == (*q.shape[:-1], v.shape[-1])
        real = mask.bool()
        expect = _softmax_reference(q, k, v, spec, layer.scaling)
        torch.testing.assert_close(out[real.unsqueeze(1).expand_as(out[..., 0])],
                                   expect[real.unsqueeze(1).expand_as(expect[..., 0])], atol=1e-5, rtol=1e-4)
        assert spec.causal == (family == "gpt-neo")


def test_no_tap_outside_passthrough() -> None:
    ids, mask = batch()
    model = convert(tiny_gpt_neo(), gsa_config("gpt-neo"))
    seen = _record(model)
    logits(model, ids, mask)
    assert seen == []
