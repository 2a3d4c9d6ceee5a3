"""
One step of Algorithm 1 (lines 5-10), the one implementation: train.py's loop, bench.py and
bench_gpu.py call `train_step`.

    samples -> decode their videos                                       line 5
            -> G responses per prompt, l_i under the rollout policy      lines 6, 8 (rollout.py)
            -> Oracle ranks of each whole group                          line 7 (oracle.py)
            -> advantages from the ranks and the policy's own ranking    line 9 (grpo_rank.py)
            -> mu optimizer steps on the clipped objective (Eq. 6)       line 10

Under torchrun each process runs the step on its own prompts (whole groups: the Oracle always
ranks all G responses of a prompt) and the processes agree, through all-reduces, on skipping a
non-finite step and on the metrics. Sharding the policy (FSDP2) is `shard` below.
"""
import contextlib
import copy
import time
import warnings
from dataclasses import dataclass, fields

import torch

from answers import extract_choice, normalize_answer
from configurator import all_finished, rank_and_world, reduce_sum
from data import read_videos
from grpo_rank import dcg, grpo_rank_loss, rank_advantages, ranks_from_scores
from oracle import OracleError, rank_many
from rollout import completion_logprobs, rollout


@dataclass
class StepConfig:
    """The options of one step; train.py's globals of the same names are the defaults."""
    num_generations: int              # G
    max_new_tokens: int
    temperature: float
    top_p: float
    mask_truncated_completions: bool
    advantage: str                    # grpo_rank.METHODS
    dcg_kind: str
    bound: str
    scale_rewards: str                # grpo_rank.SCALES
    floor: float                      # lambda_floor's floor (grpo_rank.FLOOR)
    ratio_policy: str                 # "rollout" | "reference": which policy Eq. 4's pi_old is
    beta: float                       # KL weight (k3)
    epsilon: float
    epsilon_high: float               # 0: same as epsilon
    entropy_coef: float
    loss_type: str                    # grpo_rank.LOSS_TYPES (TRL's names)
    use_bias_correction_kl: bool      # the KL term times the ratio (TRL's default)
    top_k: int
    repetition_penalty: float
    num_iterations: int               # mu
    grad_clip: float
    oracle_workers: int
    max_bad_video_fraction: float

    @classmethod
    def from_options(cls, options):
        """The step's options out of a dict of more (a script's globals, say)."""
        return cls(**{f.name: options[f.name] for f in fields(cls)})


def load_frames(samples, policy, clips=None):
    """Decode a batch's videos, each clip brought to the policy's input size as it is decoded (or taken
    from `clips`, a data.ClipCache). Returns (frames uint8 (B', T, S, S, 3), kept samples, failed
    samples); each failure is reported with a warning naming the sample and the file."""
    frames, kept, failures = read_videos(samples, policy.config.num_frames, policy.fit_frames, clips)
    for sample, err in failures:
        warnings.warn(f"skipping sample {sample['id']}: {err}")
    return frames, kept, [sample for sample, _ in failures]


def oracle_ranks(oracle, samples, responses, workers):
    """Oracle ranks of every group (Algorithm 1 line 7), whole groups at once and concurrently.
    Returns (oracle_rank (B, G) long, valid (B,) bool, failures: list of messages). A failed or
    invalid ranking leaves its group invalid (zero advantages); it is never replaced by a guess."""
    group_size = len(responses[0])
    oracle_rank = torch.zeros(len(samples), group_size, dtype=torch.long)
    valid = torch.zeros(len(samples), dtype=torch.bool)
    failures = []
    if hasattr(oracle, "rank_many"):   # the Oracle's own: a judge numbers its shuffles in input order,
        results = oracle.rank_many(samples, responses, max_workers=workers)   # a local RM runs in one thread
    else:
        results = rank_many(oracle, samples, responses, max_workers=workers)
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


def sample_correct(sample, response):
    """Is a sampled response right? (A training-curve metric; the Oracle may grade differently.)"""
    if sample.get("options"):
        return extract_choice(response, sample["options"]) == sample["answer"]
    return normalize_answer(response) == normalize_answer(sample["answer"])


def group_ndcg(policy_rank, oracle_rank, dcg_kind="eq10"):
    """nDCG of the policy's ordering of a group (1: as the Oracle orders it): (B, G), (B, G) -> (B,)."""
    gain = dcg(oracle_rank, dcg_kind)
    return (gain * dcg(policy_rank, dcg_kind)).sum(-1) / (gain * gain).sum(-1)


