"""Replay buffer of ε_z: FIFO ring, Bernoulli draws, ramp, groups kept together, exact state round trip."""
from __future__ import annotations

import pytest
import torch

from trainer.ebm.replay import ReplayBuffer, replay_probability

SHAPES = [(2, 2, 2), (3,)]  # two latent groups per sample


def _batch(ids: list[int]) -> list[torch.Tensor]:
    """A batch whose entries encode their id in every element of every group."""
    ids_t = torch.tensor(ids, dtype=torch.float32)
    return [ids_t.view(-1, *([1] * len(s))).expand(len(ids), *s).clone() for s in SHAPES]


def _ids(eps_z: list[torch.Tensor]) -> list[int]:
    """Ids of a drawn batch, checking that every group of an entry carries the same id."""
    first = eps_z[0].flatten(1)
    for group in eps_z:
        flat = group.flatten(1)
        assert torch.equal(flat, flat[:, :1].expand_as(flat))  # one id per entry…
        assert torch.equal(flat[:, 0], first[:, 0])  # …the same in every group
    return [int(v) for v in first[:, 0]]


def test_fifo_eviction():
    buf = ReplayBuffer(SHAPES, capacity=5)
    assert len(buf) == 0
    buf.push(_batch([0, 1, 2]))
    assert len(buf) == 3 and buf.position == 3
    buf.push(_batch([3, 4, 5, 6]))  # wraps: 5 and 6 overwrite 0 and 1
    assert len(buf) == 5 and buf.position == 2
    assert sorted(_ids(buf.storage)) == [2, 3, 4, 5, 6]
    buf.push(_batch(list(range(10, 18))))  # more than the capacity: only the newest 5 survive
    assert sorted(_ids(buf.storage)) == [13, 14, 15, 16, 17]
    assert buf.position == (2 + 8) % 5


def test_ramp():
    assert replay_probability(0, 0.6, 5000) == 0.0
    assert replay_probability(2500, 0.6, 5000) == pytest.approx(0.3)
    assert replay_probability(5000, 0.6, 5000) == pytest.approx(0.6)
    assert replay_probability(90000, 0.6, 5000) == pytest.approx(0.6)
    assert replay_probability(3, 0.6, 0) == 0.6


def test_empty_buffer_gives_fresh_noise():
    buf = ReplayBuffer(SHAPES, capacity=10)
    eps, n = buf.draw(6, p=1.0, generator=torch.Generator().manual_seed(0))
    assert n == 0 and [tuple(t.shape) for t in eps] == [(6, 2, 2, 2), (6, 3)]
    assert eps[0].std() > 0.3  # N(0, I), not zeros from the empty storage


def test_p0_all_fresh_and_p1_all_replayed():
    buf = ReplayBuffer(SHAPES, capacity=8)
    buf.push(_batch([100 + i for i in range(8)]))  # ids ≥ 100 never look like N(0, 1) draws
    gen = torch.Generator().manual_seed(0)
    eps, n = buf.draw(6, p=0.0, generator=gen)
    assert n == 0 and eps[1].abs().max() < 10
    eps, n = buf.draw(6, p=1.0, generator=gen)
    assert n == 6
    ids = _ids(eps)
    assert len(set(ids)) == 6 and all(100 <= i < 108 for i in ids)  # distinct entries, groups together
    # Asking for more chains than stored: every stored entry once, then fresh noise.
    eps, n = buf.draw(12, p=1.0, generator=gen)
    assert n == 8 and sorted(_ids([t[:8] for t in eps])) == list(range(100, 108))
    assert eps[0][8:].abs().max() < 10


def test_partial_p_replays_first_and_binomial():
    buf = ReplayBuffer(SHAPES, capacity=1000)
    buf.push(_batch([100 + i for i in range(1000)]))
    gen = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(200):
        eps, n = buf.draw(32, p=0.25, generator=gen)
        counts.append(n)
        assert (eps[1][:n] >= 100).all() and (eps[1][n:].abs() < 10).all()  # replayed first
    mean = sum(counts) / len(counts)
    # Binomial(32, 0.25): mean 8, SE of the mean over 200 draws = √(32·0.25·0.75/200) ≈ 0.17.
    assert abs(mean - 8) < 0.8


def test_draw_reproducible_from_generator():
    buf = ReplayBuffer(SHAPES, capacity=50)
    buf.push(_batch(list(range(100, 150))))
    a, na = buf.draw(16, 0.5, torch.Generator().manual_seed(3))
    b, nb = buf.draw(16, 0.5, torch.Generator().manual_seed(3))
    c, _ = buf.draw(16, 0.5, torch.Generator().manual_seed(4))
    assert na == nb and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_state_round_trip_exact():
    buf = ReplayBuffer(SHAPES, capacity=6)
    buf.push([torch.randn(4, *s) for s in SHAPES])
    buf.push([torch.randn(5, *s) for s in SHAPES])  # wrapped: position 3, full
    state = buf.state_dict()
    restored = ReplayBuffer(SHAPES, capacity=6)
    restored.load_state_dict(state)
    assert (restored.fill, restored.position) == (buf.fill, buf.position) == (6, 3)
    assert all(torch.equal(x, y) for x, y in zip(restored.storage, buf.storage))
    # Same future behaviour: the same draws and the same eviction order.
    a, _ = buf.draw(5, 0.7, torch.Generator().manual_seed(1))
    b, _ = restored.draw(5, 0.7, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    new = [torch.randn(2, *s) for s in SHAPES]
    buf.push(new), restored.push(new)
    assert all(torch.equal(x, y) for x, y in zip(restored.storage, buf.storage))
    # A partly filled buffer saves only its filled part, and restores it.
    small = ReplayBuffer(SHAPES, capacity=100)
    small.push(_batch([1, 2, 3]))
    state = small.state_dict()
    assert state["storage"][0].shape[0] == 3
    again = ReplayBuffer(SHAPES, capacity=100)
    again.load_state_dict(state)
    assert _ids([t[:3] for t in again.storage]) == [1, 2, 3] and len(again) == 3 and again.position == 3
    with pytest.raises(ValueError):
        ReplayBuffer(SHAPES, capacity=7).load_state_dict(state)


def test_nbytes_and_shape_checks():
    buf = ReplayBuffer(SHAPES, capacity=10)
    assert buf.nbytes == 10 * (8 + 3) * 4
    with pytest.raises(ValueError):
        buf.push([torch.zeros(2, 2, 2, 2)])  # a group missing
    with pytest.raises(ValueError):
        buf.push([torch.zeros(2, 2, 2, 3), torch.zeros(2, 3)])  # wrong shape
