"""Load and validate the course's JSON files; classify each record's translation direction."""
import json
import re
from collections import Counter
from pathlib import Path

from . import resolve

SPLITS = ("train", "public_test", "private_test")

# Template keywords (from the ~17 course templates). The text itself rarely contains these phrases.
TO_MODERN = re.compile(r"翻譯成現代文|翻譯成白話文|文言文翻譯|翻譯成白話")
TO_CLASSICAL = re.compile(r"翻譯成文言文|古代怎麼說|翻譯成古文")


class DataError(ValueError):
    """A course data file is malformed; the message names the file and the record."""


def _fail(path, msg, index=None, rid=None):
    where = f"{path}"
    if index is not None:
        where += f": record {index}" + (f" (id {rid!r})" if rid else "")
    raise DataError(f"{where}: {msg}")


def _read_json(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found (set data_dir to the folder holding the course JSON files)")
    raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        if e.reason == "unexpected end of data":  # the last character's bytes are not all there
            raise DataError(f"{path}: the file ends in the middle of a character ({len(raw)} bytes): it is "
                            "truncated; copy it again") from None
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_record(path, i, rec, need_output):
    if not isinstance(rec, dict):
        _fail(path, f"expected an object, got {type(rec).__name__}", i)
    rid = rec.get("id") if isinstance(rec.get("id"), str) else None
    required = ("id", "instruction", "output") if need_output else ("id", "instruction")
    for key in required:
        if key not in rec:
            _fail(path, f"missing field {key!r}", i, rid)
    for key in ("id", "instruction", "output"):  # an optional output must still be valid text
        if key not in rec:
            continue
        if not isinstance(rec[key], str):
            _fail(path, f"field {key!r} must be a string, got {type(rec[key]).__name__}", i, rid)
        if not rec[key].strip():
            _fail(path, f"field {key!r} is empty", i, rid)


def load_records(path, need_output=False) -> list[dict]:
    """Validated records of one course file; any defect raises DataError naming file and record."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    seen = {}
    for i, rec in enumerate(data):
        _check_record(path, i, rec, need_output)
        if rec["id"] in seen:
            _fail(path, f"duplicate id (first at record {seen[rec['id']]})", i, rec["id"])
        seen[rec["id"]] = i
    if not data:
        raise DataError(f"{path}: no records")
    return [dict(r, direction=direction(r["instruction"])) for r in data]


def load_split(data_dir, split, need_output=None, limit=None) -> list[dict]:
    """One split ('train', 'public_test', 'private_test') from data_dir; limit keeps the first N."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    need = split != "private_test" if need_output is None else need_output
    recs = load_records(resolve(data_dir) / f"{split}.json", need_output=need)
    return recs[:limit] if limit else recs


def direction(instruction: str) -> str:
    """'classical' (to Classical Chinese), 'modern' (to vernacular) or 'unknown', from the template."""
    modern, classical = bool(TO_MODERN.search(instruction)), bool(TO_CLASSICAL.search(instruction))
    if modern != classical:
        return "modern" if modern else "classical"
    if modern:  # both phrases: trust the shortest line, which is the template, not the text
        return direction(min(instruction.split("\n"), key=len))
    return "unknown"


def direction_counts(records) -> dict:
    """Records per direction, e.g. {'classical': 137, 'modern': 113}."""
    return dict(sorted(Counter(r["direction"] for r in records).items()))


def to_dataset(records):
    """A validated record list as a `datasets.Dataset` (for map/batching/caching)."""
    from datasets import Dataset

    return Dataset.from_list(records)