def global_batch_indices(num_samples, epoch, step_in_epoch, global_batch, seed):
    """The prompts of one step across all processes: a slice of the epoch's permutation, which
    depends only on (seed, epoch), so a resumed run continues with the same data. -> (global_batch,)"""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[step_in_epoch * global_batch:(step_in_epoch + 1) * global_batch]


def prompts_of_process(batch_index, rank, world):
    """This process's prompts: whole prompts, never parts of a group. Each process samples all G
    responses of its prompts itself, so the Oracle always ranks complete groups. -> list of ints"""
    return batch_index[rank::world].tolist()


def shard(policy):
    """FSDP2: every decoder layer is a sharded group, and the whole policy is the root group (vision
    tower, embeddings, projectors, LM head). The policy is used through encode_video, generate and
    completion_logits rather than forward, so those are registered as the root's forward methods:
    each call gathers the root's parameters and reshards them after."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for lm in [policy.lm] + ([policy.ref_lm] if policy.ref_lm is not None else []):
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        layer_names = set(getattr(base, "_no_split_modules", None) or [])
        for module in list(lm.modules()):
            if type(module).__name__ in layer_names:
                fully_shard(module)
    fully_shard(policy, reshard_after_forward=True)
    for method in ("encode_video", "generate", "completion_logits"):
        register_fsdp_forward_method(policy, method)


class PhaseTimer:
    """Wall seconds per named phase (summed when a phase is entered again): `with timer("forward"):`.
    On CUDA every start and stop waits for the queued kernels. Passed to train_step by the benches."""

    def __init__(self, cuda=False):
        self.cuda, self.seconds = cuda, {}

    @contextlib.contextmanager
    def __call__(self, name):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, obj, method, name):
        """Time every call of obj.method under `name` (an instance attribute wrapping the bound method,
        as FSDP's register_fsdp_forward_method does), so the code calling it runs unchanged."""
        original = getattr(obj, method)

        def timed(*args, **kwargs):
            with self(name):
                return original(*args, **kwargs)
        setattr(obj, method, timed)


def optimise(policy, optimizer, batch, advantages, old_logp, ref_logp, config, phase):
    """Algorithm 1 line 10: mu passes of the clipped objective (Eq. 6) over one rollout. advantages: (B*G,);
    old_logp, ref_logp: (B*G, L) (ref_logp None without the KL term). A non-finite loss or gradient skips
    the step on every process, and a skipped step changes nothing: the weights and optimizer state of
    before its first update are put back. -> (losses, loss stats per pass, whether the step was skipped)"""
    device = policy.device
    losses, loss_stats, nonfinite, before = [], [], False, None
    num_items = reduce_sum([batch.loss_mask.sum().item()], device)[0] / rank_and_world()[1]   # "dapo": all tokens
    for _ in range(config.num_iterations):
        with phase("forward"):
            logp = completion_logprobs(policy, batch, with_entropy=config.entropy_coef != 0)
            logp, entropy = logp if isinstance(logp, tuple) else (logp, None)
            loss, stats = grpo_rank_loss(logp, old_logp, ref_logp if config.beta != 0 else None, advantages,
                                         batch.loss_mask, config.epsilon, config.epsilon_high or None, config.beta,
                                         entropy, config.entropy_coef, config.loss_type, config.max_new_tokens,
                                         num_items, config.use_bias_correction_kl)
            nonfinite = reduce_sum([float(not torch.isfinite(loss))], device)[0] > 0   # all processes skip together
        if nonfinite:
            break
        with phase("optimizer"):
            optimizer.zero_grad(set_to_none=True)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), config.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            if not torch.isfinite(grad_norm):
                nonfinite = True
                break
            if before is None and config.num_iterations > 1:
                before = ([p.detach().clone() for p in policy.trainable_parameters()],
                          copy.deepcopy(optimizer.state_dict()))
            optimizer.step()
        losses.append(loss.item())
        loss_stats.append(stats)
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        if before is not None:
            with torch.no_grad():
                for param, saved in zip(policy.trainable_parameters(), before[0]):
                    param.copy_(saved)
            optimizer.load_state_dict(before[1])
    return losses, loss_stats, nonfinite


