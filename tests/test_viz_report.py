"""``gsa report``: each benchmark JSON's table, plot, machine and settings; fallbacks to the files written beside
it; the model card; a self-contained page that loads in headless Chromium with every image; bad input."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from _viz_models import distilled, models, one_error_line, read_png
from gsa_cli.main import main
from gsa_eval.passkey import BENCHMARK as PASSKEY
from gsa_viz.inputs import load_gsa_model
from gsa_viz.report import build_report, collect, markdown_html, model_card

pytest.importorskip("matplotlib")
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_PIXEL_STD = 0.02  # not blank (a page is mostly white): pixel standard deviation above this
IMG = re.compile(r'<img alt="([^"]*)" src="([^"]*)">')


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Two real benchmark results (one with a table and a plot, one with a table only) and a JSON no registered
    benchmark wrote."""
    folder = tmp_path_factory.mktemp("results")
    for name in ("passkey.json", "init.json"):
        shutil.copy(RESULTS / name, folder / name)
    (folder / "custom.json").write_text(json.dumps({"summary": {"speed": 3.5, "memory": "12 MiB"},
                                                    "settings": {"size": 7}}))
    return folder


def test_each_json_gets_its_table_plot_machine_and_settings(results):
    sections = {s.name: s for s in collect(results)}
    assert list(sections) == ["custom", "init", "passkey"]
    passkey = sections["passkey"]
    assert passkey.table == PASSKEY.markdown(passkey.report)  # rendered by the benchmark's own markdown
    assert passkey.plot is not None and passkey.plot.startswith(PNG_MAGIC) and passkey.plot_note == ""
    assert passkey.machine["cpu_model"] == passkey.report["environment"]["cpu_model"]
    assert sections["init"].table and sections["init"].plot is None
    assert "draws no plot" in sections["init"].plot_note
    custom = sections["custom"]
    assert custom.table is not None and "| speed | 3.5 |" in custom.table
    assert custom.table_note == "summary from the JSON"
    page = build_report(results)
    rows = len([ln for ln in PASSKEY.markdown(passkey.report).splitlines() if ln.startswith("|")]) - 1
    passkey_html = page[page.index('id="b-passkey"'):]
    assert passkey_html.count("<tr>") >= rows  # every row of the table (and the metadata rows)
    assert passkey.report["environment"]["cpu_model"] in page
    assert "<summary>settings</summary>" in passkey_html


def test_a_json_older_than_its_renderer_falls_back_to_the_files_beside_it(tmp_path):
    (tmp_path / "passkey.json").write_text(json.dumps({"schema": "old"}))
    shutil.copy(RESULTS / "passkey.md", tmp_path / "passkey.md")
    shutil.copy(RESULTS / "passkey.png", tmp_path / "passkey.png")
    (section,) = collect(tmp_path)
    assert section.table == (RESULTS / "passkey.md").read_text()
    assert section.plot == (RESULTS / "passkey.png").read_bytes()
    assert section.table_note.startswith("re-rendering failed") and "passkey.md" in section.table_note
    assert section.plot_note.startswith("re-rendering failed") and "passkey.png" in section.plot_note


def test_markdown_tables_keep_alignment_and_escape_html():
    out = markdown_html("| a | <b>x</b> |\n|---|---:|\n| `1` | 2 |\n\ntext **bold**")
    assert '<th style="text-align:left">a</th>' in out and '<td style="text-align:right">2</td>' in out
    assert "&lt;b&gt;x&lt;/b&gt;" in out and "<code>1</code>" in out and "<p>text <b>bold</b></p>" in out


def test_the_model_card_counts_splats_and_reads_the_conversion_quality(tmp_path_factory):
    folder = models(tmp_path_factory)["gsa"]
    viz = load_gsa_model(folder)
    card = model_card(folder)
    for index, (_, layer) in viz.layers.items():
        alive = [int(v) for v in layer.bank.alive.sum(-1)]
        assert f"<td style=\"text-align:right\">{index}</td>" in card
        assert f"<td style=\"text-align:left\">{' '.join(map(str, alive))}</td>" in card
    assert "no conversion record" in card
    run = distilled(tmp_path_factory)
    record = json.loads((run / "distill.json").read_text())
    card = model_card(run / "model")
    for label, per_layer in record["layer_error"].items():
        assert f">{label}<" in card
        for value in per_layer.values():
            assert f"{value['rel_err']:.3f}" in card


def test_the_page_is_self_contained(results):
    page = build_report(results)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing from the network
    assert "<link" not in page and "@import" not in page
    images = IMG.findall(page)
    assert len(images) == 1  # passkey's plot
    for _, src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)


def _chromium(*args: str, page: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={page.parent / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
                           *args, page.as_uri()], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless Chromium is not installed (Debian: apt-get install -y chromium)")
def test_the_page_loads_in_headless_chromium_with_every_image(results, tmp_path_factory, tmp_path):
    page = tmp_path / "report.html"
    assert main(["report", "--results", str(results), "--model", str(models(tmp_path_factory)["gsa"]), "--out",
                 str(page)]) == 0
    html = page.read_text()
    n_images = len(IMG.findall(html))
    shot = tmp_path / "shot.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1280,2000", page=page)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [ln for ln in done.stderr.splitlines() if ":CONSOLE" in ln]
    assert console == []  # no console message at all: no error, no failed resource
    image = read_png(shot)
    assert image.shape[:2] == (2000, 1280) and float(image[..., :3].std()) > MIN_PIXEL_STD
    dom = _chromium("--dump-dom", page=page)
    assert f'data-images-loaded="{n_images} of {n_images}"' in dom.stdout
    # the check can fail: a page with one undecodable image says so
    broken = tmp_path / "broken.html"
    broken.write_text(html.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAAA", 1))
    dom = _chromium("--dump-dom", page=broken)
    assert f'data-images-loaded="{n_images - 1} of {n_images}"' in dom.stdout


def test_bad_input_is_one_message(tmp_path, tmp_path_factory, capsys):
    out = str(tmp_path / "r.html")
    assert main(["report", "--results", str(tmp_path / "none"), "--out", out]) == 2
    assert "no such folder" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["report", "--results", str(tmp_path / "empty"), "--out", out]) == 2
    assert "holds no benchmark JSON" in one_error_line(capsys)
    assert main(["report", "--results", str(tmp_path / "empty"), "--out", str(tmp_path / "r.png")]) == 2
    assert "must end in .html" in one_error_line(capsys)
    softmax = models(tmp_path_factory)["softmax"]
    assert main(["report", "--results", str(tmp_path / "empty"), "--model", str(softmax), "--out", out]) == 2
    assert "is not a GSA model" in one_error_line(capsys)
    (tmp_path / "empty" / "x.json").write_text("{broken")
    assert main(["report", "--results", str(tmp_path / "empty"), "--out", out]) == 2
    assert "cannot read" in one_error_line(capsys)
    assert not Path(out).exists()
