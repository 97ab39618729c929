"""Training features and batches: answer-only labels, right-padded or packed (padding-free) rows.

Sequences are built by evaluate.encode, so the training loss and the course metric score exactly the
same tokens (output + EOS given BOS + prompt).
"""
import torch

from . import evaluate, prompts

IGNORE = -100  # label value the loss skips


def encode_examples(tok, records, template, max_length) -> tuple[list[dict], int, list[str]]:
    """Training features (input_ids, labels with the prompt masked), how many were cut, and the ids of
    records left out because max_length leaves no answer token (they would train nothing)."""
    feats, cut, skipped = [], 0, []
    for r in records:
        e = evaluate.encode(tok, prompts.build(r["instruction"], template), r["output"], max_length)
        if e.n_prompt >= len(e.input_ids):
            skipped.append(r["id"])
            continue
        cut += e.truncated
        labels = [IGNORE] * e.n_prompt + e.input_ids[e.n_prompt:]
        feats.append({"input_ids": e.input_ids, "labels": labels})
    return feats, cut, skipped


def scored(labels):
    """The positions that predict an answer token: position t predicts label t+1 (the last never does)."""
    score = torch.zeros_like(labels, dtype=torch.bool)
    score[:, :-1] = labels[:, 1:] != IGNORE
    return score


class PadCollator:
    """Right-pads a batch; pads get attention 0 and label IGNORE."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, feats):
        width = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), width), self.pad_id)
        labels = torch.full((len(feats), width), IGNORE)
        attn = torch.zeros((len(feats), width), dtype=torch.long)
        for i, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], attn[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}


# cuda_graphs: rows padded to a multiple of this many tokens. Random micro-batches of the course's training
# split (Qwen tokens) then take three widths at 8 records (768-1,280; 15.8% pads), five at 16 (1,280-2,304;
# 7.7% pads): as many recorded graphs
GRAPH_MULTIPLE = 256


class PackCollator:
    """Padding-free rows: the micro-batch's sequences laid end to end, positions restarting at 0.

    Sequences go into rows of at most row_tokens (first fit, longest first; a longer sequence gets a
    row of its own), so attention stays as cheap as in short rows; the rows are right-padded to the
    longest. No attention mask: transformers reads the sequence boundaries from position_ids and
    attends only within each sequence, so every example's loss is what it is alone (tested). Each
    sequence starts with BOS, whose label is IGNORE, so no token is trained to predict the next
    example; pads sit after every real token of their row (causal attention never sees them) and
    carry label IGNORE.
    """

    def __init__(self, pad_id=0, row_tokens=512, multiple=8, bounds=False, answers=False, graphs=False):
        # widths rounded up to a multiple of 8: a compiled model specializes on width % 8 and would
        # otherwise recompile (tens of seconds each) whenever a batch's width changes that remainder
        self.pad_id, self.row_tokens, self.multiple = pad_id, row_tokens, multiple
        # bounds (varlen_attention): the sequences' boundaries go with the batch, attention costs what each
        # sequence costs alone whatever the row, so the whole micro-batch is one row (no row padding)
        # answers (with the answer-only loss): the flat positions that predict an answer token, found here on
        # the CPU, so the loss gathers them without a host-GPU sync (evaluate.token_nll's index)
        self.bounds, self.answers = bounds, answers
        if bounds:
            self.row_tokens = float("inf")
        # graphs (cuda_graphs): a CUDA graph is recorded for each shape its inputs take, so the row is padded
        # to a multiple of GRAPH_MULTIPLE and seq_max is the row's width (an upper bound the flash kernel
        # takes; a value of its own would record a graph for each longest sequence)
        self.graphs = graphs
        if graphs:
            self.multiple = GRAPH_MULTIPLE

    def rows(self, lengths) -> list[list[int]]:
        """Indices of the sequences in each row."""
        rows, room = [], []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
            if j is None:
                rows.append([i])
                room.append(self.row_tokens - lengths[i])
            else:
                rows[j].append(i)
                room[j] -= lengths[i]
        return rows

    def __call__(self, feats):
        rows = self.rows([len(f["input_ids"]) for f in feats])
        width = max(sum(len(feats[i]["input_ids"]) for i in r) for r in rows)
        width = -(-width // self.multiple) * self.multiple
        ids = torch.full((len(rows), width), self.pad_id)
        labels = torch.full((len(rows), width), IGNORE)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            at = 0
            for i in r:
                n = len(feats[i]["input_ids"])
                ids[k, at:at + n] = torch.tensor(feats[i]["input_ids"])
                labels[k, at:at + n] = torch.tensor(feats[i]["labels"])
                pos[k, at:at + n] = torch.arange(n)
                at += n
            pos[k, at:] = torch.arange(width - at)  # the pad tail as one more (unscored) sequence
        out = {"input_ids": ids, "labels": labels, "position_ids": pos}
        if self.bounds:
            out.update(boundaries(pos))
            if self.graphs:
                out["seq_max"] = width
        if self.answers:
            out["answer_index"] = scored(labels).flatten().nonzero().squeeze(1)
        return out


def boundaries(position_ids):
    """seq_bounds/seq_max for lib.varlen_attention: a sequence starts wherever the positions restart at 0
    (pad tails included), over the rows laid end to end; int32, as the flash kernel takes them."""
    flat = position_ids.flatten()
    starts = (flat == 0).nonzero().squeeze(1)
    bounds = torch.cat([starts, torch.tensor([len(flat)])]).to(torch.int32)
    return {"seq_bounds": bounds, "seq_max": int(bounds.diff().max())}


def collator(p, tok):
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if not p.packing:
        return PadCollator(pad)
    return PackCollator(pad, p.pack_tokens, bounds=p.varlen_attention, answers=p.varlen_attention and p.answer_loss,
                        graphs=p.cuda_graphs)
