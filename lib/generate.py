"""Answer generation (left-padded batches) and the course's prediction file format."""
import json
from pathlib import Path

import torch
from tqdm import tqdm  # the plain bar: tqdm.auto warns in kernels without ipywidgets

from . import mbr, prompts


def _left_pad(seqs, pad_id):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], attn[i, width - len(s):] = torch.tensor(s), 1
    return ids, attn


def decoding_kwargs(g) -> dict:
    """generate() settings from a GenerateParams; sampling knobs only when sampling (else HF warns)."""
    kw = {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample, "num_beams": g.num_beams,
          "repetition_penalty": g.repetition_penalty}
    if g.do_sample:
        kw.update(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
    if g.num_beams > 1:
        kw["length_penalty"] = g.length_penalty
    if g.mbr_candidates > 1:
        kw["num_return_sequences"] = g.mbr_candidates
    return kw


@torch.inference_mode()
def generate(model, tok, prompts, g, progress=True) -> list[str]:
    """One answer per prompt; the prompt is [BOS] + tok(prompt), exactly as the metric conditions it."""
    # Right after training the model is in train mode with gradient checkpointing, under which the
    # layers silently drop the KV cache: generate() would then feed one token with no past each step.
    model.eval()
    if g.do_sample:  # the same answers on every run (an MBR choice among samples included)
        torch.manual_seed(getattr(g, "seed", 0))
    dev = next(model.parameters()).device
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    encoded = [bos + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pad less
    answers = [None] * len(encoded)
    batches = [order[i:i + g.gen_batch_size] for i in range(0, len(order), g.gen_batch_size)]
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress):
        ids, attn = _left_pad([encoded[i] for i in batch], pad)
        out = model.generate(input_ids=ids.to(dev), attention_mask=attn.to(dev), pad_token_id=pad,
                             eos_token_id=tok.eos_token_id, **decoding_kwargs(g))
        texts = [_clean(tok.decode(row, skip_special_tokens=True), g) for row in out[:, ids.shape[1]:]]
        n = g.mbr_candidates  # generate() returns a prompt's candidates one after another
        for k, i in enumerate(batch):
            answers[i] = mbr.select(texts[k * n:(k + 1) * n]) if n > 1 else texts[k]
    return answers


def _clean(text: str, g) -> str:
    """The answer as kept (and, under MBR, as compared): stripped, first line only if asked."""
    text = text.strip()
    return text.split("\n", 1)[0].strip() if g.first_line_only else text


def translate(model, tok, records, p, progress=True) -> list[str]:
    """Answers to the records' instructions, each in p's prompt template without examples (p: GenerateParams + template)."""
    return generate(model, tok, [prompts.build(r["instruction"], p.template) for r in records], p, progress)


def write_predictions(path: Path, records, answers):
    """The course's prediction format: [{"id": ..., "output": ...}, ...]."""
    rows = [{"id": r["id"], "output": a} for r, a in zip(records, answers)]
    Path(path).write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    return rows
