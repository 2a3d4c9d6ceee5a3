"""
GRPO_rank: rank-based advantages and the clipped GRPO loss (Oracle-RLAIF, Sec. 4). An Oracle ranks the G
responses the policy sampled for a prompt; this file turns the ranks into advantages and those into a loss.
Pure torch, no project imports: copy it. Ranks are integer (B, G) tensors, B prompts of G responses, 0 = best;
ties share their best rank (scores 9, 7, 7, 3: 0, 1, 1, 3). Where the paper is inconsistent, each choice is a keyword:
  dcg_kind  "eq10" 1/log2(2+r) (Eq. 10, default) | "eq11" 1/((1+r) log2(2+r)) | "table3" log2(2+r)/(1+r) (fits Table 3)
  bound     "symmetric" min/max of the two DCGs, delta in [0, 1) as the paper states (default) | "literal" Eq. 9 as printed
  method    "lambda_floor" (default) | "lambda" | "lambda_clamp" | "paper" (Eq. 7-8 as printed) | "rank_reward" (Eq. 5)
            | "pairwise_gain": see rank_advantages. "paper" rewards the policy's ranking for *agreeing* with the
            Oracle's, not a response for being good: it fails where the others learn (README, Results).
"""
import torch

DCG_KINDS, BOUNDS, LOSS_TYPES = ("eq10", "eq11", "table3"), ("symmetric", "literal"), ("grpo", "bnpo", "dr_grpo", "dapo")
METHODS = ("lambda", "lambda_floor", "lambda_clamp", "paper", "rank_reward", "pairwise_gain")
SCALES = ("group", "batch", "none")
FLOOR = 0.1    # lambda_floor, lambda_clamp: the least push an ordered pair gets, per unit of gain gap


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_ranks(name, rank, group_size):
    if rank.dtype.is_floating_point or rank.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of ranks, got dtype {rank.dtype}")
    if rank.numel() and (rank.min() < 0 or rank.max() >= group_size):
        raise ValueError(f"{name} must hold ranks in [0, {group_size}) (0 = best), "
                         f"got values in [{int(rank.min())}, {int(rank.max())}]")


def dcg(rank, kind="eq10"):
    """Discounted gain of a rank. rank: integer tensor, any shape -> float tensor, same shape."""
    _check_choice("dcg_kind", kind, DCG_KINDS)
    r = rank.to(torch.get_default_dtype())
    log_term = torch.log2(2.0 + r)                 # the discount of rank r (0 = best) in all three
    if kind == "eq10":
        return 1.0 / log_term                      # Eq. 10
    if kind == "eq11":
        return 1.0 / ((1.0 + r) * log_term)        # Eq. 11
    return log_term / (1.0 + r)                    # reproduces Table 3 and the Sec. 4 examples


def ranks_from_scores(scores):
    """Competition ranks, higher score = better: (B, G) float -> (B, G) long. The rank of i is the
    number of strictly higher scores, its position in Algorithm 1 line 9's "argsort_desc"."""
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (B, G), got {tuple(scores.shape)}")
    return (scores.unsqueeze(1) > scores.unsqueeze(2)).sum(-1)   # [b, i] = #{j : s_j > s_i}


def ndcg_penalty(policy_rank, oracle_rank, dcg_kind="eq10", bound="symmetric"):
    """delta_i = 1 - nDCG_i (Eq. 9). policy_rank, oracle_rank: (B, G) long -> delta (B, G) float."""
    _check_choice("bound", bound, BOUNDS)
    if policy_rank.shape != oracle_rank.shape or policy_rank.dim() != 2:
        raise ValueError(f"policy_rank {tuple(policy_rank.shape)}, oracle_rank {tuple(oracle_rank.shape)}: need (B, G) both")
    for name, rank in (("policy_rank", policy_rank), ("oracle_rank", oracle_rank)):
        _check_ranks(name, rank, oracle_rank.shape[1])
    dcg_pred, dcg_true = dcg(policy_rank, dcg_kind), dcg(oracle_rank, dcg_kind)
    if bound == "literal":
        return 1.0 - dcg_pred / dcg_true           # Eq. 9 as printed: > 1 when the policy ranks i higher
    return 1.0 - torch.minimum(dcg_pred, dcg_true) / torch.maximum(dcg_pred, dcg_true)


