"""The long-context benchmark runs end to end on a tiny model and writes a complete JSON, table and plot.

Timings are never asserted: only the structure, the bookkeeping and what the models hold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from gsa_bench import longctx


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    longctx.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("longctx")
    argv = ["--quick", "--contexts", "96,200", "--new-tokens", "3", "--prefill-chunk", "32", "--threads", "1",
            "--no-isolate", "--quiet", "--out", str(out)]
    assert longctx.run(_args(argv)) == 0
    return out, json.loads((out / "longctx.json").read_text())


def test_json_structure(quick_run: tuple[Path, dict]) -> None:
    out, report = quick_run
    for key in ("schema", "what", "settings", "method", "targets", "cases", "summary", "started", "finished",
                "loadavg_1m", "environment"):
        assert key in report, key
    assert report["schema"] == longctx.SCHEMA and report["settings"]["contexts"] == [96, 200]
    assert [(c["model"], c["context"]) for c in report["cases"]] == [
        ("gsa", 96), ("softmax", 96), ("gsa", 200), ("softmax", 200)]
    for case in report["cases"]:
        assert case["status"] == "ok" and case["new_tokens"] == 3
        assert case["time_to_first_token_s"] > 0 and case["decode_ms_per_token"] > 0
        assert case["peak_rss_bytes"] is None  # in-process: no high-water mark worth reporting
        assert case["max_position_embeddings"] >= case["context"] + 3  # positions extended to cover the prompt
        linear = case["linear_terms_bytes"]
        assert linear["input_ids"] == 8 * case["context"] and case["linear_total_bytes"] == sum(linear.values())
    assert "summary" in report and (out / "longctx.md").read_text().startswith("| model | prompt |")
    if (out / "longctx.png").exists():
        assert (out / "longctx.png").stat().st_size > 0


def test_the_models_hold_what_they_should(quick_run: tuple[Path, dict]) -> None:
    """GSA: no bias buffers, a constant-size recurrent cache; softmax: its bias buffers and a growing cache."""
    cases = {(c["model"], c["context"]): c for c in quick_run[1]["cases"]}
    for n in (96, 200):
        assert cases[("gsa", n)]["bias_buffer_bytes"] == 0
        assert cases[("gsa", n)]["cache_type"] == "GSARecurrentCache"
        assert cases[("gsa", n)]["cache_kinds"] == ["state", "window"]
        positions = cases[("softmax", n)]["max_position_embeddings"]
        assert cases[("softmax", n)]["bias_buffer_bytes"] == 2 * positions**2  # two layers, bool P x P
    assert cases[("gsa", 96)]["cache_bytes"] == cases[("gsa", 200)]["cache_bytes"]
    assert cases[("softmax", 200)]["cache_bytes"] > cases[("softmax", 96)]["cache_bytes"]


def test_a_softmax_case_that_cannot_fit_is_skipped_with_the_reason(monkeypatch) -> None:
    settings = {"shape": longctx.TINYSTORIES, "prefill_chunk": 1024, "new_tokens": 16}
    need = longctx.softmax_bytes_lower_bound(longctx.TINYSTORIES, 65536, 1024, longctx.positions_for(65536, 16))
    assert need > 4 * 65536**2  # the bias buffers alone: 16 GiB
    monkeypatch.setattr(longctx.timing, "mem_total_bytes", lambda: 24 * 2**30)
    reason = longctx.skip_reason(settings, 65536)
    assert reason is not None and "does not fit" in reason and "24.0 GiB" in reason
    assert longctx.skip_reason(settings, 4096) is None


def test_summary_targets_are_computed_from_the_cases() -> None:
    def case(n: int, peak: int, ttft: float) -> dict:
        return {"status": "ok", "model": "gsa", "context": n, "peak_rss_bytes": peak, "linear_total_bytes": n,
                "time_to_first_token_s": ttft}

    settings = {"contexts": [4096, 65536]}
    met = longctx.summarise(settings, [case(4096, 10**9, 1.0), case(65536, 12 * 10**8, 15.0)])
    assert met["gsa_peak_rss_ratio"]["target_met"] and met["gsa_prefill_time_ratio"]["target_met"]
    missed = longctx.summarise(settings, [case(4096, 10**9, 1.0), case(65536, 2 * 10**9, 30.0)])
    assert not missed["gsa_peak_rss_ratio"]["target_met"] and not missed["gsa_prefill_time_ratio"]["target_met"]


def test_bad_models_are_refused() -> None:
    with pytest.raises(SystemExit):
        _args(["--models", "gsa,linear"])
    with pytest.raises(ValueError, match="valid models: gsa, softmax"):
        longctx.build_model("linear", {}, 8)
