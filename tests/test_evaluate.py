import math

import pytest
import torch

from lib import evaluate, prompts


def test_encode_layout(tiny):
    _, _, tok = tiny
    e = evaluate.encode(tok, "甲乙", "丙丁", max_length=2048)
    assert e.input_ids[0] == tok.bos_token_id and e.input_ids[-1] == tok.eos_token_id
    assert e.n_prompt == 3 and len(e.input_ids) == 6 and not e.truncated
    cut = evaluate.encode(tok, "甲乙", "丙丁", max_length=4)
    assert cut.truncated and len(cut.input_ids) == 4


@pytest.mark.parametrize("quant", [0, 1])
@pytest.mark.parametrize("batch_size", [1, 3, 8, 64])
def test_batched_equals_reference_loop(tiny, sample_eval, quant, batch_size):
    model, tok = tiny[quant], tiny[2]
    ps = [prompts.build(r["instruction"]) for r in sample_eval]
    outs = [r["output"] for r in sample_eval]
    ref = evaluate.reference_perplexities(model, tok, ps, outs)
    fast = evaluate.perplexities(model, tok, ps, outs, batch_size=batch_size, progress=False)
    assert fast.n_tokens == ref.n_tokens
    for a, b in zip(ref.ppl, fast.ppl):
        assert abs(a - b) / a < 1e-4
    assert abs(ref.mean_ppl - fast.mean_ppl) / ref.mean_ppl < 1e-4


def test_metric_by_hand(tiny):
    """exp(mean NLL of output+EOS) computed from raw logits for one example."""
    model, _, tok = tiny
    e = evaluate.encode(tok, "翻譯", "學而", 2048)
    with torch.no_grad():
        logp = model(torch.tensor([e.input_ids])).logits[0].float().log_softmax(-1)
    nll = [-logp[t - 1, e.input_ids[t]].item() for t in range(e.n_prompt, len(e.input_ids))]
    expected = math.exp(sum(nll) / len(nll))
    got = evaluate.perplexities(model, tok, ["翻譯"], ["學而"], progress=False).ppl[0]
    assert len(nll) == 3  # 學, 而, EOS
    assert got == pytest.approx(expected, rel=1e-5)


def test_summary_bits_per_char(tiny, sample_eval):
    model, _, tok = tiny
    df = evaluate.score_records(model, tok, sample_eval, [prompts.build(r["instruction"]) for r in sample_eval])
    s = evaluate.summarize(df.assign(template="course"), "template")
    assert s.n[0] == 20 and s.mean_ppl[0] == pytest.approx(df.ppl.mean())
    assert set(s.columns) >= {"ppl_classical", "ppl_modern"}


def test_bits_per_char_of_a_hand_computed_example():
    """Two answers: 'ab' scored 2 tokens + EOS at 1 bit each (3 ln 2 nats), '子曰是' 4 x 0.5 bit (2 ln 2 nats):
    5 bits over 5 characters = 1.0 bit per character; the mean of per-token perplexities would say
    otherwise (2 and sqrt 2), which is why the ladder compares in bits per character."""
    import pandas as pd

    df = pd.DataFrame({"nll": [3 * math.log(2), 2 * math.log(2)], "n_chars": [2, 3], "n_tokens": [3, 4],
                       "ppl": [2.0, math.sqrt(2)], "direction": ["modern", "classical"]})
    assert evaluate.bits_per_char(df) == pytest.approx(1.0)
    assert evaluate.bits_per_char(df.iloc[:1]) == pytest.approx(1.5)
