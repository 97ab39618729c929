"""BM25 over character n-grams: the training examples most similar to a query, same direction.

Characters are the natural unit for Chinese (no word boundaries); unigrams + bigrams catch both
shared names and shared phrasing. Whole-corpus index in plain Python: 10k records index in ~1 s and a
query takes milliseconds, far below the model's time per prompt.
"""
import math
import re
from collections import Counter, defaultdict

from .data import TO_CLASSICAL, TO_MODERN

_TEMPLATE_WORDS = re.compile(TO_MODERN.pattern + "|" + TO_CLASSICAL.pattern + r"|答案：")


def text_of(instruction: str) -> str:
    """The text to translate: the instruction without its template line(s).

    Course templates sit on their own line ("翻譯成文言文：", "這句話在古代怎麼說："), so whole lines
    that carry a template phrase go; a one-line instruction only loses the phrases themselves.
    """
    lines = [x for x in instruction.split("\n") if x.strip() and not _TEMPLATE_WORDS.search(x)]
    return "".join(lines) if lines else _TEMPLATE_WORDS.sub("", instruction)


def ngrams(text: str, n_max: int = 2) -> Counter:
    return Counter(text[i:i + n] for n in range(1, n_max + 1) for i in range(len(text) - n + 1))


class BM25:
    """Okapi BM25 (k1=1.5, b=0.75) over character 1-2 grams of the records' instructions."""

    def __init__(self, records, k1=1.5, b=0.75):
        self.records, self.k1, self.b = records, k1, b
        self.docs = [ngrams(text_of(r["instruction"])) for r in records]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg = sum(self.lengths) / max(len(self.docs), 1)
        self.postings = defaultdict(list)
        for i, d in enumerate(self.docs):
            for g, tf in d.items():
                self.postings[g].append((i, tf))
        n = len(self.docs)
        self.idf = {g: math.log(1 + (n - len(p) + 0.5) / (len(p) + 0.5)) for g, p in self.postings.items()}

    def scores(self, query: str) -> dict:
        out = defaultdict(float)
        for g in ngrams(text_of(query)):
            for i, tf in self.postings.get(g, ()):
                norm = tf + self.k1 * (1 - self.b + self.b * self.lengths[i] / self.avg)
                out[i] += self.idf[g] * tf * (self.k1 + 1) / norm
        return out

    def top(self, query_record, k: int) -> list[dict]:
        """The k most similar records in the query's direction, never the query itself; most similar last."""
        if k == 0:
            return []
        scores = self.scores(query_record["instruction"])
        ok = [i for i in scores if self.records[i]["direction"] == query_record["direction"]
              and self.records[i]["instruction"] != query_record["instruction"]
              and self.records[i]["id"] != query_record.get("id")]
        best = sorted(ok, key=lambda i: (-scores[i], i))[:k]  # index breaks ties: deterministic
        return [self.records[i] for i in reversed(best)]
