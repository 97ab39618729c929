"""Which records train together: each optimizer step's records split into micro-batches of even tokens.

Under DDP every step waits for the rank with the most work. A packed micro-batch's work grows with its
tokens, and random micro-batches of course records differ: over the 10,000 training records, the longer
of two micro-batches of 16 (Llama-2 tokens) is 4.3% above their mean on average, of 8 (Qwen) 6.5%.
Splitting each step's records by tokens leaves the step's records - and so its gradient - as they were,
and brings those down to 0.3% / 0.8% (README, "Several GPUs": the 7B's 2-GPU tokens/s 1.03x those of
random micro-batches on 2 x H100).

transformers' BatchRebalanceSampler does this for padded batches: its cost is batch size x longest
length, so it gives a group of long records few of them and a group of short ones many. Packed rows
have no padding: measured on 160 lengths from 20 to 400, its split was *less* even in tokens than a
random one (1.15 vs 1.14 for the larger of two over their mean). PackedRebalanceSampler keeps its
plumbing (HF passes it as the DataLoader's batch sampler and keeps accelerate from sharding it again)
and replaces the split: micro_batch_size records each, near-equal token sums.
"""
from transformers.trainer_pt_utils import BatchRebalanceSampler


class PackedRebalanceSampler(BatchRebalanceSampler):
    """Per optimizer step: the next effective-batch of a seeded shuffle (the same on every rank, no
    communication), split into dp_size x grad_accum micro-batches of equal record count whose token
    sums are near equal; rank r takes its grad_accum of them."""

    def _assign(self, indices, lengths):
        k = self.dp_size * self.grad_accum
        bins = even_split(list(zip(indices, lengths)), k)
        cost = [sum(n for _, n in b) for b in bins]
        # as HF's: slot s gets the bins ranked [s*dp, (s+1)*dp) by cost, so each slot is even across ranks
        ranked = sorted(range(k), key=lambda i: -cost[i])
        return [[[i for i, _ in bins[ranked[s * self.dp_size + r]]] for s in range(self.grad_accum)]
                for r in range(self.dp_size)]


def even_split(items, k):
    """(index, tokens) pairs into k bins of sizes differing by at most one, token sums near equal: the
    longest first, each into the lightest bin with room left (greedy longest-processing-time)."""
    sizes = [len(items) // k + (1 if i < len(items) % k else 0) for i in range(k)]
    bins, sums = [[] for _ in range(k)], [0] * k
    for item in sorted(items, key=lambda x: -x[1]):
        j = min((i for i in range(k) if len(bins[i]) < sizes[i]), key=lambda i: sums[i])
        bins[j].append(item)
        sums[j] += item[1]
    return bins
