"""The course metric: mean over examples of exp(mean NLL of output+EOS given BOS+prompt), batched.

`reference_perplexities` is the course's own batch-size-1 loop, kept as the yardstick; `perplexities`
is the fast one (length-sorted right-padded batches, LM head only on answer positions) and a test
holds the two equal to 1e-4.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm  # the plain bar: tqdm.auto warns in kernels without ipywidgets

from .chunked_loss import HEAD_LOSSES


@dataclass
class Encoded:
    input_ids: list[int]
    n_prompt: int  # BOS + prompt tokens; the rest (output + EOS) is scored
    truncated: bool


def encode(tok, prompt: str, output: str, max_length: int = 2048) -> Encoded:
    """[BOS] + tok(prompt) + tok(output) + [EOS], each part tokenized alone, cut at max_length."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    head = bos + tok(prompt, add_special_tokens=False)["input_ids"]
    ids = head + tok(output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return Encoded(ids[:max_length], min(len(head), max_length), len(ids) > max_length)


@dataclass
class Scores:
    ppl: list[float]  # per example, in input order
    nll: list[float]  # summed NLL (nats) of each example's scored tokens
    n_tokens: list[int]
    n_truncated: int

    @property
    def mean_ppl(self) -> float:
        return float(np.mean(self.ppl))


def _scores(nll, counts, truncated) -> Scores:
    ppl = [float(np.exp(s / c)) if c else float("nan") for s, c in zip(nll, counts)]
    return Scores(ppl, [float(x) for x in nll], list(counts), int(sum(truncated)))


@torch.inference_mode()
def reference_perplexities(model, tok, prompts, outputs, max_length=2048) -> Scores:
    """The course's loop: one example at a time, full logits, CrossEntropy on the shifted labels."""
    dev = next(model.parameters()).device
    encs = [encode(tok, p, o, max_length) for p, o in zip(prompts, outputs)]
    nll, counts = [], []
    for e in tqdm(encs, desc="reference ppl", leave=False):
        ids = torch.tensor([e.input_ids], device=dev)
        logits = model(ids, attention_mask=torch.ones_like(ids)).logits
        losses = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")
        mask = torch.zeros_like(losses)
        mask[e.n_prompt - 1:] = 1  # logits at t predict token t+1
        nll.append((losses * mask).sum().item())
        counts.append(int(mask.sum().item()))
    return _scores(nll, counts, [e.truncated for e in encs])


def _parts(model):
    """Decoder stack, LM head and logit soft-cap of a (possibly peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)


def token_nll(model, ids, attn, score, position_ids=None, head_loss="chunked", index=None, **attention_kw):
    """NLL of each scored next token: position t (score[b, t] True) predicting ids[b, t+1].

    Returns (losses [N], row index of each [N]). Runs the decoder, then the LM head only on scored
    positions: exact, and the prompt's full-vocabulary logits (262k wide for Gemma) never exist.
    Training uses it too, so the training loss and the metric score the same tokens the same way.
    Packed rows pass attn=None and position_ids restarting at 0 for each sequence (transformers then
    builds a block-diagonal causal mask), or, in training with varlen_attention, also the sequences' bounds
    in attention_kw (seq_bounds, seq_max: lib.varlen_attention). head_loss: chunked_loss.HEAD_LOSSES' key.
    index: the flat (row-major) positions of score's True entries, where the caller has them (the varlen
    collator, from the labels on the CPU): gathering by them needs no host-GPU sync, while boolean indexing
    waits for the whole forward, so the host cannot queue the backward meanwhile. Then score is not read
    and the rows are not returned (None).
    """
    decoder, head, cap = _parts(model)
    hidden = decoder(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=False,
                     **attention_kw).last_hidden_state
    if index is None:
        targets = ids[:, 1:][score[:, :-1]]
        losses = HEAD_LOSSES[head_loss](hidden[score], head.weight, targets, cap, head.bias)  # no full logits
        return losses, score.nonzero()[:, 0]
    targets = ids.flatten().index_select(0, index + 1)  # t + 1 stays in t's row: the last column is never scored
    losses = HEAD_LOSSES[head_loss](hidden.flatten(0, 1).index_select(0, index), head.weight, targets, cap, head.bias)
    return losses, None


def _batch_nll(model, encs, pad_id, dev):
    """Summed NLL of each sequence's answer tokens (right-padded batch)."""
    width = max(len(e.input_ids) for e in encs)
    ids = torch.full((len(encs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    score = torch.zeros_like(ids, dtype=torch.bool)  # position t scores token t+1
    for i, e in enumerate(encs):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        score[i, e.n_prompt - 1:n - 1] = True
    losses, row = token_nll(model, ids.to(dev), attn.to(dev), score.to(dev))
    return torch.zeros(len(encs), device=dev).index_add_(0, row, losses).tolist()


def _check_scorable(encs, ids, max_length):
    """The metric is undefined for an example with no answer token left within max_length."""
    bad = [i for i, e in enumerate(encs) if len(e.input_ids) <= e.n_prompt]
    if bad:
        name = ids[bad[0]] if ids else f"example {bad[0]}"
        raise ValueError(f"{len(bad)} example(s) leave no answer token within max_length={max_length} (the "
                         f"prompt alone fills it), first: {name}; raise max_length or drop the record")


@torch.inference_mode()
def perplexities(model, tok, prompts, outputs, batch_size=16, max_length=2048, progress=True, ids=None) -> Scores:
    """The course metric, batched: examples sorted by length, right-padded, pads masked."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    dev = next(model.parameters()).device
    encs = [encode(tok, p, o, max_length) for p, o in zip(prompts, outputs)]
    _check_scorable(encs, ids, max_length)
    order = sorted(range(len(encs)), key=lambda i: -len(encs[i].input_ids))  # longest first: OOM shows early
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    nll = [0.0] * len(encs)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        for i, v in zip(batch, _batch_nll(model, [encs[i] for i in batch], pad, dev)):
            nll[i] = v
    counts = [len(e.input_ids) - e.n_prompt for e in encs]
    return _scores(nll, counts, [e.truncated for e in encs])


def score_records(model, tok, records, prompts_, batch_size=16, max_length=2048, **labels):
    """Per-example course metric for records with their prompts, as a DataFrame (one row a record).

    labels (e.g. template='course', k=2) become constant columns, so results of runs concatenate.
    """
    import pandas as pd

    outputs = [r["output"] for r in records]
    s = perplexities(model, tok, prompts_, outputs, batch_size=batch_size, max_length=max_length,
                     ids=[r["id"] for r in records])
    if s.n_truncated:
        print(f"note: {s.n_truncated} of {len(records)} sequences were cut at max_length={max_length}")
    df = pd.DataFrame({"id": [r["id"] for r in records], "direction": [r["direction"] for r in records],
                       "ppl": s.ppl, "nll": s.nll, "n_tokens": s.n_tokens,
                       "n_chars": [len(o) for o in outputs]})
    for k, v in labels.items():
        df.insert(0, k, v)
    return df


def bits_per_char(df) -> float:
    """Total answer NLL / total answer characters, in bits: comparable across tokenizers."""
    return float(df.nll.sum() / df.n_chars.sum() / np.log(2))


def summarize(df, by) -> "pd.DataFrame":
    """Mean perplexity (the course score) per group, overall and per direction, plus bits/char."""
    import pandas as pd

    by = [by] if isinstance(by, str) else list(by)
    rows = []
    for key, g in df.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key), mean_ppl=g.ppl.mean(), n=len(g))
        for d, gd in g.groupby("direction"):
            row[f"ppl_{d}"] = gd.ppl.mean()
        row["bits_per_char"] = bits_per_char(g)  # perplexity per token is not comparable across tokenizers
        rows.append(row)
    return pd.DataFrame(rows)
