"""
Evaluation of a policy checkpoint: the paper's two protocols (Sec. 5) plus exact match.

    open   open-ended QA (MSVD-QA, MSRVTT-QA, ActivityNet-QA; Table 1), judged as Video-ChatGPT does:
           answers sampled at temperature 0.2, its judge messages word for word (judge.py), "yes" in
           the verdict is yes, else "no" in it is no; accuracy = yes / (yes + no), score = the mean.
           Video-ChatGPT's script retries a malformed reply forever and leaves a verdict that is neither
           yes nor no out of the accuracy silently; here a reply still malformed after the retries is
           counted invalid, neither verdicts are counted (unclear), and 4.8 stays 4.8 (no int()).
    mc     multiple choice (Video-MME; Table 2), scored as lmms-eval 0.7.3: on Video-MME rows its default
           prompt, greedy, 16 new tokens; accuracy = correct / all questions (no letter: wrong, counted
           as unanswered); by task type (category), duration, domain, sub-category. The letter is read
           by answers.extract_choice; --extract=lmms reads it exactly as lmms-eval does.
    exact  normalised exact match against the reference (the synthetic task), per category.

    python eval.py --checkpoint=out/sft --data=data/synth/eval.jsonl            # exact (no options)
    python eval.py --checkpoint=DIR --data=videomme.jsonl --extract=lmms        # mc, leaderboard reading
    python eval.py --checkpoint=DIR --data=msvd.jsonl --task=open --judge_model=NAME --judge_base_url=URL
    python eval.py --compare=sft/eval/videomme_mc_results.json,rl/eval/videomme_mc_results.json  # B - A

Each prediction goes to a JSONL file as soon as its batch is done: an interrupted run continues with
--resume. A video that cannot be read is skipped with a warning, counted as skipped_videos, outside
the accuracy (lmms-eval stops instead). Under torch.distributed each rank evaluates a strided shard
with the same number of encode_video / generate calls (an FSDP-sharded model needs all ranks in every
forward); rank 0 alone writes files, and all ranks return the same results.
"""
import functools
import json
import logging
import math
import os
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

from answers import EXTRACTORS, extract_choice, normalize_answer
from configurator import all_finished, configure, rank_and_world, setup_distributed, shutdown_distributed
from checkpoint import MANIFEST, CheckpointError
from data import MC_FORMATS, DatasetError, load_jsonl, read_videos, write_jsonl
from judge import JUDGE_BACKOFF, JUDGE_BASE_URL, JUDGE_MAX_RETRIES, JUDGE_PROMPTS, Judge, JudgeError
from policies import load_policy
from oracle import OracleError, reference_letter, run_many
from tables import DURATIONS, VIDEOMME_CATEGORIES, comparison_names, format_comparison, print_results, table_order

log = logging.getLogger("eval")

TASKS = ("exact", "open", "mc")
DEFAULT_MAX_NEW_TOKENS = {"exact": 8, "mc": 5, "mc_videomme": 16, "open": 64}   # lmms-eval: 16 on Video-MME
DEFAULT_TEMPERATURE = {"exact": 0.0, "mc": 0.0, "open": 0.2}   # 0 = greedy (the anchors' protocols)
JUDGE_WORKERS = 8              # concurrent judge requests per batch (they are independent)
BREAKDOWNS = (("category", VIDEOMME_CATEGORIES), ("duration", DURATIONS), ("domain", []), ("sub_category", []))

# -----------------------------------------------------------------------------
# scoring one prediction

def base_record(sample, task):
    """The fields every predictions line shares; category / duration only when the sample has them."""
    record = {"id": sample["id"], "task": task}
    record.update({k: sample[k] for k, _ in BREAKDOWNS if k in sample})
    return record


