"""Position extension by name (kind ``positions``): the built-ins, the conformance kit, models, configs, errors."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from _adapter_models import SMALL_BANK, tiny_gpt_neo

from gsa_core import GSAConfig, StrategyParams, scoped_registry
from gsa_core.errors import ConfigError, UnknownComponentError
from gsa_core.positions import PositionLimitError, check_table
from gsa_core.registry import get_registry
from gsa_core.testing import check_component, check_position_extension
from gsa_plugins.adapters import convert, load_converted
from gsa_plugins.adapters.positions import extend_positions, position_limit
from gsa_plugins.positions import Interpolate, NoExtension, Tile

GPT_NEO = {**SMALL_BANK, "backend": "kernel", "adapter": {"name": "gpt-neo"}}


# ----------------------------------------------------------------------------- the built-in strategies
def test_builtins_pass_the_conformance_kit():
    check_position_extension(Tile(), keeps_prefix=True, bounded=True)
    check_position_extension(Interpolate(), keeps_endpoints=True, bounded=True)
    check_position_extension(Interpolate(align="scale"), bounded=True)
    check_position_extension(NoExtension(), keeps_prefix=True)
    check_component("positions", get_registry().build("positions", "tile"))


def test_tile_copies_the_table_and_interpolate_reads_between_trained_rows():
    table = torch.arange(8.0).view(4, 2)  # row i = (2i, 2i+1)
    assert torch.equal(Tile().extend(table, 10), table[torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])])
    # endpoints: position m of 7 reads trained position m * 3 / 6 = m / 2
    out = Interpolate().extend(table, 7)
    assert torch.equal(out[::2], table)  # whole source positions are exact copies
    torch.testing.assert_close(out[1::2], (table[:-1] + table[1:]) / 2)  # halfway: the mean, rounded once
    # scale (Chen et al.): position m of 8 reads m * 4 / 8; past the last trained row, the last row
    scaled = Interpolate(align="scale").extend(table, 8)
    assert torch.equal(scaled[0:6:2], table[:3]) and torch.equal(scaled[-1], table[-1])


def test_none_past_the_table_names_the_limit_and_the_options():
    with pytest.raises(PositionLimitError) as info:
        NoExtension().extend(torch.zeros(4, 2), 9)
    text = str(info.value)
    assert "4 learned positions" in text and "--max-positions N --positions NAME" in text
    assert "interpolate" in text and "tile" in text


def test_bad_tables_and_lengths_are_refused():
    with pytest.raises(ValueError, match=r"\[positions, dim\]"):
        check_table(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="at least every trained position"):
        Tile().extend(torch.zeros(4, 2), 3)


def test_strategy_names_and_params_are_validated_with_did_you_mean():
    with pytest.raises(UnknownComponentError, match="Did you mean 'interpolate'"):
        get_registry().build("positions", "interpolte")
    with pytest.raises(ConfigError, match="align"):
        GSAConfig.from_dict({"long_context": {"positions": {"name": "interpolate", "params": {"align": "sideways"}}}})
    with pytest.raises(ConfigError, match="Did you mean 'tile'"):
        GSAConfig.from_dict({"long_context": {"positions": "tiles"}})


# ----------------------------------------------------------------------------- the kit catches broken strategies
class _Base(StrategyParams):
    def extend(self, table, n_positions):
        rows = check_table(table, n_positions)
        return table[torch.arange(n_positions) % rows].clone()


class _InPlace(_Base):
    def extend(self, table, n_positions):
        table.mul_(1.0 + 1e-3)
        return super().extend(table, n_positions)


class _WrongShape(_Base):
    def extend(self, table, n_positions):
        return super().extend(table, n_positions)[:-1] if n_positions > 1 else table.new_zeros(2, table.shape[1])


class _Noisy(_Base):
    def extend(self, table, n_positions):
        return super().extend(table, n_positions) + torch.randn(n_positions, table.shape[1], dtype=table.dtype)


class _NotIdentity(_Base):
    def extend(self, table, n_positions):
        return super().extend(table, n_positions).flip(0)


class _Aliased(_Base):
    def extend(self, table, n_positions):
        return table if n_positions == table.shape[0] else super().extend(table, n_positions)


@pytest.mark.parametrize(("broken", "message"), [
    (_InPlace(), "modified the table"), (_WrongShape(), "returned shape"), (_Noisy(), "not deterministic|n_positions"),
    (_NotIdentity(), "n_positions == P"), (_Aliased(), "aliased"),
])
def test_the_kit_catches_broken_strategies(broken, message):
    with pytest.raises(AssertionError, match=message):
        check_position_extension(broken, max_examples=20)


def test_the_kit_checks_declared_properties():
    with pytest.raises(AssertionError, match="first"):
        check_position_extension(Interpolate(), keeps_prefix=True, max_examples=20)
    with pytest.raises(AssertionError, match="first and last"):
        check_position_extension(Tile(), keeps_endpoints=True, max_examples=20)


# ----------------------------------------------------------------------------- models
def test_extend_a_converted_model_records_the_strategy_and_round_trips(tmp_path):
    model = convert(tiny_gpt_neo(), GPT_NEO)
    ids = torch.randint(3, 101, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    trained = model.transformer.wpe.weight.detach().clone()
    extend_positions(model, 256, "tile")
    assert position_limit(model) == 256 and model.config.max_position_embeddings == 256
    assert torch.equal(model.transformer.wpe.weight[:64], trained)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # tile keeps the trained positions: short inputs unchanged
    long_context = model.config.gsa["long_context"]
    assert long_context["positions"] == {"name": "tile", "params": {}} and long_context["trained_positions"] == 64
    model.save_pretrained(tmp_path)
    again = load_converted(tmp_path)
    assert again.config.gsa == model.config.gsa and position_limit(again) == 256
    long_ids = torch.randint(3, 101, (1, 200))
    with torch.no_grad():
        assert torch.equal(again(long_ids).logits, model(long_ids).logits)
    extend_positions(again, 512, "interpolate", {"align": "scale"})  # a second extension keeps the first length
    assert again.config.gsa["long_context"]["trained_positions"] == 64
    assert again.config.gsa["long_context"]["positions"] == {"name": "interpolate", "params": {"align": "scale"}}


def test_extend_an_original_model_rebuilds_its_own_masks():
    """The softmax baseline at a longer context: GPT-Neo's own ``P x P`` bias buffer follows the table."""
    model = tiny_gpt_neo()
    extend_positions(model, 128, "interpolate")
    assert model.transformer.h[0].attn.attention.bias.shape[-1] == 128
    with torch.no_grad():
        out = model(torch.randint(3, 101, (1, 100))).logits
    assert out.shape == (1, 100, 101) and torch.isfinite(out).all()


