import pytest
import sacrebleu

from lib import data, fewshot, prompts, quality, retrieval

TRAIN = data.load_split("data/sample", "train")


def rec(rid, instruction, output="x"):
    return {"id": rid, "instruction": instruction, "output": output, "direction": data.direction(instruction)}


def test_retrieval_finds_the_similar_same_direction_never_the_query():
    bm = retrieval.BM25(TRAIN)
    for q in TRAIN[:10]:  # the query itself is in the pool: it must never come back
        got = bm.top(q, 3)
        assert len(got) == 3 and q["id"] not in {g["id"] for g in got}
        assert all(g["direction"] == q["direction"] for g in got)
        assert got == bm.top(q, 3)  # deterministic
    # a query sharing a rare phrase with one record retrieves that record, as the most similar (last)
    q = rec("q", "翻譯成文言文：\n楚國人的劍掉進水裡")
    target = next(r for r in TRAIN if "楚國人" in r["instruction"])
    assert target["direction"] == "classical"  # the sample's 楚人涉江 record, as a to-classical query
    assert bm.top(q, 2)[-1]["id"] == target["id"]


def test_retrieval_ignores_template_words():
    assert retrieval.text_of("翻譯成文言文：\n學而時習之") == "學而時習之"
    assert retrieval.text_of("學而時習之\n這句話在古代怎麼說：") == "學而時習之"


def test_selector_strategies():
    s = fewshot.Selector(TRAIN)
    q = TRAIN[0]
    assert s.examples("fixed", q, 2) == prompts.SEED_EXAMPLES[:2]
    a, b = s.examples("random", q, 3, seed=0), s.examples("random", q, 3, seed=1)
    assert a == s.examples("random", q, 3, seed=0) and a != b  # seeded, and the seed matters
    assert all(e["instruction"] != q["instruction"] for e in a + b)
    assert s.examples("retrieved", q, 2) == s.examples("retrieved", q, 4)[-2:]  # nearest kept
    with pytest.raises(ValueError, match="4 examples"):
        s.examples("fixed", q, 5)
    assert s.examples("retrieved", q, 0) == []


class CharTok:
    """Whitespace-free stand-in: one token per character."""
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_examples_are_dropped_farthest_first_never_the_answer():
    q = rec("q", "翻譯成現代文：\n學而時習之", "學習了知識並且按時溫習")
    shots = [rec(str(i), f"例{i}" * 20, "答" * 20) for i in range(3)]
    full = len(prompts.build(q["instruction"], "course", shots)) + len(q["output"]) + 2
    per_shot = len(f"{shots[0]['instruction']} 答案：{shots[0]['output']}\n")
    prompt, dropped = fewshot.fit_prompt(CharTok(), q, shots, "course", full - per_shot)
    assert dropped == 1 and "例0" not in prompt and "例1" in prompt and "例2" in prompt
    prompt, dropped = fewshot.fit_prompt(CharTok(), q, shots, "course", full)
    assert dropped == 0
    prompt, dropped = fewshot.fit_prompt(CharTok(), q, shots, "course", 10)  # nothing fits
    assert dropped == 3 and prompt == prompts.build(q["instruction"])


def test_quality_matches_sacrebleu_on_a_hand_made_pair():
    hyps, refs = ["吾甚悅之。", "學而時習之"], ["吾甚悅。", "學而時習之，不亦說乎"]
    s = quality.scores(hyps, refs)
    assert s["chrF"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs], word_order=0).score)
    assert s["BLEU"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="char").score)
    assert 0 < s["BLEU"] < 100 and quality.scores(refs, refs)["chrF"] == pytest.approx(100)
    # character BLEU splits CJK Extension B characters, which the zh tokenizer leaves glued
    ext_b = ["𠀋𠀍𠀎𠀏𠀐𠀑"]
    assert quality.scores(ext_b, ext_b)["BLEU"] == pytest.approx(100)
