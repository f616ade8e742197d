"""The validated config: formats, error paths with field paths and suggestions, schema export."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_core.config import GSAConfig, config_json_schema
from gsa_core.errors import ConfigError

EXAMPLE = {
    "seed": 5,
    "bank": {"n_splats": 32, "covariance": "isotropic"},
    "initializer": {"name": "random", "params": {"scale_factor": 0.5}},
    "backend": "dense",
    "adaptation": {"enabled": True, "scheduler": {"name": "interval", "params": {"every": 10, "start": 0}}},
}


def test_defaults_are_valid_and_filled():
    cfg = GSAConfig()
    assert cfg.backend.name == "auto" and cfg.initializer.name == "random"
    assert cfg.adaptation.scheduler.params == {"start": 100, "every": 100, "stop": None}


def test_bare_string_is_shorthand_and_params_are_filled():
    cfg = GSAConfig.from_dict(EXAMPLE)
    assert cfg.backend.name == "dense" and "block_elements" in cfg.backend.params
    assert cfg.initializer.params == {"scale_factor": 0.5}
    assert cfg.adaptation.scheduler.params["every"] == 10


@pytest.mark.parametrize("suffix", [".toml", ".json", ".yaml", ".yml"])
def test_file_formats_round_trip(tmp_path, suffix):
    import tomllib  # noqa: F401 - TOML written by hand below

    import yaml

    path = tmp_path / f"cfg{suffix}"
    if suffix == ".toml":
        path.write_text(
            'seed = 5\nbackend = "dense"\n[bank]\nn_splats = 32\ncovariance = "isotropic"\n'
            '[initializer]\nname = "random"\nparams = { scale_factor = 0.5 }\n'
            '[adaptation]\nenabled = true\nscheduler = { name = "interval", params = { every = 10, start = 0 } }\n'
        )
    elif suffix == ".json":
        path.write_text(json.dumps(EXAMPLE))
    else:
        path.write_text(yaml.safe_dump(EXAMPLE))
    assert GSAConfig.from_file(path) == GSAConfig.from_dict(EXAMPLE)


def test_dump_and_reload_is_identity():
    cfg = GSAConfig.from_dict(EXAMPLE)
    assert GSAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_misspelled_strategy_names_path_value_and_suggestion():
    with pytest.raises(ConfigError) as info:
        GSAConfig.from_dict({"adaptation": {"birth": {"name": "clon"}}})
    msg = str(info.value)
    assert "adaptation.birth.name" in msg
    assert "unknown birth 'clon'" in msg
    assert "Did you mean 'clone'?" in msg


def test_bad_params_name_the_nested_field():
    with pytest.raises(ConfigError) as info:
        GSAConfig.from_dict({"backend": {"name": "dense", "params": {"block_elements": -1}}})
    msg = str(info.value)
    assert "backend.params" in msg and "block_elements: Input should be greater than or equal to 1" in msg


def test_unknown_keys_are_rejected_everywhere():
    for bad, path in [({"sed": 1}, "sed"), ({"bank": {"n_splat": 3}}, "bank.n_splat"),
                      ({"backend": {"name": "dense", "extra": 1}}, "backend.extra")]:
        with pytest.raises(ConfigError, match=rf"{path}: Extra inputs are not permitted"):
            GSAConfig.from_dict(bad)


def test_literal_choices_are_listed():
    with pytest.raises(ConfigError, match=r"bank.covariance: Input should be 'isotropic', 'diagonal' or 'full'"):
        GSAConfig.from_dict({"bank": {"covariance": "spherical"}})


def test_cross_field_check():
    with pytest.raises(ConfigError, match=r"min_alive \(9\) exceeds n_splats \(4\)"):
        GSAConfig.from_dict({"bank": {"n_splats": 4, "min_alive": 9}})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        GSAConfig.from_file(tmp_path / "missing.toml")
    (tmp_path / "a.ini").write_text("x")
    with pytest.raises(ConfigError, match=r"unsupported config format '.ini'"):
        GSAConfig.from_file(tmp_path / "a.ini")
    (tmp_path / "b.toml").write_text("seed = = 3")
    with pytest.raises(ConfigError, match=r"cannot parse .*b.toml"):
        GSAConfig.from_file(tmp_path / "b.toml")
    (tmp_path / "c.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        GSAConfig.from_file(tmp_path / "c.yaml")


def test_from_model_config():
    class HFConfig:
        gsa = EXAMPLE

    assert GSAConfig.from_model_config(HFConfig()).seed == 5
    assert GSAConfig.from_model_config({"gsa": EXAMPLE}).seed == 5
    with pytest.raises(ConfigError, match="carries no GSA config"):
        GSAConfig.from_model_config(object())


def test_json_schema_lists_registered_strategies():
    schema = config_json_schema()
    backend = schema["$defs"]["BackendSpec"]
    assert {"auto", "dense"} <= set(backend["oneOf"][0]["enum"])
    dense = next(c for c in backend["oneOf"][1:] if c["properties"]["name"]["const"] == "dense")
    assert "block_elements" in dense["properties"]["params"]["properties"]
    json.dumps(schema)  # serialisable


@settings(max_examples=40, deadline=None)
@given(n=st.integers(-5, 600), cov=st.sampled_from(["isotropic", "diagonal", "full", "bogus"]))
def test_bank_fields_validate_exactly_the_valid_values(n, cov):
    data = {"bank": {"n_splats": n, "covariance": cov}}
    if n >= 1 and cov != "bogus":
        assert GSAConfig.from_dict(data).bank.n_splats == n
    else:
        with pytest.raises(ConfigError):
            GSAConfig.from_dict(data)
