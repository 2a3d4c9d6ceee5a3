"""
Curves: the study's (results/curves.png, by experiments.py --report=True) and any one run's
(`python experiments.py --study=plot --plot_dir=OUT` -> OUT/curves.png, from train.py's records).
matplotlib is imported only when a plot is drawn.
"""
import json
import os
import statistics

from records import read_jsonl

PANELS = [("curve", "held-out accuracy (greedy)", False),
          ("sample_accuracy", "accuracy of the sampled responses (10-step mean)", True),
          ("oracle_rank", "mean Oracle rank of the samples (10-step mean; identical responses tie at\n"
                          "rank 0, so a policy that collapses onto one answer scores 0)", True)]
RUN_PANELS = ["loss", "mean_abs_advantage", "sample_accuracy", "ndcg_agreement", "kl", "entropy", "clip_fraction",
              "response_length", "truncated_fraction", "lr"]


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def smooth(values, width=10):
    """Trailing moving average: per-step training metrics are noisy."""
    return [statistics.mean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]


def plot_study(rows, study, path):
    """Each method's runs at the default beta, one column per Oracle: mean over seeds, min-max band."""
    plt = pyplot()
    fig, axes = plt.subplots(len(PANELS), len(study.oracles), figsize=(6.5 * len(study.oracles), 4 * len(PANELS)),
                             squeeze=False)
    for column, oracle in enumerate(study.oracles):
        for method in study.methods:
            runs = [r for r in rows if r["oracle"] == oracle and r["method"] == method and r["variant"] == "default"]
            if not runs:
                continue
            for row_index, (key, _, smoothed) in enumerate(PANELS):
                steps = [s for s, _ in runs[0][key]]
                series = [[v for _, v in r[key]] for r in runs if len(r[key]) == len(steps)]
                if smoothed:
                    series = [smooth(values) for values in series]
                ax = axes[row_index][column]
                ax.plot(steps, [statistics.mean(v) for v in zip(*series)], label=f"{method} ({len(series)} seeds)")
                ax.fill_between(steps, [min(v) for v in zip(*series)], [max(v) for v in zip(*series)], alpha=0.2)
        for row_index, (_, title, _) in enumerate(PANELS):
            ax = axes[row_index][column]
            ax.set_title(f"{oracle} Oracle: {title}", fontsize=9)
            ax.set_xlabel("RL step")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plot_run(path):
    """One run's curves: every RUN_PANELS metric of metrics.jsonl by step (and its 10-step mean), and the
    held-out accuracy of evals.jsonl / results.json. -> the PNG's path."""
    plt = pyplot()
    rows = read_jsonl(os.path.join(path, "metrics.jsonl"))
    if not rows:
        raise SystemExit(f"{path}: no metrics.jsonl lines to plot")
    fig, axes = plt.subplots(3, 4, figsize=(16, 9))
    steps = [row["step"] for row in rows]
    for ax, key in zip(axes.flat, RUN_PANELS):
        values = [row.get(key, float("nan")) for row in rows]
        ax.plot(steps, values, alpha=0.3)
        ax.plot(steps, smooth(values), label="10-step mean")
        ax.set_title(key, fontsize=9)
    evals = [(e["step"], e["accuracy"]) for e in read_jsonl(os.path.join(path, "evals.jsonl"))]
    if os.path.exists(os.path.join(path, "results.json")):
        with open(os.path.join(path, "results.json")) as f:
            result = json.load(f)
        evals = [(0, result["before"].get("accuracy"))] + evals + [(steps[-1], result["after"].get("accuracy"))]
    ax = axes.flat[len(RUN_PANELS)]
    ax.plot([s for s, _ in evals], [a for _, a in evals], marker="o")
    ax.set_title("held-out accuracy", fontsize=9)
    axes.flat[-1].axis("off")
    for ax in axes.flat:
        ax.set_xlabel("RL step", fontsize=8)
    fig.tight_layout()
    png = os.path.join(path, "curves.png")
    fig.savefig(png, dpi=80)
    print(f"wrote {png}")
    return png
