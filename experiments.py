"""
Does GRPO_rank learn? Two studies.

$ python experiments.py --study=bandit   # the bandits of bandits.py (seconds): what each advantage does to a policy
$ python experiments.py --study=plot --plot_dir=out   # a run's metrics.jsonl (+ evaluations) -> out/curves.png
$ python experiments.py                  # the video ablation (hours on 2 cores); finished runs are skipped
$ python experiments.py --report=True    # only collect finished runs, plot and print the tables

The video ablation: every advantage from the SAME SFT warm start (the default `python train.py`'s),
same steps, several seeds, two Oracles, with and without the KL term, a learning-rate sweep; writes
results/ablation.json, results/curves.png and README-ready tables. `parallel` runs at a time,
`num_threads` torch threads each (a run's numbers depend on its thread count, not on what runs beside it).

Runs (each is `python train.py ...` in its own process, output in results/runs/<name>/):
  default:  advantage paper | lambda | lambda_floor | lambda_clamp | rank_reward | pairwise_gain  x  oracle reference
            | graded  x  seeds; default_seeds for lambda_floor, for rival at beta 0.04 and for a cell whose seeds
            spread wider than wide_spread (judged on the runs finished when experiments.py starts: rerun it to add
            a wide cell's seeds); bar_seeds too for lambda_floor and rival at beta 0.04
  beta=0:   the same without the KL term (paper excepted: it does not learn with it)
  floor=...: lambda_floor at its other floors (train.py's --floor is grpo_rank.FLOOR), as the default runs
  lr=...:   each method but paper at the other learning rates (reference Oracle, first seed)
  variants: advantage=paper with dcg_kind eq10 | eq11 | table3, bound symmetric | literal,
            ratio_policy rollout | reference (reference Oracle, first seed)
  probes:   PROBES, questions about the default and its rival, and the other advantages at 1600 steps (both
            Oracles, each probe at its own seeds)
"""
import json
import os
import statistics
import subprocess
import sys
import time

from configurator import configure
from bandits import bandit_table
from grpo_rank import FLOOR

# -----------------------------------------------------------------------------
study = "video"            # "video" | "bandit" | "plot"
plot_dir = "out"           # --study=plot: the run directory (train.py's out_dir)
out_dir = "results"
seeds = "0,1,2"
default_seeds = "0,1,2,3,4"   # train.py's advantage (lambda_floor), the one users take: more seeds
rival = "lambda"           # the advantage the default must match (the bar): default_seeds too, at the
                           # default beta (without the KL term it collapses on every seed)
wide_spread = 5.0          # points: a cell whose finished seeds spread wider (std) also gets default_seeds
bar_seeds = "5,6,7,8,9"    # the bar hinges on the default against its rival at the default beta, 2 standard
                           # errors apart at 5 seeds: 5 more each, both Oracles, fixed before any of them ran
