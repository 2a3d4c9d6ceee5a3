"""
GRPO_rank in TRL (tested with trl 1.16.0, transformers 5.25, torch 2.13; it extends two private methods: pin trl).
GRPORankTrainer is TRL's GRPOTrainer with advantages from an Oracle's ranking of each whole group, through
grpo_rank.rank_advantages (Algorithm 1 lines 7-9); generation, the loss, KL, logging and the processes stay TRL's.
oracle=, asked once per group (the G completions of one prompt):
  - a callable, called like a TRL reward function on one group: oracle(prompts=[G], completions=[G], **dataset
    columns) -> G ranks, 0 = best, ties sharing their best rank;
  - an object with .rank(sample, responses), e.g. oracle.py's (its .rank_many when it has one): sample = the dataset
    row, responses = the completions' text (a conversation's last message);
  - None: TRL's reward_funcs score, and each group's weighted sum of rewards is ranked (ranks_from_scores).
A reply that is not G ranks in [0, G) (or an error from rank_many) gives its group zero advantages, with a warning
naming the group; the metric oracle/failures counts them. TRL computes advantages in _generate_and_score_completions
from rewards gathered over all processes, then keeps each process's slice: a group, G consecutive places of the global
batch, may straddle two processes. So _calculate_rewards gathers all completions and ranks every whole group once, on
one process (a judge need not answer twice alike), sharing the ranks; _generate_and_score_completions swaps TRL's
advantages for rank_advantages on them and the gathered l_i, and keeps this process's slice as TRL does.
"""
import operator
import warnings

import torch
from accelerate.utils import gather_object   # accelerate is what TRL is built on and gathers with
from trl import GRPOTrainer

from grpo_rank import FLOOR, rank_advantages, ranks_from_scores

# the multimodal inputs of TRL's rollout batch, passed to the extra log-prob pass as TRL's loss passes them
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                   "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def ranked_by_oracle(completions, **kwargs):
    """Placeholder reward function (TRL requires one): with an Oracle, rewards are not used, so it logs 0."""
    return [0.0] * len(completions)


def response_text(completion):
    """A TRL completion as oracle.py's Oracles read it: the string, or the text of a conversation's last message."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def as_ranking(reply, group_size):
    """An Oracle's reply as a list of G int ranks in [0, G), or None when it is not one."""
    reply = reply.tolist() if hasattr(reply, "tolist") else reply      # a tensor or a numpy array
    if not isinstance(reply, (list, tuple)) or len(reply) != group_size or any(isinstance(r, bool) for r in reply):
        return None
    try:
        ranks = [operator.index(r) for r in reply]                      # ints, numpy ints; not floats
    except TypeError:
        return None
    return ranks if all(0 <= r < group_size for r in ranks) else None


def tie_identical(seq_logp, completion_ids):
    """Identical completions of a group get the first one's l_i bit for bit, so the same predicted rank and advantage
    (batched float arithmetic does not promise it). seq_logp: (B, G); completion_ids: B*G token lists -> (B, G)."""
    tied, (num_groups, group_size) = seq_logp.clone(), seq_logp.shape
    for b in range(num_groups):
        first = {}
        for i in range(group_size):
            tied[b, i] = tied[b, first.setdefault(tuple(completion_ids[b * group_size + i]), i)]
    return tied