def rank_advantages(oracle_rank, seq_logp, method="lambda_floor", dcg_kind="eq10", bound="symmetric", scale_rewards="group",
                    floor=FLOOR):
    """Advantages from Oracle ranks. oracle_rank: (B, G) long; seq_logp: (B, G) float, l_i of Algorithm 1
    line 8 -> advantages (B, G) float, no gradient, zero-sum per group. Ranks with ties are read as
    competition ranks (dense 0, 0, 1 -> 0, 0, 2). scale_rewards (TRL's): rank_reward and pairwise_gain
    are divided by the std + 1e-4 of their group ("group"), of the batch ("batch"), or not ("none").
    floor: lambda_floor's and lambda_clamp's FLOOR."""
    for name, value, choices in (("method", method, METHODS), ("dcg_kind", dcg_kind, DCG_KINDS), ("bound", bound, BOUNDS),
                                 ("scale_rewards", scale_rewards, SCALES)):
        _check_choice(name, value, choices)
    if not 0 <= floor < float("inf"):   # NaN fails too
        raise ValueError(f"floor must be finite and >= 0, got {floor}")
    if oracle_rank.dim() != 2 or seq_logp.shape != oracle_rank.shape:
        raise ValueError(f"oracle_rank {tuple(oracle_rank.shape)}, seq_logp {tuple(seq_logp.shape)}: need (B, G) both")
    group_size = oracle_rank.shape[1]
    _check_ranks("oracle_rank", oracle_rank, group_size)
    oracle_rank = ranks_from_scores(-oracle_rank.to(torch.get_default_dtype()))   # dense -> competition
    seq_logp = seq_logp.detach().to(torch.get_default_dtype())
    if not torch.isfinite(seq_logp).all():
        raise ValueError("seq_logp must be finite, got NaN or inf")
    policy_rank = ranks_from_scores(seq_logp)      # Algorithm 1 line 9
    gain, discount = dcg(oracle_rank, dcg_kind), dcg(policy_rank, dcg_kind)
    prefers = (oracle_rank.unsqueeze(2) < oracle_rank.unsqueeze(1)).to(gain.dtype)    # [b,i,j]: i above j
    gap = gain.unsqueeze(2) - gain.unsqueeze(1)                                        # [b,i,j]: g_i - g_j
    if method == "paper":   # with G = 2 and the symmetric bound both deltas are equal, so A = 0
        delta = ndcg_penalty(policy_rank, oracle_rank, dcg_kind, bound)   # Eq. 9
        return delta.mean(-1, keepdim=True) - delta                       # Eq. 7-8
    if method in ("lambda", "lambda_floor", "lambda_clamp"):
        # each pair (i, j) the Oracle orders i above j pushes i up and j down by |Delta nDCG_ij| * sigmoid(l_j - l_i): the
        # nDCG change if the policy swapped them (gains DCG(oracle rank), discounts DCG(policy rank), Eq. 9-10) times ~1
        # for a mis-ordered pair, fading as it is ordered. "lambda" collapses at beta 0: an unlikely (long) response is
        # barely pushed down. "lambda_floor" adds floor * |g_i - g_j|, escaped by none; "lambda_clamp" takes the larger.
        swap = (gap * (discount.unsqueeze(2) - discount.unsqueeze(1))).abs()
        weight, norm = torch.sigmoid(seq_logp[:, None] - seq_logp[:, :, None]), (gain * gain).sum(-1)[:, None, None]
        lambdas = swap * weight
        if method == "lambda_floor":
            lambdas = floor * gap.abs() + lambdas
        elif method == "lambda_clamp":
            lambdas = torch.maximum(floor * gap.abs(), lambdas)
        lambdas = lambdas / norm
        return (lambdas * prefers).sum(2) - (lambdas * prefers).sum(1)
    if method == "rank_reward":   # Eq. 5 on the reward (G-1-rank)/(G-1)
        reward = (group_size - 1 - oracle_rank).to(gain.dtype) / max(group_size - 1, 1)
        advantages = reward - reward.mean(-1, keepdim=True)
    else:
        # pairwise_gain: each pair the Oracle orders i above j pushes i up and j down by (g_i - g_j) * (1 + [d_j - d_i]_+),
        # g = DCG(oracle rank), d = DCG(policy rank): GRPO on the DCG gain, which no response escapes by becoming
        # unlikely, plus the nDCG the policy loses by ranking the worse response above the better (false promotion).
        regret = (discount.unsqueeze(1) - discount.unsqueeze(2)).clamp(min=0)       # [b,i,j]: d_j - d_i
        lambdas = gap * (1.0 + regret) * prefers
        reward = advantages = lambdas.sum(2) - lambdas.sum(1)
    if scale_rewards == "none":
        return advantages
    std = reward.std(-1, keepdim=True) if scale_rewards == "group" else reward.std()
    return advantages / (std.nan_to_num(0.0) + 1e-4)        # TRL's scale: an all-tied group stays 0