def score_records(samples, predictions, errors, task, judge=None, extract="project", judge_prompt="videochatgpt"):
    """Score one batch. samples: list[dict]; predictions: list[dict | None], one per sample
    ({"prediction": str, "truncated": bool}, None for a video that failed); errors: {id: reason} of
    those videos -> list of predictions-file records, in sample order.
    open: the batch's judge requests run concurrently; a judge failure (OracleError after the retries,
    e.g. a reply that stays malformed) makes the record invalid: counted, with the reason kept."""
    records = []
    for sample, pred in zip(samples, predictions):
        record = base_record(sample, task)
        records.append(record)
        if pred is None:
            record.update(skipped=True, error=errors[sample["id"]])
            continue
        record.update(question=sample["question"], answer=sample["answer"], **pred)
        if task == "exact":
            record["correct"] = normalize_answer(pred["prediction"]) == normalize_answer(sample["answer"])
        elif task == "mc":
            letter = extract_choice(pred["prediction"], sample["options"], extract)
            record.update(choice=letter, correct=letter == reference_letter(sample), unanswered=letter is None)
    to_judge = [r for r in records if not r.get("skipped")] if task == "open" else []
    if to_judge:
        jobs = [functools.partial(judge.judge_answer, r["question"], r["answer"], r["prediction"], judge_prompt)
                for r in to_judge]
        for record, verdict in zip(to_judge, run_many(jobs, JUDGE_WORKERS, errors=(JudgeError, OracleError))):
            if isinstance(verdict, (JudgeError, OracleError)):
                log.warning("sample %s: no valid judge verdict, counted invalid: %s", record["id"], verdict)
                record.update(verdict=None, score=None, invalid=True, error=str(verdict))
            else:
                record.update(verdict=verdict["pred"], score=float(verdict["score"]), invalid=False)
    return records


# -----------------------------------------------------------------------------
# metrics

def group_metrics(records, task):
    """Accuracy of a list of (non-skipped) records: {"accuracy", "n"} plus "score", "invalid" (open).
    n counts every evaluated sample; open accuracy and score are over the valid verdicts only."""
    if task == "open":   # accuracy over the yes and no verdicts; the score over every valid verdict
        judged = [r for r in records if not r["invalid"]]
        yes, no = (sum(r["verdict"] == v for r in judged) for v in ("yes", "no"))
        return {"accuracy": yes / (yes + no) if yes + no else 0.0, "n": len(records),
                "score": sum(r["score"] for r in judged) / len(judged) if judged else 0.0,
                "invalid": len(records) - len(judged), "unclear": len(judged) - yes - no}
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / len(records) if records else 0.0, "n": len(records)}


def summarize(records, task):
    """Predictions-file records (one per sample) -> the results dict evaluate() returns."""
    evaluated = [r for r in records if not r.get("skipped")]
    results = {"task": task, **group_metrics(evaluated, task)}
    for key, known in BREAKDOWNS:
        names = table_order({r[key] for r in evaluated if key in r}, known)
        if names or key in ("category", "duration"):
            results[f"by_{key}"] = {name: group_metrics([r for r in evaluated if r.get(key) == name], task)
                                    for name in names}
    results["skipped_videos"] = len(records) - len(evaluated)
    if task == "mc":
        results["unanswered"] = sum(r["unanswered"] for r in evaluated)
    return results


# -----------------------------------------------------------------------------
# generation

def generate_batch(policy, samples, max_new_tokens, temperature, generator, always=False, mc_format="oneline"):
    """One encode_video + one generate for a batch. samples: list[dict] ->
    (list of {"prediction", "truncated"} | None per sample (None: the video failed to load), errors:
    {id: reason}). always=True (distributed) runs the forward passes even when no video loaded, on a
    blank clip, so that every rank makes the same calls; its output is thrown away."""
    frames, loaded, failures = read_videos(samples, policy.config.num_frames, policy.fit_frames)
    errors = {}
    for sample, e in failures:
        log.warning("sample %s: skipped, video %s cannot be read: %s", sample["id"], sample["video"], e)
        errors[sample["id"]] = str(e)
    if not loaded and not always:
        return [None] * len(samples), errors
    prompts = loaded or [{"question": "?"}]
    if frames is None:
        frames = torch.zeros(1, policy.config.num_frames, 32, 32, 3, dtype=torch.uint8)
    features = policy.encode_video(frames, seconds=[s.get("seconds") for s in prompts])
    prompt_ids, prompt_mask = policy.encode_prompts(prompts, mc_format)
    ids, mask, truncated = policy.generate(features, prompt_ids, prompt_mask, group_size=1,
                                           max_new_tokens=max_new_tokens, temperature=temperature,
                                           greedy=temperature == 0, generator=generator, all_finished=all_finished)
    texts = policy.decode(ids, mask)
    by_id = {s["id"]: {"prediction": text, "truncated": bool(cut)}
             for s, text, cut in zip(loaded, texts, truncated.tolist())}
    return [by_id.get(s["id"]) for s in samples], errors


# -----------------------------------------------------------------------------
# the predictions file

