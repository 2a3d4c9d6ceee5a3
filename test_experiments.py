"""Tests for experiments.py (the study's plan and collection), report.py (its tables and RESULTS.md), plots.py
and the archived run records (records.archive_metrics)."""
import gzip
import importlib
import json
import os

import pytest

import experiments
import report
from records import archive_metrics, read_jsonl

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- the committed record

@pytest.fixture(scope="module")
def committed():
    """The rows of the committed study (results/runs), collected as --report does, and its settings."""
    module = importlib.reload(experiments)
    module.out_dir = os.path.join(HERE, "results")
    runs = module.plan()
    assert not [name for name, _, _ in runs
                if os.path.exists(os.path.join(HERE, "results", "runs", name, "metrics.jsonl"))], "unarchived runs"
    rows = module.collect(runs)
    yield rows, module.settings(), runs
    importlib.reload(experiments)


def test_results_md_is_the_template_rendered_from_the_committed_runs(committed):
    rows, settings, runs = committed
    assert len(rows) == len(runs) == 217
    with open(os.path.join(HERE, report.TEMPLATE), encoding="utf-8") as f:
        rendered = report.render(f.read(), report.tables(rows, settings))
    with open(os.path.join(HERE, "RESULTS.md"), encoding="utf-8") as f:
        assert f.read() == rendered, "RESULTS.md drifted: run python experiments.py --report=True"


def test_ablation_json_holds_every_run_as_collected(committed):
    rows, _, _ = committed
    with open(os.path.join(HERE, "results", "ablation.json")) as f:
        saved = json.load(f)
    assert [r["name"] for r in saved] == [r["name"] for r in rows]
    for kept, row in zip(saved, rows):
        assert kept["after"] == row["after"] and kept["last100"] == row["last100"]
        assert kept["truncated_last50"] == row["truncated_last50"]


def test_the_readme_table_is_the_reports(committed):
    rows, settings, _ = committed
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert report.headline_table(rows, settings) in readme
    assert len(readme.encode("utf-8")) <= 20_000                      # a newcomer reads it in ten minutes


def test_render_names_an_unknown_placeholder():
    assert report.render("a {{x}} b", {"x": ("caption", "| t |")}) == "a | t | b"
    with pytest.raises(SystemExit, match=r"no table named \{\{y\}\}; known: \['x'\]"):
        report.render("{{y}}", {"x": ("caption", "t")})


# ----------------------------------------------------------------------------- archived metrics

def test_archive_metrics_keeps_every_line_exact_fractions_and_six_digits(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    rows = [{"step": 1, "sample_accuracy": 63 / 128, "entropy": 0.09640729427337646, "loss": -4.100904334336519e-05,
             "oracle_failures": 0, "kl": float("nan")},
            {"step": 2, "sample_accuracy": 1.0, "entropy": 1.3632656855398722, "loss": 12345.678901234,
             "oracle_failures": 3, "kl": 0.0}]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    archived = archive_metrics(path)
    assert archived == path + ".gz" and not os.path.exists(path)
    back = read_jsonl(path)                                             # reads PATH.gz when PATH is gone
    assert [list(r) for r in back] == [list(r) for r in rows]           # the same keys, in order
    assert back[0]["sample_accuracy"] == 63 / 128 and back[1]["oracle_failures"] == 3   # exact
    assert back[0]["entropy"] == 0.0964073 and back[1]["loss"] == 12345.7             # 6 significant digits
    assert back[0]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5) and back[0]["kl"] != back[0]["kl"]   # NaN
    first = open(archived, "rb").read()
    with gzip.open(archived, "rt") as f, open(path, "w") as plain:
        plain.write(f.read())
    os.remove(archived)
    assert open(archive_metrics(path), "rb").read() == first           # the same metrics, the same bytes


# ----------------------------------------------------------------------------- the plan and the tables

