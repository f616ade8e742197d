"""The decode benchmark runs end to end on a tiny model and writes a complete JSON and a plot.

Timings are never asserted: only the structure, the bookkeeping and what the caches hold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from gsa_bench import decode


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    decode.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("decode")
    argv = ["--quick", "--contexts", "8,24", "--steps", "3", "--warmup", "1", "--threads", "1", "--no-isolate",
            "--quiet", "--out", str(out)]
    assert decode.run(_args(argv)) == 0
    return out, json.loads((out / "decode.json").read_text())


def test_json_structure(quick_run: tuple[Path, dict]) -> None:
    out, report = quick_run
    for key in ("schema", "what", "settings", "models", "original_bias_buffer", "method", "started", "finished",
                "loadavg_1m", "environment", "cases", "summary"):
        assert key in report, key
    assert report["schema"] == decode.SCHEMA
    settings = report["settings"]
    assert settings["contexts"] == [8, 24] and settings["steps"] == 3
    assert settings["max_positions"] >= 24 + 1 + 3
    assert report["original_bias_buffer"]["bytes"] == settings["shape"]["num_layers"] * settings["max_positions"] ** 2
    assert [(c["model"], c["context"]) for c in report["cases"]] == [
        ("softmax", 8), ("gsa", 8), ("softmax", 24), ("gsa", 24)]
    for case in report["cases"]:
        assert case["status"] == "ok"
        assert len(case["step_times_s"]) == 3 and case["tokens_per_s"] > 0
        assert case["seen_tokens"] == case["context"] + 1 + 3
    summary = report["summary"]
    assert set(summary["speedup_per_context"]) == {"8", "24"}  # JSON keys
    assert isinstance(summary["gsa_flat_target_met"], bool)
    assert summary["speedup_at_largest"]["context"] == 24
    if (out / "decode.png").exists():
        assert (out / "decode.png").stat().st_size > 0


def test_caches_hold_what_they_should(quick_run: tuple[Path, dict]) -> None:
    """Softmax cache grows with the context; the GSA cache (state + local window) does not."""
    _, report = quick_run
    cases = {(c["model"], c["context"]): c for c in report["cases"]}
    assert cases[("softmax", 24)]["cache_bytes_after_decode"] > cases[("softmax", 8)]["cache_bytes_after_decode"]
    assert cases[("gsa", 24)]["cache_bytes_after_decode"] == cases[("gsa", 8)]["cache_bytes_after_decode"]
    assert report["summary"]["gsa_cache_constant"] is True
    assert cases[("gsa", 8)]["cache_kinds"] == ["state", "window"]
    assert cases[("softmax", 8)]["cache_kinds"] is None
    assert cases[("gsa", 8)]["bias_buffer_bytes_held"] == 0
    assert cases[("softmax", 8)]["bias_buffer_bytes_held"] == report["original_bias_buffer"]["bytes"]


def test_summary_text_and_bad_model() -> None:
    report = {"settings": {"contexts": [8]}, "cases": [], "summary": {}}
    assert "| 8 | - | - | - | - | - | - | - |" in decode.summary_text(report)
    with pytest.raises(ValueError, match="valid models: softmax, gsa"):
        decode.build_model("linear", {})
