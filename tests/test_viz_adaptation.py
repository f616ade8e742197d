"""``gsa viz adaptation``: the runs record alive splats and the shift statistic per logged step, the timeline is
drawn from those records (train and distill), the PNG, and run folders without records."""

from __future__ import annotations

import json

import pytest
from _train_corpus import MICRO, write_corpus
from _viz_models import distilled, one_error_line, read_png
from gsa_cli.main import main
from gsa_train.loop import load_trained, train
from gsa_viz.adaptation import GID_ALIVE, GID_BIRTHS, GID_DEATHS, GID_SHIFT, adaptation_figure, read_run

from gsa_plugins.adapters import banks

pytest.importorskip("matplotlib")
MIN_PIXEL_STD = 0.05  # not blank: pixel standard deviation (values in [0, 1]) above this
SHIFT = {"name": "shift", "params": {"window": 2, "threshold": 0.05, "delay": 1, "burst": 2, "burst_every": 2,
                                     "every": 3}}
GSA = {"bank": {"n_splats": 4}, "backend": "kernel", "initializer": {"name": "kmeans", "params": {"scale_factor": 4.0}},
       "adapter": {"name": "gpt-neo", "params": {"global_layers": "gsa", "local_layers": "exact"}},
       "adaptation": {"enabled": True, "window": 2, "scheduler": SHIFT,
                      "death": {"name": "low-mass", "params": {"relative_threshold": 0.9}}, "birth": "clone"}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("runs") / "gsa"
    train({**MICRO, "corpus": str(corpus), "out": out, "steps": 10, "attention": "gsa", "gsa": GSA})
    return out


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    return distilled(tmp_path_factory)


def test_train_records_alive_splats_and_the_shift_statistic_per_logged_step(train_run):
    record = json.loads((train_run / "train.json").read_text())
    history = record["history"]
    assert len(history) == 10  # log_every 1
    names = list(banks(load_trained(train_run)))
    final = {f"{n}.gsa.bank": int(b.alive.sum()) for n, b in banks(load_trained(train_run)).items()}
    assert len(names) == 1
    for entry in history:
        assert set(entry["alive"]) == set(final) and isinstance(entry["shift"], float)
    assert history[-1]["alive"] == final  # the last record is the saved model's banks
    assert max(e["shift"] for e in history) >= 0.05  # the detector fired (its threshold) ...
    assert record["adaptation"]["shift_events"]  # ... and the controller says so


def test_the_timeline_is_the_records(train_run):
    record = json.loads((train_run / "train.json").read_text())
    run = read_run(train_run)
    assert run.source == "train.json" and len(run.stages) == 1
    stage = run.stages[0]
    refines = record["adaptation"]["history"]
    assert [x for x, _ in stage.births] == sorted({r["step"] + 1 for r in refines})
    assert sum(b for _, b in stage.births) == record["adaptation"]["refines"]["births"] > 0
    assert sum(d for _, d in stage.deaths) == record["adaptation"]["refines"]["deaths"]
    assert stage.shift == [(e["step"], e["shift"]) for e in record["history"]]
    assert stage.shift_events == [s + 1 for s in record["adaptation"]["shift_events"]]
    assert stage.threshold == 0.05
    fig = adaptation_figure(run)
    bars = {gid: [p.get_height() for ax in fig.axes for p in ax.patches if p.get_gid() == gid]
            for gid in (GID_BIRTHS, GID_DEATHS)}
    assert bars[GID_BIRTHS] == [b for _, b in stage.births]
    assert bars[GID_DEATHS] == [-d for _, d in stage.deaths]
    lines = {gid: [ln for ax in fig.axes for ln in ax.lines if ln.get_gid() == gid] for gid in (GID_ALIVE, GID_SHIFT)}
    (alive,) = lines[GID_ALIVE]
    bank = next(iter(stage.alive))
    assert list(alive.get_ydata()) == [e["alive"][bank] for e in record["history"]]
    (shift,) = lines[GID_SHIFT]
    assert list(shift.get_ydata()) == [e["shift"] for e in record["history"]]
    fig.clf()


def test_cli_writes_the_png(train_run, tmp_path):
    out = tmp_path / "adapt.png"
    assert main(["viz", "adaptation", str(train_run), "--out", str(out)]) == 0
    image = read_png(out)
    assert image.shape[:2] == (950, 900)  # 9 x 9.5 in at 100 dpi: whole pixels
    assert float(image[..., :3].std()) > MIN_PIXEL_STD


def test_a_distillation_has_both_stages_on_one_axis(distill_run, tmp_path):
    record = json.loads((distill_run / "distill.json").read_text())
    for n in (1, 2):
        assert all("alive" in e and e["shift"] is None for e in record[f"stage{n}"]["history"])
    run = read_run(distill_run)
    assert [s.name for s in run.stages] == ["stage 1", "stage 2"]
    one, two = run.stages
    assert (one.start, one.end, two.start, two.end) == (0, 6, 6, 8)
    assert [x for x, _ in one.loss] == list(range(1, 7)) and [x for x, _ in two.loss] == list(range(7, 9))
    assert sum(b for _, b in one.births) == sum(r["births"] for r in record["adaptation_stage1"]["history"])
    assert all(6 < x <= 8 for x, _ in two.births)
    out = tmp_path / "d.png"
    assert main(["viz", "adaptation", str(distill_run), "--out", str(out)]) == 0
    assert float(read_png(out)[..., :3].std()) > MIN_PIXEL_STD


def test_runs_without_records_are_one_message(tmp_path, corpus, capsys):
    out = str(tmp_path / "a.png")
    assert main(["viz", "adaptation", str(tmp_path / "missing"), "--out", out]) == 2
    assert "does not exist" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert main(["viz", "adaptation", str(tmp_path / "other"), "--out", out]) == 2
    line = one_error_line(capsys)
    assert "holds no run records (train.json from gsa train, distill.json from gsa distill)" in line
    assert "it has notes.txt" in line
    softmax = tmp_path / "softmax"
    train({**MICRO, "corpus": str(corpus), "out": softmax, "steps": 2})
    capsys.readouterr()
    assert main(["viz", "adaptation", str(softmax), "--out", out]) == 2
    assert "records no adaptation: the run's attention is 'softmax'" in one_error_line(capsys)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "distill.json").write_text("{not json")
    assert main(["viz", "adaptation", str(tmp_path / "broken"), "--out", out]) == 2
    assert "cannot read" in one_error_line(capsys)
    (tmp_path / "broken" / "distill.json").write_text(json.dumps({"stage1": {"steps": 3, "history": []}}))
    assert main(["viz", "adaptation", str(tmp_path / "broken"), "--out", out]) == 2
    assert "records no adaptation (stage 1 ran with adaptation off)" in one_error_line(capsys)
    assert not (tmp_path / "a.png").exists()
