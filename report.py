"""
The study's record: tables, curves and RESULTS.md from the runs experiments.py collected.

`python experiments.py --report=True` calls `write_report`: it prints every table, draws
results/curves.png and renders RESULTS.md from results/RESULTS.template.md, whose {{name}}
placeholders are the tables below, so the document cannot drift from results/ (a test renders it
from the committed runs and compares byte for byte). Edit the template, never RESULTS.md.

A row (experiments.collect) is one finished run: method, variant ("default", "beta=0", "floor=0.25",
"steps=1600", ...), oracle, seed, held-out accuracy before / after, by category, the held-out curve,
the last 100 steps' means of LATE_KEYS and the truncated fraction of the last 50 steps.
"""
import os
import re
import statistics
from dataclasses import dataclass

from plots import plot_study

LATE_KEYS = ("sample_accuracy", "entropy", "mean_abs_advantage", "kl")   # metrics.jsonl, averaged over the last 100 steps
TEMPLATE = os.path.join("results", "RESULTS.template.md")


@dataclass
class Study:
    """What the tables need to know of the plan (experiments.py's settings)."""
    methods: tuple
    oracles: tuple
    betas: list               # as spelled in the run names; the first is train.py's
    seeds: list               # the main grid's; the first is the learning-rate sweep's and the variants'
    floors: list              # lambda_floor's other floors, as spelled in the run names
    default_floor: float      # train.py's (grpo_rank.FLOOR)
    learning_rates: list      # the sweep's, beside train.py's 1e-3
    variants: bool            # the paper's open variants were run
    probes: list              # (variant, method) of each probe
    long_variant: str         # the longer horizon's probes ("steps=1600")
    max_steps: int


def variant_name(beta, default_beta, prefix=""):
    """A row's variant: "default" (train.py's beta), "beta=0", "floor=0.25", "floor=0.25/beta=0"."""
    return "/".join(p for p in (prefix, "" if beta == default_beta else f"beta={beta}") if p) or "default"


def runs_of(rows, method, oracle, variant):
    """The finished runs of one cell: a method under an Oracle in one variant ("default", "beta=0", ...)."""
    return [r for r in rows if (r["method"], r["oracle"], r["variant"]) == (method, oracle, variant)]


def collapsed(row):
    """A run whose responses ran to max_new_tokens at the end (the length collapse)."""
    return row["truncated_last50"] > 0.5


def mean_std(values):
    values = [100 * v for v in values]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


# ----------------------------------------------------------------------------- tables

def headline_table(rows, study):
    """The README's one table: held-out % (mean ± std, seeds) of each advantage under both Oracles, with the KL
    term at the main grid's horizon and at the longer one, and without it."""
    default_beta, zero = study.betas[0], variant_name("0", study.betas[0])
    columns = [(f"{oracle}, {study.max_steps} steps", oracle, "default") for oracle in study.oracles]
    columns += [(f"{oracle}, {study.long_variant.split('=')[1]} steps", oracle, study.long_variant)
                for oracle in study.oracles]
    columns += [(f"{oracle}, beta 0", oracle, zero) for oracle in study.oracles]
    lines = ["| advantage | " + " | ".join(name for name, _, _ in columns) + " |", "| --- |" + " --- |" * len(columns)]
    for method in study.methods:
        cells = []
        for _, oracle, variant in columns:
            picked = runs_of(rows, method, oracle, variant)
            broken = sum(collapsed(r) for r in picked)
            cells.append(f"{mean_std([r['after'] for r in picked])} ({len(picked)})" if picked else "-")
            cells[-1] += f", collapsed {broken}/{len(picked)}" if broken else ""
        lines.append(f"| {method}{' (default)' if method == 'lambda_floor' else ''} | " + " | ".join(cells) + " |")
    start = f"{100 * rows[0]['before']:.1f} %" if rows else "-"
    return "\n".join(lines) + f"\n\nfrom the same SFT warm start ({start}); beta {default_beta} unless stated; (n): RL seeds"