class GRPORankTrainer(GRPOTrainer):
    """GRPOTrainer with GRPO_rank advantages. oracle: see the module docstring. rank_method ("lambda_floor", the
    project's default), dcg_kind, bound, floor: rank_advantages's; its scale_rewards is GRPOConfig.scale_rewards."""

    def __init__(self, *args, oracle=None, rank_method="lambda_floor", dcg_kind="eq10", bound="symmetric",
                 floor=FLOOR, **kwargs):
        if oracle is not None and len(args) < 2 and kwargs.get("reward_funcs") is None:
            kwargs["reward_funcs"] = ranked_by_oracle
        super().__init__(*args, **kwargs)
        self.oracle, self.oracle_failures = oracle, 0
        self.rank_options = dict(method=rank_method, dcg_kind=dcg_kind, bound=bound, scale_rewards=self.scale_rewards,
                                 floor=floor)
        rank_advantages(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), **self.rank_options)  # bad option: now

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (N, F) of all processes' N completions, unchanged. On the side, Algorithm 1 line 7 on every
        whole group: self._oracle_rank (N/G, G) long, self._ranked (N/G,) bool, self._failures."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        self._completion_ids = gather_object(completion_ids_list)   # all processes' completions, in TRL's order
        self._local_lengths = [len(ids) for ids in completion_ids_list]
        rows, prompts, completions = gather_object(inputs), gather_object(prompts), gather_object(completions)
        num_groups = len(prompts) // group_size
        mine = range(self.accelerator.process_index, num_groups, self.accelerator.num_processes)   # ranked here
        groups = [slice(b * group_size, (b + 1) * group_size) for b in mine]
        if self.oracle is None:   # TRL's reward functions as the scorer: their weighted sum, ranked within each group
            scores = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(1).cpu()
            unscored = rewards_per_func.isnan().all(1).cpu()          # None from every reward function: no score
            replies = [None if unscored[g].any() else ranks_from_scores(scores[None, g])[0] for g in groups]
        elif hasattr(self.oracle, "rank_many"):   # oracle.py's: concurrent, a failed group's OracleError in its slot
            replies = self.oracle.rank_many([rows[g.start] for g in groups],
                                            [[response_text(c) for c in completions[g]] for g in groups])
        elif hasattr(self.oracle, "rank"):
            replies = [self.oracle.rank(rows[g.start], [response_text(c) for c in completions[g]]) for g in groups]
        else:
            replies = [self.oracle(prompts=prompts[g], completions=completions[g], **{
                key: [row[key] for row in rows[g]] for key in rows[g.start] if key not in ("prompt", "completion")})
                for g in groups]
        self._oracle_rank = torch.zeros(num_groups, group_size, dtype=torch.long)
        self._ranked, self._failures = torch.zeros(num_groups, dtype=torch.bool), []
        for b, reply, ranking in gather_object([(b, repr(reply)[:200], as_ranking(reply, group_size))
                                                for b, reply in zip(mine, replies)]):   # all groups, on every process
            if ranking is None:
                self._failures.append(f"group {b} (prompt {prompts[b * group_size]!r:.80}): the "
                                      f"{'oracle' if self.oracle else 'reward functions'} replied {reply}, "
                                      f"not {group_size} ranks in [0, {group_size})")
            else:
                self._oracle_rank[b], self._ranked[b] = torch.tensor(ranking), True
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        """TRL's rollout batch of this process's n completions, its advantages (n,) replaced by GRPO_rank's: those of
        rank_advantages over all processes' groups, this process's slice kept (TRL's order, as TRL slices its own)."""
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        n, process = len(self._local_lengths), self.accelerator.process_index
        seq_logp = self._rollout_seq_logp(output, mode)                         # (N/G, G) l_i, Algorithm 1 line 8
        finite = torch.isfinite(seq_logp).all(-1)
        failures = self._failures + [f"group {b}: non-finite sequence log-probs"
                                     for b in (self._ranked & ~finite).nonzero().flatten().tolist()]
        ranked, advantages = self._ranked & finite, torch.zeros_like(seq_logp)   # a failed group keeps zeros
        if ranked.any():   # line 9 (the policy's ranks from l_i) happens inside rank_advantages
            advantages[ranked] = rank_advantages(self._oracle_rank[ranked], seq_logp[ranked], **self.rank_options)
        output["advantages"] = advantages.view(-1)[process * n:(process + 1) * n].to(output["advantages"])

        for message in failures if process == 0 else []:   # every process holds them all: say each once
            warnings.warn(f"GRPORankTrainer: {message}; that group gets zero advantages")
        self.oracle_failures += len(failures)
        self._metrics[mode]["oracle/failures"].append(float(len(failures)))
        tied = (self._oracle_rank[ranked] == self._oracle_rank[ranked][:, :1]).all(-1)   # no signal in the group
        self._metrics[mode]["oracle/tied_groups"].append(tied.float().mean().nan_to_num().item())
        logged = self._logs["advantages"]        # the completions table shows the advantages used, not TRL's
        for _ in range(min(advantages.numel(), len(logged))):
            logged.pop()
        logged.extend(advantages.view(-1).tolist())
        return output

    def _rollout_seq_logp(self, output, mode):
        """l_i (N/G, G) of all processes' completions: the log-prob of every token the rollout policy sampled, from
        TRL's own old log-probs where it computed them (a batch used more than once, or vLLM), else one no-grad pass."""
        mask = output["completion_mask"]
        lengths = torch.tensor(self._local_lengths, device=mask.device)
        sampled = (torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]).long()   # (n, L), cut-off too
        token_logp = output.get("old_per_token_logps")   # with mask_truncated_completions, TRL's hide cut-off ones
        if token_logp is None or self.mask_truncated_completions:
            token_logp = self._rollout_token_logp(output, sampled, mode)
        sampled = sampled * output.get("tool_mask", 1)                    # tool outputs: not sampled by the policy
        token_logp = torch.where(sampled.bool(), token_logp.float(), 0.0)   # whatever TRL leaves on padding
        seq_logp = self.accelerator.gather(token_logp.sum(-1)).cpu()        # (N,)
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        return tie_identical(seq_logp.view(-1, group_size), self._completion_ids)

    @torch.no_grad()
    def _rollout_token_logp(self, output, sampled, mode):
        """The extra pass: token log-probs (n, L) of the sampled tokens under the policy that sampled them (its weights
        have not changed since), at TRL's temperature, through TRL's own log-prob function."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
        attention_mask = torch.cat([output["prompt_mask"], sampled], 1)
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        token_logp, _, _ = self._get_per_token_logps_and_entropies(
            self.model, input_ids, attention_mask, output["completion_ids"].shape[1], batch_size=batch_size,
            **{key: output[key] for key in MULTIMODAL_KEYS if key in output})
        return token_logp
