"""The attention benchmark runs end to end and writes a complete JSON and a plot.

Timings are never asserted (DESIGN.md section 5): only the schema, the bookkeeping and the files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import ClassVar

import pytest

pytest.importorskip("matplotlib")

from gsa_bench import attention, timing

from gsa_core.masks import MASK_KINDS
from gsa_core.registry import StrategyParams
from gsa_plugins.backends.dense import DenseBackend, DenseParams

TINY = ["--quick", "--sizes", "128,256", "--heads", "2", "--decode-contexts", "128,256", "--decode-steps", "5",
        "--decode-warmup", "1", "--repeats", "1", "--max-case-seconds", "1", "--matmul-size", "256",
        "--sparse", "64:8", "--profile-sizes", "128", "--quiet"]


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    attention.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    assert attention.run(_args([*TINY, "--no-isolate", "--out", str(out)])) == 0
    return out, json.loads((out / "attention.json").read_text())


def test_quick_run_writes_json_and_png(quick_run: tuple[Path, dict]) -> None:
    out, report = quick_run
    assert (out / "attention.png").stat().st_size > 0
    for key in ("schema", "started", "finished", "command", "settings", "environment", "matmul",
                "peak_memory_method", "flop_formulas", "results", "decode", "ratios", "targets",
                "registered_backends", "loadavg_1m", "profile"):
        assert key in report, key
    assert report["schema"] == attention.SCHEMA
    settings = report["settings"]
    assert settings["sizes"] == [128, 256] and settings["heads"] == 2 and settings["causal"] is True
    assert settings["dtype"] == "float32" and settings["sdpa_limit_s"] == 30.0
    env = report["environment"]
    for key in ("torch", "torch_threads", "cpu_model", "python"):
        assert key in env
    assert report["matmul"]["gflops_reference"] > 0


def test_every_case_is_recorded(quick_run: tuple[Path, dict]) -> None:
    _, report = quick_run
    labels = [s["label"] for s in report["settings"]["series"]]
    assert labels[0] == "sdpa" and any(lbl.startswith("kernel") for lbl in labels)
    assert "sparse K=64 k=8" in labels
    rows = {(r["series"], r["n"], r["mode"]): r for r in report["results"]}
    assert len(rows) == len(labels) * 2 * 2
    registered = set(report["registered_backends"])
    for (label, _n, _mode), r in rows.items():
        backend = next(s["backend"] for s in report["settings"]["series"] if s["label"] == label)
        if backend == "sdpa" or backend in registered:
            assert r["status"] == "ok", r
            assert r["median_s"] > 0 and len(r["times_s"]) >= 1
            assert r["peak_bytes"] is None or r["peak_bytes"] >= 0
        else:
            assert r["status"] == "unavailable" and backend in r["reason"]
    sdpa = rows[("sdpa", 256, "fwd")]
    assert sdpa["flops"] == attention.sdpa_flops(256, 2, 64)
    assert sdpa["gflops"] > 0 and sdpa["fraction_of_matmul"] > 0
    for ratio in report["ratios"]:
        assert ratio["speedup_vs_sdpa"] > 0 and ratio["mode"] in attention.MODES


def test_decode_and_targets(quick_run: tuple[Path, dict]) -> None:
    _, report = quick_run
    decode = {(r["series"], r["context"]): r for r in report["decode"]}
    assert {c for _, c in decode} == {128, 256}
    for r in decode.values():
        if r["status"] == "ok":
            assert r["step_ms_median"] > 0 and r["steps"] == 5 and r["state_bytes"] > 0
    if "kernel" in report["registered_backends"]:
        kernel = [r for (s, _), r in decode.items() if s.startswith("kernel")]
        assert all(r["status"] == "ok" for r in kernel)
        assert len({r["state_bytes"] for r in kernel}) == 1  # constant-size state
        assert all(r["state_bytes_after_steps"] == r["state_bytes"] for r in kernel)
    assert len(report["profile"]) == 1
    if report["profile"][0]["status"] == "ok":
        assert report["profile"][0]["by_op"] and "op" in report["profile"][0]["by_op"][0]
    names = [t["target"] for t in report["targets"]]
    assert any("n=2048" in n for n in names) and any("matmul" in n for n in names)
    assert any("flat" in n for n in names)
    for t in report["targets"]:
        assert t["met"] in (True, False, None)


def test_markdown_and_rerender(quick_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, report = quick_run
    table = attention.markdown_table(report)
    assert table.count("| n |") >= 1 and "| 256 |" in table and "| target |" in table
    assert attention.run(_args(["--from-json", str(out / "attention.json"), "--out", str(tmp_path),
                                "--markdown"])) == 0
    assert (tmp_path / "attention.png").exists() and (tmp_path / "attention.json").exists()
    assert "| target | measured | met |" in capsys.readouterr().out


def test_isolated_case_and_sdpa_stop(tmp_path: Path) -> None:
    """Cases run in a fresh process; a call over the limit stops the series at larger n."""
    argv = ["--quick", "--isolate", "--sizes", "64,128", "--heads", "1", "--backends", "sdpa", "--no-backward",
            "--no-decode", "--repeats", "1", "--matmul-size", "128", "--sdpa-limit", "0", "--quiet",
            "--out", str(tmp_path)]
    assert attention.run(_args(argv)) == 0
    report = json.loads((tmp_path / "attention.json").read_text())
    first, second = report["results"]
    assert report["settings"]["isolated"] is True
    assert first["status"] == "stopped" and len(first["times_s"]) == 1 and "limit" in first["reason"]
    assert second["status"] == "skipped" and "n=64" in second["reason"]


def test_measure_budget_and_sizes() -> None:
    m = timing.measure(lambda: time.sleep(0.02), warmup=1, repeats=5, budget_s=0.001, track_memory=False)
    assert m.stopped and m.cold and len(m.times_s) == 1
    m = timing.measure(lambda: None, warmup=1, repeats=3)
    assert not m.stopped and len(m.times_s) == 3 and len(m.warmup_s) == 1
    assert attention.parse_sizes("512-4096") == [512, 1024, 2048, 4096]
    assert attention.parse_sizes("1k,64k") == [1024, 65536]
    with pytest.raises(argparse.ArgumentTypeError):
        attention.parse_sizes("abc")


class _Uncounted(StrategyParams):
    """The dense backend under another name, with no FLOP count of its own."""

    name: ClassVar[str] = "uncounted"
    supported_masks: ClassVar[frozenset[str]] = frozenset(MASK_KINDS)

    def forward(self, q, k, v, bank, mask):
        return DenseBackend(DenseParams()).forward(q, k, v, bank, mask)


class _Counted(_Uncounted):
    name: ClassVar[str] = "counted"

    def flops(self, batch, heads, n_q, n_k, head_dim, value_dim, causal, bank):
        """One FLOP per query-key pair and head (a made-up count)."""
        return float(batch * heads * n_q * n_k)


def test_a_new_backend_reports_its_own_flops(gsa_registry, tmp_path: Path) -> None:
    """A third-party backend gets FLOP figures from its own ``flops`` method, with no benchmark edit; one without
    the method is timed and gets none."""
    gsa_registry.register("backend", "counted", _Counted)
    gsa_registry.register("backend", "uncounted", _Uncounted)
    argv = ["--quick", "--no-isolate", "--sizes", "32", "--heads", "2", "--head-dim", "8", "--splats", "4",
            "--backends", "counted,uncounted", "--no-decode", "--repeats", "1", "--matmul-size", "64", "--quiet",
            "--out", str(tmp_path)]
    assert attention.run(_args(argv)) == 0
    report = json.loads((tmp_path / "attention.json").read_text())
    rows = {(r["backend"], r["mode"]): r for r in report["results"]}
    assert rows[("counted", "fwd")]["flops"] == 2 * 32 * 32
    assert rows[("counted", "fwd+bwd")]["flops"] == 3 * 2 * 32 * 32
    assert rows[("counted", "fwd")]["gflops"] > 0
    assert rows[("uncounted", "fwd")]["status"] == "ok" and rows[("uncounted", "fwd")]["flops"] is None
    assert "gflops" not in rows[("uncounted", "fwd")]
    assert report["flop_methods"] == {"counted": "One FLOP per query-key pair and head (a made-up count)."}
