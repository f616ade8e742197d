"""``gsa viz coverage``: the heatmaps hold the coverage of every GSA layer and head, thin coverage shows, the PNG,
and bad input."""

from __future__ import annotations

import pytest
import torch
from _viz_models import TEXT, one_error_line, read_png
from gsa_cli.main import main
from gsa_viz.coverage import GID_KEYS, GID_QUERIES, coverage_figure, coverage_shares
from gsa_viz.inputs import capture, encode, load_gsa_model

from gsa_core.adaptation.coverage import coverage_map

pytest.importorskip("matplotlib")
MIN_PIXEL_STD = 0.02  # not blank (a heatmap page is mostly white): pixel standard deviation above this


@pytest.fixture
def viz(folders):
    return load_gsa_model(folders["gsa"])  # function scope: a test shrinks a bank


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text(TEXT)
    return path


def test_heatmaps_are_layers_by_heads_and_hold_the_coverage(viz):
    ids = encode(viz, TEXT)
    shares = coverage_shares(viz, ids)
    assert list(shares) == [0, 1]
    inputs = capture(viz, ids)
    for index, got in shares.items():
        bank = inputs[index].layer.bank
        q, k = inputs[index].gsa_space()
        assert torch.equal(got[0], coverage_map(bank, q).fraction())
        assert torch.equal(got[1], coverage_map(bank, k).fraction())
    fig = coverage_figure(viz, TEXT)
    for row, gid in enumerate((GID_QUERIES, GID_KEYS)):
        image = next(im for ax in fig.axes for im in ax.images if im.get_gid() == gid)
        data = image.get_array()
        assert data.shape == (2, 4)  # GSA layers x heads
        assert torch.allclose(torch.as_tensor(data), torch.stack([shares[0][row], shares[1][row]]).float())
    fig.clf()


def test_shrunk_splats_show_as_thin_coverage(viz):
    bank = viz.layers[1][1].bank
    with torch.no_grad():
        bank.log_scale[2] -= 6.0  # head 2's splats 400x narrower: almost nothing lies within 2σ
    shares = coverage_shares(viz, encode(viz, TEXT))
    thin = shares[1][:, 2]
    others = torch.cat([shares[1][:, :2], shares[1][:, 3:]], 1)
    assert float(thin.max()) < 0.1 < float(others.min())
    wider = coverage_shares(viz, encode(viz, TEXT), radius=2000.0)
    assert float(wider[1][:, 2].min()) == 1.0  # the radius is the one the shares use


def test_cli_writes_the_png(folders, text_file, tmp_path):
    out = tmp_path / "c.png"
    assert main(["viz", "coverage", str(folders["gsa"]), "--text", str(text_file), "--out", str(out)]) == 0
    image = read_png(out)
    assert image.shape[0] > 200 and image.shape[1] > 600
    assert float(image[..., :3].std()) > MIN_PIXEL_STD


@pytest.mark.parametrize(("extra", "needle"), [
    (["--radius", "0"], "--radius must be a positive number"),
    (["--radius", "nan"], "--radius must be a positive number"),
    (["--text", "/nonexistent/heldout.txt"], "no such file"),
    (["--tokens", "100000"], "--tokens must be between"),
])
def test_bad_input_is_one_message(folders, tmp_path, capsys, extra, needle):
    out = tmp_path / "c.png"
    assert main(["viz", "coverage", str(folders["gsa"]), *extra, "--out", str(out)]) == 2
    assert needle in one_error_line(capsys)
    assert not out.exists()


def test_a_softmax_model_is_refused(folders, text_file, tmp_path, capsys):
    assert main(["viz", "coverage", str(folders["softmax"]), "--text", str(text_file), "--out",
                 str(tmp_path / "c.png")]) == 2
    assert "is not a GSA model" in one_error_line(capsys)
