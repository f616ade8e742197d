"""Shift detection fires on a shift and not on a stationary stream; the synthetic generators."""

from __future__ import annotations

import pytest
import torch

from gsa_core.adaptation import ShiftDetector, gaussian_symmetric_kl
from gsa_core.synthetic import AssociativeRecall, ClusteredStream


def _scores(stream, steps=80, window=8, batch=4, length=32, threshold=0.25):
    det = ShiftDetector(stream.n_heads, stream.head_dim, window, threshold=threshold)
    fired = []
    for step, q, k in stream.stream(steps, batch, length):
        det.push(q, k)
        if det.shifted():
            fired.append(step)
            det.reset()
    return fired


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stationary_stream_never_fires(seed):
    assert _scores(ClusteredStream(n_heads=2, head_dim=8, seed=seed), steps=120) == []


@pytest.mark.parametrize(("fraction", "magnitude"), [(1.0, 1.0), (0.25, 1.0), (1.0, 0.3)])
def test_shift_fires_once_soon_after_it(fraction, magnitude):
    stream = ClusteredStream(n_heads=2, head_dim=8, shift_at=50, shift_fraction=fraction,
                             shift_magnitude=magnitude, seed=4)
    fired = _scores(stream, steps=100)
    assert len(fired) == 1 and 50 <= fired[0] <= 50 + 8


def test_keys_alone_can_shift_and_scores_are_per_head():
    det = ShiftDetector(2, 3, window=4)
    g = torch.Generator().manual_seed(0)
    for step in range(8):
        q = torch.randn(2, 2, 50, 3, generator=g)
        k = torch.randn(2, 2, 50, 3, generator=g)
        if step >= 4:
            k[:, 1] += 5.0  # only head 1's keys move
        det.push(q, k)
    scores = det.scores()
    assert scores.shape == (2, 2)
    assert scores[1, 1] > 1.0 and scores[0].max() < 0.1 and scores[1, 0] < 0.1


def test_not_ready_and_reductions():
    det = ShiftDetector(1, 2, window=3)
    for _ in range(5):
        det.push(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2))
    assert not det.ready and det.score() == 0.0
    det.push(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2))
    assert det.ready
    doubled = det.score(lambda t: 2 * t)  # what an all-reduce over two identical ranks does
    assert doubled == pytest.approx(det.score(), rel=1e-6)
    state = det.state_dict()
    other = ShiftDetector(1, 2, window=3)
    other.load_state_dict(state)
    assert other.score() == pytest.approx(det.score())


def test_symmetric_kl_basics():
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    n, s, o = torch.tensor(500.0), x.sum(0), x.T @ x
    assert gaussian_symmetric_kl(n, s, o, n, s, o) == pytest.approx(0.0, abs=1e-6)
    y = x + torch.tensor([2.0, 0.0, 0.0])
    shifted = gaussian_symmetric_kl(n, s, o, n, y.sum(0), y.T @ y)
    assert shifted == pytest.approx(4.0 / (2 * 3), rel=0.2)  # |dmu|^2 / (2d) for unit variance
    assert gaussian_symmetric_kl(torch.tensor(0.0), s, o, n, s, o) == 0.0


def test_clustered_stream_is_reproducible_and_shifts_as_asked():
    stream = ClusteredStream(n_heads=2, head_dim=4, n_clusters=4, shift_at=10, shift_fraction=0.5, seed=1)
    a, b = stream.sample(3, 2, 8), stream.sample(3, 2, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    q, k, ids = a
    assert q.shape == (2, 2, 8, 4) and k.shape == (2, 2, 8, 4) and ids.max() < 4
    before, after = stream.centers(9), stream.centers(10)
    moved = (before != after).any(-1)
    assert moved[:, :2].all() and not moved[:, 2:].any()
    assert torch.equal(ClusteredStream(shift_at=None).centers(10**6), ClusteredStream().centers(0))
    with pytest.raises(ValueError):
        ClusteredStream(shift_fraction=1.5)


def test_associative_recall_answers_are_in_the_sequence():
    task = AssociativeRecall(n_pairs=4, n_keys=6, n_values=5, shift_at=20, seed=0)
    for step in (0, 25):
        batch = task.sample(step, 16)
        assert batch.tokens.shape == (16, task.length) and batch.tokens.max() < task.vocab_size
        lo, hi = task.key_range(step)
        keys, values = batch.tokens[:, 0:-1:2], batch.tokens[:, 1:-1:2]
        assert ((keys >= lo) & (keys < hi)).all() and (values >= 2 * task.n_keys).all()
        for row in range(16):
            query = batch.tokens[row, -1]
            pos = (keys[row] == query).nonzero().flatten()
            assert len(pos) == 1 and values[row, pos[0]] == batch.answer[row] == batch.targets[row, -1]
        assert (batch.targets[:, :-1] == -100).all()
    assert task.key_range(0) != task.key_range(25)
    with pytest.raises(ValueError):
        AssociativeRecall(n_pairs=9, n_keys=4)
