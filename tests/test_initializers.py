"""Initializers (random, kmeans, pca) and model-agnostic calibration of many banks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gsa_core.bank import SplatBank
from gsa_core.calibration import calibrate_banks, gsa_input_scale, layer_seed, to_gsa_space
from gsa_core.errors import CalibrationError, ParamsError
from gsa_core.registry import get_registry
from gsa_core.testing import check_initializer
from gsa_core.testing.policy_checks import assert_valid_bank
from gsa_plugins.initializers import KMeansInit, PCAInit, kmeans

NAMES = ("random", "kmeans", "pca")
KINDS = ("isotropic", "diagonal", "full")


def build(name: str, **params):
    return get_registry().build("initializer", name, params)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def snapshot(bank: SplatBank) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bank.state_dict().items()}


# ----------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("name", NAMES)
def test_conformance(name):
    check_initializer(build(name), max_examples=30)


@pytest.mark.parametrize("name", NAMES)
def test_conformance_with_params(name):
    check_initializer(build(name, scale_factor=3.0), max_examples=10)


def test_registered_by_name_with_validated_params():
    assert set(NAMES) <= set(get_registry().names("initializer"))
    with pytest.raises(ParamsError, match="iterations"):
        build("kmeans", iterations=-1)
    with pytest.raises(ParamsError, match="multiples"):
        build("pca", multiples=[1.0, -2.0])
    with pytest.raises(ParamsError, match="typo"):
        build("pca", typo=1)


# ----------------------------------------------------------------------------- hard cases
def hard_cases(h: int, d: int) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    g = gen(1)
    rank1 = torch.randn(h, 40, 1, generator=g) * torch.randn(h, 1, d, generator=g)
    return {
        "none": (None, None),
        "one_vector": (torch.randn(h, 1, d, generator=g), None),
        "keys_only": (None, torch.randn(h, 5, d, generator=g)),
        "duplicates": (torch.randn(h, 1, d, generator=g).repeat(1, 20, 1), torch.randn(h, 1, d, generator=g)
                       .repeat(1, 20, 1)),
        "zero_variance": (torch.full((h, 30, d), -7.0), torch.full((h, 30, d), -7.0)),
        "rank_deficient": (rank1[:, :20], rank1[:, 20:]),
        "huge_offset": (torch.randn(h, 30, d, generator=g) + 1e4, torch.randn(h, 30, d, generator=g) + 1e4),
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_hard_cases_give_valid_banks(name, kind):
    init = build(name)
    for label, (q, k) in hard_cases(3, 6).items():
        bank = SplatBank(3, 6, 16, kind)
        with torch.no_grad():
            bank.alive[1, ::3] = False  # heads with different numbers of alive slots
        before = snapshot(bank)
        init.initialize(bank, q, k, generator=gen(5))
        assert_valid_bank(bank, f"{name}/{kind}/{label}")
        assert torch.equal(bank.alive, before["alive"])
        dead = ~bank.alive
        for key, p in bank.slot_parameters().items():
            assert torch.equal(p.detach()[dead], before[key][dead]), f"{label}: wrote a dead slot's {key}"
        # The features of the data are finite (no overflow from a degenerate covariance).
        if q is not None:
            feats = bank.log_features(q)
            assert torch.isfinite(feats[bank.alive.unsqueeze(1).expand_as(feats)]).all()


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_bank_other_seed_differs(name):
    q, k = torch.randn(2, 200, 4, generator=gen(2)), torch.randn(2, 200, 4, generator=gen(3))
    banks = []
    for seed in (0, 0, 1):
        bank = SplatBank(2, 4, 8)
        build(name).initialize(bank, q, k, generator=gen(seed))
        banks.append(bank)
    for key in banks[0].slot_parameters():
        assert torch.equal(banks[0].slot_parameters()[key], banks[1].slot_parameters()[key])
    if name != "pca":  # pca is deterministic by construction: no random draws
        assert not torch.equal(banks[0].centers, banks[2].centers)


@pytest.mark.parametrize("name", NAMES)
def test_fewer_vectors_than_slots(name):
    q = torch.tensor([[[0.0, 0.0], [5.0, 5.0]]])
    k = torch.tensor([[[5.0, 0.0]]])
    bank = SplatBank(1, 2, 16, "full")
    build(name).initialize(bank, q, k, generator=gen())
    assert_valid_bank(bank, name)
    if name == "kmeans":  # every center is one of the three points
        pts = torch.cat([q, k], 1)[0]
        dist = torch.cdist(bank.centers.detach()[0], pts)
        assert dist.min(1).values.max() < 1e-5
        assert {tuple(p) for p in pts.tolist()} == {tuple(c) for c in bank.centers.detach()[0].tolist()}


# ----------------------------------------------------------------------------- k-means
def blobs(h: int, sizes: list[int], d: int, sep: float, std: float, seed: int = 0):
    g = gen(seed)
    centers = torch.randn(h, len(sizes), d, generator=g) * sep
    pts = [centers[:, i:i + 1] + std * torch.randn(h, n, d, generator=g) for i, n in enumerate(sizes)]
    return centers, torch.cat(pts, 1)


def test_kmeans_recovers_well_separated_clusters():
    sizes = [300, 100, 50, 150]
    _, x = blobs(3, sizes, 4, sep=20.0, std=0.3)
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    spans = list(itertools.pairwise(bounds))
    truth = torch.stack([x[:, a:b].mean(1) for a, b in spans], 1)
    spread = torch.stack([x[:, a:b].std(1, correction=0) for a, b in spans], 1)  # [H, 4, d]
    perm = torch.randperm(x.shape[1], generator=gen(9))
    x = x[:, perm]
    bank = SplatBank(3, 4, 4, "diagonal")
    KMeansInit().initialize(bank, x[:, :300], x[:, 300:], generator=gen())
    centers = bank.centers.detach()
    for h in range(3):
        dist = torch.cdist(truth[h], centers[h])  # [true, found]
        match = dist.argmin(1)
        assert sorted(match.tolist()) == [0, 1, 2, 3], "each true cluster must get its own splat"
        assert dist.min(1).values.max() < 1e-4  # exactly the blobs' means
        # amplitudes follow cluster sizes, scales the cluster spread
        amp = bank.log_amplitude.detach()[h, match].exp()
        assert torch.allclose(amp, torch.tensor(sizes, dtype=torch.float) / sum(sizes), atol=1e-3)
        std = bank.log_scale.detach()[h, match].exp()
        assert torch.allclose(std, spread[h], rtol=0.05)


def test_kmeans_full_covariance_follows_cluster_shape():
    g = gen(4)
    a = torch.randn(1, 400, 2, generator=g) * torch.tensor([2.0, 0.2])  # elongated along x
    b = torch.randn(1, 400, 2, generator=g) * torch.tensor([0.2, 2.0]) + torch.tensor([30.0, 0.0])
    bank = SplatBank(1, 2, 2, "full")
    KMeansInit().initialize(bank, a, b, generator=gen())
    cov = bank.covariance_matrix().detach()[0]
    first = int(bank.centers.detach()[0, :, 0].argmin())  # the cluster near the origin
    assert cov[first, 0, 0] > 10 * cov[first, 1, 1]
    assert cov[1 - first, 1, 1] > 10 * cov[1 - first, 0, 0]


def test_kmeans_is_vectorised_over_heads_with_per_head_alive_counts():
    truth, x = blobs(2, [100, 100, 100], 3, sep=30.0, std=0.1, seed=3)
    bank = SplatBank(2, 3, 5)
    with torch.no_grad():
        bank.alive[0, 3:] = False  # head 0: exactly 3 clusters; head 1: 5 splats for 3 blobs
        bank.alive[1, 1] = False
    KMeansInit().initialize(bank, x, None, generator=gen())
    found = bank.centers.detach()[0, :3]
    assert torch.cdist(truth[0], found).min(1).values.max() < 0.1
    alive1 = bank.centers.detach()[1, bank.alive[1]]
    assert torch.cdist(truth[1], alive1).min(1).values.max() < 0.1


def test_kmeans_function_converges_and_counts_all_points():
    _, x = blobs(4, [64, 64], 2, sep=50.0, std=0.5, seed=1)
    active = torch.ones(4, 2, dtype=torch.bool)
    _, assign, counts = kmeans(x, active, gen(), iterations=10, max_points=50)
    assert counts.sum(1).tolist() == [128.0] * 4 and assign.shape == (4, 128)
    assert sorted(counts[0].tolist()) == [64.0, 64.0]


# ----------------------------------------------------------------------------- pca
def test_pca_centers_lie_on_principal_axes():
    g = gen(7)
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    stds = torch.tensor([4.0, 2.0, 1.0, 0.5])
    x = (torch.randn(1, 4000, 4, generator=g) * stds) @ rot.T + torch.tensor([1.0, -2.0, 3.0, 0.0])
    bank = SplatBank(1, 4, 9, "full")
    PCAInit(multiples=(1.0, 2.0)).initialize(bank, x[:, :2000], x[:, 2000:], generator=gen())
    mean = x[0].mean(0)
    cov = torch.cov(x[0].T.double())
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0).float(), evecs.flip(1).float()
    offsets = bank.centers.detach()[0] - mean
    assert offsets[0].norm() < 1e-3  # the mean slot
    expected = []
    for axis in range(2):
        for m in (1.0, 2.0):
            for sign in (1.0, -1.0):
                expected.append(sign * m * evals[axis].sqrt() * evecs[:, axis])
    assert torch.allclose(offsets[1:], torch.stack(expected), atol=1e-3)
    # Each offset is parallel to one principal axis: its projection on the others vanishes.
    proj = offsets[1:] @ evecs
    assert (proj[:, 2:].abs() < 1e-3).all()


def test_pca_scales_use_residual_variance_and_wrap_on_rank_deficient_data():
    g = gen(8)
    x = torch.zeros(1, 500, 5)
    x[..., 0] = torch.randn(1, 500, generator=g) * 3.0  # rank 1: only axis 0 varies
    bank = SplatBank(1, 5, 8, "diagonal")
    PCAInit(multiples=(1.0,)).initialize(bank, x, None, generator=gen())
    off = bank.centers.detach()[0, :, 0] - x[0, :, 0].mean()
    sd = x[0, :, 0].std()
    # mean, then +-1, then rings at +-2, +-3, ... along the single axis
    assert torch.allclose(off, torch.tensor([0, 1, -1, 2, -2, 3, -3, 4]) * sd, atol=1e-3)
    assert torch.allclose(bank.centers.detach()[0, :, 1:], torch.zeros(8, 4), atol=1e-5)
    std = bank.log_scale.detach().exp()[0]
    assert torch.allclose(std[:, 0], torch.full((8,), float(sd)), rtol=1e-3)  # axis_scale 1 x the axis' std
    assert (std[:, 1:] < 1e-1).all()  # residual variance is zero: floored, not NaN


# ----------------------------------------------------------------------------- calibration
def layered(seed: int = 0) -> tuple[dict[str, SplatBank], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    g = gen(seed)
    shapes = {"enc.0": (2, 4, 8), "enc.1": (3, 6, 8), "dec.0": (1, 2, 4)}
    banks = {n: SplatBank(h, d, k, "diagonal") for n, (h, d, k) in shapes.items()}
    vecs = {n: (torch.randn(h, 50, d, generator=g), torch.randn(h, 50, d, generator=g) + 1.0)
            for n, (h, d, _) in shapes.items()}
    return banks, vecs


@pytest.mark.parametrize("name", NAMES)
def test_calibrate_banks_over_several_layers(name):
    banks, vecs = layered()
    before = {n: snapshot(b) for n, b in banks.items()}
    report = calibrate_banks(banks, vecs, name, seed=3)
    assert [lay.layer for lay in report.layers] == list(banks)
    assert report.initializer == name and report.seconds >= 0
    for n, bank in banks.items():
        assert_valid_bank(bank, n)
        assert not torch.equal(bank.centers.detach(), before[n]["centers"])
    # Order of the mappings does not matter: every layer has its own seed from (seed, name).
    again, _ = layered()
    calibrate_banks(dict(reversed(list(again.items()))), dict(reversed(list(vecs.items()))), name, seed=3)
    for n in banks:
        assert torch.equal(again[n].centers, banks[n].centers)
    assert layer_seed(3, "enc.0") != layer_seed(3, "enc.1")


def test_calibrate_accepts_name_params_and_instances_and_subsamples():
    banks, vecs = layered()
    report = calibrate_banks(banks, vecs, ("kmeans", {"iterations": 3}), max_vectors=20)
    assert all(lay.subsampled and lay.n_queries == 20 and lay.n_keys == 20 for lay in report.layers)
    report = calibrate_banks(banks, vecs, PCAInit())
    assert report.initializer == "PCAInit" and not any(lay.subsampled for lay in report.layers)
    assert report.to_dict()["layers"][0]["layer"] == "enc.0"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_vectors_name_layer_and_head_and_write_nothing(bad):
    banks, vecs = layered()
    q, k = vecs["enc.1"]
    k = k.clone()
    k[2, 17, 3] = bad
    vecs["enc.1"] = (q, k)
    before = {n: snapshot(b) for n, b in banks.items()}
    kind = "NaN" if math.isnan(bad) else "Inf"
    with pytest.raises(CalibrationError, match=rf"layer 'enc.1', head 2: keys contain {kind} \(first at vector 17\)"):
        calibrate_banks(banks, vecs, "kmeans")
    for n, bank in banks.items():  # validation happens before any bank is written
        for key, value in bank.state_dict().items():
            assert torch.equal(value, before[n][key])


def test_calibration_shape_and_layer_errors():
    banks, vecs = layered()
    with pytest.raises(CalibrationError, match=r"no vectors for layer\(s\) \['dec.0'\]"):
        calibrate_banks(banks, {n: v for n, v in vecs.items() if n != "dec.0"}, "random")
    with pytest.raises(CalibrationError, match="unknown layer"):
        calibrate_banks(banks, {**vecs, "extra": vecs["dec.0"]}, "random")
    with pytest.raises(CalibrationError, match=r"layer 'enc.0': queries must be \[2 heads, N, 4\]"):
        calibrate_banks(banks, {**vecs, "enc.0": (torch.zeros(2, 5, 3), None)}, "random")


def test_gsa_space_turns_the_teacher_scaling_into_a_plain_dot_product():
    q, k = torch.randn(5, 32, generator=gen(1)), torch.randn(7, 32, generator=gen(2))
    scaling = 32**-0.5
    assert gsa_input_scale(scaling) == pytest.approx(32**-0.25)
    logits = to_gsa_space(q, scaling) @ to_gsa_space(k, scaling).T
    assert torch.allclose(logits, (q @ k.T) * scaling, atol=1e-5)
    assert to_gsa_space(q, 1.0) is q
    with pytest.raises(ValueError):
        gsa_input_scale(0.0)


def test_recommended_initializer_is_registered():
    from gsa_core.calibration import RECOMMENDED_INITIALIZER

    name, params = RECOMMENDED_INITIALIZER
    assert isinstance(build(name, **params), KMeansInit)
