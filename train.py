"""
Algorithm 1 (Iterative GRPO_rank), end to end.

$ python train.py                          # the embedded default: CPU, no downloads, minutes
$ python train.py --advantage=paper        # the paper's advantage, Eq. 7-8 (+ --bound=literal: Eq. 9 as printed)
$ torchrun --nproc_per_node=4 train.py config/paper_7b.py --sft_checkpoint=DIR   # FSDP2, one process per GPU

The main job: make the synthetic video-QA set if missing -> SFT warm start if there is no SFT
checkpoint (sft.py) -> held-out accuracy of the warm start ("before") -> GRPO_rank steps
(train_step.py) -> held-out accuracy again ("after") -> out/results.json, out/metrics.jsonl (one
line per step), out/ckpt/ (resumable).

Every default below can be overridden with --key=value, or by a config file (a .py file of
`name = literal` lines, or .json) given as a plain argument; later arguments win (configurator.py).
"""
import json
import os
import sys
import time
import warnings

import torch
from tqdm import tqdm

import checkpoint
from configurator import (barrier, check_values, configure, cosine_lr, option_keys, setup_distributed,
                          shutdown_distributed)
from data import TEMPLATES, ClipCache, DatasetError, load_jsonl
from eval import evaluate
from grpo_rank import BOUNDS, DCG_KINDS, LOSS_TYPES, METHODS, SCALES
from policies import POLICIES, load_policy, make_policy
from oracle import ORACLE_NAMES, make_oracle
from records import RunLog, lock_out_dir
from sft import train_sft
from synth import make_synthetic_dataset
from train_step import StepConfig, global_batch_indices, prompts_of_process, shard, train_step

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"
resume = False               # continue from out_dir/ckpt
save_every = 50              # steps between checkpoints (and one at the end)
eval_every = 0               # steps between held-out evaluations; 0: only before and after
eval_size = 300              # held-out samples evaluated (the eval split, never training prompts)
eval_batch_size = 64
seed = 1337
num_threads = 2              # CPU results depend on the thread count: fix it
stop_after_steps = 0         # end this invocation after N steps as if interrupted (resume later); 0: off
report_to = "none"           # "tensorboard": metrics and evaluations also to out_dir/tensorboard (pip install tensorboard)
# data
data_dir = "data/synth"      # the synthetic set is made here when train_data is empty
train_data = ""              # JSONL in data.py's format
eval_data = ""
num_train = 2000
num_eval = 300
max_bad_video_fraction = 0.1  # abort when more of a batch's videos fail to decode
clip_cache_mb = 1024         # decoded clips kept in memory across epochs, per process (0: decode every time)
# model
policy = "videolm"           # built when there is no checkpoint: "videolm" (the paper's: vision -> pooling -> projector
                             # -> lm) | "tiny-qwen2_5_vl"; a Qwen2.5-VL transformers dir: --sft_checkpoint=DIR
vision = "tiny"              # or a CLIP vision model dir / hub id
lm = "tiny"                  # or a causal LM dir / hub id
tokenizer = ""
num_frames = 8               # the paper: 50
dtype = "float32"
load_in_4bit = False         # QLoRA (CUDA only)
gradient_checkpointing = False
share_prefix = True          # score each group on one cached pass over its shared [video, prompt] prefix (bench.py: 4.9x)
# how a model built here (no --sft_checkpoint) sees and reads; a checkpoint (convert.py's) keeps its own
vision_post_layernorm = "auto"   # "auto": on for the tiny tower (it needs it), off for pretrained ones (LLaVA) | "true" | "false"
project_first = False        # True: projector on every frame's patches, then the pooling (VLM-RLAIF)
image_pad = False            # True: frames padded to a square with CLIP's mean colour (VLM-RLAIF)
template = "plain"           # "plain" | "v1": VLM-RLAIF's vicuna v1 prompt
sft_checkpoint = ""          # start RL from this model.py checkpoint; empty: out_dir/sft, trained if missing
sft_steps = 300
sft_batch_size = 32
sft_learning_rate = 1e-3
lora_r = 8                   # RL trains LoRA adapters + the projector
lora_alpha = 16
lora_dropout = 0.0
lora_target_modules = "q_proj,k_proj,v_proj,o_proj"
# GRPO_rank (paper Sec. 4)
advantage = "lambda_floor"   # | "lambda_clamp" | "lambda" (collapses at beta 0) | "paper" (Eq. 7-8) | "rank_reward"
                             # | "pairwise_gain"
