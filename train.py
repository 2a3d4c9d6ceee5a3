"""
Algorithm 1 (Iterative GRPO_rank), end to end.

$ python train.py                          # the embedded default: CPU, no downloads, minutes
$ python train.py --advantage=paper        # the paper's advantage, Eq. 7-8 (+ --bound=literal: Eq. 9 as printed)
$ torchrun --nproc_per_node=4 train.py config.py --lm=/models/llama   # FSDP2, one process per GPU

The main job: make the synthetic video-QA set if missing -> SFT warm start if there is no SFT
checkpoint (sft.py) -> held-out accuracy of the warm start ("before") -> GRPO_rank -> held-out
accuracy again ("after") -> out/results.json, out/metrics.jsonl (one line per step), out/ckpt/.

Every default below can be overridden with --key=value, or by a config file (a .py file of
assignments, or .json) given as a plain argument; later arguments win.
"""
import ast
import difflib
import json
import os
import shutil
import sys
import time
import warnings

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import load_jsonl, make_synthetic_dataset, read_videos
from eval import evaluate, format_comparison
from grpo_rank import BOUNDS, DCG_KINDS, METHODS, group_ndcg, grpo_rank_loss, rank_advantages, ranks_from_scores
from model import ModelConfig, VideoLM
from oracle import OracleError, extract_choice, make_oracle, normalize_answer, rank_many
from rollout import completion_logprobs, rollout
from sft import cosine_lr, train_sft

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
# data
data_dir = "data/synth"      # the synthetic set is made here when train_data is empty
train_data = ""              # JSONL in data.py's format
eval_data = ""
num_train = 2000
num_eval = 300
max_bad_video_fraction = 0.1  # abort when more of a batch's videos fail to decode
# model
vision = "tiny"              # or a CLIP vision model dir / hub id
lm = "tiny"                  # or a causal LM dir / hub id
tokenizer = ""
num_frames = 8               # the paper: 50
dtype = "float32"
load_in_4bit = False         # QLoRA (CUDA only)
gradient_checkpointing = False
share_prefix = True          # score each group on one cached pass over its shared [video, prompt] prefix (bench.py: 4.9x)
sft_checkpoint = ""          # start RL from this model.py checkpoint; empty: out_dir/sft, trained if missing
sft_steps = 300
sft_batch_size = 32
sft_learning_rate = 1e-3
lora_r = 8                   # RL trains LoRA adapters + the projector
lora_alpha = 16
lora_dropout = 0.0
lora_target_modules = "q_proj,k_proj,v_proj,o_proj"
# GRPO_rank (paper Sec. 4)
advantage = "lambda"         # "lambda" | "paper" (Eq. 7-8 as printed) | "rank_reward"
dcg_kind = "eq10"            # "eq10" | "eq11" | "table3"
bound = "symmetric"          # "symmetric" | "literal" (Eq. 9 as printed)
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
loss_agg = "sequence"        # "sequence" (Eq. 6) | "token"
num_iterations = 2           # mu: optimisation passes over each rollout
learning_rate = 1e-3
weight_decay = 0.0
grad_clip = 1.0
warmup_steps = 10
batch_size = 16              # prompts per process per step; each process owns whole groups
epochs = 2                   # Algorithm 1 line 2; the reference policy is refreshed at each epoch start
max_steps = 200
max_bad_steps = 3            # abort after this many non-finite steps in a row
# Oracle
oracle = "reference"         # "reference" | "graded" | "reward_model" | "judge"
oracle_workers = 8           # concurrent rank requests (judge)
judge_base_url = "http://127.0.0.1:8000/v1"
judge_model = ""
judge_api_key_env = "OPENAI_API_KEY"
reward_model = ""            # a local AutoModelForSequenceClassification dir
# -----------------------------------------------------------------------------


def config_keys(namespace):
    return [k for k, v in namespace.items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))]


def _parse(text, default):
    """A command-line string as the type of the default; ValueError if it is not one."""
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "0", "false", "no"):
            return text.lower() in ("1", "true", "yes")
        raise ValueError
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError from None
    return float(value) if isinstance(default, float) and type(value) is int else value