def read_predictions(path, task):
    """Records of an earlier run, {id: record}; a later line for an id replaces an earlier one.
    Unreadable lines (a run killed mid-write) are dropped with a warning: those samples run again."""
    records, bad = {}, 0
    if not os.path.exists(path):
        return records
    with open(path, "rb") as f:     # bytes: a line cut inside a multibyte character is one more bad line
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
                sid = record["id"]
            except (ValueError, KeyError, TypeError, RecursionError):
                bad += 1
                continue
            if record.get("task") != task:
                raise ValueError(f"{path}: holds {record.get('task')!r} predictions, not {task!r}; "
                                 "use another predictions file or drop --resume")
            records[sid] = record
    if bad:
        log.warning("%s: %d unreadable line(s) dropped; their samples are evaluated again", path, bad)
    return records


def is_complete(record):
    """A record --resume keeps. Skipped videos and invalid judge verdicts are tried again."""
    return not record.get("skipped") and not record.get("invalid")


# -----------------------------------------------------------------------------
# the library entry point (train.py, sft.py)

def evaluate(policy, samples, task="exact", batch_size=32, max_new_tokens=None, temperature=None,
             judge=None, predictions_path=None, resume=False, seed=0, progress=True, mc_prompt="auto",
             extract="project", judge_prompt="videochatgpt"):
    """Evaluate a policy on dataset rows; returns the results dict (the same on every rank).

    policy: VideoLM (or anything with config.num_frames, device, encode_video, encode_prompts,
    generate, decode, eval/train); samples: list of dataset rows (data.load_jsonl); task: "exact",
    "open" (needs judge: anything with judge_answer(question, reference, prediction), e.g. a
    JudgeOracle) or "mc" (rows with options, answer a letter). max_new_tokens / temperature: None =
    DEFAULT_MAX_NEW_TOKENS / DEFAULT_TEMPERATURE of the task (temperature 0 = greedy). mc_prompt:
    data.MC_FORMATS, or "auto": "videomme" on Video-MME rows (they have a "domain"), else "oneline";
    extract: answers.EXTRACTORS; judge_prompt: judge.JUDGE_PROMPTS. predictions_path: JSONL, one record per sample, appended and flushed after each batch;
    resume=True keeps the complete records already there and evaluates the rest.

    Returns {"task", "n" (evaluated samples), "accuracy" (in [0, 1]), "by_category": {name:
    {"accuracy", "n", ...}}, "by_duration": {...} (empty without durations), "skipped_videos",
    "max_new_tokens", "temperature"}, plus "score", "invalid", "unclear" (open) or "unanswered" (mc)."""
    for name, value, choices in (("task", task, TASKS), ("mc_prompt", mc_prompt, ("auto",) + MC_FORMATS),
                                 ("extract", extract, EXTRACTORS), ("judge_prompt", judge_prompt, JUDGE_PROMPTS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if task == "open" and judge is None:
        raise ValueError("task='open' needs a judge (e.g. oracle.JudgeOracle)")
    if task == "mc" and not all(s.get("options") for s in samples):
        raise ValueError("task='mc' needs every sample to have options")
    if len({s["id"] for s in samples}) != len(samples):
        raise ValueError("sample ids must be unique (predictions are matched by id)")
    if mc_prompt == "auto":
        mc_prompt = "videomme" if task == "mc" and any("domain" in s for s in samples) else "oneline"
    default_tokens = DEFAULT_MAX_NEW_TOKENS["mc_videomme" if mc_prompt == "videomme" else task]
    max_new_tokens = default_tokens if max_new_tokens is None else max_new_tokens
    temperature = DEFAULT_TEMPERATURE[task] if temperature is None else temperature
    rank, world = rank_and_world()

    # what an earlier run finished: rank 0 reads the file, every rank gets the same copy (or error)
    done, error = {}, None
    if resume and predictions_path and rank == 0:
        try:
            done = read_predictions(predictions_path, task)
        except ValueError as e:
            error = e
    if world > 1:
        box = [(done, error)]
        dist.broadcast_object_list(box, src=0)
        done, error = box[0]
    if error is not None:
        raise error
    todo = [s for s in samples if not (s["id"] in done and is_complete(done[s["id"]]))]
    shard = todo[rank::world]
    batches = [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]
    num_batches = math.ceil(len(todo[0::world]) / batch_size)   # rank 0's shard is the largest

    out = None
    if predictions_path and rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(predictions_path)), exist_ok=True)
        if resume:   # rewrite first: a half-written last line must not swallow the next record, and the
            # records to be redone (skipped, invalid) go, so the file keeps one record per id
            write_jsonl(predictions_path, [record for record in done.values() if is_complete(record)])
        out = open(predictions_path, "a" if resume else "w", encoding="utf-8")
    was_training = policy.training
    policy.eval()
    generator = torch.Generator(device=policy.device).manual_seed(seed + rank)
    new = []
    try:
        with torch.no_grad():
            for step in tqdm(range(num_batches), desc=f"eval {task}", disable=not progress or rank != 0):
                # a rank short of batches runs a blank one: the same calls on every rank, no records
                batch = batches[step] if step < len(batches) else []
                preds, errors = generate_batch(policy, batch, max_new_tokens, temperature, generator,
                                               always=world > 1, mc_format=mc_prompt)
                records = score_records(batch, preds, errors, task, judge, extract, judge_prompt)
                if world > 1:
                    parts = [None] * world
                    dist.all_gather_object(parts, records)
                    records = [r for part in parts for r in part]
                if out is not None:
                    out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                    out.flush()
                new += records
    finally:
        if out is not None:
            out.close()
        policy.train(was_training)

    merged = {**done, **{r["id"]: r for r in new}}
    extra = len(set(merged) - {s["id"] for s in samples})
    if extra and rank == 0:
        log.warning("%s: %d record(s) for ids not in the data are ignored", predictions_path, extra)
    results = summarize([merged[s["id"]] for s in samples if s["id"] in merged], task)
    results.update(max_new_tokens=max_new_tokens, temperature=temperature, mc_prompt=mc_prompt, extract=extract,
                   judge_prompt=judge_prompt)
    return results


