"""Zero-shot prompt comparison (the seed's Q2 zero-shot part)."""
import pandas as pd

from . import evaluate, prompts


def compare_templates(model, tok, records, templates, batch_size=16, max_length=2048) -> pd.DataFrame:
    """Per-example perplexity of every template on the same records (one row per template x record)."""
    frames = []
    for name in templates:
        if name == prompts.CHAT:
            ps = [prompts.chat(tok, r["instruction"]) for r in records]
            if ps and ps[0] is None:
                print("note: the tokenizer has no chat template; 'chat' is left out")
                continue
        else:
            ps = [prompts.build(r["instruction"], name) for r in records]
        frames.append(evaluate.score_records(model, tok, records, ps, batch_size, max_length, template=name))
    return pd.concat(frames, ignore_index=True)
