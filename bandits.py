"""
Two bandits: what each rank advantage does to a policy, in seconds, with no model and no video.

$ python bandits.py        # the README's two tables (also: python experiments.py --study=bandit)

bandit: a softmax policy over `num_answers` answers of known quality; each step samples G answers for
each of `batch` prompts, an Oracle ranks them by quality (equal answers tie), and one Adam step is
taken on grpo_rank_loss. Reports expected quality / best quality before and after.
length_bandit: the same with answer LENGTH, the video run's length collapse at beta 0 in seconds.
"""
import statistics
import sys

import torch

from configurator import configure
from grpo_rank import BOUNDS, DCG_KINDS, grpo_rank_loss, rank_advantages, ranks_from_scores

# -----------------------------------------------------------------------------
# defaults, overridable as --key=value
num_seeds = 5                # seeds 0 .. num_seeds-1 per row; the README's tables are the mean over 5
steps = 300                  # Adam steps per run
# -----------------------------------------------------------------------------


def bandit(method="lambda_floor", dcg_kind="eq10", bound="symmetric", steps=300, num_answers=10,
           group_size=5, batch=8, lr=0.05, seed=0):
    """Returns (start, end): expected quality / best quality before and after training."""
    gen = torch.Generator().manual_seed(seed)
    quality = torch.randperm(num_answers, generator=gen).to(torch.get_default_dtype()) / (num_answers - 1)
    logits = torch.randn(num_answers, generator=gen).requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=lr)
    expected = lambda: (torch.softmax(logits.detach(), -1) * quality).sum().item()
    start = expected()
    for _ in range(steps):
        log_probs = torch.log_softmax(logits, -1)
        answers = torch.multinomial(log_probs.detach().exp(), batch * group_size, replacement=True,
                                    generator=gen).view(batch, group_size)
        oracle_rank = ranks_from_scores(quality[answers])
        logp = log_probs[answers]                                        # (B, G) = seq_logp, one token
        advantages = rank_advantages(oracle_rank, logp, method, dcg_kind, bound)
        loss, _ = grpo_rank_loss(logp.view(-1, 1), logp.detach().view(-1, 1), None,
                                 advantages.view(-1), torch.ones(batch * group_size, 1), beta=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return start, expected()


def length_bandit(method="lambda_floor", oracle="reference", steps=300, num_prompts=16, num_answers=6,
                  num_fillers=20, max_len=8, group_size=8, batch=16, lr=0.05, stop_logit=4.0, seed=0,
                  **advantage_options):
    """A bandit with answer LENGTH, the video run's length collapse in seconds. A response is one answer
    word (per-prompt logits), then at every position the stop token or one of `num_fillers` filler words
    (logits shared by all prompts, shifted per answer word: one "stop after the answer" habit, as a small
    LM has), cut at `max_len` tokens. The Oracle scores as oracle.py's reference Oracle: the right word
    alone 2, followed by n fillers token F1 2/(n+2) (partial credit), else 0; "graded" gives a wrong word
    1/(1+distance) as for a count. beta 0, mu 2. Returns (p_stop at start, p_stop at end, truncated
    fraction of the last 20 steps): p_stop is the mean probability of stopping right after the word."""
    gen = torch.Generator().manual_seed(seed)
    answer = torch.randint(num_answers, (num_prompts,), generator=gen)
    word_logits = 0.5 * torch.randn(num_prompts, num_answers, generator=gen)
    word_logits[torch.arange(num_prompts), answer] += 1.2                  # a weak warm start
    word_logits.requires_grad_()
    next_logits = torch.zeros(num_fillers + 1)                             # index 0: the stop token
    next_logits[0] = stop_logit
    next_logits.requires_grad_()
    habit = torch.zeros(num_answers, num_fillers + 1, requires_grad=True)
    optimizer = torch.optim.Adam([word_logits, next_logits, habit], lr=lr)
    p_stop = lambda: torch.softmax(next_logits.detach() + habit.detach(), -1)[:, 0].mean().item()
    start, truncated_history = p_stop(), []

    def token_logp(prompts, tokens, mask):                                  # (N,), (N, L), (N, L) -> (N, L)
        first = torch.log_softmax(word_logits[prompts], -1).gather(1, tokens[:, :1])
        rest = torch.log_softmax(next_logits + habit[tokens[:, 0]], -1).gather(1, tokens[:, 1:])
        return torch.cat([first, rest], 1) * mask

    for _ in range(steps):
        prompts = torch.randint(num_prompts, (batch,), generator=gen).repeat_interleave(group_size)
        with torch.no_grad():
            word = torch.multinomial(torch.softmax(word_logits[prompts], -1), 1, generator=gen)
            after = torch.multinomial(torch.softmax(next_logits + habit[word[:, 0]], -1), max_len - 1,
                                      replacement=True, generator=gen)
            stopped = after == 0
            fillers = torch.where(stopped.any(1), stopped.float().argmax(1), torch.tensor(max_len - 1))
            mask = torch.cat([torch.ones(len(prompts), 1),
                              (torch.arange(max_len - 1) <= fillers[:, None]).float()], 1)
            right = word[:, 0] == answer[prompts]
            score = torch.where(right, 2.0 / (fillers + 2.0), torch.zeros(()))
            if oracle == "graded":
                distance = (word[:, 0] - answer[prompts]).abs()
                score = torch.where(right, score, 1.0 / (1.0 + distance))
            tokens = torch.cat([word, after], 1)
            old_logp = token_logp(prompts, tokens, mask)
            advantages = rank_advantages(ranks_from_scores(score.view(batch, group_size)),
                                         old_logp.sum(1).view(batch, group_size), method, **advantage_options)
        for _ in range(2):
            loss, _ = grpo_rank_loss(token_logp(prompts, tokens, mask), old_logp, None, advantages.view(-1), mask, beta=0.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        truncated_history.append((~stopped.any(1)).float().mean().item())
    return start, p_stop(), statistics.mean(truncated_history[-20:])


def bandit_table(seeds_=range(5), steps=300):
    print(f"bandit: 10 answers, G=5, 8 groups/step, {steps} Adam steps, {len(seeds_)} seeds; "
          "expected quality / best (1.0 = always the best answer)")
    print(f"{'method':<14} {'dcg_kind':<8} {'bound':<10} {'start':>6} {'end':>6}  {'min..max over seeds':>20}")
    variants = [(method, "eq10", "symmetric") for method in ("lambda_floor", "lambda_clamp", "lambda", "pairwise_gain",
                                                             "rank_reward")]
    variants += [("paper", kind, bound) for kind in DCG_KINDS for bound in BOUNDS]
    for method, kind, bound in variants:
        runs = [bandit(method, kind, bound, steps=steps, seed=seed) for seed in seeds_]
        starts, ends = [s for s, _ in runs], [e for _, e in runs]
        print(f"{method:<14} {kind:<8} {bound:<10} {sum(starts) / len(runs):6.3f} "
              f"{sum(ends) / len(runs):6.3f}  {min(ends):9.3f} .. {max(ends):.3f}")
    print(f"\nlength bandit: an answer word, then stop or filler words (cut at 8 tokens), beta 0, {steps} steps, "
          f"{len(seeds_)} seeds;\np(stop) after the word at start -> end, and the truncated fraction of the last 20 steps")
    print(f"{'method':<14} {'oracle':<10} {'p(stop)':>14} {'truncated':>10}")
    for oracle in ("reference", "graded"):
        for method in ("lambda_floor", "lambda_clamp", "lambda", "pairwise_gain", "rank_reward", "paper"):
            runs = [length_bandit(method, oracle, steps=steps, seed=seed) for seed in seeds_]
            start, end, truncated = (statistics.mean(values) for values in zip(*runs))
            print(f"{method:<14} {oracle:<10} {start:6.2f} -> {end:4.2f} {truncated:10.2f}")


def main(argv):
    configure(argv, globals())
    bandit_table(range(num_seeds), steps)


if __name__ == "__main__":
    main(sys.argv[1:])
