import json

import torch

from lib import data, finetune, generate, params, prompts
from tests.tiny_model import TINY


def greedy_reference(model, tok, prompt, n):
    """Greedy decoding the slow, obvious way: a full forward over the whole sequence every step."""
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


def test_generate_after_training_matches_reference(tmp_path):
    """Left-padded batched generation right after QLoRA training (train mode, checkpointing on)."""
    p = params.FinetuneParams(model=TINY, micro_batch_size=4, grad_accum=1, max_steps=2, eval_steps=2,
                              save_steps=2, eval_limit=2, learning_rate=1e-2, max_new_tokens=6, gen_batch_size=3,
                              first_line_only=False)
    recs = data.load_split(p.data_dir, "public_test", limit=5)
    r = finetune.finetune(p, data.load_split(p.data_dir, "train", limit=8), recs[:2], tmp_path)
    model, tok = r.model, r.tok
    model.train()  # as the Trainer leaves it
    ps = [prompts.build(r["instruction"]) for r in recs]  # different lengths: real left padding
    got = generate.generate(model, tok, ps, p, progress=False)
    assert got == [greedy_reference(model, tok, x, 6) for x in ps]


def test_prediction_file_format(tmp_path):
    recs = data.load_split("data/sample", "private_test", limit=2)
    generate.write_predictions(tmp_path / "p.json", recs, ["甲", "乙"])
    assert json.loads((tmp_path / "p.json").read_text()) == [{"id": recs[0]["id"], "output": "甲"},
                                                             {"id": recs[1]["id"], "output": "乙"}]