max_steps = 800            # where the curves have flattened (200 stopped them rising)
epochs = 7                 # 125 steps per epoch: enough epochs for max_steps
eval_every = 100
learning_rates = "5e-4,2e-3"   # the sweep, beside train.py's 1e-3
floors = "0.25,0.05"       # lambda_floor's other floors, beside grpo_rank.FLOOR (every seed, Oracle and beta)
betas = "0.04,0"           # train.py's, then none
sft_steps = 300
sft_seed = 1337            # the warm start of the default `python train.py` ...
sft_threads = 2            # ... trained with its thread count, so it is the same model
variants = True            # also the paper's open variants
probes = True              # also PROBES (below), each at its own seeds
report = False             # only collect, plot and print
num_threads = 1
parallel = 2               # runs at a time
# -----------------------------------------------------------------------------
METHODS = ("paper", "lambda", "lambda_floor", "lambda_clamp", "rank_reward", "pairwise_gain")
ORACLES = ("reference", "graded")
# (name tag, variant, method, train.py overrides, seeds): what lambda's lead with the KL term is made of, how far
# it holds, and the other advantages at the longer horizon. Each probe's seeds were fixed before its runs: the
# 1600-step pair at seed 0 first, seeds 1-4 after those four runs, and the rest (seeds 5-9 of the pair, the other
# advantages at seeds 0-2, the default without the KL term) after all of seeds 0-4, before any of them ran.
STEPS_1600 = ["--max_steps=1600", "--epochs=13"]   # twice the horizon; the cosine schedule stretches with it
LONG = "steps=1600"                                 # those probes' variant
PROBES = [("beta0.01", "beta=0.01", "lambda", ["--beta=0.01"], "0"),   # a quarter of the KL term: does lambda hold?
          ("steps1600", LONG, "lambda", STEPS_1600, "0,1,2,3,4,5,6,7,8,9"),        # lambda's entropy still
          ("steps1600", LONG, "lambda_floor", STEPS_1600, "0,1,2,3,4,5,6,7,8,9"),  # rises at 800 steps
          ("ent0.004", "entropy_coef=0.004", "lambda_floor", ["--entropy_coef=0.004"], "0"),   # the default with
          ("ent0.004-beta0", "entropy_coef=0.004/beta=0", "lambda_floor",                     # lambda's entropy
           ["--entropy_coef=0.004", "--beta=0"], "0"),
          ("steps1600", LONG, "lambda_clamp", STEPS_1600, "0,1,2"),   # is the default still the best
          ("steps1600-beta0", f"{LONG}/beta=0", "lambda_floor", [*STEPS_1600, "--beta=0"], "0"),   # and safe
          ("steps1600", LONG, "rank_reward", STEPS_1600, "0,1,2"),    # there?
          ("steps1600", LONG, "pairwise_gain", STEPS_1600, "0,1,2")]


def variant_name(beta, prefix=""):
    """A row's variant: "default" (train.py's beta), "beta=0", "floor=0.25", "floor=0.25/beta=0"."""
    return "/".join(p for p in (prefix, "" if beta == betas.split(",")[0] else f"beta={beta}") if p) or "default"


def result_path(name):
    """A run's results.json: written last by train.py, so its presence means the run finished."""
    return os.path.join(out_dir, "runs", name, "results.json")


def wide(cell):
    """Whether the finished runs of a cell ("rank_reward-graded-beta0") spread more than wide_spread points."""
    finished = []
    for seed in seeds.split(","):
        path = result_path(f"{cell}-s{seed}")
        if os.path.exists(path):
            with open(path) as f:
                finished.append(100 * json.load(f)["after"]["accuracy"])
    return len(finished) > 1 and statistics.stdev(finished) > wide_spread


