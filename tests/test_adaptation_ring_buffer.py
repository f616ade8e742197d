"""Ring buffer: O(1) push into fixed storage, windowed reductions equal to a plain list's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gsa_core.adaptation import RingBuffer

pushes = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), max_size=40)


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 9), values=pushes, last=st.none() | st.integers(0, 12))
def test_matches_a_list_of_the_newest_entries(capacity, values, last):
    buf = RingBuffer(capacity, (), dtype=torch.float64)
    for v in values:
        buf.push(v)
    held = values[-capacity:] if values else []
    assert len(buf) == len(held) and buf.pushed == len(values)
    assert buf.values().tolist() == held
    window = held if last is None else held[len(held) - min(last, len(held)):]
    assert buf.values(last).tolist() == window
    assert buf.sum(last).item() == pytest.approx(sum(window), abs=1e-9)
    assert buf.mean(last).item() == pytest.approx(sum(window) / max(len(window), 1), abs=1e-9)
    if window:
        assert buf.max(last).item() == max(window)
        assert buf.latest().item() == held[-1]
    assert buf.full == (len(values) >= capacity)


@settings(max_examples=30, deadline=None)
@given(capacity=st.integers(1, 6), n=st.integers(0, 20), seed=st.integers(0, 1000))
def test_tensor_entries_and_fixed_storage(capacity, n, seed):
    g = torch.Generator().manual_seed(seed)
    buf = RingBuffer(capacity, (2, 3))
    storage = buf.data.data_ptr()
    entries = [torch.randn(2, 3, generator=g) for _ in range(n)]
    for e in entries:
        buf.push(e)
    assert buf.data.data_ptr() == storage  # pushing never reallocates
    held = entries[-capacity:]
    expected = torch.stack(held) if held else torch.zeros(0, 2, 3)
    assert torch.equal(buf.values(), expected)
    assert torch.allclose(buf.sum(), expected.sum(0) if held else torch.zeros(2, 3), atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(capacity=st.integers(1, 6), n=st.integers(1, 15), col=st.integers(0, 2))
def test_fill_where_forgets_one_column_of_every_entry(capacity, n, col):
    buf = RingBuffer(capacity, (3,))
    for i in range(n):
        buf.push(torch.full((3,), float(i + 1)))
    mask = torch.zeros(3, dtype=torch.bool)
    mask[col] = True
    buf.fill_where(mask, 0.0)
    assert (buf.values()[:, col] == 0).all()
    others = [c for c in range(3) if c != col]
    assert (buf.values()[:, others] > 0).all()


def test_broadcast_push_clear_and_state_roundtrip():
    buf = RingBuffer(3, (2,))
    buf.push(1.0)
    buf.push(torch.tensor([2.0, 3.0]))
    assert buf.values().tolist() == [[1.0, 1.0], [2.0, 3.0]]
    state = buf.state_dict()
    other = RingBuffer(3, (2,))
    other.load_state_dict(state)
    assert torch.equal(other.values(), buf.values()) and len(other) == 2
    buf.clear()
    assert len(buf) == 0 and buf.sum().tolist() == [0.0, 0.0]
    with pytest.raises(IndexError):
        buf.latest()
    with pytest.raises(ValueError):
        RingBuffer(0)
    with pytest.raises(ValueError):
        RingBuffer(2, (3,)).load_state_dict(state)


def test_held_mask_marks_written_rows():
    buf = RingBuffer(4)
    for v in range(6):
        buf.push(float(v))
    assert buf.held_mask().all()
    buf.clear()
    buf.push(1.0)
    assert buf.held_mask().tolist() == [True, False, False, False]
