"""Each training pair also the other way round: its answer as the request, its request's text as the answer.

The course data asks in 17 fixed phrasings (templates), 9 towards Classical Chinese and 8 towards the
vernacular; every record of train.json and public_test.json uses one of them. A pair (text X, answer Y)
in one direction is also a pair (Y, X) in the other, so the training set doubles without a record from
outside it. The reversed request takes a template of the other direction, drawn with a seeded generator.
One template has a quirk the answers follow: after "文言文翻譯：" the answer starts with "答案：" (519
of 519 in train.json, 18 of 18 in public_test.json), so a reversed answer gets it there and a reversed
request's text loses it.
"""
import random

from . import data

# (request with {X} for the text, prefix of the answer), as the course files write them
TEMPLATES = (
    ("{X}\n翻譯成文言文：", ""), ("翻譯成文言文：\n{X}", ""), ("翻譯成文言文：\n{X}\n答案：", ""),
    ("{X}\n幫我把這句話翻譯成文言文", ""), ("{X}\n把這句話翻譯成文言文：", ""), ("{X}\n翻譯成古文：", ""),
    ("{X}\n這句話在古代怎麼說：", ""), ("{X}\n這句話在中國古代怎麼說：", ""), ("將下麵句子翻譯成文言文：\n{X}", ""),
    ("{X}\n翻譯成現代文：", ""), ("翻譯成現代文：\n{X}", ""), ("翻譯成現代文：\n{X}\n答案：", ""),
    ("{X}\n翻譯成白話文：", ""), ("{X}\n幫我把這句話翻譯成現代文", ""), ("{X}\n把這句話翻譯成現代文。", ""),
    ("將下麵句子翻譯成現代文：\n{X}", ""), ("文言文翻譯：\n{X}", "答案："),
)
OTHER = {"classical": "modern", "modern": "classical"}


def split(instruction: str):
    """(template, text) of a request in one of the course's phrasings, or None. The longest template
    that fits wins ("翻譯成文言文：\\n{X}\\n答案：" before "翻譯成文言文：\\n{X}")."""
    fits = []
    for tpl in TEMPLATES:
        head, tail = tpl[0].split("{X}")
        if instruction.startswith(head) and instruction.endswith(tail) and len(instruction) > len(head) + len(tail):
            fits.append((len(head) + len(tail), tpl, instruction[len(head):len(instruction) - len(tail)]))
    if not fits:
        return None
    _, tpl, text = max(fits, key=lambda f: f[0])
    return tpl, text


def reversed_records(records, seed: int = 0) -> list[dict]:
    """The records the other way round (ids suffixed '-reversed'); those in no known phrasing are left out."""
    by_direction = {d: [t for t in TEMPLATES if data.direction(t[0]) == d] for d in OTHER}
    rng = random.Random(seed)
    out = []
    for r in records:
        found, way = split(r["instruction"]), data.direction(r["instruction"])
        if found is None or way not in OTHER:
            continue
        (_, prefix), text = found
        answer = r["output"].removeprefix(prefix)
        request, new_prefix = rng.choice(by_direction[OTHER[way]])
        instruction = request.replace("{X}", answer)
        out.append({"id": f"{r['id']}-reversed", "instruction": instruction, "output": new_prefix + text,
                    "direction": data.direction(instruction)})
    return out


def training_records(records, reverse_pairs: bool, seed: int = 0) -> list[dict]:
    """What a run trains on: the records, and with reverse_pairs their reversals after them."""
    if not reverse_pairs:
        return list(records)
    extra = reversed_records(records, seed)
    if len(extra) < len(records):
        print(f"note: reverse_pairs: {len(records) - len(extra)} of {len(records)} training records ask in a "
              "phrasing lib/reverse.py does not know; they train one way only", flush=True)
    return list(records) + extra