def configure(argv, namespace):
    """Apply config files and --key=value overrides to the module globals in `namespace`.
    Returns the set of keys that were given (so defaults can be told from explicit choices)."""
    keys = config_keys(namespace)
    given = set()

    def assign(key, value, source):
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3)
            raise SystemExit(f"{source}: unknown option {key!r}" + (f"; did you mean {close}?" if close else ""))
        default, given_as = namespace[key], value
        where = f"--{key}" if source == "command line" else f"{source}: {key}"
        if isinstance(value, str) and source == "command line":
            try:
                value = _parse(value, default)
            except ValueError:
                value = None
        elif isinstance(default, float) and type(value) is int:
            value = float(value)
        if type(value) is not type(default):
            raise SystemExit(f"{where} expects a {type(default).__name__}, got {given_as!r}")
        namespace[key] = value
        given.add(key)

    for arg in argv:
        if arg.startswith("--"):
            key, sep, value = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"expected --key=value, got {arg!r}")
            assign(key, value, "command line")
        else:
            if not os.path.exists(arg):
                raise SystemExit(f"config file {arg!r} not found")
            if arg.endswith(".json"):
                with open(arg) as f:
                    values = json.load(f)
            else:
                values = {}
                with open(arg) as f:
                    exec(f.read(), {}, values)
            for key, value in values.items():
                if not key.startswith("_"):
                    assign(key, value, arg)
    return given


# ----------------------------------------------------------------------------- distributed

def setup_distributed():
    """(rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def reduce_sum(values, device):
    """Sum a list of floats over all processes."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def shard(policy):
    """FSDP2: every decoder layer is a sharded group, and the whole policy is the root group (vision
    tower, embeddings, projectors, LM head). The policy is used through encode_video, generate and
    completion_logits rather than forward, so those are registered as the root's forward methods:
    each call gathers the root's parameters and reshards them after."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for lm_ in [policy.lm] + ([policy.ref_lm] if policy.ref_lm is not None else []):
        base = lm_.get_base_model() if hasattr(lm_, "get_base_model") else lm_
        layer_names = set(getattr(base, "_no_split_modules", None) or [])
        for module in list(lm_.modules()):
            if type(module).__name__ in layer_names:
                fully_shard(module)
    fully_shard(policy, reshard_after_forward=True)
    for method in ("encode_video", "generate", "completion_logits"):
        register_fsdp_forward_method(policy, method)


# ----------------------------------------------------------------------------- checkpoints

def full_state(policy, optimizer):
    """Full (unsharded) model and optimizer state dicts, keyed by parameter names, on the CPU, so
    a checkpoint loads on any world size."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(policy, options=options), get_optimizer_state_dict(policy, optimizer, options=options)