dcg_kind = "eq10"            # "eq10" | "eq11" | "table3"
bound = "symmetric"          # "symmetric" | "literal" (Eq. 9 as printed)
scale_rewards = "group"      # rank_reward / pairwise_gain over the std of: "group" | "batch" (this process's) | "none"
floor = 0.1                  # lambda_floor / lambda_clamp: a worse response's least push, per unit of gain gap
ratio_policy = "rollout"     # "rollout": standard GRPO; "reference": Eq. 4/6 read literally (pi_old = pi_ref)
num_generations = 8          # G (the paper: 5)
epsilon = 0.2
epsilon_high = 0.0           # 0: same as epsilon
beta = 0.04                  # KL to the reference policy (k3 estimator)
entropy_coef = 0.0
temperature = 1.0
top_p = 1.0
max_new_tokens = 8
mask_truncated_completions = False
loss_type = "grpo"           # TRL's names: "grpo" (Eq. 6: mean per sequence, then over sequences) | "bnpo" | "dr_grpo" | "dapo"
loss_agg = ""                # the earlier name: "sequence" = grpo, "token" = bnpo
use_bias_correction_kl = False   # True: the KL term times the importance ratio (TRL's default)
top_k = 0                    # sampling: 0 = off
repetition_penalty = 1.0     # sampling: 1 = off
num_iterations = 2           # mu: optimisation passes over each rollout
learning_rate = 1e-3
weight_decay = 0.0
grad_clip = 1.0
warmup_steps = 10
batch_size = 16              # prompts per process per step; each process owns whole groups
epochs = 7                   # Algorithm 1 line 2; the reference policy is refreshed at each epoch start
max_steps = 800              # the synthetic set has 125 steps per epoch; the curves flatten by 800 (README, Results)
max_bad_steps = 3            # abort after this many non-finite steps in a row
# Oracle
oracle = "reference"         # "reference" | "graded" | "reward_model" | "judge"
oracle_workers = 8           # concurrent rank requests (judge)
judge_base_url = "http://127.0.0.1:8000/v1"
judge_model = ""
judge_api_key_env = "OPENAI_API_KEY"
judge_timeout = 30.0         # seconds a judge request may wait for data
judge_max_seconds = 60.0     # the Oracle's whole budget per step (all groups, retries included): a dead judge costs this
judge_max_retries = 4
reward_model = ""            # a local AutoModelForSequenceClassification dir
# -----------------------------------------------------------------------------
COUNTERS = ("oracle_failures", "skipped_samples", "nonfinite_groups", "nonfinite_steps")
RUNTIME_OPTIONS = ("dtype", "load_in_4bit", "gradient_checkpointing", "num_frames")   # a checkpoint runs with these
MODEL_OPTIONS = ("vision", "lm", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")   # it is made of these
SEEING_OPTIONS = ("tokenizer", "template", "project_first", "image_pad", "vision_post_layernorm")  # it sees, reads so
HUB_OPTIONS = ("vision", "lm", "tokenizer")   # a hub id given as one of these may be downloaded; nothing else is


CHOICES = {"policy": POLICIES, "advantage": METHODS, "dcg_kind": DCG_KINDS, "bound": BOUNDS, "scale_rewards": SCALES,
           "ratio_policy": ("rollout", "reference"), "loss_type": LOSS_TYPES, "loss_agg": ("", "sequence", "token"),
           "oracle": ORACLE_NAMES, "template": TEMPLATES, "vision_post_layernorm": ("auto", "true", "false"),
           "report_to": ("none", "tensorboard")}
# numeric options: (lowest, highest) allowed, None = unbounded; every float must also be finite
RANGES = {"save_every": (1, None), "eval_every": (0, None), "eval_size": (0, None), "eval_batch_size": (1, None),
          "num_threads": (1, None), "stop_after_steps": (0, None), "num_train": (1, None), "num_eval": (0, None),
          "max_bad_video_fraction": (0, 1), "clip_cache_mb": (0, None), "num_frames": (1, None),
          "sft_steps": (0, None), "sft_batch_size": (1, None), "sft_learning_rate": (0, None), "lora_r": (0, None),
          "lora_alpha": (1, None), "lora_dropout": (0, 0.99), "num_generations": (2, None), "epsilon": (0, 1),
          "epsilon_high": (0, None), "beta": (0, None), "floor": (0, None), "temperature": (0, None),
          "top_p": (1e-9, 1), "max_new_tokens": (1, None), "num_iterations": (1, None),
          "learning_rate": (1e-12, None), "weight_decay": (0, None), "grad_clip": (1e-12, None),
          "warmup_steps": (0, None), "batch_size": (1, None), "epochs": (1, None), "max_steps": (0, None),
          "max_bad_steps": (1, None), "oracle_workers": (1, None), "top_k": (0, None),
          "repetition_penalty": (1e-6, None), "judge_timeout": (1e-3, None), "judge_max_seconds": (1e-3, None),
          "judge_max_retries": (0, None)}


def check_options():
    """Every option's value, at start (before any data or model work), the message naming the option."""
    check_values(globals(), CHOICES, RANGES)
    if max_bad_video_fraction >= 1:
        raise SystemExit(f"--max_bad_video_fraction must be below 1, got {max_bad_video_fraction}: at 1 a batch whose "
                         "videos all fail would go on with nothing to train on; below 1 it stops the run, naming them")
    if loss_agg:   # the earlier option name, kept as an alias
        globals()["loss_type"] = {"sequence": "grpo", "token": "bnpo"}[loss_agg]
    if temperature == 0:
        warnings.warn("temperature=0 samples greedily: the G responses of a group are identical, the Oracle ties "
                      "them, and every advantage is zero (nothing to learn). Use a temperature > 0 for training.")


def as_model(key, value, vision_name):
    """An option's value as a model config holds it: --vision_post_layernorm "auto" is on for the tiny tower (it
    needs it), off for pretrained ones (LLaVA), "true" / "false" a bool; the others as they are."""
    if key != "vision_post_layernorm":
        return value
    return vision_name == "tiny" if value == "auto" else value == "true"


def as_option(key, value):
    """A model config's value as train.py's option of that name spells it."""
    return ("true" if value else "false") if key == "vision_post_layernorm" else value


def resume_from(ckpt_dir, given):
    """--resume=True: the checkpoint to continue from, verified (None: there is none; one that does not verify is
    an error, never a fresh start over it). Its model is what trains on: its LoRA, parts, template, frame and
    tokenizer options are taken (so recorded in results.json); a different value given explicitly is an error."""
    found = checkpoint.resumable(ckpt_dir)
    if not found:
        print(f"resume: no checkpoint in {ckpt_dir}, starting fresh")
        return None
    saved = checkpoint.model_config_of(found, MODEL_OPTIONS + SEEING_OPTIONS)   # those its policy has
    conflicts = [f"--{key}={globals()[key]!r} (the checkpoint has {as_option(key, value)!r})"
                 for key, value in saved.items()
                 if key in given and as_model(key, globals()[key], saved.get("vision", "")) != value]
    if conflicts:
        raise SystemExit(f"resume: {found} was trained with other model options: {', '.join(conflicts)}. Drop "
                         "them to continue that run, or start a new one with another --out_dir.")
    globals().update({key: as_option(key, value) for key, value in saved.items()})
    return found


def record_model_options(config, policy, given):
    """results.json's config says how the model that trains sees and reads: a loaded checkpoint keeps its own
    template, frames and tokenizer whatever the options say; an explicit option it does not follow is warned of."""
    for key in (key for key in SEEING_OPTIONS if hasattr(policy.config, key)):   # (a Qwen policy has its own)
        used = getattr(policy.config, key)
        if key in given and as_model(key, config[key], getattr(policy.config, "vision", "")) != used:
            warnings.warn(f"--{key}={config[key]!r} is not used: the loaded model has {as_option(key, used)!r} "
                          "(a checkpoint keeps its own); results.json records that")
        config[key] = as_option(key, used)


def runtime_overrides(given):
    """How to run a loaded checkpoint (precision, QLoRA, checkpointing, frames): the options given
    on the command line or in a config file win over the checkpoint's; defaults do not."""
    return {key: globals()[key] for key in RUNTIME_OPTIONS if key in given}


def build_oracle():
    """The Oracle, built at start: a judge API key that cannot be sent or a missing reward model stops the
    run before any work, the message naming the option."""
    try:
        if oracle == "judge":
            return make_oracle("judge", base_url=judge_base_url, model=judge_model, api_key_env=judge_api_key_env,
                               seed=seed, timeout=judge_timeout, max_seconds=judge_max_seconds,
                               max_retries=judge_max_retries)
        return make_oracle("reward_model", path=reward_model) if oracle == "reward_model" else make_oracle(oracle)
    except (ValueError, OSError) as err:
        raise SystemExit(f"--oracle={oracle}: {err}") from None


def load_datasets(master):
    """(train samples, held-out samples): the given JSONL files, or the synthetic set, made once by
    the first process."""
    paths = {"train": train_data, "eval": eval_data}
    if not train_data:
        try:
            if master:
                make_synthetic_dataset(data_dir, num_train=num_train, num_eval=num_eval)
            barrier()
            paths = make_synthetic_dataset(data_dir, num_train=num_train, num_eval=num_eval)
        except OSError as err:
            raise SystemExit(f"--data_dir={data_dir}: cannot make the synthetic dataset there ({err})") from None
    eval_samples = load_jsonl(paths["eval"])[:eval_size] if paths.get("eval") else []
    return load_jsonl(paths["train"]), eval_samples


def build_policy():
    """The model of a run with no checkpoint to start from: --policy, from the options below it."""
    if policy != "videolm":
        return make_policy(policy, num_frames=num_frames, dtype=dtype, load_in_4bit=load_in_4bit,
                           gradient_checkpointing=gradient_checkpointing, seed=seed)
    layernorm = as_model("vision_post_layernorm", vision_post_layernorm, vision)
    return make_policy("videolm", vision=vision, lm=lm, tokenizer=tokenizer, num_frames=num_frames, dtype=dtype,
                       load_in_4bit=load_in_4bit, gradient_checkpointing=gradient_checkpointing,
                       lora_r=0 if lm == "tiny" else lora_r, lora_alpha=lora_alpha,
                       lora_target_modules=lora_target_modules, vision_post_layernorm=layernorm,
                       project_first=project_first, image_pad=image_pad, template=template, seed=seed)


def warm_start(master, train_samples, device, overrides):
    """The SFT policy RL starts from (the paper starts from VLM-SFT): --sft_checkpoint (a checkpoint of this
    project's, or a transformers model directory of a supported family: policies.py), or out_dir/sft,
    trained first by sft.py when missing."""
    if sft_checkpoint:
        return load_policy(sft_checkpoint, **overrides)
    sft_dir = os.path.join(out_dir, "sft")
    if not os.path.exists(os.path.join(sft_dir, "config.json")):
        if master:
            model = build_policy().to(device)
            print(f"sft: no checkpoint at {sft_dir}; training the warm start for {sft_steps} steps")
            if sft_steps == 0:
                warnings.warn("sft_steps=0 and no --sft_checkpoint: RL starts from an untrained projector")
            train_sft(model, train_samples, sft_steps, sft_batch_size, sft_learning_rate, seed=seed)
            model.save(sft_dir)
        barrier()
    return load_policy(sft_dir, **overrides)


def start_policy(master, train_samples, device, overrides, found):
    """(policy, saved training state or None): the checkpoint `found` (checksums verified, nothing
    unpickled), else the warm start with LoRA added and the first reference snapshot (before sharding)."""
    if found:
        if master:
            print(f"resuming from {found}")
        checkpoint.verify(found)
        return load_policy(os.path.join(found, "model"), **overrides), checkpoint.load_state(found, "train_state")
    model = warm_start(master, train_samples, device, overrides)
    if lora_r > 0 and not model.has_lora:
        model.add_lora(lora_r, lora_alpha, lora_dropout, lora_target_modules)
    if not model.trainable_parameters():      # before the reference snapshot copies a whole pretrained LM
        raise SystemExit(f"--lora_r={lora_r}: the policy has nothing to train (a pretrained LM trains only through "
                         "LoRA): give --lora_r > 0")
    model.snapshot_reference()
    return model, None


# ----------------------------------------------------------------------------- the loop's bookkeeping

def schedule(num_samples, world, master):
    """(steps per epoch, total steps): Algorithm 1's epochs over the prompts D, one global batch
    (batch_size prompts on each of `world` processes) per step, at most max_steps."""
    global_batch = batch_size * world
    steps_per_epoch = num_samples // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{num_samples} training samples are fewer than one global batch ({global_batch})")
    total_steps = min(max_steps, epochs * steps_per_epoch)
    if master and total_steps < max_steps:
        print(f"running {total_steps} steps, not max_steps={max_steps}: epochs={epochs} x {steps_per_epoch} steps "
              f"per epoch; raise --epochs for more")
    return steps_per_epoch, total_steps


def count_faults(metrics, counters, step, bad_in_a_row):
    """Move a step's fault counts out of its metrics into the run's counters, warning of a skipped step.
    -> non-finite steps in a row (stop_if_failing acts on it)."""
    skipped = metrics.pop("nonfinite_step")
    for key in COUNTERS[:3]:
        counters[key] += metrics.pop(key)
    counters["nonfinite_steps"] += int(skipped)
    if not skipped:
        return 0
    warnings.warn(f"step {step}: non-finite loss or gradient, optimizer step skipped ({bad_in_a_row + 1} in a row)")
    return bad_in_a_row + 1


def stop_if_failing(bad_in_a_row, step, ckpt_dir):
    """After max_bad_steps non-finite steps in a row, an error naming the checkpoint to resume from. Called
    after the step's metrics line is written, so the run's record is complete."""
    if bad_in_a_row < max_bad_steps:
        return
    last = checkpoint.latest(ckpt_dir)        # skipped steps change no weight: every checkpoint is good
    origin = sft_checkpoint or os.path.join(out_dir, "sft")
    raise RuntimeError(f"{bad_in_a_row} non-finite steps in a row at step {step}; stopping. " +
                       (f"The last good checkpoint is {last} (--resume=True continues from it)" if last else
                        f"No checkpoint was written yet; the run started from {origin}"))


# ----------------------------------------------------------------------------- main

def main(argv):
    """Options, checked; then out_dir is locked (by the first process: a second train.py on it stops at once)
    for as long as the run lives."""
    given = configure(argv, globals())
    check_options()
    lock = lock_out_dir(out_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        return run(given)
    finally:
        if lock is not None:
            lock.close()


def run(given):
    ckpt_dir = os.path.join(out_dir, "ckpt")
    found = resume_from(ckpt_dir, given) if resume else None
    ranker = build_oracle()
    hub_ids = {globals()[key] for key in HUB_OPTIONS if key in given}   # only these may be downloaded
    overrides = {**runtime_overrides(given), "share_prefix": share_prefix, "hub_ids": hub_ids}
    config = {k: globals()[k] for k in option_keys(globals())}
    rank, world, device = setup_distributed()
    master = rank == 0
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    timings, start = {}, time.time()
    if master:
        print("config: " + json.dumps(config))
    log = RunLog(out_dir, master, report_to)

    train_samples, eval_samples = load_datasets(master)                  # the prompts D
    steps_per_epoch, total_steps = schedule(len(train_samples), world, master)
    timings["data"], tick = time.time() - start, time.time()
    policy, state = start_policy(master, train_samples, device, overrides, found)   # pi_theta <- pi_SFT
    record_model_options(config, policy, given)
    timings["sft"] = time.time() - tick
    policy.disable_dropout()
    policy.to(device)
    if world > 1:
        shard(policy)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=learning_rate, weight_decay=weight_decay)
    step_config = StepConfig.from_options(globals())
    generator = torch.Generator(device=device).manual_seed(seed + 1000 * rank)
    step, counters, before = 0, dict.fromkeys(COUNTERS, 0), None
    if state:
        step, counters, before = checkpoint.restore_training(policy, optimizer, generator, state, seed, rank, world)
        counters = {**dict.fromkeys(COUNTERS, 0), **counters}
    held_out = lambda progress: (evaluate(policy, eval_samples, batch_size=eval_batch_size, progress=progress)
                                 if eval_samples else {})
    tick = time.time()
    before = held_out(master) if before is None else before
    timings["eval_before"] = time.time() - tick
    log.start(step)
    log.evaluation(before, step, record=False)

    tick, bad_in_a_row = time.time(), 0
    last_step = min(total_steps, step + stop_after_steps) if stop_after_steps else total_steps   # this invocation's
    clips = ClipCache(clip_cache_mb * 2**20) if clip_cache_mb else None
    bar = tqdm(total=total_steps, initial=step, desc="grpo_rank", disable=not master)
    while step < last_step:                                               # Algorithm 1 lines 2 and 4
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if step_in_epoch == 0:
            policy.snapshot_reference()                                   # line 3: pi_ref <- pi_theta
        step_start = time.time()
        batch_index = global_batch_indices(len(train_samples), epoch, step_in_epoch, batch_size * world, seed)
        samples = [train_samples[i] for i in prompts_of_process(batch_index, rank, world)]
        lr = cosine_lr(step, total_steps, warmup_steps, learning_rate)
        metrics = train_step(policy, optimizer, samples, ranker, step_config, lr, generator, step, clips=clips)  # l. 5-10
        bad_in_a_row = count_faults(metrics, counters, step, bad_in_a_row)
        step += 1
        row = {"step": step, "epoch": epoch, **metrics, "lr": lr, **counters,
               "samples_per_s": metrics.pop("samples") / (time.time() - step_start), "seconds": time.time() - start}
        log.step(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['sample_accuracy']:.2f}", ndcg=f"{row['ndcg_agreement']:.2f}")
        stop_if_failing(bad_in_a_row, step, ckpt_dir)
        if eval_every and step % eval_every == 0 and step < total_steps and eval_samples:
            mid = held_out(False)
            if master:
                tqdm.write(f"step {step}: held-out accuracy {mid['accuracy']:.3f}")
            log.evaluation(mid, step)
        if step % save_every == 0 or step == last_step:
            state = {"step": step, "epoch": step // steps_per_epoch, "config": config, "counters": counters,
                     "before": before}
            checkpoint.save_training(ckpt_dir, policy, optimizer, generator, state, master)
    bar.close()
    results = None
    if step < total_steps:
        if master:
            print(f"stopped after {stop_after_steps} steps (stop_after_steps) at step {step}; --resume=True continues")
    else:
        timings["rl"], tick = time.time() - tick, time.time()
        after = held_out(master)
        timings["eval_after"], timings["total"] = time.time() - tick, time.time() - start
        log.evaluation(after, step, record=False)
        results = log.finish(before, after, config, timings, counters, names=("before (SFT)", f"after ({advantage})"))
    log.close()
    shutdown_distributed()
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (checkpoint.CheckpointError, checkpoint.CheckpointWriteError, DatasetError) as err:
        sys.exit(f"train.py: {err}")     # a bad or unwritable file: its name and what is wrong, no traceback
