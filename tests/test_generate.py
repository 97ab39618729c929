import json

import pytest
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


def test_beam_settings_reach_generate_and_length_penalty_needs_beams(monkeypatch):
    """num_beams and length_penalty (beam search's length normalisation) are what model.generate gets;
    a length penalty without beams is an error, and greedy decoding passes none (HF would warn)."""
    from lib import models

    model, tok = models.load_model(TINY, "none", "float32", "cpu"), models.load_tokenizer(TINY)
    seen = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw) or real(**kw))
    g = params.GenerateParams(num_beams=3, length_penalty=1.5, max_new_tokens=3, first_line_only=False)
    g.check()
    assert len(generate.generate(model, tok, ["甲", "乙丙"], g, progress=False)) == 2
    assert (seen[0]["num_beams"], seen[0]["length_penalty"]) == (3, 1.5)
    generate.generate(model, tok, ["甲"], params.GenerateParams(max_new_tokens=2), progress=False)
    assert "length_penalty" not in seen[-1]
    with pytest.raises(params.ParamsError, match="length_penalty applies to beam search only"):
        params.GenerateParams(length_penalty=2.0).check()


def test_mbr_keeps_the_candidate_that_agrees_most():
    """Hand-reasoned: 'xyz' shares no character with the others (agreement 0), 'abc' and 'abd' agree with
    each other equally (a tie goes to the earlier, beam search's better one); a duplicate is agreement."""
    from lib import mbr

    assert mbr.select(["xyz", "abd", "abc"]) == "abd"
    assert mbr.select(["abd", "xyz", "xyz"]) == "xyz"
    assert mbr.select(["甲"]) == "甲"
    with pytest.raises(ValueError):
        mbr.select([])


def test_mbr_decoding_picks_among_each_prompts_own_beams():
    """Batched (left-padded) MBR equals, prompt by prompt, the selection among that prompt's own beam
    candidates generated alone; more candidates than beams without sampling is an error."""
    from lib import mbr, models

    model, tok = models.load_model(TINY, "none", "float32", "cpu"), models.load_tokenizer(TINY)
    g = params.GenerateParams(num_beams=4, mbr_candidates=4, max_new_tokens=5, gen_batch_size=3,
                              first_line_only=False)
    g.check()
    ps = ["甲", "乙丙丁戊", "己庚"]
    got = generate.generate(model, tok, ps, g, progress=False)
    for prompt, answer in zip(ps, got):
        ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=4,
                             num_return_sequences=4, max_new_tokens=5, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id, eos_token_id=tok.eos_token_id)
        beams = [tok.decode(r[ids.shape[1]:], skip_special_tokens=True).strip() for r in out]
        assert len(set(beams)) > 1  # else the selection is trivially right
        assert answer == mbr.select(beams)
    with pytest.raises(params.ParamsError, match="mbr_candidates = 4 needs"):
        params.GenerateParams(num_beams=2, mbr_candidates=4).check()
    params.GenerateParams(do_sample=True, mbr_candidates=4).check()
