"""The benchmark scaffold: common options, run metadata, the writers, re-rendering, and every benchmark uses it."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
from gsa_bench import plugin
from gsa_bench.scaffold import Benchmark, quick_defaults

from gsa_core.commands import CommandSpec
from gsa_core.registry import PluginInfo


def measure(args, run):
    if args.partial:
        run.save({"schema": "tiny/1", "values": [0]})  # what a long grid does after each case
    return {"schema": "tiny/1", "values": list(range(args.n)), "threads": args.threads}


def plot(report):
    from gsa_bench.scaffold import pyplot

    fig, ax = pyplot().subplots()
    ax.plot(report["values"])
    return fig


def options(parser):
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--partial", action="store_true")


TINY = Benchmark("tiny", "a tiny benchmark", options, measure, markdown=lambda r: f"| n | {len(r['values'])} |",
                 plot=plot, prepare=lambda args: quick_defaults(args, {"n": (2, 5)}), threads=1,
                 quick_help="smoke run")


def test_common_options_metadata_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert TINY.main(["--quick", "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert report["values"] == [0, 1] and report["threads"] == 1  # the quick default; --threads' default
    for key in ("command", "started", "finished", "environment"):
        assert key in report
    assert set(report["loadavg_1m"]) == {"start", "end"}
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert (tmp_path / "tiny.md").read_text() == "| n | 2 |\n"
    png = tmp_path / "tiny.png"
    assert not png.exists() or png.stat().st_size > 0
    assert capsys.readouterr().out.strip() == "| n | 2 |"
    assert TINY.main(["--out", str(tmp_path / "full"), "--quiet"]) == 0
    assert json.loads((tmp_path / "full" / "tiny.json").read_text())["values"] == [0, 1, 2, 3, 4]


def test_from_json_re_renders_without_measuring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert TINY.main(["--n", "3", "--out", str(tmp_path), "--quiet"]) == 0
    measured = (tmp_path / "tiny.json").read_text()
    (tmp_path / "tiny.md").unlink()
    assert TINY.main(["--from-json", str(tmp_path / "tiny.json"), "--out", str(tmp_path), "--n", "9"]) == 0
    assert (tmp_path / "tiny.json").read_text() == measured  # the measured file is left as it is
    assert (tmp_path / "tiny.md").read_text() == "| n | 3 |\n"
    assert TINY.main(["--from-json", str(tmp_path / "tiny.json"), "--out", str(tmp_path / "copy")]) == 0
    assert json.loads((tmp_path / "copy" / "tiny.json").read_text())["values"] == [0, 1, 2]
    (tmp_path / "tiny.md").unlink()
    monkeypatch.chdir(tmp_path / "copy")  # without --out nothing is written anywhere, the default folder included
    assert TINY.main(["--from-json", str(tmp_path / "tiny.json")]) == 0
    assert capsys.readouterr().out.strip().endswith("| n | 3 |")
    assert not (tmp_path / "tiny.md").exists() and not (tmp_path / "copy" / "benchmarks").exists()


def test_partial_results_are_saved_with_metadata(tmp_path: Path) -> None:
    seen = {}

    def measure_and_look(args, run):
        out = measure(args, run)
        seen.update(json.loads((args.out / "tiny.json").read_text()))
        return out

    bench = Benchmark("tiny", "a tiny benchmark", options, measure_and_look, prepare=TINY.prepare)
    assert bench.main(["--partial", "--out", str(tmp_path), "--quiet"]) == 0
    assert seen["values"] == [0] and "started" in seen and "finished" in seen
    assert json.loads((tmp_path / "tiny.json").read_text())["values"] == [0, 1, 2, 3, 4]


def test_gsa_bench_gets_the_same_parser() -> None:
    parser = argparse.ArgumentParser()
    TINY(parser)  # what `gsa bench tiny` calls
    args = parser.parse_args(["--quick"])
    assert args.handler == TINY.run and args.out is None and args.threads == 1  # out: benchmarks/results when run


@pytest.mark.parametrize("name", sorted(plugin.BENCHMARKS))
def test_every_builtin_benchmark_is_a_scaffold_benchmark(name: str) -> None:
    spec = CommandSpec("benchmark", name, f"gsa_bench.{name}:BENCHMARK", "", PluginInfo("bench"))
    bench = spec.load()
    assert isinstance(bench, Benchmark) and bench.name == name
    parser = argparse.ArgumentParser()
    bench(parser)
    args = parser.parse_args([])
    assert {"out", "threads", "from_json", "markdown", "quiet"} <= set(vars(args))
