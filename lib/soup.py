"""A model soup (Wortsman et al., 2022): the uniform weight average of the best models of several full
fine-tuning runs that differ only in their seed (the order of the records; for `reverse_pairs` also
the phrasing of the reversed requests).

Runs fine-tuned from the same base stay in one basin, so their average is itself a good model, often
better than each: averaging cancels part of what each run learned from its own order. Only whole
models are averaged: two LoRA adapters' A and B matrices are not (the product of averages is not the
average of the products).
"""
import dataclasses
from pathlib import Path

import torch


def member_params(p) -> list:
    """The recipe of each run of the soup: p with seeds p.seed, p.seed + 1, ...; each a plain run."""
    return [dataclasses.replace(p, seed=p.seed + i, soup_seeds=1) for i in range(p.soup_seeds)]


def member_dir(out: Path, q) -> Path:
    return Path(out) / f"seed-{q.seed}"


@torch.no_grad()
def average_into(model, others) -> None:
    """model's trained weights become the mean of its own and those of the models in others (same
    architecture). Parameters, not buffers: a tied weight counts once, rotary tables stay."""
    own = dict(model.named_parameters())
    n = 1
    for other in others:
        theirs = dict(other.named_parameters())
        if theirs.keys() != own.keys():
            raise ValueError("the soup's models differ in their parameters: "
                             f"{sorted(set(theirs) ^ set(own))[:5]}")
        for name, w in own.items():
            w.add_(theirs[name].to(w.device, w.dtype))
        n += 1
        del other, theirs  # one other model in memory at a time (each a whole fp32 copy)
    for w in own.values():
        w.div_(n)


def make(load, folders, out: Path):
    """The soup of the models saved in folders (load(folder) -> model), saved into out; returns it."""
    model = load(folders[0])
    average_into(model, (load(f) for f in folders[1:]))  # a generator: one other model loaded at a time
    model.save_pretrained(out)
    return model
