"""In-context example selection (fixed / random / retrieved) and the k-shot sweep."""
import random

import pandas as pd

from . import evaluate, generate, prompts, quality
from .retrieval import BM25

STRATEGIES = ("fixed", "random", "retrieved")


class Selector:
    """Picks k examples for a query by strategy; `random` is seeded per (seed, query)."""

    def __init__(self, train_records):
        self.train = train_records
        self._bm25 = None
        self._top = {}  # query id -> its most similar examples (most similar last), reused for every k

    @property
    def bm25(self):
        if self._bm25 is None:  # built on first use: fixed/random sweeps never pay for it
            self._bm25 = BM25(self.train)
        return self._bm25

    def examples(self, strategy, query, k, seed=0) -> list[dict]:
        if k == 0:
            return []
        if strategy == "fixed":
            if k > len(prompts.SEED_EXAMPLES):
                raise ValueError(f"the fixed (seed) set has {len(prompts.SEED_EXAMPLES)} examples, k={k} asked")
            return prompts.SEED_EXAMPLES[:k]
        if strategy == "random":
            rng = random.Random(f"{seed}/{query['id']}")
            pool = [r for r in self.train if r["instruction"] != query["instruction"]]
            if k > len(pool):
                raise ValueError(f"k={k} random examples asked, but the pool has {len(pool)} training records "
                                 f"(other than query {query['id']!r}); lower k in shots")
            return rng.sample(pool, k)
        if strategy == "retrieved":
            cached = self._top.get(query["id"], [])
            if len(cached) < k:
                cached = self._top[query["id"]] = self.bm25.top(query, max(k, 5))
            return cached[-k:]
        raise ValueError(f"unknown strategy {strategy!r}; known: {STRATEGIES}")


def fit_prompt(tok, query, examples, template, max_length) -> tuple[str, int]:
    """The prompt with as many examples as fit max_length with the answer; drops the farthest first.

    Returns (prompt, examples dropped). The answer is never cut to make room for examples.
    """
    examples = list(examples)
    for dropped in range(len(examples)):
        prompt = prompts.build(query["instruction"], template, examples[dropped:])
        if not evaluate.encode(tok, prompt, query.get("output", ""), max_length).truncated:
            return prompt, dropped
    return prompts.build(query["instruction"], template), len(examples)


def build_prompts(tok, selector, records, strategy, k, template, max_length, seed=0):
    """Prompts for all records, and how many queries lost examples to max_length."""
    built = [fit_prompt(tok, r, selector.examples(strategy, r, k, seed), template, max_length) for r in records]
    return [b[0] for b in built], sum(b[1] > 0 for b in built)


def sweep(model, tok, train_records, records, p) -> pd.DataFrame:
    """Per-example perplexity for every (strategy, k, seed); k=0 is computed once and shared."""
    selector, frames, zero = Selector(train_records), [], None
    for strategy in p.strategies:
        for k in p.shots:
            if strategy == "fixed" and k > len(prompts.SEED_EXAMPLES):
                print(f"skip fixed k={k}: the seed's fixed set has {len(prompts.SEED_EXAMPLES)} examples")
                continue
            for seed in (p.random_seeds if strategy == "random" else [0]):
                if k == 0 and zero is not None:
                    frames.append(zero.assign(strategy=strategy, seed=seed))
                    continue
                ps, affected = build_prompts(tok, selector, records, strategy, k, p.template, p.max_length, seed)
                df = evaluate.score_records(model, tok, records, ps, p.eval_batch_size, p.max_length,
                                            strategy=strategy, k=k, seed=seed, examples_dropped=affected)
                print(f"{strategy:9s} k={k} seed={seed}: mean ppl {df.ppl.mean():.3f}"
                      + (f" ({affected} queries dropped examples to fit max_length)" if affected else ""))
                zero = df if k == 0 else zero
                frames.append(df)
    return pd.concat(frames, ignore_index=True)


def table(per_example) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per (strategy, k): mean perplexity and its spread over seeds, bits per character; per run).

    The seed's table, per strategy. Bits per character pools every example of every seed.
    """
    runs = per_example.groupby(["strategy", "k", "seed"], sort=False).ppl.mean().rename("mean_ppl").reset_index()
    out = runs.groupby(["strategy", "k"], sort=False).mean_ppl.agg(["mean", "std", "count"]).reset_index()
    out = out.rename(columns={"mean": "mean_ppl", "std": "std_over_seeds", "count": "seeds"})
    bpc = per_example.groupby(["strategy", "k"], sort=False).apply(evaluate.bits_per_char, include_groups=False)
    return out.merge(bpc.rename("bits_per_char").reset_index(), on=["strategy", "k"]), runs


def best(table) -> dict:
    """The setting with the lowest mean perplexity, as {strategy, k, mean_ppl, bits_per_char}."""
    row = table.loc[table.mean_ppl.idxmin()]
    return {"strategy": row.strategy, "k": int(row.k), "mean_ppl": float(row.mean_ppl),
            "bits_per_char": float(row.bits_per_char)}


def quality_of(model, tok, train_records, records, settings: dict, p) -> tuple[pd.DataFrame, dict]:
    """chrF/BLEU of answers generated under each {name: (strategy, k)} setting; (scores, {name: answers})."""
    selector, frames, answers = Selector(train_records), [], {}
    for name, (strategy, k) in settings.items():
        ps, _ = build_prompts(tok, selector, records, strategy, k, p.template, p.max_length)
        answers[name] = generate.generate(model, tok, ps, p)
        frames.append(quality.by_direction(records, answers[name]).assign(setting=name))
    return pd.concat(frames, ignore_index=True), answers