def save_checkpoint(path, policy, optimizer, train_state, master):
    """Write atomically: everything goes to PATH.tmp, then PATH.tmp replaces PATH. The previous
    checkpoint stays until the new one is complete; one with non-finite weights is never written."""
    model_state, optim_state = full_state(policy, optimizer)
    if master:
        bad = [name for name, tensor in model_state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        if bad:
            raise RuntimeError(f"refusing to checkpoint non-finite weights ({bad[:3]}); last good checkpoint kept at {path}")
        tmp, old = path + ".tmp", path + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save(os.path.join(tmp, "model"), state=model_state)
        torch.save({**train_state, "optimizer": optim_state}, os.path.join(tmp, "train_state.pt"))
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def latest_checkpoint(path):
    """PATH, or PATH.old when a crash came between the two renames of save_checkpoint."""
    for candidate in (path, path + ".old"):
        if os.path.exists(os.path.join(candidate, "train_state.pt")):
            return candidate
    return None


# ----------------------------------------------------------------------------- one step's pieces

def load_frames(samples, num_frames_):
    """Decode a batch's videos. Returns (frames (B', T, H, W, 3), kept samples, failed samples);
    each failure is reported with a warning naming the sample and the file."""
    frames, kept, failures = read_videos(samples, num_frames_)
    for sample, err in failures:
        warnings.warn(f"skipping sample {sample['id']}: {err}")
    return frames, kept, [sample for sample, _ in failures]


def oracle_ranks(oracle_, samples, responses, workers):
    """Oracle ranks of every group (Algorithm 1 line 7), whole groups at once and concurrently.
    Returns (oracle_rank (B, G) long, valid (B,) bool, failures: list of messages). A failed or
    invalid ranking leaves its group invalid (zero advantages); it is never replaced by a guess."""
    group_size = len(responses[0])
    oracle_rank = torch.zeros(len(samples), group_size, dtype=torch.long)
    valid = torch.zeros(len(samples), dtype=torch.bool)
    failures = []
    if hasattr(oracle_, "rank_many"):   # the Oracle's own: a judge numbers its shuffles in input order,
        results = oracle_.rank_many(samples, responses, max_workers=workers)   # a local RM runs in one thread
    else:
        results = rank_many(oracle_, samples, responses, max_workers=workers)
    for b, result in enumerate(results):
        if isinstance(result, OracleError):
            failures.append(f"oracle failed on sample {samples[b]['id']}: {result}")
        elif (not isinstance(result, (list, tuple)) or len(result) != group_size
              or not all(isinstance(r, int) and 0 <= r < group_size for r in result)):
            failures.append(f"oracle returned an invalid ranking for sample {samples[b]['id']}: {result!r} "
                            f"(expected {group_size} ints in [0, {group_size}))")
        else:
            oracle_rank[b], valid[b] = torch.tensor(result), True
    return oracle_rank, valid, failures


def global_batch_indices(num_samples, epoch, step_in_epoch, global_batch):
    """The prompts of one step across all processes: a slice of the epoch's permutation, which
    depends only on (seed, epoch), so a resumed run continues with the same data. -> (global_batch,)"""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[step_in_epoch * global_batch:(step_in_epoch + 1) * global_batch]


def prompts_of_process(batch_index, rank, world):
    """This process's prompts: whole prompts, never parts of a group. Each process samples all G
    responses of its prompts itself, so the Oracle always ranks complete groups. -> list of ints"""
    return batch_index[rank::world].tolist()


def sample_correct(sample, response):
    """Is a sampled response right? (A training-curve metric; the Oracle may grade differently.)"""
    if sample.get("options"):
        return extract_choice(response, sample["options"]) == sample["answer"]
    return normalize_answer(response) == normalize_answer(sample["answer"])


def build_oracle():
    if oracle == "judge":
        return make_oracle("judge", base_url=judge_base_url, model=judge_model, api_key_env=judge_api_key_env, seed=seed)
    if oracle == "reward_model":
        return make_oracle("reward_model", path=reward_model)
    return make_oracle(oracle)


def check_options():
    for name, value, choices in [("advantage", advantage, METHODS), ("dcg_kind", dcg_kind, DCG_KINDS),
                                 ("bound", bound, BOUNDS), ("ratio_policy", ratio_policy, ("rollout", "reference")),
                                 ("loss_agg", loss_agg, ("sequence", "token"))]:
        if value not in choices:
            raise SystemExit(f"--{name} must be one of {choices}, got {value!r}")
    if num_generations < 2:
        raise SystemExit(f"--num_generations must be at least 2 (a group to rank), got {num_generations}")
    if num_iterations < 1 or batch_size < 1:
        raise SystemExit("--num_iterations and --batch_size must be at least 1")


RUNTIME_OPTIONS = ("dtype", "load_in_4bit", "gradient_checkpointing", "num_frames")


def runtime_overrides(given):
    """How to run a loaded checkpoint (precision, QLoRA, checkpointing, frames): the options given
    on the command line or in a config file win over the checkpoint's; defaults do not."""
    return {key: globals()[key] for key in RUNTIME_OPTIONS if key in given}


def warm_start(master, train_samples, device, overrides):
    """The SFT policy RL starts from (the paper starts from VLM-SFT)."""
    if sft_checkpoint:
        return VideoLM.load(sft_checkpoint, **overrides)
    sft_dir = os.path.join(out_dir, "sft")
    if not os.path.exists(os.path.join(sft_dir, "config.json")):
        if master:
            model_config = ModelConfig(vision=vision, lm=lm, tokenizer=tokenizer, num_frames=num_frames, dtype=dtype,
                                       load_in_4bit=load_in_4bit, gradient_checkpointing=gradient_checkpointing,
                                       lora_r=0 if lm == "tiny" else lora_r, lora_alpha=lora_alpha,
                                       lora_target_modules=lora_target_modules, seed=seed)
            policy = VideoLM(model_config).to(device)
            print(f"sft: no checkpoint at {sft_dir}; training the warm start for {sft_steps} steps")
            if sft_steps == 0:
                warnings.warn("sft_steps=0 and no --sft_checkpoint: RL starts from an untrained projector")
            train_sft(policy, train_samples, sft_steps, sft_batch_size, sft_learning_rate, seed=seed)
            policy.save(sft_dir)
        barrier()
    return VideoLM.load(sft_dir, **overrides)


# ----------------------------------------------------------------------------- main

def main(argv):
    overrides = runtime_overrides(configure(argv, globals()))
    check_options()
    config = {k: globals()[k] for k in config_keys(globals())}
    rank, world, device = setup_distributed()
    master = rank == 0
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    timings, start = {}, time.time()
    if master:
        os.makedirs(out_dir, exist_ok=True)
        print("config: " + json.dumps(config))

    # data: the synthetic set is made once, by the first process
    paths = {"train": train_data, "eval": eval_data}
    if not train_data:
        if master:
            make_synthetic_dataset(data_dir, num_train=num_train, num_eval=num_eval)
        barrier()
        paths = make_synthetic_dataset(data_dir, num_train=num_train, num_eval=num_eval)
    train_samples = load_jsonl(paths["train"])
    eval_samples = load_jsonl(paths["eval"])[:eval_size] if paths.get("eval") else []
    global_batch = batch_size * world
    steps_per_epoch = len(train_samples) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_samples)} training samples are fewer than one global batch ({global_batch})")
    total_steps = min(max_steps, epochs * steps_per_epoch)
    timings["data"] = time.time() - start

    # the policy: resume, or warm start + LoRA
    ckpt_dir = os.path.join(out_dir, "ckpt")
    found = latest_checkpoint(ckpt_dir) if resume else None
    if resume and found is None and master:
        print(f"resume: no checkpoint in {ckpt_dir}, starting fresh")
    tick = time.time()
    if found:
        policy = VideoLM.load(os.path.join(found, "model"), **overrides)
        state = torch.load(os.path.join(found, "train_state.pt"), map_location="cpu", weights_only=False)
    else:
        policy = warm_start(master, train_samples, device, overrides)
        state = None
        if lora_r > 0 and not policy.has_lora:
            policy.add_lora(lora_r, lora_alpha, lora_dropout, lora_target_modules)
        policy.snapshot_reference()   # made before sharding; refreshed in place at each epoch start
    timings["sft"] = time.time() - tick
    policy.config.share_prefix = share_prefix
    for module in policy.modules():   # RL without dropout: the rollout, reference and training passes
        if isinstance(module, torch.nn.Dropout):   # must score the same policy (ratio 1 on the first pass)
            module.p = 0.0
    policy.to(device)
    if world > 1:
        shard(policy)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=learning_rate, weight_decay=weight_decay)
    oracle_ = build_oracle()
    generator = torch.Generator(device=device).manual_seed(seed + 1000 * rank)

    step, counters, before = 0, {"oracle_failures": 0, "skipped_samples": 0, "nonfinite_groups": 0, "nonfinite_steps": 0}, None
    if state:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(policy, optimizer, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        step, counters, before = state["step"], {**counters, **state["counters"]}, state["before"]
        torch.set_rng_state(state["rng"]["torch"])
        if len(state["rng"]["generators"]) == world:   # the same sampling stream, when the layout matches
            generator.set_state(state["rng"]["generators"][rank].to(generator.get_state().device))
        else:
            generator.manual_seed(seed + 1000 * rank + step)
        if master:
            print(f"resumed from {found} at step {step}")

    tick = time.time()
    if before is None:
        before = evaluate(policy, eval_samples, batch_size=eval_batch_size, progress=master) if eval_samples else {}
    timings["eval_before"] = time.time() - tick

    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if master:   # drop lines of steps after the checkpoint (a crashed run's tail)
        kept = []
        if step > 0 and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)

    def train_state():
        generators = [generator.get_state().cpu()]
        if dist.is_initialized():
            generators = [None] * world
            dist.all_gather_object(generators, generator.get_state().cpu())
        return {"step": step, "epoch": step // steps_per_epoch, "config": config, "counters": counters,
                "before": before, "rng": {"torch": torch.get_rng_state(), "generators": generators}}

    tick, bad_in_a_row, steps_this_run = time.time(), 0, 0
    bar = tqdm(total=total_steps, initial=step, desc="grpo_rank", disable=not master)
    while step < total_steps:                                      # Algorithm 1 lines 2 and 4
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if step_in_epoch == 0:
            policy.snapshot_reference()                            # line 3: pi_ref <- pi_theta
        step_start = time.time()
        batch_index = global_batch_indices(len(train_samples), epoch, step_in_epoch, global_batch)
        samples = [train_samples[i] for i in prompts_of_process(batch_index, rank, world)]   # line 5

        frames, samples, failed = load_frames(samples, policy.config.num_frames)
        failed_total, seen_total = reduce_sum([len(failed), len(failed) + len(samples)], device)
        counters["skipped_samples"] += int(failed_total)
        if failed_total > max_bad_video_fraction * seen_total:
            raise RuntimeError(f"step {step}: {int(failed_total)} of {int(seen_total)} videos failed to decode "
                               f"(more than {max_bad_video_fraction:.0%}), e.g. {[s['video'] for s in failed[:3]]}")

        # line 6: G responses per prompt; line 8: l_i under the current policy
        batch = rollout(policy, samples, frames.to(device), num_generations, max_new_tokens, temperature, top_p,
                        mask_truncated_completions, generator)
        oracle_rank, valid, failures = oracle_ranks(oracle_, samples, batch.responses, oracle_workers)   # line 7
        for message in failures:
            warnings.warn(message)
        counters["oracle_failures"] += int(reduce_sum([len(failures)], device)[0])
        finite = torch.isfinite(batch.seq_logp.cpu()).all(-1)
        if not finite.all():   # a non-finite l_i cannot be ranked: that group is skipped and counted
            warnings.warn(f"step {step}: non-finite sequence log-probs for samples "
                          f"{[s['id'] for s, ok in zip(samples, finite.tolist()) if not ok]}; their groups get zero advantages")
            valid &= finite
        counters["nonfinite_groups"] += int(reduce_sum([float((~finite).sum())], device)[0])
        # line 9 (predicted ranks from l_i) happens inside rank_advantages; failed groups keep zeros
        advantages = torch.zeros(len(samples), num_generations)
        if valid.any():
            advantages[valid] = rank_advantages(oracle_rank[valid], batch.seq_logp[valid].cpu(), advantage, dcg_kind, bound)
        advantages = advantages.to(device).view(-1)

        ref_logp = None
        if beta != 0 or ratio_policy == "reference":
            with torch.no_grad():
                ref_logp = completion_logprobs(policy, batch, reference=True)
        old_logp = batch.old_logp if ratio_policy == "rollout" else ref_logp   # Eq. 4's pi_old

        # line 10: mu passes of the clipped GRPO_rank objective (Eq. 6)
        lr = cosine_lr(step, total_steps, warmup_steps, learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr
        policy.train()
        losses, iteration_stats, nonfinite = [], [], False
        for _ in range(num_iterations):
            logp = completion_logprobs(policy, batch, with_entropy=entropy_coef != 0)
            logp, entropy = logp if isinstance(logp, tuple) else (logp, None)
            loss, stats = grpo_rank_loss(logp, old_logp, ref_logp if beta != 0 else None, advantages, batch.loss_mask,
                                         epsilon, epsilon_high or None, beta, entropy, entropy_coef, loss_agg)
            if reduce_sum([float(not torch.isfinite(loss))], device)[0] > 0:   # every process skips together
                nonfinite = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            if not torch.isfinite(grad_norm):
                nonfinite = True
                optimizer.zero_grad(set_to_none=True)
                break
            optimizer.step()
            losses.append(loss.item())
            iteration_stats.append(stats)
        if nonfinite:
            counters["nonfinite_steps"] += 1
            bad_in_a_row += 1
            warnings.warn(f"step {step}: non-finite loss or gradient, optimizer step skipped "
                          f"({bad_in_a_row} in a row)")
        else:
            bad_in_a_row = 0

        # metrics, averaged over processes
        valid_f = valid.float()
        ndcg = group_ndcg(ranks_from_scores(batch.seq_logp.cpu()), oracle_rank, dcg_kind)
        tied = (oracle_rank == oracle_rank[:, :1]).all(-1).float()
        correct = [float(sample_correct(s, r)) for s, group in zip(samples, batch.responses) for r in group]
        lengths = batch.completion_mask.sum(-1).float()
        mean_stat = lambda key: sum(s[key] for s in iteration_stats) / max(1, len(iteration_stats))
        local = [sum(losses) / max(1, len(losses)), advantages.abs().mean().item(),
                 (ndcg * valid_f).sum().item() / max(1.0, valid_f.sum().item()),
                 (tied * valid_f).sum().item() / max(1.0, valid_f.sum().item()),
                 (oracle_rank.float().mean(-1) * valid_f).sum().item() / max(1.0, valid_f.sum().item()),
                 sum(correct) / max(1, len(correct)), mean_stat("kl"), mean_stat("clip_fraction"), mean_stat("ratio"),
                 (batch.entropy * batch.completion_mask).sum().item() / max(1.0, batch.completion_mask.sum().item()),
                 lengths.mean().item(), batch.truncated.float().mean().item()]
        names = ["loss", "mean_abs_advantage", "ndcg_agreement", "all_tied_fraction", "mean_oracle_rank",
                 "sample_accuracy", "kl", "clip_fraction", "ratio", "entropy", "response_length", "truncated_fraction"]
        averaged = [value / world for value in reduce_sum(local, device)]
        step += 1
        steps_this_run += 1
        elapsed = time.time() - step_start
        row = {"step": step, "epoch": epoch, **dict(zip(names, averaged)), "lr": lr, **counters,
               "samples_per_s": len(batch_index) * num_generations / elapsed, "seconds": time.time() - start}
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['sample_accuracy']:.2f}", ndcg=f"{row['ndcg_agreement']:.2f}")
        if bad_in_a_row >= max_bad_steps:   # after its metrics line, so the run's record is complete
            raise RuntimeError(f"{bad_in_a_row} non-finite steps in a row at step {step}; stopping. "
                               f"The last good checkpoint is {latest_checkpoint(ckpt_dir)}")
        if eval_every and step % eval_every == 0 and step < total_steps and eval_samples:
            mid = evaluate(policy, eval_samples, batch_size=eval_batch_size, progress=False)
            if master:
                tqdm.write(f"step {step}: held-out accuracy {mid['accuracy']:.3f}")
                with open(os.path.join(out_dir, "evals.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, **mid}) + "\n")
        if step % save_every == 0 or step == total_steps or steps_this_run == stop_after_steps:
            save_checkpoint(ckpt_dir, policy, optimizer, train_state(), master)
        if steps_this_run == stop_after_steps and step < total_steps:
            bar.close()
            if master:
                print(f"stopped after {steps_this_run} steps (stop_after_steps); --resume=True continues")
            return None
    bar.close()
    timings["rl"] = time.time() - tick

    tick = time.time()
    after = evaluate(policy, eval_samples, batch_size=eval_batch_size, progress=master) if eval_samples else {}
    timings["eval_after"] = time.time() - tick
    timings["total"] = time.time() - start
    results = {"before": before, "after": after, "config": config, "seconds": timings, "counters": counters}
    if master:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        if before and after:
            print(format_comparison(before, after, names=("before (SFT)", f"after ({advantage})")))
        print(f"wrote {out_dir}/results.json; {counters}; {timings['total']:.0f} s in all")
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
