"""A new model family through an entry point: install the example adapter, list it, convert with it."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _adapter_models import batch, greedy, logits

from gsa_core.config import GSAConfig
from gsa_core.errors import GSAError
from gsa_core.registry import scoped_registry
from gsa_core.testing import check_adapter
from gsa_plugins.adapters import convert, detect_adapter, gsa_layers, load_converted, set_passthrough

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gsa-example-adapter"
DIST = "gsa-example-adapter"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True, capture_output=True, text=True, timeout=600)


def _is_installed() -> bool:
    try:
        importlib.metadata.distribution(DIST)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def installed_example() -> Iterator[None]:
    """pip-install the example into this environment (as a user would) and remove it afterwards."""
    already = _is_installed()
    if not already:
        _pip("install", "--no-deps", "--no-build-isolation", str(EXAMPLE))
        shutil.rmtree(EXAMPLE / "build", ignore_errors=True)  # build artefacts of the non-editable install
        shutil.rmtree(EXAMPLE / "src" / "gsa_example_adapter.egg-info", ignore_errors=True)
    importlib.invalidate_caches()
    yield
    if not already:
        _pip("uninstall", "-y", DIST)
        for mod in [m for m in sys.modules if m.startswith("gsa_example_adapter")]:
            del sys.modules[mod]


def tiny_gpt2(cross: bool = False):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=cross,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def test_listed_with_its_distribution(installed_example):
    with scoped_registry() as reg:
        comp = reg.get("adapter", "gpt2")
        assert comp.provider.distribution == DIST and comp.provider.version == "0.1.0"
    out = subprocess.run([shutil.which("gsa") or "gsa", "plugins", "list", "--kind", "adapter", "--json"],
                         capture_output=True, text=True, check=True, timeout=120)
    names = {(c["name"], c["distribution"]) for c in json.loads(out.stdout)["components"]}
    assert ("gpt2", DIST) in names and ("gpt-neo", "gaussian-splat-attention") in names


def test_converts_a_tiny_gpt2(installed_example, tmp_path):
    ids, mask = batch(n=9, left_pad=3)
    with scoped_registry():
        assert detect_adapter(tiny_gpt2()).name == "gpt2"
        from gsa_core.registry import get_registry

        check_adapter(get_registry().build("adapter", "gpt2"), tiny_gpt2,
                      GSAConfig.from_dict({"bank": {"n_splats": 8}, "adapter": {"name": "gpt2",
                                                                               "params": {"passthrough": True}}}),
                      lambda m: logits(m, ids, mask))
        model = tiny_gpt2()
        ref = greedy(model, ids, mask, n=5)
        convert(model, {"bank": {"n_splats": 8}, "adapter": {"name": "gpt2", "params": {"passthrough": True}}})
        assert torch.equal(greedy(model, ids, mask, n=5), ref)
        set_passthrough(model, False)
        out = greedy(model, ids, mask, n=5)
        assert out.shape == (2, 14)
        model.save_pretrained(tmp_path)
        again = load_converted(tmp_path)
        assert (logits(again, ids, mask) - logits(model, ids, mask)).abs().max().item() == 0.0
        # cross-attention comes for free with GPT-2's own is_cross_attention modules
        decoder = convert(tiny_gpt2(cross=True), {"bank": {"n_splats": 8}})
        assert any(layer.causal is False for layer in gsa_layers(decoder).values())
    # without the plugin the checkpoint names what is missing
    with scoped_registry(allow=["builtin"]), pytest.raises(GSAError, match=r"unknown adapter 'gpt2'.*Available"):
        load_converted(tmp_path)
