"""The batched-decode-step benchmark runs on a tiny model and writes a complete JSON and table.

Timings are never asserted: only the structure, the bookkeeping and the stacked pasts it reports.
"""

from __future__ import annotations

import argparse
import json

import pytest
from gsa_bench import batch_step

from gsa_core.errors import GSAError


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    batch_step.add_arguments(parser)
    return parser.parse_args(argv)


def test_quick_run_writes_every_case(tmp_path):
    assert batch_step.run(_args(["--quick", "--rows", "1,3", "--quiet", "--out", str(tmp_path)])) == 0
    report = json.loads((tmp_path / "batch_step.json").read_text())
    assert report["schema"] == batch_step.SCHEMA and report["settings"]["threads"] == 1
    assert [(c["model"], c["rows"]) for c in report["cases"]] == [("gsa", 1), ("gsa", 3), ("softmax", 1),
                                                                    ("softmax", 3)]
    for case in report["cases"]:
        assert len(case["step_times_s"]) == 3 and case["tokens_per_s"] == case["rows"] / case["median_step_s"]
    past = {(c["model"], c["rows"]): c["past_bytes"] for c in report["cases"]}
    assert past[("gsa", 3)] == 3 * past[("gsa", 1)]  # equal sessions stack to three times one session's bytes
    assert report["summary"]["speedup_over_one_row"]["gsa"]["1"] == 1.0
    assert (tmp_path / "batch_step.md").read_text().count("\n| ") == 4


@pytest.mark.parametrize("argv, message", [(["--models", "mamba"], "choose from gsa, softmax"),
                                           (["--steps", "0"], "--steps"), (["--warmup", "-1"], "--warmup")])
def test_bad_settings_are_one_message(tmp_path, argv, message):
    with pytest.raises(GSAError, match=message):
        batch_step.run(_args(["--quick", "--out", str(tmp_path), *argv]))


def test_a_bad_row_list_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _args(["--rows", "0,4"])
    assert exit_info.value.code == 2 and "integers >= 1" in capsys.readouterr().err