# -----------------------------------------------------------------------------
# command line

def default_predictions_path(checkpoint, data_path, task):
    """<where>/eval/<checkpoint>/<data file stem>_<task>_predictions.jsonl, outside every checkpoint directory:
    a save replaces a checkpoint directory whole, so files written inside one are lost (a resumed run deleted
    out/ckpt/model/eval/). out/sft -> out/eval/sft/; out/ckpt/model (out/ckpt is a checkpoint) -> out/eval/ckpt_model/."""
    outer = os.path.abspath(checkpoint)
    while os.path.isfile(os.path.join(os.path.dirname(outer), MANIFEST)):    # a checkpoint inside a checkpoint
        outer = os.path.dirname(outer)
    where = os.path.dirname(outer) if os.path.isabs(checkpoint) else os.path.relpath(os.path.dirname(outer))
    name = os.path.relpath(os.path.abspath(checkpoint), os.path.dirname(outer)).replace(os.sep, "_")
    stem = os.path.splitext(os.path.basename(data_path))[0]
    return os.path.normpath(os.path.join(where, "eval", name, f"{stem}_{task}_predictions.jsonl"))


def default_results_path(predictions_path):
    """Beside the predictions: x_predictions.jsonl -> x_results.json."""
    base = predictions_path[:-len(".jsonl")] if predictions_path.endswith(".jsonl") else predictions_path
    return (base[:-len("_predictions")] if base.endswith("_predictions") else base) + "_results.json"


# defaults of the command line, overridable as --key=value
checkpoint = ""              # a policy checkpoint (train.py, sft.py, convert.py) or a Qwen2.5-VL transformers dir
data = ""                    # dataset JSONL (data.py format)
task = ""                    # exact | open | mc; default: mc when the data has options, else exact
batch_size = 32
max_new_tokens = 0           # 0: the task's default (DEFAULT_MAX_NEW_TOKENS)
temperature = -1.0           # < 0: the task's default (DEFAULT_TEMPERATURE; 0 = greedy)
seed = 0
limit = 0                    # evaluate only the first N samples (0: all)
predictions = ""             # default: <checkpoint's folder>/eval/<checkpoint>/<data>_<task>_predictions.jsonl
out = ""                     # results JSON; default: beside the predictions
resume = False               # keep the predictions already in the file
dtype = ""                   # override the checkpoint's dtype (e.g. bfloat16)
hub_ids = ""                 # comma-separated hub ids the checkpoint's parts may be downloaded from (else nothing is)
mc_prompt = "auto"           # auto | videomme (lmms-eval's default videomme prompt) | oneline (this project's)
extract = "project"          # project | lmms: read the letter exactly as lmms-eval 0.7.3 does (leaderboard numbers)
judge_prompt = "videochatgpt"   # videochatgpt: its ActivityNet-QA judge messages, word for word | project
judge_temperature = 0.0      # Video-ChatGPT sent none, so its API's default (1.0) applied
device = ""                  # default: cuda when there is one (under torchrun: this process's GPU), else cpu
judge_base_url = JUDGE_BASE_URL
judge_model = ""
judge_api_key_env = "OPENAI_API_KEY"   # the environment variable holding the key
judge_max_retries = JUDGE_MAX_RETRIES
judge_backoff = JUDGE_BACKOFF          # first retry delay, seconds
judge_timeout = 30.0                   # seconds a judge request may wait for data
judge_max_seconds = 60.0               # one verdict's whole budget, retries included: a dead or dripping judge costs this
max_invalid_fraction = 0.1             # exit 1 when more of the judged samples get no valid verdict
compare = ""                 # "A.json,B.json": print two results side by side, delta = B - A
quiet = False                # no progress bar


