"""``gsa viz attention``: both matrices reproduce the layer's outputs, the heatmaps are token x token with the
mask shown, the KL rows, the PNG, and bad input."""

from __future__ import annotations

import pytest
import torch
from _viz_models import SENTENCES, TEXT, distilled, one_error_line, read_png
from gsa_cli.main import main
from gsa_viz.attention import GID_DIFF, GID_GSA, GID_KL, GID_SOFTMAX, attention_figure, attention_pair
from gsa_viz.inputs import capture, encode, load_gsa_model, token_labels

pytest.importorskip("matplotlib")
MIN_PIXEL_STD = 0.05  # not blank: pixel standard deviation (values in [0, 1]) above this
#: fp32 products of n <= 48 weights with values of size ~1: a few hundred ulps at most
ATOL = 1e-5
SHORT = SENTENCES[0]


@pytest.mark.parametrize("layer", [0, 1])  # global, and local with its sliding window of 8
def test_both_matrices_reproduce_the_layers_own_outputs(viz, layer):
    inputs = capture(viz, encode(viz, TEXT, 40), [layer])[layer]
    pair = attention_pair(inputs)
    # the softmax matrix is the host's exact attention: times v it gives the output the host computed
    assert torch.allclose(pair.softmax @ inputs.v, inputs.exact_out, atol=ATOL)
    with torch.no_grad():
        gsa_out = inputs.layer.attend(inputs.q[None], inputs.k[None], inputs.v[None], inputs.mask)[0]
    assert torch.allclose(pair.gsa @ inputs.v, gsa_out, atol=ATOL)
    n = inputs.q.shape[1]
    causal = torch.ones(n, n).tril().bool()
    if layer == 1:
        causal &= ~torch.ones(n, n).tril(-8).bool()  # window 8: keys i-7..i
    assert torch.equal(pair.allowed, causal)
    for m in (pair.gsa, pair.softmax):
        assert torch.allclose(m.sum(-1), torch.ones(m.shape[:2]), atol=ATOL)
        assert float(m[:, ~pair.allowed].abs().max()) == 0.0
    assert pair.kl.shape == (inputs.n_heads, n)
    assert float(pair.kl.min()) >= -ATOL
    assert torch.allclose(pair.kl[:, 0], torch.zeros(inputs.n_heads), atol=ATOL)  # one visible key: both give 1


def images(fig, gid):
    return [im for ax in fig.axes for im in ax.images if im.get_gid() == gid]


def test_heatmaps_are_token_by_token_with_the_mask_grey_and_tokens_on_the_axes(viz):
    ids = encode(viz, SHORT)
    n = ids.shape[1]
    fig = attention_figure(viz, SHORT, layer=0, head="all")
    for gid in (GID_GSA, GID_SOFTMAX, GID_DIFF):
        found = images(fig, gid)
        assert len(found) == 4  # one per head
        for im in found:
            data = im.get_array()
            assert data.shape == (n, n)
            assert (data.mask == ~torch.ones(n, n).tril().bool().numpy()).all()  # causal: the upper triangle
    lines = [ln for ax in fig.axes for ln in ax.lines if ln.get_gid() == GID_KL]
    assert len(lines) == 4 and all(len(ln.get_xdata()) == n for ln in lines)
    ax = next(ax for ax in fig.axes if ax.images and ax.images[0].get_gid() == GID_GSA)
    assert [t.get_text() for t in ax.get_xticklabels()] == token_labels(viz, ids)
    fig.clf()


def test_long_texts_get_positions_not_labels(viz):
    fig = attention_figure(viz, TEXT, layer=0, head=2, max_tokens=64)
    ax = next(ax for ax in fig.axes if ax.images and ax.images[0].get_gid() == GID_GSA)
    assert ax.images[0].get_array().shape == (64, 64)
    assert ax.get_xlabel() == "key position" and "head 2" in ax.get_title()
    fig.clf()


def test_cli_writes_the_png(folders, tmp_path):
    out = tmp_path / "a.png"
    assert main(["viz", "attention", str(folders["gsa"]), "--text", SHORT, "--layer", "1", "--head", "all",
                 "--out", str(out)]) == 0
    image = read_png(out)
    assert image.shape[0] > 400 and image.shape[1] > 800
    assert float(image[..., :3].std()) > MIN_PIXEL_STD


@pytest.mark.parametrize(("extra", "needle"), [
    (["--text", SHORT, "--layer", "3"], "--layer 3 is not a GSA layer of"),
    (["--text", SHORT, "--head", "4"], "the layer has 4 heads"),
    (["--text", "   "], "the text is empty"),
    (["--text", SHORT, "--tokens", "0"], "--tokens must be between"),
])
def test_bad_input_is_one_message(folders, tmp_path, capsys, extra, needle):
    out = tmp_path / "a.png"
    assert main(["viz", "attention", str(folders["gsa"]), *extra, "--out", str(out)]) == 2
    assert needle in one_error_line(capsys)
    assert not out.exists()


def test_a_softmax_model_is_refused(folders, tmp_path, capsys):
    assert main(["viz", "attention", str(folders["softmax"]), "--text", SHORT, "--out", str(tmp_path / "a.png")]) == 2
    assert "is not a GSA model" in one_error_line(capsys)


def test_a_bidirectional_encoder_has_no_masked_cells(tmp_path_factory):
    viz = load_gsa_model(distilled(tmp_path_factory) / "model")  # a distilled BERT (AttentionInterface adapter)
    text = "the value of the list is a string"
    (index,) = list(viz.layers)[:1]
    inputs = capture(viz, encode(viz, text), [index])[index]
    pair = attention_pair(inputs)
    assert bool(pair.allowed.all())
    assert torch.allclose(pair.softmax @ inputs.v, inputs.exact_out, atol=ATOL)
    fig = attention_figure(viz, text, layer=index, head="all")
    im = next(im for ax in fig.axes for im in ax.images if im.get_gid() == GID_GSA)
    assert not im.get_array().mask.any()
    assert "mask: none" in fig._suptitle.get_text()
    fig.clf()


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_the_panel_layout_fits_one_to_64_heads_without_overlap(rows):
    from gsa_viz.attention import _layout

    fig, axes, bars, _ = _layout(rows, labelled=rows <= 8)
    boxes = [ax.get_position() for ax in [*axes.flat, *bars]]
    assert all(0 <= b.x0 < b.x1 <= 1 and 0 <= b.y0 < b.y1 <= 1 for b in boxes)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0  # disjoint
    top = max(b.y1 for b in boxes)
    assert (1 - top) * fig.get_size_inches()[1] >= 0.8  # the title's margin, in inches
    assert fig.get_size_inches()[0] <= 19  # four panels of at most 3.2 in with their tick-label gaps
    fig.clf()