def test_experiment_plan_gives_five_seeds_to_the_default_and_to_cells_that_spread(tmp_path):
    """3 seeds per cell; default_seeds for lambda_floor, for its rival (lambda) at the default beta, and for a
    cell whose finished seeds spread more than wide_spread points (std): the issue's '5 seeds where the spread
    is large'; bar_seeds for the default and its rival at the default beta only."""
    module = importlib.reload(experiments)
    module.out_dir = str(tmp_path)

    def finish(name, accuracy):
        os.makedirs(tmp_path / "runs" / name)
        with open(tmp_path / "runs" / name / "results.json", "w") as f:
            json.dump({"after": {"accuracy": accuracy}}, f)

    def seeds_of(cell):
        return sorted(int(name.rsplit("-s", 1)[1]) for name, _, _ in module.plan() if name.rsplit("-s", 1)[0] == cell)

    assert seeds_of("lambda_floor-graded")[:5] == [0, 1, 2, 3, 4] and seeds_of("rank_reward-graded") == [0, 1, 2]
    assert seeds_of("lambda_clamp-reference-beta0") == [0, 1, 2]
    assert seeds_of("lambda-graded-beta0") == [0, 1, 2]                        # the rival, at the default beta only
    module.bar_seeds = ""
    assert seeds_of("lambda-graded") == [0, 1, 2, 3, 4] and seeds_of("lambda_floor-graded-beta0") == [0, 1, 2, 3, 4]
    module.bar_seeds = "5,6"       # the bar's comparison: the default and its rival at the default beta, both Oracles
    assert seeds_of("lambda-reference") == seeds_of("lambda_floor-graded") == [0, 1, 2, 3, 4, 5, 6]
    assert seeds_of("lambda_floor-graded-beta0") == [0, 1, 2, 3, 4] and seeds_of("pairwise_gain-graded") == [0, 1, 2]
    module.bar_seeds = ""
    finish("rank_reward-graded-s0", 0.60)
    finish("rank_reward-graded-s1", 0.64)          # std 2.8 points: narrow
    assert seeds_of("rank_reward-graded") == [0, 1, 2]
    finish("rank_reward-graded-s2", 0.78)          # std 9.5 points: wide
    assert seeds_of("rank_reward-graded") == [0, 1, 2, 3, 4] and seeds_of("rank_reward-reference") == [0, 1, 2]
    assert seeds_of("rank_reward-graded-beta0") == [0, 1, 2]   # the cell, not the method
    extra = [info for name, _, info in module.plan() if name == "rank_reward-graded-s4"]
    assert extra == [{"method": "rank_reward", "variant": "default", "oracle": "graded", "seed": 4}]
    importlib.reload(experiments)


def test_late_table_averages_each_runs_last_100_steps_then_the_seeds(tmp_path):
    """collect() keeps the mean of the last 100 metrics.jsonl lines per run; late_table() averages them over the
    seeds of a method and Oracle at the default beta, beside the held-out accuracy."""
    module = importlib.reload(experiments)
    module.out_dir = str(tmp_path)
    for seed, (after, shift) in enumerate([(0.9, 0.0), (0.8, 1.0)]):
        run_dir = tmp_path / "runs" / f"lambda-graded-s{seed}"
        os.makedirs(run_dir)
        scores = {"accuracy": after, "by_category": {"count": {"accuracy": after}}}
        with open(run_dir / "results.json", "w") as f:
            json.dump({"before": {**scores, "accuracy": 0.3}, "after": scores, "config": {"max_steps": 150},
                       "seconds": {"rl": 1.0}}, f)
        with open(run_dir / "metrics.jsonl", "w") as f:
            for step in range(1, 151):   # entropy = step + shift: the last 100 steps (51-150) average 100.5 + shift
                f.write(json.dumps({"step": step, "mean_oracle_rank": 1.0, "sample_accuracy": 0.5, "truncated_fraction": 0.0,
                                    "entropy": step + shift, "mean_abs_advantage": 0.04, "kl": 0.006}) + "\n")
    info = {"method": "lambda", "variant": "default", "oracle": "graded"}
    rows = module.collect([(f"lambda-graded-s{seed}", [], {**info, "seed": seed}) for seed in (0, 1)])
    assert [r["last100"]["entropy"] for r in rows] == [100.5, 101.5]
    rows.append({**rows[0], "variant": "beta=0", "after": 0.0})      # another beta: not in the table
    lines = report.late_table(rows, module.settings()).splitlines()
    assert lines[2:] == ["| lambda | graded | 2 | 85.0 | 50.0 | 101.00 | 0.040 | 0.0060 |"]
    importlib.reload(experiments)


