"""Training pairs the other way round (lib/reverse.py), checked on hand-written records."""
import pytest

from lib import data, finetune, reverse
from tests.conftest import COURSE
from tests.test_train import tiny_params


def _rec(instruction, output, rid="r1"):
    return {"id": rid, "instruction": instruction, "output": output, "direction": data.direction(instruction)}


def test_a_pair_reversed_by_hand():
    r = _rec("學而時習之，不亦說乎？\n翻譯成現代文：", "學習了並且時常溫習，不也很愉快嗎？")
    (out,) = reverse.reversed_records([r])
    assert out["id"] == "r1-reversed" and out["direction"] == "classical"
    assert out["output"] == "學而時習之，不亦說乎？"
    assert "學習了並且時常溫習，不也很愉快嗎？" in out["instruction"]
    assert reverse.split(out["instruction"])[1] == "學習了並且時常溫習，不也很愉快嗎？"


def test_the_answer_prefix_of_one_phrasing_moves_with_it():
    """After "文言文翻譯：" the course's answers start with "答案：": a reversed request drops it from its
    text, a reversed answer in that phrasing gets it, and no other answer does."""
    r = _rec("文言文翻譯：\n人不知而不慍。", "答案：別人不了解我，我也不怨恨。")
    (out,) = reverse.reversed_records([r])
    assert out["output"] == "人不知而不慍。" and "答案" not in out["instruction"]
    assert out["instruction"].replace("別人不了解我，我也不怨恨。", "{X}") in [t for t, _ in reverse.TEMPLATES]
    to_modern = [_rec("溫故而知新。\n翻譯成文言文：" if i % 2 else "翻譯成古文：\n溫故而知新。", "溫故而知新。", f"r{i}")
                 for i in range(60)]
    to_modern = [dict(r, instruction=r["instruction"].replace("溫故而知新。", f"句{i}")) for i, r in enumerate(to_modern)]
    outs = reverse.reversed_records(to_modern, seed=3)
    prefixed = [o for o in outs if o["instruction"].startswith("文言文翻譯：")]
    assert 0 < len(prefixed) < len(outs)  # 1 of the 8 modern phrasings
    assert all(o["output"].startswith("答案：") == o["instruction"].startswith("文言文翻譯：") for o in outs)
    assert {o["direction"] for o in outs} == {"modern"}


def test_the_longest_phrasing_wins_and_unknown_ones_are_left_out():
    assert reverse.split("翻譯成文言文：\n他走了。\n答案：") == (("翻譯成文言文：\n{X}\n答案：", ""), "他走了。")
    assert reverse.split("翻譯成文言文：\n他走了。") == (("翻譯成文言文：\n{X}", ""), "他走了。")
    assert reverse.split("請翻譯：他走了。") is None
    assert reverse.reversed_records([_rec("請翻譯：他走了。", "去矣。")]) == []


@pytest.mark.parametrize("split", ["train", "public_test"])
def test_every_sample_record_reverses_and_back(split):
    """The sample's records in the course's phrasings go there and back (answer prefixes aside); the
    sample's own "翻譯成白話文：\n" phrasing (not the course's) is left out."""
    recs = [r for r in data.load_split("data/sample", split) if not r["instruction"].startswith("翻譯成白話文：\n")]
    back = reverse.reversed_records(reverse.reversed_records(recs, seed=0), seed=1)
    assert len(back) == len(recs) >= 18
    for a, b in zip(recs, back):
        assert a["direction"] == b["direction"]
        assert b["output"].removeprefix("答案：") == a["output"].removeprefix("答案：")


def test_a_run_with_reverse_pairs_trains_on_both_ways(tmp_path, capsys):
    tr = data.load_split("data/sample", "train", limit=8)
    unknown = sum(r["instruction"].startswith("翻譯成白話文：\n") for r in tr)
    assert unknown == 1  # the sample's own phrasing: trained one way, with a note
    ev = data.load_split("data/sample", "public_test", limit=4)
    plain = finetune.finetune(tiny_params(max_steps=2, eval_steps=2, save_steps=0), tr, ev, tmp_path / "plain")
    both = finetune.finetune(tiny_params(max_steps=2, eval_steps=2, save_steps=0, reverse_pairs=True), tr, ev,
                             tmp_path / "both")
    assert (plain.summary["n_train"], both.summary["n_train"]) == (8, 15)
    assert "1 of 8 training records ask in a phrasing" in capsys.readouterr().out
    assert reverse.training_records(tr, False) == tr


def test_the_method_says_both_ways():
    from lib import params

    assert params.method("none", True, True) == "full fine-tuning, pairs both ways"
    assert params.method("nf4", False, False) == "QLoRA"


@pytest.mark.skipif(not COURSE.exists(), reason="course data not present")
def test_reversed_course_pairs_never_hand_training_a_test_pair():
    """On the course files: every training record reverses, and no reversed pair is a public-test pair
    (its request's text and its answer), so reverse_pairs adds nothing of the test to training."""
    train, test = data.load_split(COURSE, "train"), data.load_split(COURSE, "public_test")
    rev = reverse.reversed_records(train)
    assert len(rev) == len(train) == 10_000

    def pair(r):
        return reverse.split(r["instruction"])[1].strip(), r["output"].removeprefix("答案：").strip()

    assert not {pair(r) for r in rev} & {pair(r) for r in test}