def main(argv):
    configure(argv, globals())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name, value, choices in (("mc_prompt", mc_prompt, ("auto",) + MC_FORMATS), ("extract", extract, EXTRACTORS),
                                 ("judge_prompt", judge_prompt, JUDGE_PROMPTS)):
        if value not in choices:
            raise SystemExit(f"--{name} must be one of {choices}, got {value!r}")
    if compare:
        paths = compare.split(",")
        if len(paths) != 2:
            raise SystemExit(f"--compare expects A.json,B.json, got {compare!r}")
        a, b = (json.load(open(path)) for path in paths)
        names = comparison_names(a, b)
        print(format_comparison(a, b, names))
        print("\n".join(f"{name}: {path}" for name, path in zip(names, paths)))
        return 0
    if not checkpoint or not data:
        raise SystemExit("usage: python eval.py --checkpoint=DIR --data=FILE.jsonl [--task=exact|open|mc] "
                         "(or --compare=A.json,B.json)")
    samples = load_jsonl(data)[:limit or None]
    task_ = task or ("mc" if any(s.get("options") for s in samples) else "exact")
    if task_ not in TASKS:
        raise SystemExit(f"--task must be one of {TASKS}, got {task!r}")
    judge = None
    if task_ == "open":
        if not judge_model:
            raise SystemExit("--task=open needs a judge: --judge_model (and --judge_base_url, --judge_api_key_env)")
        try:
            judge = Judge(base_url=judge_base_url, model=judge_model, api_key_env=judge_api_key_env,
                          max_retries=judge_max_retries, backoff=judge_backoff, temperature=judge_temperature,
                          timeout=judge_timeout, max_seconds=judge_max_seconds)
        except ValueError as err:      # e.g. an API key that cannot be sent (never printed)
            raise SystemExit(f"--judge_api_key_env={judge_api_key_env}: {err}") from None

    # torchrun: one model replica per GPU, each evaluating a shard
    rank, _, default_device = setup_distributed()
    policy = load_policy(checkpoint, hub_ids={name for name in hub_ids.split(",") if name},
                         **({"dtype": dtype} if dtype else {})).to(device or default_device)
    predictions_path = predictions or default_predictions_path(checkpoint, data, task_)
    out_path = out or default_results_path(predictions_path)
    results = evaluate(policy, samples, task=task_, batch_size=batch_size, max_new_tokens=max_new_tokens or None,
                       temperature=temperature if temperature >= 0 else None, judge=judge,
                       predictions_path=predictions_path, resume=resume, seed=seed, progress=not quiet,
                       mc_prompt=mc_prompt, extract=extract, judge_prompt=judge_prompt)
    if rank == 0:
        results.update(checkpoint=checkpoint, data=data, predictions=predictions_path)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(out_path + ".tmp", out_path)
        print_results(results, title=f"{task_}: {checkpoint} on {data}")
        print(f"predictions: {predictions_path}\nresults: {out_path}")
    shutdown_distributed()      # no rank leaves while rank 0 still writes
    return 1 if rank == 0 and too_many_invalid(results) else 0


def too_many_invalid(results):
    """Open-ended QA: say beside the accuracy how many verdicts it is over; True (exit 1) when more than
    max_invalid_fraction of the judged samples got none (a judge that died mid-run left 8 valid of 40: 100 %)."""
    if results["task"] != "open" or not results["n"]:
        return False
    invalid, n = results["invalid"], results["n"]
    print(f"accuracy {100 * results['accuracy']:.1f}% over {n - invalid} valid judge verdicts of {n} ({invalid} invalid)")
    if invalid <= max_invalid_fraction * n:
        return False
    print(f"error: {invalid} of {n} samples have no valid judge verdict (more than --max_invalid_fraction="
          f"{max_invalid_fraction:g}); the accuracy stands on the other {n - invalid}. --resume=True asks the judge "
          "again for those", file=sys.stderr)
    return True


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (CheckpointError, DatasetError) as err:    # a bad input file: its name and what is wrong, no traceback
        sys.exit(f"eval.py: {err}")
