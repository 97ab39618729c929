"""The report's discussion, written from the saved results: each paragraph answers one question."""
import math

from . import report


def _ordering(res) -> str:
    h = report.headline(res)
    a = h[h.direction == "all"].set_index("method")
    ft = report.finetune_method(res)  # QLoRA as the seed, or LoRA on a 16-bit base
    z, f, q = (a.loc[m, "mean_ppl"] for m in ("zero-shot", "few-shot", ft))
    holds = z > f > q
    text = (f"**Zero-shot > few-shot > {ft}?** Mean perplexity {z:.2f} → {f:.2f} → {q:.2f} "
            f"({a.loc['zero-shot', 'bits_per_char']:.2f} → {a.loc['few-shot', 'bits_per_char']:.2f} → "
            f"{a.loc[ft, 'bits_per_char']:.2f} bits per character): the seed's ordering "
            f"{'holds' if holds else 'does not hold'} here.")
    if a["chrF"].notna().all():
        text += (f" On generated answers chrF goes {a.loc['zero-shot', 'chrF']:.1f} → {a.loc['few-shot', 'chrF']:.1f}"
                 f" → {a.loc[ft, 'chrF']:.1f}.")
    seed = report.seed_bits_per_char(report.SEED_PPL["fine-tuned"])
    return text + (f" The seed's fine-tuned 7B model is at ≈ {seed:.2f} bits per character (an upper estimate); "
                   f"this model is {'below' if a.loc[ft, 'bits_per_char'] < seed else 'above'} it.")


def _retrieval(res) -> str:
    t = report.get(res, "03_fewshot_sweep")[1]["table"]
    fixed, other = t[t.strategy == "fixed"], t[(t.strategy != "fixed") & (t.k > 0)]
    if fixed.empty or other.empty:
        return "**Retrieved vs fixed examples:** the sweep did not run both."
    f, o = fixed.loc[fixed.mean_ppl.idxmin()], other.loc[other.mean_ppl.idxmin()]
    gain = (f.mean_ppl - o.mean_ppl) / f.mean_ppl * 100
    text = (f"**Does choosing examples beat the seed's fixed ones?** The seed's fixed examples do best at k={int(f.k)} "
            f"(mean ppl {f.mean_ppl:.2f}); {o.strategy} examples at k={int(o.k)} reach {o.mean_ppl:.2f}, "
            f"{abs(gain):.1f}% {'lower' if gain > 0 else 'higher'}.")
    seed = fixed[fixed.k == 4]
    if len(seed):  # the seed's own setting: its 4 examples
        s = float(seed.mean_ppl.iloc[0])
        text += f" Against the seed's own setting (its 4 examples, {s:.2f}) that is {(s - o.mean_ppl) / s * 100:.1f}% lower."
    return text


def _ladder(res) -> str:
    t = report.ladder_table(res).sort_values("nominal_params")
    parts = [f"{r.model} {r.zero_shot_bits_per_char:.2f} → {r.best_bits_per_char:.2f}" for r in t.itertuples()]
    by_ppl = list(t.sort_values("best_ppl").model)
    by_bpc = list(t.sort_values("best_bits_per_char").model)
    text = ("**How the ladder scales:** bits per character, zero-shot → fine-tuned: " + "; ".join(parts) + ". ")
    name, tuned = report.finetune_method(res, "04_plm_compare"), report.finetune_method(res)
    if name != tuned:  # e.g. a study whose 01 was rerun under a better recipe
        epochs = report.ran_with(res, "04_plm_compare").get("epochs")
        text += (f"The ladder trains every model under its own recipe ({name}, {epochs:g} epochs), not 01's "
                 f"({tuned}): compare its rows with each other, and 01's model with the headline. ")
    if by_ppl != by_bpc:
        text += (f"Per-token perplexity ranks the fine-tuned models {by_ppl}, bits per character {by_bpc}: a "
                 "tokenizer that spends more tokens per character spreads the same uncertainty over more tokens "
                 "and looks better per token, so only bits per character compares models.")
    else:
        text += "Here per-token perplexity and bits per character rank the models alike; across tokenizers only the latter is comparable."
    return text


def _curve(res) -> str:
    doc = report.get(res, "01_finetune")[0]
    s, p = doc["summary"], doc["provenance"]["params"]
    soup = s.get("soup")
    # a soup's curve numbers (zero-shot, last) are its first run's: so is the best point read against them
    best_ppl, best_step = (soup["members"][0]["eval_ppl"], soup["members"][0]["best_step"]) if soup else (s["best_ppl"], s["best_step"])
    per_epoch = math.ceil(s["n_train"] / (p["micro_batch_size"] * p["grad_accum"]))
    best_epoch, epochs = best_step / per_epoch, s["steps"] / per_epoch
    worse = (s["final_ppl"] - best_ppl) / best_ppl * 100
    return (f"**What the learning curve says:** the best public-test perplexity{' of the first run' if soup else ''}, "
            f"{best_ppl:.2f}, comes at step "
            f"{best_step} (epoch {best_epoch:.1f} of {epochs:.1f}); the last step is {worse:.0f}% worse "
            f"({s['final_ppl']:.2f}). " + ("Past that point the model overfits the training set: train for about "
                                           f"{max(1, math.ceil(best_epoch))} epoch(s), or keep the best adapter, "
                                           "as this study does." if worse > 2 else _flat_end(p))
            + (" " + _soup(soup) if soup else ""))


def _soup(soup) -> str:
    """The soup against its runs alone, each scored by the same code (lib.finetune)."""
    runs = "; ".join(f"seed {m['seed']}: {m['eval_ppl']:.2f} / {m['eval_bits_per_char']:.3f}" for m in soup["members"])
    change = soup["soup"]["eval_ppl"] / min(m["eval_ppl"] for m in soup["members"]) - 1  # < 0: the soup is better
    return (f"The study's model is a soup: the weights of {len(soup['members'])} runs' best models (seeds differing only) "
            f"averaged, {soup['soup']['eval_ppl']:.2f} mean perplexity / {soup['soup']['eval_bits_per_char']:.3f} bits "
            f"per character against the runs alone ({runs}): {'better' if change < 0 else 'no better'} than the "
            f"best run ({change:+.1%} mean perplexity).")


def _flat_end(p) -> str:
    """What a curve that never turned up says, by its schedule."""
    if p.get("lr_scheduler") in ("cosine", "linear"):
        return ("The curve has not turned up, and its flat end is the rate decaying to zero: only a longer "
                "schedule (more epochs, the same decay) would tell whether more training helps.")
    return "The curve has not turned up: more steps may still help."


def text(res) -> str:
    paragraphs = []
    for part in (_ordering, _retrieval, _ladder, _curve):
        try:
            paragraphs.append(part(res))
        except report.Missing as e:
            paragraphs.append(f"*({part.__name__.strip('_')}: {e})*")
    return "\n\n".join(paragraphs)
