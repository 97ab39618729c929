"""The learning-curve figure: perplexity on a log axis, a soup as its own point, not a line's."""
import numpy as np
import pandas as pd
from matplotlib.collections import PathCollection

from lib import plots


def _curve():
    runs = pd.DataFrame({"step": [0, 10, 20] * 2, "eval_ppl": [60.0, 9.0, 12.0, 61.0, 8.5, 11.0],
                         "eval_bits_per_char": [4.4, 2.6, 2.8, 4.4, 2.5, 2.7],
                         "model": ["m, seed 0"] * 3 + ["m, seed 1"] * 3, "run": ["seed 0"] * 3 + ["seed 1"] * 3})
    soup = pd.DataFrame([{"step": 10, "eval_ppl": 8.0, "eval_bits_per_char": 2.4, "model": "m, soup", "run": "soup"}])
    return pd.concat([runs, soup], ignore_index=True)


def test_perplexity_is_drawn_on_a_log_axis_and_bits_per_character_on_a_linear_one():
    assert plots.learning_curves(_curve()).axes[0].get_yscale() == "log"
    assert plots.learning_curves(_curve(), y="eval_bits_per_char").axes[0].get_yscale() == "linear"


def test_a_soup_is_one_star_and_no_line_goes_through_it():
    ax = plots.learning_curves(_curve()).axes[0]
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 1]
    assert sorted(tuple(line.get_ydata()) for line in lines) == [(60.0, 9.0, 12.0), (61.0, 8.5, 11.0)]
    stars = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(stars) == 1 and np.allclose(stars[0].get_offsets(), [[10, 8.0]])
    assert "soup" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_a_curve_without_a_soup_has_no_star():
    ax = plots.learning_curves(_curve().query("run != 'soup'")).axes[0]
    assert not [c for c in ax.collections if isinstance(c, PathCollection)]
