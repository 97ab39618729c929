"""Minimum-Bayes-risk selection: of several candidate answers to one prompt, keep the one that agrees most
with the others (Freitag et al. 2022, "High Quality Rather than High Model Probability"). With chrF as the
agreement, it picks the candidate the model's own distribution expects to score best in chrF, where the
single most probable answer (beam search's) is often short or idiosyncratic."""
from sacrebleu.metrics import CHRF

_CHRF = CHRF(word_order=0)  # chrF as lib.quality scores it


def select(candidates: list[str]) -> str:
    """The candidate with the highest summed chrF against the other candidates (as references); ties go to
    the earliest (beam search returns them best first). Duplicates count as agreement."""
    if not candidates:
        raise ValueError("no candidates to choose from")

    def agreement(i):
        return sum(_CHRF.sentence_score(candidates[i], [c]).score for j, c in enumerate(candidates) if j != i)

    return candidates[max(range(len(candidates)), key=lambda i: (agreement(i), -i))]
