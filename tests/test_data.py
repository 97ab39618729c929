import json

import pytest

from lib import data
from tests.conftest import COURSE


def write(tmp_path, obj, raw=None):
    f = tmp_path / "train.json"
    f.write_text(raw if raw is not None else json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return f


GOOD = {"id": "a", "instruction": "翻譯成文言文：\n我很高興。", "output": "吾甚悅。"}


def test_sample_loads_with_directions():
    recs = data.load_split("data/sample", "train")
    assert len(recs) == 40
    assert data.direction_counts(recs) == {"classical": 18, "modern": 22}
    assert all(r["direction"] != "unknown" for r in recs)


@pytest.mark.parametrize("obj,raw,msg", [
    (None, '[{"id": "a",\n "instruction": }]', "invalid JSON at line 2, column 17"),
    ({"id": "a"}, None, "expected a JSON list"),
    ([], None, "no records"),
    ([GOOD, "x"], None, "record 1: expected an object"),
    ([{"id": "a", "output": "x"}], None, "record 0 (id 'a'): missing field 'instruction'"),
    ([dict(GOOD, output="  ")], None, "record 0 (id 'a'): field 'output' is empty"),
    ([dict(GOOD, output=3)], None, "record 0 (id 'a'): field 'output' must be a string, got int"),
    ([dict(GOOD, id=7)], None, "record 0: field 'id' must be a string, got int"),
    ([GOOD, dict(GOOD)], None, "record 1 (id 'a'): duplicate id (first at record 0)"),
])
def test_bad_input_names_file_and_record(tmp_path, obj, raw, msg):
    f = write(tmp_path, obj, raw)
    with pytest.raises(data.DataError) as e:
        data.load_records(f, need_output=True)
    assert str(f) in str(e.value) and msg in str(e.value)


def test_missing_file_and_unknown_split(tmp_path):
    with pytest.raises(data.DataError, match="file not found"):
        data.load_split(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split"):
        data.load_split("data/sample", "dev")


def test_private_split_needs_no_output():
    recs = data.load_split("data/sample", "private_test")
    assert len(recs) == 20 and "output" not in recs[0]


@pytest.mark.parametrize("instruction,expected", [
    ("翻譯成文言文：\n我很高興。", "classical"),
    ("我很高興。\n這句話在古代怎麼說：", "classical"),
    ("翻譯成古文：\n我很高興。", "classical"),
    ("文言文翻譯：\n吾甚悅。", "modern"),
    ("吾甚悅。\n翻譯成現代文：", "modern"),
    ("翻譯成白話文：\n吾甚悅。", "modern"),
    ("吾甚悅。", "unknown"),
    # the text mentions a template phrase; the shortest line (the template) decides
    ("他說翻譯成現代文很難。\n翻譯成文言文：", "classical"),
])
def test_direction(instruction, expected):
    assert data.direction(instruction) == expected


def test_to_dataset():
    ds = data.to_dataset(data.load_split("data/sample", "train", limit=5))
    assert ds.num_rows == 5 and set(ds.column_names) == {"id", "instruction", "output", "direction"}


@pytest.mark.skipif(not COURSE.exists(), reason="course data not present")
def test_course_files_load():
    counts = {s: data.direction_counts(data.load_split(COURSE, s)) for s in data.SPLITS}
    # SOURCE.md: train ~5.2k/4.8k, public 137/113, private 117/133
    assert counts["public_test"] == {"classical": 137, "modern": 113}
    assert counts["private_test"] == {"classical": 117, "modern": 133}
    assert sum(counts["train"].values()) == 10000 and "unknown" not in counts["train"]
