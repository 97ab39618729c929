"""Seaborn figures of the study; each returns its Figure so notebooks can show and save it."""
import matplotlib.pyplot as plt
import seaborn as sns
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

sns.set_theme(style="whitegrid")


def ppl_distributions(df, by="template"):
    """Per-example perplexity per group (log scale: a few hard examples dominate the mean)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.boxplot(data=df, x=by, y="ppl", hue="direction", ax=ax, log_scale=True)
    means = df.groupby(by, sort=False).ppl.mean()
    ax.set_title("per-example perplexity; mean: " + ", ".join(f"{k} {v:.2f}" for k, v in means.items()))
    ax.set_ylabel("perplexity (log scale)")
    fig.tight_layout()
    plt.close(fig)  # shown where the caller displays it, not again by the inline backend
    return fig


LABELS = {"eval_ppl": "public-test mean perplexity",
          "eval_bits_per_char": "public-test bits per character (comparable across tokenizers)"}


def learning_curves(curve, hue="model", y="eval_ppl"):
    """Public-test mean perplexity (or bits per character) vs optimizer step, one line per run; a soup
    (one row, run == "soup": the average of the runs' best models) as a star at its step."""
    fig, ax = plt.subplots(figsize=(7, 4))
    soup = curve[curve["run"] == "soup"] if "run" in curve else curve.iloc[:0]
    runs = curve.drop(soup.index)
    sns.lineplot(data=runs, x="step", y=y, hue=hue if hue in runs else None, marker="o", errorbar=None, ax=ax)
    if len(soup):
        ax.scatter(soup.step, soup[y], marker="*", s=250, color="black", zorder=5, label="soup")
        ax.legend()
    if y == "eval_ppl":
        # untrained ~60, trained ~8-14: on a linear axis the trained part (and any overfitting) is flat
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel(LABELS.get(y, y) + (" (log scale)" if y == "eval_ppl" else ""))
    ax.set_xlabel("optimizer step")
    fig.tight_layout()
    plt.close(fig)  # shown where the caller displays it, not again by the inline backend
    return fig


def sweep_lines(curves):
    """Learning curves of a recipe sweep after their first evaluation (step 0, the untrained model, is far
    above and would flatten them), the legend below the axes (variant names are long)."""
    trained = curves[curves.step > 0]
    fig, ax = plt.subplots(figsize=(8, 4 + 0.25 * trained.variant.nunique()))
    sns.lineplot(data=trained, x="step", y="eval_ppl", hue="variant", marker="o", ax=ax)
    ax.set_ylabel(LABELS["eval_ppl"])
    ax.set_xlabel("optimizer step")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(0, -0.15), frameon=False, title=None)
    fig.tight_layout()
    plt.close(fig)
    return fig


def fewshot_lines(df):
    """Mean perplexity vs number of in-context examples per strategy (error bars: spread over seeds)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=df, x="k", y="mean_ppl", hue="strategy", marker="o", errorbar="sd", ax=ax)
    ax.set_xlabel("in-context examples (k)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean perplexity")
    fig.tight_layout()
    plt.close(fig)  # shown where the caller displays it, not again by the inline backend
    return fig


def ladder(df):
    """Bits per character vs parameter count (log scale), one line per setting, models labelled."""
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=df.sort_values("params"), x="params", y="bits_per_char", hue="setting", marker="o", ax=ax)
    for r in df.drop_duplicates("model").itertuples():
        ax.annotate(r.model, (r.params, r.bits_per_char), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (nominal)")
    ax.set_ylabel("public-test bits per character")
    fig.tight_layout()
    plt.close(fig)  # shown where the caller displays it, not again by the inline backend
    return fig


def save(fig, path):
    """Write fig to path and return fig, so a cell can end with it and show it once."""
    fig.savefig(path, dpi=110)
    return fig
