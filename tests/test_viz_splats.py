"""``gsa viz splats``: the PNG, the drawn ellipses against the bank, the projection's maths, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from _viz_models import DEAD, TEXT, one_error_line, read_png
from gsa_cli.main import main
from gsa_viz.figures import head_grid, panel_inches
from gsa_viz.inputs import capture, encode
from gsa_viz.projection import ellipse, fit_plane
from gsa_viz.splats import GID_1SIGMA, GID_2SIGMA, GID_DEAD, mass_share, splat_figure

pytest.importorskip("matplotlib")
#: A decoded picture that is not blank: pixel standard deviation (values in [0, 1]) above this.
MIN_PIXEL_STD = 0.05


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def test_cli_writes_a_png_of_the_grid_size(folders, text_file, tmp_path):
    out = tmp_path / "pics" / "splats.png"
    assert main(["viz", "splats", str(folders["gsa"]), "--head", "all", "--text", str(text_file), "--out",
                 str(out)]) == 0
    image = read_png(out)
    rows, cols = 2, 2  # four heads
    side = panel_inches(4)
    from gsa_viz.figures import DPI

    want = ((rows * side + 0.8) * DPI, (cols * side + 0.9) * DPI)
    # matplotlib truncates the figure's fractional pixel size: within one pixel of inches x DPI
    assert all(abs(got - w) <= 1 for got, w in zip(image.shape[:2], want, strict=True)), (image.shape, want)
    assert float(image[..., :3].std()) > MIN_PIXEL_STD


def artists(ax, gid):
    return [a for a in [*ax.patches, *ax.collections] if a.get_gid() == gid]


@pytest.mark.parametrize("layer", [0, 1])
def test_one_ellipse_per_alive_splat_and_a_cross_per_dead_slot(viz, layer):
    fig = splat_figure(viz, TEXT, layer=layer, head="all")
    bank = viz.layers[layer][1].bank
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert len(axes) == bank.n_heads
    dead_written = {h for h, _ in DEAD[layer]}
    for head, ax in enumerate(axes):
        alive = int(bank.alive[head].sum())
        assert len(artists(ax, GID_1SIGMA)) == alive
        assert len(artists(ax, GID_2SIGMA)) == alive
        crosses = artists(ax, GID_DEAD)
        dead = bank.capacity - alive
        assert sum(len(c.get_offsets()) for c in crosses) == dead
        assert (dead > 0) == (head in dead_written)
    fig.clf()


def test_one_head_and_the_ellipse_sizes_follow_the_covariance(viz):
    fig = splat_figure(viz, TEXT, layer=0, head=1)
    ax = next(ax for ax in fig.axes if ax.get_visible() and artists(ax, GID_1SIGMA))
    one, two = artists(ax, GID_1SIGMA), artists(ax, GID_2SIGMA)
    for a, b in zip(one, two, strict=True):  # drawn in the same slot order: 2σ is twice 1σ
        assert b.width == pytest.approx(2 * a.width, rel=1e-9) and b.height == pytest.approx(2 * a.height, rel=1e-9)
    assert "head 1" in ax.get_title()


def test_mass_share_sums_to_one_over_alive_slots_and_is_zero_on_dead(viz):
    ids = encode(viz, TEXT)
    inputs = capture(viz, ids, [0])[0]
    share = mass_share(inputs)
    bank = inputs.layer.bank
    assert share.shape == (bank.n_heads, bank.capacity)
    # float32 sums of <= 6 shares per query: a few ulps of 1
    assert torch.allclose(share.sum(-1), torch.ones(bank.n_heads), atol=1e-5)
    assert float(share[~bank.alive].abs().max()) == 0.0


def test_projection_is_the_marginal_of_the_gaussian():
    torch.manual_seed(0)
    d = 5
    x = torch.randn(400, d) * torch.tensor([5.0, 3.0, 0.1, 0.1, 0.1])
    plane = fit_plane(x)
    # the first two principal axes are the two wide coordinates (up to sign)
    assert torch.allclose(plane.axes.abs()[:, :2], torch.eye(2, dtype=torch.float64), atol=0.05)
    assert float(plane.explained.sum()) > 0.99
    sigma = torch.diag(torch.tensor([4.0, 1.0, 9.0, 9.0, 9.0])).unsqueeze(0)
    _, cov = plane.gaussians(torch.zeros(1, d), sigma)
    expected = plane.axes @ sigma[0].double() @ plane.axes.T
    assert torch.allclose(cov[0], expected)
    width, height, angle = ellipse(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), 1.0)
    assert (width, height) == pytest.approx((4.0, 2.0))  # 2·1σ along each axis
    assert math.isclose(abs(angle) % 180, 0.0, abs_tol=1e-9)


@pytest.mark.parametrize("n", [1, 3, 16, 64])
def test_head_grids_fit_every_head_and_stay_printable(n):
    fig, axes = head_grid(n, title="t")
    assert len(axes) == n
    w, h = fig.get_size_inches()
    assert w <= 17 and h <= 17  # 64 heads: 8 x 8 panels of 1.9 in
    fig.clf()


@pytest.mark.parametrize(("extra", "needle"), [
    (["--layer", "5"], "--layer 5 is not a GSA layer"),
    (["--head", "9"], "the layer has 4 heads"),
    (["--head", "x"], "--head must be a head index"),
    (["--tokens", "1"], "--tokens must be between"),
])
def test_bad_layer_head_and_counts_are_one_message(folders, tmp_path, capsys, extra, needle):
    out = tmp_path / "s.png"
    assert main(["viz", "splats", str(folders["gsa"]), *extra, "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert needle in line
    if needle.startswith("--layer"):
        assert "0 (transformer.h.0.attn.attention), 1 (transformer.h.1.attn.attention)" in line
    assert not out.exists()


def test_a_model_that_is_not_gsa_says_so(folders, tmp_path, capsys):
    assert main(["viz", "splats", str(folders["softmax"]), "--out", str(tmp_path / "s.png")]) == 2
    line = one_error_line(capsys)
    assert "is not a GSA model" in line and "gpt_neo" in line


def test_a_run_folder_points_at_its_model_and_a_missing_folder_is_named(folders, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for f in folders["gsa"].iterdir():
        (run / "model" / f.name).write_bytes(f.read_bytes())
    assert main(["viz", "splats", str(run), "--out", str(tmp_path / "s.png")]) == 2
    assert f"its model is {run / 'model'}" in one_error_line(capsys)
    assert main(["viz", "splats", str(tmp_path / "nope"), "--out", str(tmp_path / "s.png")]) == 2
    assert "does not exist" in one_error_line(capsys)


def test_out_must_be_a_png(folders, tmp_path, capsys):
    assert main(["viz", "splats", str(folders["gsa"]), "--out", str(tmp_path / "s.jpg")]) == 2
    assert "must end in .png" in one_error_line(capsys)
