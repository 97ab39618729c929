"""Translation quality beyond perplexity: sacrebleu chrF and character-level BLEU."""
import pandas as pd
import sacrebleu


def scores(hyps, refs) -> dict:
    """chrF (word_order=0, i.e. chrF not chrF++) and BLEU with tokenize='char'.

    'char' rather than 'zh': the zh tokenizer leaves CJK Extension B+ characters (common in Classical
    Chinese) glued to their neighbours.
    """
    chrf = sacrebleu.corpus_chrf(hyps, [refs], word_order=0).score
    bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize="char").score
    return {"chrF": chrf, "BLEU": bleu, "n": len(hyps)}


def by_direction(records, hyps) -> pd.DataFrame:
    """chrF/BLEU overall and per translation direction."""
    refs = [r["output"] for r in records]
    rows = [{"direction": "all", **scores(hyps, refs)}]
    for d in sorted({r["direction"] for r in records}):
        idx = [i for i, r in enumerate(records) if r["direction"] == d]
        rows.append({"direction": d, **scores([hyps[i] for i in idx], [refs[i] for i in idx])})
    return pd.DataFrame(rows)