def masked_mean(values, mask, loss_type="grpo", max_completion_length=None, num_items=None):
    """values, mask: (N, L) -> scalar, normalised as TRL's loss_type: "grpo" mean over each sequence's tokens,
    then over the sequences (Eq. 6's 1/|o_i| and 1/G; a row with no tokens, e.g. a masked truncated completion,
    drops out here, where TRL counts it as 0); "bnpo" mean over all tokens; "dr_grpo" sum / (N * max_completion_
    length); "dapo" sum / num_items (the tokens of all processes / their number; default: this batch's)."""
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    mask = mask.to(values.dtype)
    total = values * mask
    if loss_type == "grpo":
        tokens = mask.sum(-1)
        return (total.sum(-1) / tokens.clamp(min=1.0)).sum() / (tokens > 0).sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return total.sum() / (mask.shape[0] * (max_completion_length or mask.shape[1]))
    return total.sum() / (num_items if loss_type == "dapo" and num_items else mask.sum().clamp(min=1.0))


def grpo_rank_loss(logp, old_logp, ref_logp, advantages, mask, epsilon=0.2, epsilon_high=None, beta=0.04,
                   entropy=None, entropy_coef=0.0, loss_type="grpo", max_completion_length=None, num_items=None,
                   use_bias_correction_kl=False):
    """The negative GRPO_rank objective (Eq. 6) and detached stats. logp: (N, L) token log-probs under the
    policy being trained (with grad); old_logp: (N, L) under the policy the ratio is taken against (Eq. 4);
    ref_logp: (N, L) under the reference policy of the KL term (None when beta = 0); advantages: (N,); mask:
    (N, L), 1 on completion tokens; entropy: (N, L) per-token entropy (with grad) for the bonus, or None;
    loss_type etc.: masked_mean; use_bias_correction_kl: the KL term times the ratio (TRL's default)."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape (N, L), got {tuple(logp.shape)}")
    for name, tensor in {"old_logp": old_logp, "mask": mask, "ref_logp": ref_logp, "entropy": entropy}.items():
        if tensor is not None and tensor.shape != logp.shape:
            raise ValueError(f"{name} must have the shape of logp {tuple(logp.shape)}, got {tuple(tensor.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must have shape ({logp.shape[0]},), got {tuple(advantages.shape)}")
    if ref_logp is None and beta != 0:
        raise ValueError("ref_logp is required when beta != 0")
    ratio, adv = torch.exp(logp - old_logp.detach()), advantages.detach().unsqueeze(-1)          # Eq. 4
    objective = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high) * adv)  # Eq. 6, clip
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        log_ref_ratio = ref_logp.detach() - logp
        # k3 estimator of D_KL[pi_theta || pi_ref] (DeepSeekMath's GRPO); Eq. 3/6 print D_KL[pi_old || pi_theta]
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
        objective = objective - beta * (kl * ratio if use_bias_correction_kl else kl)   # Eq. 6, - beta D_KL
    if entropy is not None and entropy_coef != 0:
        objective = objective + entropy_coef * entropy                              # Eq. 6, + c_entropy H
    loss = -masked_mean(objective, mask, loss_type, max_completion_length, num_items)

    with torch.no_grad():
        clipped = ((ratio < 1.0 - epsilon) & (adv < 0)) | ((ratio > 1.0 + epsilon_high) & (adv > 0))
        stats = {"clip_fraction": masked_mean(clipped.to(logp.dtype), mask, "bnpo").item(),
                 "ratio": masked_mean(ratio, mask, "bnpo").item(), "kl": masked_mean(kl, mask, "bnpo").item(),
                 "entropy": masked_mean(entropy, mask, "bnpo").item() if entropy is not None else 0.0}
    return loss, stats