def plan():
    """[(name, train.py overrides, row info)] for every run, the first seed of everything first."""
    runs, seed_list = [], seeds.split(",")
    default_seed_list = seed_list + default_seeds.split(",")
    default_beta, *other_betas = betas.split(",")
    extra = [s for s in default_seeds.split(",") + (bar_seeds.split(",") if bar_seeds else []) if s not in seed_list]
    for index, seed in enumerate(seed_list + list(dict.fromkeys(extra))):
        for beta in [default_beta] + other_betas:
            for oracle in ORACLES:
                for method in METHODS:
                    if method == "paper" and beta != default_beta:
                        continue
                    tag = "" if beta == default_beta else f"-beta{beta}"
                    bar_run = method in ("lambda_floor", rival) and beta == default_beta
                    if seed not in default_seed_list and not bar_run:
                        continue   # bar_seeds: the default and its rival at the default beta only
                    if (seed not in seed_list and method != "lambda_floor" and not bar_run
                            and not wide(f"{method}-{oracle}{tag}")):
                        continue   # default_seeds' extra seeds: the default, its rival, cells with a wide spread
                    runs.append((f"{method}-{oracle}{tag}-s{seed}",
                                 [f"--advantage={method}", f"--oracle={oracle}", f"--beta={beta}", f"--seed={seed}"],
                                 {"method": method, "variant": variant_name(beta), "oracle": oracle, "seed": int(seed)}))
                for floor in floors.split(",") if floors and seed in seed_list else []:
                    runs.append((f"lambda_floor-floor{floor}-{oracle}{tag}-s{seed}",
                                 ["--advantage=lambda_floor", f"--floor={floor}", f"--oracle={oracle}",
                                  f"--beta={beta}", f"--seed={seed}"],
                                 {"method": "lambda_floor", "variant": variant_name(beta, f"floor={floor}"),
                                  "oracle": oracle, "seed": int(seed)}))
        if index == 0 and learning_rates:
            for method in METHODS[1:]:
                for lr in learning_rates.split(","):
                    runs.append((f"{method}-reference-lr{lr}-s{seed}",
                                 [f"--advantage={method}", f"--learning_rate={lr}", f"--seed={seed}"],
                                 {"method": method, "variant": f"lr={lr}", "oracle": "reference", "seed": int(seed)}))
    probe_seeds = {seed for *_, seeds_of in PROBES for seed in seeds_of.split(",")}
    for seed in sorted(probe_seeds, key=int) if probes else []:
        for tag, variant, method, overrides, seeds_of in PROBES:
            if seed not in seeds_of.split(","):
                continue
            for oracle in ORACLES:
                runs.append((f"{method}-{oracle}-{tag}-s{seed}",
                             [f"--advantage={method}", f"--oracle={oracle}", *overrides, f"--seed={seed}"],
                             {"method": method, "variant": variant, "oracle": oracle, "seed": int(seed)}))
    if variants:
        seed = seed_list[0]
        for dcg_kind in ("eq10", "eq11", "table3"):
            for bound in ("symmetric", "literal"):
                for ratio_policy in ("rollout", "reference"):
                    if (dcg_kind, bound, ratio_policy) == ("eq10", "symmetric", "rollout"):
                        continue   # that is the default paper run
                    variant = f"{dcg_kind}/{bound}/{ratio_policy}"
                    runs.append((f"paper-{dcg_kind}-{bound}-{ratio_policy}-s{seed}",
                                 ["--advantage=paper", f"--dcg_kind={dcg_kind}", f"--bound={bound}",
                                  f"--ratio_policy={ratio_policy}", f"--seed={seed}"],
                                 {"method": "paper", "variant": variant, "oracle": "reference", "seed": int(seed)}))
    return runs


def command(script, args, threads):
    return [sys.executable, script, *args, f"--num_threads={threads}"]


def ensure_sft():
    """One warm start for every run, trained exactly as the default main job trains it."""
    sft_dir = os.path.join(out_dir, "sft")
    if not os.path.exists(os.path.join(sft_dir, "config.json")):
        with open(os.path.join(out_dir, "sft.log"), "w") as log:
            subprocess.run(command("sft.py", [f"--out_dir={sft_dir}", f"--seed={sft_seed}", f"--steps={sft_steps}"],
                                   sft_threads), check=True, stdout=log, stderr=subprocess.STDOUT)
    return sft_dir


def run_all(runs, sft):
    """Every unfinished run, `parallel` at a time; a run's output goes to its train.log. A failed run is
    named with its log and the others go on. -> names of the failed runs."""
    waiting = [(name, args) for name, args, _ in runs
               if not os.path.exists(result_path(name))]
    running, failed, done = {}, [], 0
    print(f"{len(runs) - len(waiting)} of {len(runs)} runs already finished; {len(waiting)} to go, {parallel} at a time")
    while waiting or running:
        while waiting and len(running) < parallel:
            name, args = waiting.pop(0)
            run_dir = os.path.join(out_dir, "runs", name)
            os.makedirs(run_dir, exist_ok=True)
            log = open(os.path.join(run_dir, "train.log"), "w")
            argv = command("train.py", [f"--out_dir={run_dir}", f"--sft_checkpoint={sft}", f"--max_steps={max_steps}",
                                        f"--epochs={epochs}", f"--eval_every={eval_every}",
                                        f"--save_every={max_steps}", *args], num_threads)
            running[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log, time.time())
        time.sleep(1)
        for name, (process, log, start) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            done += 1
            if process.returncode != 0:
                failed.append(name)
            status = "ok" if process.returncode == 0 else f"FAILED (exit {process.returncode}; see {log.name})"
            print(f"[{done}/{done + len(running) + len(waiting)}] {name}: {status}, {time.time() - start:.0f} s", flush=True)
    return failed


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


LATE_KEYS = ("sample_accuracy", "entropy", "mean_abs_advantage", "kl")   # metrics.jsonl, averaged over the last 100 steps


