"""The adaptation benchmark runs end to end on a tiny setting and writes its JSON and plot."""

from __future__ import annotations

import argparse
import json

from gsa_bench import adaptation


def test_tiny_benchmark_writes_json_and_plot(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    adaptation.add_arguments(parser)
    args = parser.parse_args([
        "--out", str(tmp_path), "--seeds", "0", "--variants", "off,interval+relocate", "--steps", "80",
        "--shift-at", "60", "--heads", "2", "--splats", "8", "--batch", "2", "--length", "16", "--eval-window", "5",
        "--after-window", "5", "--no-overhead", "--quiet",
    ])
    assert args.handler(args) == 0
    report = json.loads((tmp_path / "adaptation.json").read_text())
    assert set(report["summary"]) == {"off", "interval+relocate"}
    off, adapt = report["summary"]["off"], report["summary"]["interval+relocate"]
    assert off["births_per_seed"] == [0] and off["deaths_per_seed"] == [0]
    assert adapt["refines_per_seed"][0] > 0 and adapt["deaths_per_seed"][0] > 0
    assert all(len(r["losses"]) == 80 for r in report["runs"])
    assert "| interval+relocate |" in capsys.readouterr().out
    png = tmp_path / "adaptation.png"
    assert not png.exists() or png.stat().st_size > 0