def train_step(policy, optimizer, samples, oracle, config, lr, generator, step=0, timer=None, clips=None):
    """Algorithm 1 lines 5-10 on this process's prompts. policy: VideoLM (LoRA, reference snapshot
    taken); samples: B dataset rows; config: StepConfig; lr: this step's learning rate; generator:
    the sampling RNG; step: for messages; timer: name -> context manager timing that phase (bench);
    clips: a data.ClipCache of decoded videos, or None.
    Returns the step's metrics: means over all processes, fault counts summed over them, and
    "nonfinite_step" (the optimizer steps were skipped: a loss or gradient was not finite)."""
    phase = timer or (lambda name: contextlib.nullcontext())
    device, group_size = policy.device, config.num_generations
    with phase("data"):                                                        # line 5
        frames, samples, failed = load_frames(samples, policy, clips)
        # every process takes part in every forward (FSDP): one left without a readable video stops them all
        failed_total, seen_total, empty = reduce_sum([len(failed), len(failed) + len(samples), float(not samples)],
                                                     device)
        if failed_total > config.max_bad_video_fraction * seen_total or empty:
            raise RuntimeError(f"step {step}: {int(failed_total)} of {int(seen_total)} videos failed to decode (more "
                               f"than {config.max_bad_video_fraction:.0%}, or all of one process's), e.g. "
                               f"{[s['video'] for s in failed[:3]]}")
    with phase("rollout"):                                                     # lines 6 and 8
        batch = rollout(policy, samples, frames, group_size, config.max_new_tokens,   # encode_video moves frames
                        config.mask_truncated_completions, generator, all_finished, temperature=config.temperature,
                        top_p=config.top_p, top_k=config.top_k, repetition_penalty=config.repetition_penalty)
    with phase("oracle"):                                                      # line 7
        oracle_rank, valid, failures = oracle_ranks(oracle, samples, batch.responses, config.oracle_workers)
        for message in failures:
            warnings.warn(message)
    with phase("advantages"):   # line 9 (predicted ranks from l_i) happens inside rank_advantages
        finite = torch.isfinite(batch.seq_logp.cpu()).all(-1)
        if not finite.all():    # a non-finite l_i cannot be ranked: that group is skipped and counted
            warnings.warn(f"step {step}: non-finite sequence log-probs for samples "
                          f"{[s['id'] for s, ok in zip(samples, finite.tolist()) if not ok]}; their groups get zero advantages")
            valid &= finite
        advantages = torch.zeros(len(samples), group_size)                    # failed groups keep zeros
        if valid.any():
            advantages[valid] = rank_advantages(oracle_rank[valid], batch.seq_logp[valid].cpu(), config.advantage,
                                                config.dcg_kind, config.bound, config.scale_rewards, config.floor)
        advantages = advantages.to(device).view(-1)
    with phase("reference"):
        ref_logp = None
        if config.beta != 0 or config.ratio_policy == "reference":
            with torch.no_grad():
                ref_logp = completion_logprobs(policy, batch, reference=True)
        old_logp = batch.old_logp if config.ratio_policy == "rollout" else ref_logp   # Eq. 4's pi_old
    with phase("optimizer"):
        for group in optimizer.param_groups:
            group["lr"] = lr
        policy.train()

    losses, loss_stats, nonfinite = optimise(policy, optimizer, batch, advantages, old_logp, ref_logp, config, phase)

    with phase("metrics"):   # means over this process's groups, then over processes
        valid_groups = max(1.0, valid.float().sum().item())
        over_valid = lambda values: (values * valid.float()).sum().item() / valid_groups
        mean = lambda values: sum(values) / max(1, len(values))
        correct = [float(sample_correct(s, r)) for s, group in zip(samples, batch.responses) for r in group]
        local = {"loss": mean(losses), "mean_abs_advantage": advantages.abs().mean().item(),
                 "ndcg_agreement": over_valid(group_ndcg(ranks_from_scores(batch.seq_logp.cpu()), oracle_rank, config.dcg_kind)),
                 "all_tied_fraction": over_valid((oracle_rank == oracle_rank[:, :1]).all(-1).float()),
                 "mean_oracle_rank": over_valid(oracle_rank.float().mean(-1)),
                 "sample_accuracy": mean(correct),
                 **{key: mean([s[key] for s in loss_stats]) for key in ("kl", "clip_fraction", "ratio")},
                 "entropy": (batch.entropy * batch.completion_mask).sum().item() / max(1.0, batch.completion_mask.sum().item()),
                 "response_length": batch.completion_mask.sum(-1).float().mean().item(),
                 "truncated_fraction": batch.truncated.float().mean().item()}
        world = rank_and_world()[1]
        metrics = dict(zip(local, [value / world for value in reduce_sum(local.values(), device)]))
        counts = reduce_sum([len(failures), float((~finite).sum()), failed_total], device)
        metrics.update(oracle_failures=int(counts[0]), nonfinite_groups=int(counts[1]), skipped_samples=int(counts[2]),
                       nonfinite_step=nonfinite, samples=int(seen_total) * group_size)
    return metrics
