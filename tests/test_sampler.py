import random
import statistics

import torch

from lib.sampler import PackedRebalanceSampler, even_split


def test_even_split_by_hand():
    """Longest first into the lightest bin with room: 10 -> a, 9 -> b, 8 -> b (9 < 10), 1 -> a (b is full).
    Of the three ways to pair four records, {10, 1} / {9, 8} is also the most even (11 / 17)."""
    assert even_split([(0, 10), (1, 9), (2, 8), (3, 1)], 2) == [[(0, 10), (3, 1)], [(1, 9), (2, 8)]]
    # sizes differ by at most one, every item placed once
    bins = even_split([(i, i) for i in range(7)], 3)
    assert sorted(len(b) for b in bins) == [2, 2, 3] and sorted(x for b in bins for x in b) == [(i, i) for i in range(7)]


_rnd = random.Random(0)
LENGTHS = [_rnd.randint(20, 400) for _ in range(160)]


def _steps(batches, per_step):
    return [batches[i:i + per_step] for i in range(0, len(batches), per_step)]


def test_each_steps_micro_batches_carry_even_tokens():
    """8 x 2 per step: every record once an epoch, 8 in each micro-batch, and the larger micro-batch of a
    step 0.5% above the pair's mean on average, where consecutive chunks of a random order are 13.7% above."""
    s = PackedRebalanceSampler(LENGTHS, effective_batch_size=16, dp_size=1, grad_accum=2, seed=0)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(160)) and {len(b) for b in batches} == {8}
    excess = lambda steps: statistics.mean(max(t) / statistics.mean(t) for t in steps)
    tokens = [[sum(LENGTHS[i] for i in b) for b in step] for step in _steps(batches, 2)]
    perm = torch.randperm(160, generator=torch.Generator().manual_seed(0)).tolist()
    rand = [[sum(LENGTHS[i] for i in perm[j:j + 8]), sum(LENGTHS[i] for i in perm[j + 8:j + 16])] for j in range(0, 160, 16)]
    assert excess(tokens) < 1.01 < 1.1 < excess(rand)


def test_the_same_records_each_step_on_one_rank_or_two():
    """One process accumulating 2 micro-batches, or 2 processes 1 each: a step trains on the same records
    (so the same gradient), each rank draws its share without talking to the other; the seed moves the
    shuffle, and a new epoch reshuffles."""
    one = list(PackedRebalanceSampler(LENGTHS, 16, dp_size=1, grad_accum=2, seed=3))
    ranks = [list(PackedRebalanceSampler(LENGTHS, 16, dp_size=2, grad_accum=1, seed=3, rank=r)) for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(a + b) for a, b in _steps(one, 2)]
    assert list(PackedRebalanceSampler(LENGTHS, 16, 1, 2, seed=4))[0] != one[0]
    s = PackedRebalanceSampler(LENGTHS, 16, 1, 2, seed=3)
    s.set_epoch(1)
    assert list(s)[0] != one[0]


def test_balance_ranks_reaches_the_trainers_dataloader(tmp_path):
    """balance_ranks: true makes the Trainer draw its micro-batches from PackedRebalanceSampler (not HF's
    padded-cost one), shuffled by the run's seed (HF's would use 42 whatever the seed)."""
    from lib import params
    from lib.trainer import BalancedTrainer, training_args

    feats = [{"input_ids": [1] * n, "labels": [1] * n} for n in LENGTHS]
    firsts = []
    for seed in (0, 1):
        p = params.TrainParams(micro_batch_size=8, grad_accum=2, balance_ranks=True, seed=seed, device="cpu")
        tr = BalancedTrainer(model=torch.nn.Linear(1, 1), args=training_args(p, tmp_path, len(feats)),
                           train_dataset=feats, data_collator=lambda fs: [len(f["input_ids"]) for f in fs])
        batches = list(tr.get_train_dataloader())
        assert type(tr._get_train_sampler()) is PackedRebalanceSampler and len(batches) == 20
        assert batches == [[LENGTHS[i] for i in b] for b in PackedRebalanceSampler(LENGTHS, 16, 1, 2, seed=seed)]
        firsts.append(batches[0])
    assert firsts[0] != firsts[1]
