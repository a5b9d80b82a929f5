"""The memory bank layer: capacity, ageing, false-negative exclusion, informative selection, save/restore."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cirlab.layers.memory_bank import MemoryBank, MemoryBankConfig


def _bank(**kw) -> MemoryBank:
    return MemoryBank(MemoryBankConfig(**({"capacity": 8, "num_negatives": 3} | kw)), dim=4)


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float), dim=-1)


def test_capacity_keeps_the_newest_entries():
    bank = _bank(capacity=8)
    for step in range(5):
        bank.push(torch.randn(3, 4), torch.arange(3) + 3 * step, step)
    assert len(bank) == 8
    assert sorted(bank.ids.tolist()) == list(range(15 - 8, 15))
    bank.push(torch.randn(20, 4), torch.arange(100, 120), 9)  # more than the capacity at once
    assert sorted(bank.ids.tolist()) == list(range(112, 120))


def test_older_entries_count_less():
    bank = _bank(half_life=10.0)
    feat = _unit([1, 0, 0, 0])
    bank.push(feat, torch.tensor([1]), step=0)
    bank.push(feat, torch.tensor([2]), step=20)
    s = bank.scores(_unit([1, 1, 0, 0]), torch.tensor([99]), step=20)[0]
    old, new = s[bank.ids == 1].item(), s[bank.ids == 2].item()
    assert math.isclose(old / new, 0.5 ** 2, rel_tol=1e-5)


def test_the_positives_image_is_never_a_negative():
    bank = _bank(num_negatives=3)
    bank.push(_unit([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]), torch.tensor([7, 8, 9, 10]), 0)
    q = _unit([1, 0.1, 0.1, 0.1])  # most similar to the entry of image 7, its own positive
    negs, mask = bank.negatives(q, torch.tensor([7]), step=1)
    assert mask.all() and negs.shape == (1, 3, 4)
    assert not any(torch.allclose(n, _unit([1, 0, 0, 0])[0]) for n in negs[0])


def test_selection_prefers_hard_but_not_overwhelming_negatives():
    torch.manual_seed(0)
    q = _unit([1, 0, 0, 0])
    near_duplicate = _unit([1, 0.02, 0, 0])  # p close to 1: a likely false negative
    hard = F.normalize(torch.tensor([[0.6, 0.8, 0, 0], [0.6, 0, 0.8, 0], [0.6, 0, 0, 0.8]]), dim=-1)
    easy = F.normalize(torch.cat([-torch.ones(20, 1), torch.randn(20, 3) * 0.1], 1), dim=-1)
    bank = _bank(capacity=32, num_negatives=3, temperature=0.05)
    bank.push(torch.cat([near_duplicate, hard, easy]), torch.arange(24), step=0)
    negs, _ = bank.negatives(q, torch.tensor([-5]), step=0)
    chosen = {tuple(round(x, 4) for x in n.tolist()) for n in negs[0]}
    assert chosen == {tuple(round(x, 4) for x in h.tolist()) for h in hard}


def test_fifo_takes_the_newest_and_off_takes_none():
    fifo = _bank(mode="fifo", num_negatives=2)
    for step in range(4):
        fifo.push(torch.randn(1, 4), torch.tensor([step]), step)
    negs, _ = fifo.negatives(torch.randn(1, 4), torch.tensor([99]), step=4)
    newest = {tuple(fifo.features[fifo.ids == i][0].tolist()) for i in (2, 3)}
    assert {tuple(n.tolist()) for n in negs[0]} == newest
    off = _bank(mode="off")
    off.push(torch.randn(2, 4), torch.tensor([1, 2]), 0)
    assert len(off) == 0 and off.negatives(torch.randn(1, 4), torch.tensor([0]), 1)[0].shape == (1, 0, 4)


def test_least_informative_refresh_replaces_the_least_used_entries():
    bank = _bank(capacity=4, num_negatives=1, refresh="least_informative", score_momentum=0.0, temperature=1.0)
    bank.push(_unit([1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [-1, 0, 0, 0]), torch.tensor([1, 2, 3, 4]), 0)
    bank.negatives(_unit([1, 0, 0, 0]), torch.tensor([0]), step=0)  # updates the running informativeness
    bank.push(_unit([0, 0, 0, 1]), torch.tensor([5]), step=1)
    assert 4 not in bank.ids.tolist() and 1 in bank.ids.tolist()  # entry 4 (opposite the query) was least useful


def test_state_round_trips_through_a_state_dict():
    bank = _bank(capacity=16, num_negatives=4)
    bank.push(torch.randn(10, 4), torch.arange(10), step=3)
    again = _bank(capacity=16, num_negatives=4)
    again.load_state_dict(bank.state_dict())
    q = torch.randn(2, 4)
    a, b = bank.negatives(q, torch.tensor([1, 2]), 5), again.negatives(q, torch.tensor([1, 2]), 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and len(again) == 10


def test_warmup_fills_the_bank_but_gives_no_negatives():
    bank = _bank(warmup_steps=5)
    for step in range(7):
        negs, valid = bank.negatives(_unit([1, 0, 0, 0]), torch.tensor([99]), step)
        assert negs.shape[1] == (0 if step < 5 else 3) and bool(valid.all())
        bank.push(torch.randn(2, 4), torch.arange(2) + 2 * step, step)
    assert len(bank) == 8