def collect(runs):
    rows = []
    for name, _, info in runs:
        run_dir, path = os.path.join(out_dir, "runs", name), result_path(name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            result = json.load(f)
        evals = read_jsonl(os.path.join(run_dir, "evals.jsonl"))
        curve = [(0, result["before"]["accuracy"])] + [(e["step"], e["accuracy"]) for e in evals]
        steps = result["config"]["max_steps"]
        curve.append((steps, result["after"]["accuracy"]))
        metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
        rows.append({**info, "name": name, "before": result["before"]["accuracy"], "after": result["after"]["accuracy"],
                     "by_category": {"before": {k: v["accuracy"] for k, v in result["before"]["by_category"].items()},
                                     "after": {k: v["accuracy"] for k, v in result["after"]["by_category"].items()}},
                     "steps": steps, "seconds": result["seconds"].get("rl", 0.0), "curve": curve,
                     "oracle_rank": [(m["step"], m["mean_oracle_rank"]) for m in metrics],
                     "sample_accuracy": [(m["step"], m["sample_accuracy"]) for m in metrics],
                     "truncated_last50": statistics.mean(m["truncated_fraction"] for m in metrics[-50:])
                                         if metrics else 0.0,
                     "last100": {key: statistics.mean(m[key] for m in metrics[-100:]) for key in LATE_KEYS}
                                if metrics else {}})
    return rows


def runs_of(rows, method, oracle, variant):
    """The finished runs of one cell: a method under an Oracle in one variant ("default", "beta=0", ...)."""
    return [r for r in rows if (r["method"], r["oracle"], r["variant"]) == (method, oracle, variant)]


def late_table(rows):
    """What the policy does at the end of training, per method and Oracle at the default beta: held-out accuracy
    beside the last 100 steps' means of the training metrics (sampled accuracy on training prompts at
    temperature 1, per-token entropy, mean |advantage|, KL to the reference), each averaged over seeds."""
    lines = ["| method | Oracle | seeds | held-out % | sampled % (last 100 steps) | entropy | mean abs advantage | KL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in METHODS:
        for oracle in ORACLES:
            picked = [r for r in runs_of(rows, method, oracle, "default") if r.get("last100")]
            if not picked:
                continue
            late = {key: statistics.mean(r["last100"][key] for r in picked) for key in LATE_KEYS}
            lines.append(f"| {method} | {oracle} | {len(picked)} | {100 * statistics.mean(r['after'] for r in picked):.1f} "
                         f"| {100 * late['sample_accuracy']:.1f} | {late['entropy']:.2f} | {late['mean_abs_advantage']:.3f} "
                         f"| {late['kl']:.4f} |")
    return "\n".join(lines)


def probe_table(rows):
    """The PROBES' runs, mean ± std over their seeds, beside the same method's runs at the same seeds and Oracle
    in the main grid (at the default beta, or at beta 0 for a probe without the KL term)."""
    lines = ["| probe | method | Oracle | seeds | held-out % | entropy (last 100 steps) | collapsed "
             "| the same seeds without the probe: held-out %, entropy |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for _, variant, method, _, _ in PROBES:
        base_variant = "beta=0" if "beta=0" in variant.split("/") else "default"
        for oracle in ORACLES:
            picked = runs_of(rows, method, oracle, variant)
            if not picked:
                continue
            seeds_run = {r["seed"] for r in picked}
            base = [r for r in runs_of(rows, method, oracle, base_variant) if r["seed"] in seeds_run]
            entropy = lambda runs: f"{statistics.mean(r['last100']['entropy'] for r in runs):.2f}"
            base_cell = f"{mean_std([r['after'] for r in base])}, {entropy(base)}" if base else "-"
            lines.append(f"| {variant} | {method} | {oracle} | {len(picked)} | {mean_std([r['after'] for r in picked])} "
                         f"| {entropy(picked)} | {sum(collapsed(r) for r in picked)}/{len(picked)} | {base_cell} |")
    return "\n".join(lines)


def collapsed(row):
    """A run whose responses ran to max_new_tokens at the end (the length collapse)."""
    return row["truncated_last50"] > 0.5


def summary_table(rows, by_floor=False, prefix=""):
    """Mean ± std of held-out accuracy after RL (gain over the warm start), per method (or lambda_floor's
    floor), Oracle and beta; prefix: the variant of every row ("steps=1600": the longer horizon's probes), a
    method with no such runs left out."""
    columns = [(oracle, beta) for oracle in ORACLES for beta in betas.split(",")]
    specs = [(method, method, prefix) for method in METHODS]
    if by_floor:   # the floors as spelled in the run names (floors), train.py's (grpo_rank.FLOOR) as "default"
        other = [(float(f), f"floor {f}", f"floor={f}") for f in floors.split(",")] if floors else []
        specs = [(label, "lambda_floor", floor_prefix)
                 for _, label, floor_prefix in sorted([(FLOOR, f"floor {FLOOR:g}", ""), *other])]
    header = " | ".join(f"{o}, beta {b}" for o, b in columns)
    lines = ["| " + ("lambda_floor" if by_floor else "method") + " | " + header + " |",
             "| --- |" + " --- |" * len(columns)]
    for label, method, spec_prefix in specs:
        cells = []
        for oracle, beta in columns:
            picked = runs_of(rows, method, oracle, variant_name(beta, spec_prefix))
            if not picked:
                cells.append("-")
                continue
            gains = [100 * (r["after"] - r["before"]) for r in picked]
            seeds_run = f"{len(picked)} seed{'s' if len(picked) > 1 else ''}"
            cell = f"{mean_std([r['after'] for r in picked])} ({statistics.mean(gains):+.1f}; {seeds_run})"
            broken = sum(collapsed(r) for r in picked)
            cells.append(cell + (f", collapsed {broken}/{len(picked)}" if broken else ""))
        if any(cell != "-" for cell in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flattening_table(rows, long_variant=LONG):
    """Have the curves flattened? Mean held-out % over seeds at half, three quarters and the end of each
    horizon (default beta), for the methods run at both."""
    lines = ["| method | Oracle | horizon | seeds | at 1/2 | at 3/4 | at the end | last quarter |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in METHODS:
        for oracle in ORACLES:
            if not runs_of(rows, method, oracle, long_variant):
                continue
            for variant in ("default", long_variant):
                picked = runs_of(rows, method, oracle, variant)
                if not picked:
                    continue
                steps = picked[0]["steps"]
                at = [statistics.mean(100 * dict(r["curve"])[step] for r in picked)
                      for step in (steps // 2, steps * 3 // 4, steps)]
                lines.append(f"| {method} | {oracle} | {steps} | {len(picked)} | {at[0]:.1f} | {at[1]:.1f} | {at[2]:.1f} "
                             f"| {at[2] - at[1]:+.1f} |")
    return "\n".join(lines)


def lr_table(rows):
    """Held-out accuracy after RL by learning rate (reference Oracle, first seed; 1e-3 is train.py's)."""
    seed = int(seeds.split(",")[0])
    rates = sorted({"1e-3", *learning_rates.split(",")}, key=float)
    lines = ["| method | " + " | ".join(f"lr {rate}" for rate in rates) + " |", "| --- |" + " --- |" * len(rates)]
    for method in METHODS[1:]:
        cells = []
        for rate in rates:
            variant = "default" if rate == "1e-3" else f"lr={rate}"
            picked = [r for r in rows
                      if (r["method"], r["oracle"], r["variant"], r["seed"]) == (method, "reference", variant, seed)]
            cells.append(f"{100 * picked[0]['after']:.1f}" if picked else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_std(values):
    values = [100 * v for v in values]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def table(rows, oracle):
    """Markdown, shaped like the paper's Table 2: rows = categories + overall, columns = SFT and methods."""
    main = [r for r in rows if r["oracle"] == oracle and r["variant"] == "default"]
    if not main:
        return ""
    categories = sorted(main[0]["by_category"]["before"])
    columns = ["SFT"] + [m for m in METHODS if any(r["method"] == m for r in main)]
    lines = ["| category | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for category in categories + ["Overall"]:
        cells = []
        for column in columns:
            picked = main if column == "SFT" else [r for r in main if r["method"] == column]
            key = "before" if column == "SFT" else "after"
            if column == "SFT":
                picked = picked[:1]    # one warm start for all runs
            values = [r[key] if category == "Overall" else r["by_category"][key][category] for r in picked]
            cells.append(mean_std(values))
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variant_table(rows):
    seed = int(seeds.split(",")[0])
    picked = [r for r in rows if r["method"] == "paper" and r["oracle"] == "reference" and r["seed"] == seed]
    lines = ["| dcg_kind / bound / ratio_policy | before | after |", "| --- | --- | --- |"]
    for r in sorted(picked, key=lambda r: r["variant"]):
        name = "eq10/symmetric/rollout" if r["variant"] == "default" else r["variant"]
        lines.append(f"| {name} | {100 * r['before']:.1f} | {100 * r['after']:.1f} |")
    return "\n".join(lines)


def smooth(values, width=10):
    """Trailing moving average: per-step training metrics are noisy."""
    return [statistics.mean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]


PANELS = [("curve", "held-out accuracy (greedy)", False),
          ("sample_accuracy", "accuracy of the sampled responses (10-step mean)", True),
          ("oracle_rank", "mean Oracle rank of the samples (10-step mean; identical responses tie at\n"
                          "rank 0, so a policy that collapses onto one answer scores 0)", True)]


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(PANELS), len(ORACLES), figsize=(6.5 * len(ORACLES), 4 * len(PANELS)), squeeze=False)
    for column, oracle in enumerate(ORACLES):
        for method in METHODS:
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


RUN_PANELS = ["loss", "mean_abs_advantage", "sample_accuracy", "ndcg_agreement", "kl", "entropy", "clip_fraction",
              "response_length", "truncated_fraction", "lr"]


def plot_run(path):
    """One run's curves: every RUN_PANELS metric of metrics.jsonl by step (and its 10-step mean), and the
    held-out accuracy of evals.jsonl / results.json. -> the PNG's path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


def main(argv):
    configure(argv, globals())
    if study not in ("video", "bandit", "plot"):
        raise SystemExit(f"--study must be video, bandit or plot, got {study!r}")
    if study == "bandit":
        return bandit_table()
    if study == "plot":
        return plot_run(plot_dir)
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    runs, failed = plan(), []
    if not report:
        failed = run_all(runs, ensure_sft())
    rows = collect(runs)
    with open(os.path.join(out_dir, "ablation.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k not in ("curve", "oracle_rank", "sample_accuracy")}
                   | {"curve": r["curve"]}
                   for r in rows], f, indent=1)
    if rows:
        plot(rows, os.path.join(out_dir, "curves.png"))
    print(f"\nheld-out exact match (%) after {max_steps} RL steps, mean ± std over seeds (gain over the warm start)\n")
    print(summary_table(rows))
    for oracle in ORACLES:
        print(f"\nby category, {oracle} Oracle, beta {betas.split(',')[0]}, mean ± std over seeds\n")
        print(table(rows, oracle))
    print(f"\nthe end of training, beta {betas.split(',')[0]}: held-out accuracy and the last 100 steps' means, over seeds\n")
    print(late_table(rows))
    if floors:
        print(f"\nlambda_floor by floor (train.py's: {FLOOR:g}), mean ± std over seeds (gain over the warm start)\n")
        print(summary_table(rows, by_floor=True))
    if learning_rates:
        print(f"\nby learning rate (reference Oracle, beta {betas.split(',')[0]}, seed {seeds.split(',')[0]})\n")
        print(lr_table(rows))
    if variants:
        print("\nthe paper's advantage under its open variants (reference Oracle, one seed)\n")
        print(variant_table(rows))
    if probes:
        print("\nprobes, mean ± std over their seeds, beside the same seeds without the probe\n")
        print(probe_table(rows))
        print("\nheld-out exact match (%) after 1600 RL steps (the steps=1600 probes), mean ± std over seeds\n")
        print(summary_table(rows, prefix=LONG))
        print("\nhave the curves flattened? held-out % at 1/2, 3/4 and the end of each horizon, mean over seeds\n")
        print(flattening_table(rows))
    print(f"\n{len(rows)} of {len(runs)} runs finished; wrote {out_dir}/ablation.json and {out_dir}/curves.png")
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed, each with its train.log: {', '.join(failed)}")


if __name__ == "__main__":
    main(sys.argv[1:])
