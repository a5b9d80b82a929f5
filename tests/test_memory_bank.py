"""The memory bank layer: capacity, ageing, false-negative exclusion, informative selection, save/restore."""
from __future__ import annotations

import math

import pytest
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
    negs, mask, _ = bank.negatives(q, torch.tensor([7]), step=1)
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
    negs, _, _ = bank.negatives(q, torch.tensor([-5]), step=0)
    chosen = {tuple(round(x, 4) for x in n.tolist()) for n in negs[0]}
    assert chosen == {tuple(round(x, 4) for x in h.tolist()) for h in hard}


def test_fifo_takes_the_newest_and_off_takes_none():
    fifo = _bank(mode="fifo", num_negatives=2)
    for step in range(4):
        fifo.push(torch.randn(1, 4), torch.tensor([step]), step)
    negs, _, _ = fifo.negatives(torch.randn(1, 4), torch.tensor([99]), step=4)
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
        negs, valid, _ = bank.negatives(_unit([1, 0, 0, 0]), torch.tensor([99]), step)
        assert negs.shape[1] == (0 if step < 5 else 3) and bool(valid.all())
        bank.push(torch.randn(2, 4), torch.arange(2) + 2 * step, step)
    assert len(bank) == 8


def test_warmup_in_epochs_follows_the_schedule():
    bank = _bank(warmup_steps=2, warmup_epochs=1.5)
    bank.set_schedule(steps_per_epoch=4)  # 1.5 epochs of 4 steps: the bank starts at step 6
    bank.push(torch.randn(4, 4), torch.arange(4), 0)
    assert not bank.active(5) and bank.active(6)


def _spread_bank(mode: str, **kw) -> tuple:
    """A bank of 8 entries at known similarities to one query: entry j has cosine (j - 3.5) / 4."""
    bank = _bank(**({"mode": mode, "capacity": 8, "num_negatives": 3} | kw))
    cos = torch.tensor([(j - 3.5) / 4 for j in range(8)])
    feats = torch.stack([cos, (1 - cos ** 2).sqrt(), torch.zeros(8), torch.zeros(8)], dim=1)
    bank.push(feats, torch.arange(8), 0)
    return bank, _unit([1, 0, 0, 0])


def test_hardest_takes_the_most_similar_and_random_draws_uniformly():
    bank, q = _spread_bank("hardest")
    _, _, slots = bank.negatives(q, torch.tensor([99]), 1)
    assert sorted(bank.ids[slots[0]].tolist()) == [5, 6, 7]
    bank, q = _spread_bank("random")
    torch.manual_seed(0)
    counts = torch.zeros(8)
    for _ in range(400):
        counts[bank.ids[bank.negatives(q, torch.tensor([99]), 1)[2][0]]] += 1
    assert counts.sum() == 1200 and counts.min() > 100  # each entry about 150 times of 1,200


def test_sampled_draws_in_proportion_to_p_and_semi_hard_bans_above_the_positive():
    bank, q = _spread_bank("sampled", temperature=0.25, num_negatives=1)
    torch.manual_seed(0)
    counts = torch.zeros(8)
    for _ in range(2000):
        counts[bank.ids[bank.negatives(q, torch.tensor([99]), 1)[2][0]]] += 1
    p = torch.tensor([(j - 3.5) / 4 for j in range(8)]).div(0.25).softmax(0)
    assert torch.allclose(counts / 2000, p, atol=0.03)  # one negative a draw: the frequencies are p
    bank, q = _spread_bank("hardest", semi_hard_margin=0.1)
    # the positive scores 0.5: entries above 0.4 (cosines 0.625 and 0.875) are banned
    _, _, slots = bank.negatives(q, torch.tensor([99]), 1, positive_sim=torch.tensor([0.5]))
    assert sorted(bank.ids[slots[0]].tolist()) == [3, 4, 5]
    with pytest.raises(ValueError, match="positive"):
        bank.negatives(q, torch.tensor([99]), 1)


def test_bad_bank_fields_are_refused():
    for field, value in (("mode", "lifo"), ("term", "both"), ("consistency", "frozen")):
        with pytest.raises(ValueError, match=field):
            _bank(**{field: value})
