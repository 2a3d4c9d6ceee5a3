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

from bandits import bandit_table
from configurator import configure
from grpo_rank import FLOOR
from plots import plot_run
from records import archive_metrics, read_jsonl
from report import LATE_KEYS, Study, variant_name, write_report

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
max_steps = 800            # the main grid's horizon; the 1600-step probes show where the curves flatten
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
report = False             # only collect, plot, print and write RESULTS.md
results_md = "RESULTS.md"  # the full record, rendered from results/RESULTS.template.md (report.py)
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
                                 {"method": method, "variant": variant_name(beta, default_beta), "oracle": oracle, "seed": int(seed)}))
                for floor in floors.split(",") if floors and seed in seed_list else []:
                    runs.append((f"lambda_floor-floor{floor}-{oracle}{tag}-s{seed}",
                                 ["--advantage=lambda_floor", f"--floor={floor}", f"--oracle={oracle}",
                                  f"--beta={beta}", f"--seed={seed}"],
                                 {"method": "lambda_floor", "variant": variant_name(beta, default_beta, f"floor={floor}"),
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
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):      # a finished run's record, archived
            archive_metrics(os.path.join(run_dir, "metrics.jsonl"))
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


def settings():
    """What the report needs of this plan."""
    return Study(methods=METHODS, oracles=ORACLES, betas=betas.split(","), seeds=seeds.split(","),
                 floors=floors.split(",") if floors else [], default_floor=FLOOR,
                 learning_rates=learning_rates.split(",") if learning_rates else [], variants=variants,
                 probes=[(variant, method) for _, variant, method, _, _ in PROBES] if probes else [],
                 long_variant=LONG, max_steps=max_steps)


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
    write_report(rows, settings(), out_dir, results_md=results_md)
    print(f"\n{len(rows)} of {len(runs)} runs finished; wrote {out_dir}/ablation.json and {out_dir}/curves.png")
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed, each with its train.log: {', '.join(failed)}")


if __name__ == "__main__":
    main(sys.argv[1:])