def test_extend_positions_errors():
    model = convert(tiny_gpt_neo(), GPT_NEO)
    with pytest.raises(ConfigError, match="at least the model's 64 positions"):
        extend_positions(model, 32, "tile")
    with pytest.raises(PositionLimitError, match="64 learned positions"):
        extend_positions(model, 65, "none")
    with pytest.raises(UnknownComponentError, match="Did you mean"):
        extend_positions(model, 128, "tilee")
    assert position_limit(model) == 64  # nothing changed by the failed calls


# ----------------------------------------------------------------------------- a third-party strategy
class Reflect(StrategyParams):
    """Mirror the table at its end (a plugin's strategy)."""

    name: ClassVar[str] = "reflect"

    def extend(self, table, n_positions):
        rows = check_table(table, n_positions)
        period = torch.arange(n_positions) % (2 * rows)
        return table[torch.where(period < rows, period, 2 * rows - 1 - period)].clone()


def test_a_third_party_strategy_registers_passes_the_kit_and_extends_a_model(tmp_path):
    with scoped_registry() as registry:
        registry.register("positions", "reflect", Reflect)
        check_position_extension(registry.build("positions", "reflect"), keeps_prefix=True, bounded=True)
        model = convert(tiny_gpt_neo(), GPT_NEO)
        trained = model.transformer.wpe.weight.detach().clone()
        extend_positions(model, 160, "reflect")
        assert torch.equal(model.transformer.wpe.weight[64:128], trained.flip(0))
        model.save_pretrained(tmp_path)
        assert load_converted(tmp_path).config.gsa["long_context"]["positions"]["name"] == "reflect"
        with pytest.raises(UnknownComponentError, match="Did you mean 'reflect'"):
            registry.build("positions", "reflct")