def summary_table(rows, study, by_floor=False, prefix=""):
    """Mean ± std of held-out accuracy after RL (gain over the warm start), per method (or lambda_floor's
    floor), Oracle and beta; prefix: the variant of every row ("steps=1600": the longer horizon's probes), a
    method with no such runs left out."""
    columns = [(oracle, beta) for oracle in study.oracles for beta in study.betas]
    specs = [(method, method, prefix) for method in study.methods]
    if by_floor:   # the floors as spelled in the run names, train.py's as "default"
        other = [(float(f), f"floor {f}", f"floor={f}") for f in study.floors]
        specs = [(label, "lambda_floor", floor_prefix) for _, label, floor_prefix
                 in sorted([(study.default_floor, f"floor {study.default_floor:g}", ""), *other])]
    header = " | ".join(f"{o}, beta {b}" for o, b in columns)
    lines = ["| " + ("lambda_floor" if by_floor else "method") + " | " + header + " |",
             "| --- |" + " --- |" * len(columns)]
    for label, method, spec_prefix in specs:
        cells = []
        for oracle, beta in columns:
            picked = runs_of(rows, method, oracle, variant_name(beta, study.betas[0], spec_prefix))
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


def category_table(rows, study, oracle):
    """Shaped like the paper's Table 2: rows = categories + overall, columns = SFT and methods."""
    main = [r for r in rows if r["oracle"] == oracle and r["variant"] == "default"]
    if not main:
        return ""
    categories = sorted(main[0]["by_category"]["before"])
    columns = ["SFT"] + [m for m in study.methods if any(r["method"] == m for r in main)]
    lines = ["| category | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for category in categories + ["Overall"]:
        cells = []
        for column in columns:
            picked = main[:1] if column == "SFT" else [r for r in main if r["method"] == column]   # one warm start
            key = "before" if column == "SFT" else "after"
            cells.append(mean_std([r[key] if category == "Overall" else r["by_category"][key][category]
                                   for r in picked]))
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def late_table(rows, study):
    """What the policy does at the end of training, per method and Oracle at the default beta: held-out accuracy
    beside the last 100 steps' means of the training metrics (sampled accuracy on training prompts at
    temperature 1, per-token entropy, mean |advantage|, KL to the reference), each averaged over seeds."""
    lines = ["| method | Oracle | seeds | held-out % | sampled % (last 100 steps) | entropy | mean abs advantage | KL |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in study.methods:
        for oracle in study.oracles:
            picked = [r for r in runs_of(rows, method, oracle, "default") if r.get("last100")]
            if not picked:
                continue
            late = {key: statistics.mean(r["last100"][key] for r in picked) for key in LATE_KEYS}
            lines.append(f"| {method} | {oracle} | {len(picked)} | {100 * statistics.mean(r['after'] for r in picked):.1f} "
                         f"| {100 * late['sample_accuracy']:.1f} | {late['entropy']:.2f} | {late['mean_abs_advantage']:.3f} "
                         f"| {late['kl']:.4f} |")
    return "\n".join(lines)


def probe_table(rows, study):
    """The probes' runs, mean ± std over their seeds, beside the same method's runs at the same seeds and Oracle
    in the main grid (at the default beta, or at beta 0 for a probe without the KL term)."""
    lines = ["| probe | method | Oracle | seeds | held-out % | entropy (last 100 steps) | collapsed "
             "| the same seeds without the probe: held-out %, entropy |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    entropy = lambda runs: f"{statistics.mean(r['last100']['entropy'] for r in runs):.2f}"
    for variant, method in study.probes:
        base_variant = "beta=0" if "beta=0" in variant.split("/") else "default"
        for oracle in study.oracles:
            picked = runs_of(rows, method, oracle, variant)
            if not picked:
                continue
            seeds_run = {r["seed"] for r in picked}
            base = [r for r in runs_of(rows, method, oracle, base_variant) if r["seed"] in seeds_run]
            base_cell = f"{mean_std([r['after'] for r in base])}, {entropy(base)}" if base else "-"
            lines.append(f"| {variant} | {method} | {oracle} | {len(picked)} | {mean_std([r['after'] for r in picked])} "
                         f"| {entropy(picked)} | {sum(collapsed(r) for r in picked)}/{len(picked)} | {base_cell} |")
    return "\n".join(lines)


def flattening_table(rows, study):
    """Have the curves flattened? Mean held-out % over seeds at half, three quarters and the end of each
    horizon (default beta), for the methods run at both."""
    lines = ["| method | Oracle | horizon | seeds | at 1/2 | at 3/4 | at the end | last quarter |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in study.methods:
        for oracle in study.oracles:
            if not runs_of(rows, method, oracle, study.long_variant):
                continue
            for variant in ("default", study.long_variant):
                picked = runs_of(rows, method, oracle, variant)
                if not picked:
                    continue
                steps = picked[0]["steps"]
                at = [statistics.mean(100 * dict(r["curve"])[step] for r in picked)
                      for step in (steps // 2, steps * 3 // 4, steps)]
                lines.append(f"| {method} | {oracle} | {steps} | {len(picked)} | {at[0]:.1f} | {at[1]:.1f} | {at[2]:.1f} "
                             f"| {at[2] - at[1]:+.1f} |")
    return "\n".join(lines)


def lr_table(rows, study):
    """Held-out accuracy after RL by learning rate (reference Oracle, first seed; 1e-3 is train.py's)."""
    seed = int(study.seeds[0])
    rates = sorted({"1e-3", *study.learning_rates}, key=float)
    lines = ["| method | " + " | ".join(f"lr {rate}" for rate in rates) + " |", "| --- |" + " --- |" * len(rates)]
    for method in study.methods[1:]:
        cells = []
        for rate in rates:
            variant = "default" if rate == "1e-3" else f"lr={rate}"
            picked = [r for r in runs_of(rows, method, "reference", variant) if r["seed"] == seed]
            cells.append(f"{100 * picked[0]['after']:.1f}" if picked else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variant_table(rows, study):
    """The paper's advantage under its open choices (reference Oracle, first seed)."""
    seed = int(study.seeds[0])
    picked = [r for r in rows if r["method"] == "paper" and r["oracle"] == "reference" and r["seed"] == seed]
    lines = ["| dcg_kind / bound / ratio_policy | before | after |", "| --- | --- | --- |"]
    for r in sorted(picked, key=lambda r: r["variant"]):
        name = "eq10/symmetric/rollout" if r["variant"] == "default" else r["variant"]
        lines.append(f"| {name} | {100 * r['before']:.1f} | {100 * r['after']:.1f} |")
    return "\n".join(lines)


def tables(rows, study):
    """{placeholder name: (the caption printed above it, the table)}, in the order --report prints them."""
    beta = study.betas[0]
    found = {"headline": ("the README's table: held-out exact match (%) after RL, mean ± std over seeds",
                          headline_table(rows, study)),
             "summary": (f"held-out exact match (%) after {study.max_steps} RL steps, mean ± std over seeds "
                         "(gain over the warm start)", summary_table(rows, study))}
    for oracle in study.oracles:
        found[f"by_category_{oracle}"] = (f"by category, {oracle} Oracle, beta {beta}, mean ± std over seeds",
                                          category_table(rows, study, oracle))
    found["late"] = (f"the end of training, beta {beta}: held-out accuracy and the last 100 steps' means, over seeds",
                     late_table(rows, study))
    if study.floors:
        found["floors"] = (f"lambda_floor by floor (train.py's: {study.default_floor:g}), mean ± std over seeds "
                           "(gain over the warm start)", summary_table(rows, study, by_floor=True))
    if study.learning_rates:
        found["learning_rates"] = (f"by learning rate (reference Oracle, beta {beta}, seed {study.seeds[0]})",
                                   lr_table(rows, study))
    if study.variants:
        found["variants"] = ("the paper's advantage under its open variants (reference Oracle, one seed)",
                             variant_table(rows, study))
    if study.probes:
        found["probes"] = ("probes, mean ± std over their seeds, beside the same seeds without the probe",
                           probe_table(rows, study))
        found["summary_long"] = (f"held-out exact match (%) after {study.long_variant.split('=')[1]} RL steps (the "
                                 f"{study.long_variant} probes), mean ± std over seeds",
                                 summary_table(rows, study, prefix=study.long_variant))
        found["flattening"] = ("have the curves flattened? held-out % at 1/2, 3/4 and the end of each horizon, "
                               "mean over seeds", flattening_table(rows, study))
    return found


def render(template, tables_by_name, source=TEMPLATE):
    """The template with each {{name}} replaced by that table; an unknown name is an error naming it."""
    def table(match):
        if match.group(1) not in tables_by_name:
            raise SystemExit(f"{source}: no table named {{{{{match.group(1)}}}}}; known: {sorted(tables_by_name)}")
        return tables_by_name[match.group(1)][1]
    return re.sub(r"\{\{(\w+)\}\}", table, template)


def write_report(rows, study, out_dir, results_md="RESULTS.md", template=TEMPLATE):
    """Print every table, draw out_dir/curves.png, render results_md from the template (when it exists)."""
    found = tables(rows, study)
    for caption, table in found.values():
        print(f"\n{caption}\n\n{table}")
    if rows:
        plot_study(rows, study, os.path.join(out_dir, "curves.png"))
    if template and os.path.exists(template):
        with open(template, encoding="utf-8") as f:
            text = render(f.read(), found, template)
        with open(results_md + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(results_md + ".tmp", results_md)
        print(f"\nwrote {results_md} from {template}")
    return found