def test_probes_run_at_their_own_seeds_seed_by_seed_and_sit_beside_their_grid_runs():
    module = importlib.reload(experiments)
    probe_runs = {name: (args, info) for name, args, info in module.plan() if "-ent0.004" in name or "-steps1600" in name}
    expected = [f"{method}-{oracle}-ent0.004{tag}-s0" for tag, method in [("", "lambda_floor"), ("-beta0", "lambda_floor")]
                for oracle in ("reference", "graded")]
    expected += [f"{method}-{oracle}-steps1600-s{seed}" for seed in range(10) for method in ("lambda", "lambda_floor")
                 for oracle in ("reference", "graded")]
    expected += [f"{method}-{oracle}-steps1600-s{seed}" for seed in range(3)
                 for method in ("lambda_clamp", "rank_reward", "pairwise_gain") for oracle in ("reference", "graded")]
    expected += [f"lambda_floor-{oracle}-steps1600-beta0-s0" for oracle in ("reference", "graded")]
    assert sorted(probe_runs) == sorted(expected)
    args, info = probe_runs["lambda_floor-graded-ent0.004-beta0-s0"]
    assert args == ["--advantage=lambda_floor", "--oracle=graded", "--entropy_coef=0.004", "--beta=0", "--seed=0"]
    assert info == {"method": "lambda_floor", "variant": "entropy_coef=0.004/beta=0", "oracle": "graded", "seed": 0}
    assert probe_runs["lambda-graded-steps1600-s3"][0][2:4] == ["--max_steps=1600", "--epochs=13"]
    args, info = probe_runs["lambda_floor-reference-steps1600-beta0-s0"]
    assert args[2:] == ["--max_steps=1600", "--epochs=13", "--beta=0", "--seed=0"]
    assert info["variant"] == "steps=1600/beta=0"
    names = [name for name, _, _ in module.plan()]   # every probe's first seed before any probe's second
    assert names.index("pairwise_gain-graded-steps1600-s0") < names.index("lambda-reference-steps1600-s1")
    module.probes = False
    assert not [name for name, _, _ in module.plan() if "-ent0.004" in name or "-steps1600" in name or "beta0.01" in name]
    module.probes = True

    def row(variant, seed, after, entropy, truncated=0.0):
        return {"method": "lambda_floor", "oracle": "graded", "seed": seed, "variant": variant, "after": after,
                "last100": {"entropy": entropy}, "truncated_last50": truncated}
    rows = [row("entropy_coef=0.004/beta=0", 0, 0.0, 4.27, truncated=0.9), row("beta=0", 0, 0.89, 1.04),
            row("beta=0", 1, 0.5, 9.0), row("default", 0, 0.877, 1.0),           # seed 1 has no probe run: left out
            row("steps=1600", 0, 0.94, 1.0), row("steps=1600", 1, 0.90, 1.2), row("default", 1, 0.913, 1.1)]
    lines = report.probe_table(rows, module.settings()).splitlines()
    assert lines[2:] == ["| steps=1600 | lambda_floor | graded | 2 | 92.0 ± 2.8 | 1.10 | 0/2 | 89.5 ± 2.5, 1.05 |",
                         "| entropy_coef=0.004/beta=0 | lambda_floor | graded | 1 | 0.0 ± 0.0 | 4.27 | 1/1 | 89.0 ± 0.0, 1.04 |"]
    for r in rows:   # the longer horizon's own summary (methods without its runs left out) and the curves' rise
        steps = 1600 if r["variant"].startswith("steps=") else 800
        r.update(before=0.35, steps=steps, curve=[(0, 0.35), (steps // 2, 0.6), (steps * 3 // 4, r["after"] - 0.02),
                                                  (steps, r["after"])])
    lines = report.summary_table(rows, module.settings(), prefix="steps=1600").splitlines()
    assert lines[2:] == ["| lambda_floor | - | - | 92.0 ± 2.8 (+57.0; 2 seeds) | - |"]
    lines = report.flattening_table(rows, module.settings()).splitlines()
    assert lines[2:] == ["| lambda_floor | graded | 800 | 2 | 60.0 | 87.5 | 89.5 | +2.0 |",
                         "| lambda_floor | graded | 1600 | 2 | 60.0 | 90.0 | 92.0 | +2.0 |"]
    importlib.reload(experiments)