# ----------------------------------------------------------------------------- past the table: one message
def test_model_and_generate_past_the_table_raise_one_message_not_an_index_error():
    model = convert(tiny_gpt_neo(), GPT_NEO)
    too_long = torch.randint(3, 101, (1, 65))
    with pytest.raises(PositionLimitError) as info, torch.no_grad():
        model(too_long)
    assert (info.value.needed, info.value.limit) == (65, 64)
    assert "--max-positions N --positions NAME" in str(info.value) and "interpolate" in str(info.value)
    with pytest.raises(PositionLimitError, match="64 learned positions"):
        model.generate(too_long, max_new_tokens=2, do_sample=False)
    # a prompt that fits, generating past the table: the step that would need position 65 stops with the message
    with pytest.raises(PositionLimitError, match="needs 65 positions"):
        model.generate(too_long[:, :60], max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with pytest.raises(PositionLimitError), torch.no_grad():  # explicit position ids past the table
        model(too_long[:, :8], position_ids=torch.arange(60, 68).unsqueeze(0))
    extend_positions(model, 128, "interpolate")
    with torch.no_grad():
        assert torch.isfinite(model(too_long).logits).all()  # extended: fits
    with pytest.raises(PositionLimitError, match="already extended \\(interpolate from 64\\)"), torch.no_grad():
        model(torch.randint(3, 101, (1, 129)))


# ----------------------------------------------------------------------------- gsa convert --max-positions
def _cli(args, capsys):
    from gsa_cli.main import main

    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_gsa_convert_extends_positions_and_records_them(tmp_path, capsys):
    src = tmp_path / "src"
    tiny_gpt_neo().save_pretrained(src)
    status, out, _ = _cli(["convert", str(src), str(tmp_path / "tile"), "--max-positions", "256", "--positions", "tile",
                           "--passthrough", "--verify", "--json"], capsys)
    assert status == 0
    import json

    summary = json.loads(out)
    assert summary["positions"] == {"strategy": "tile", "params": {}, "from": 64, "to": 256}
    assert summary["passthrough_max_abs_diff"] == 0.0 and summary["verified"]  # tile keeps the trained rows
    saved = load_converted(tmp_path / "tile")
    assert position_limit(saved) == 256 and saved.config.gsa["long_context"]["positions"]["name"] == "tile"
    # interpolate moves trained positions: the original is no longer the passthrough reference, and says so
    status, out, _ = _cli(["convert", str(src), str(tmp_path / "interp"), "--max-positions", "200", "--positions",
                           "interpolate", "--passthrough", "--verify", "--json"], capsys)
    summary = json.loads(out)
    assert status == 0 and "passthrough_max_abs_diff" not in summary and "skipped" in summary["positions"][
        "passthrough_check"]
    # an already converted model only gets its positions extended; its GSA config stays
    status, out, _ = _cli(["convert", str(tmp_path / "tile"), str(tmp_path / "more"), "--max-positions", "512",
                           "--positions", "interpolate"], capsys)
    assert status == 0 and out.startswith("extended positions 256 -> 512 (interpolate)")
    more = load_converted(tmp_path / "more")
    assert position_limit(more) == 512 and more.config.gsa["long_context"]["trained_positions"] == 64
    assert more.config.gsa["adapter"] == saved.config.gsa["adapter"]


@pytest.mark.parametrize(("args", "message"), [
    (["--max-positions", "256"], "needs a strategy: --positions NAME"),
    (["--positions", "tile"], "give --max-positions N too"),
    (["--max-positions", "256", "--positions", "tilee"], "Did you mean 'tile'"),
    (["--max-positions", "0", "--positions", "tile"], "positive number"),
    (["--max-positions", "32", "--positions", "tile"], "at least the model's 64 positions"),
    (["--max-positions", "100", "--positions", "none"], "64 learned positions"),
])
def test_gsa_convert_bad_position_requests_are_one_line_and_status_2(tmp_path, capsys, args, message):
    src = tmp_path / "src"
    tiny_gpt_neo().save_pretrained(src)
    status, _, err = _cli(["convert", str(src), str(tmp_path / "dst"), *args], capsys)
    assert status == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").iterdir())  # nothing written
