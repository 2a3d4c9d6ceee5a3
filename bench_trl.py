"""
The cost of GRPO_rank in TRL: the step time of trl_grpo_rank.GRPORankTrainer (an Oracle ranks each group) vs TRL's
plain GRPOTrainer (the same scores as a reward function), on the same tiny random Llama, same data, same seed, at
learning rate 0: both sample the same completions every step, so they do the same work but for what GRPO_rank adds.
Rounds alternate plain, rank / rank, plain; each round trains a fresh trainer for --steps steps and takes the mean
CPU time of the steps after the first two (one thread); the figure is the median round.

  on-policy      num_iterations=1 (TRL's default): TRL computes no old log-probs, so l_i costs one extra no-grad pass
  reused batch   num_iterations=2: TRL computes the old log-probs itself, l_i reuses them (no extra pass)

$ python bench_trl.py                      # ~2 min on 2 cores; --hidden=256 --layers=4 for a larger LM
"""
import statistics
import sys
import time

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from configurator import configure
from grpo_rank import ranks_from_scores
from synth import QUESTIONS, word_tokenizer
from trl_grpo_rank import GRPORankTrainer

# -----------------------------------------------------------------------------
# defaults, overridable as --key=value
rounds = 5
steps = 12                   # steps per round (the first two are not timed)
hidden = 64                  # the random Llama's width and depth
layers = 2
batch = 16                   # completions per step (per_device_train_batch_size)
group_size = 8               # G
max_completion_length = 16
threads = 1
# -----------------------------------------------------------------------------


def score(completions):
    """What both trainers optimise: shorter completions with more distinct words (a stand-in for a judge)."""
    return [len(set(c.split())) - 0.5 * len(c.split()) for c in completions]


def reward(completions, **kwargs):
    """The scores as a TRL reward function (plain GRPOTrainer)."""
    return score(completions)


def oracle(prompts, completions, **kwargs):
    """The same scores as an Oracle: competition ranks of one group, 0 = best."""
    return ranks_from_scores(torch.tensor([score(completions)]))[0].tolist()


class StepTimes(TrainerCallback):
    """CPU time of every optimizer step (generation, scoring and the update), and of the extra l_i passes in it. CPU
    time of this one-thread process, not wall time: the development machines are shared, and wall times there vary up
    to 5x between stretches (the design notes); the CPU time of one thread barely moves."""

    def __init__(self):
        self.times, self.last, self.extra_pass = [], None, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.last = self.last or time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.process_time()
        self.times.append(now - self.last)
        self.last = now

    def timed(self, method):
        """method, with its CPU time added to self.extra_pass."""
        def run(*args, **kwargs):
            start = time.process_time()
            result = method(*args, **kwargs)
            self.extra_pass += time.process_time() - start
            return result
        return run


def mean_step_time(variant, options):
    """Train a fresh trainer (variant "plain" or "rank") for `steps` steps -> (mean CPU seconds per step after the
    first two, CPU seconds of the extra l_i passes per step over all steps)."""
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    rows = Dataset.from_list([{"prompt": q} for questions in QUESTIONS.values() for q in questions] * 8)
    args = GRPOConfig(output_dir="out/bench_trl", per_device_train_batch_size=batch, num_generations=group_size,
                      max_completion_length=max_completion_length, max_steps=steps, learning_rate=0.0,
                      report_to="none", use_cpu=True, save_strategy="no", logging_steps=10 ** 6, seed=0,
                      disable_tqdm=True, **options)
    timer = StepTimes()
    if variant == "plain":
        trainer = GRPOTrainer(model, reward, args=args, train_dataset=rows, processing_class=tokenizer, callbacks=[timer])
    else:
        trainer = GRPORankTrainer(model, args=args, train_dataset=rows, processing_class=tokenizer, callbacks=[timer],
                                  oracle=oracle)
        trainer._rollout_token_logp = timer.timed(trainer._rollout_token_logp)
    trainer.remove_callback(PrinterCallback)   # no metrics printout
    trainer.train()
    return statistics.mean(timer.times[2:]), timer.extra_pass / len(timer.times)


def main(argv):
    configure(argv, globals())
    torch.set_num_threads(threads)
    print(f"Llama hidden {hidden} x {layers} layers, {batch} completions per step (G = {group_size}), "
          f"up to {max_completion_length} tokens, {threads} thread(s), {rounds} rounds of {steps} steps")
    for name, options in (("on-policy", {}), ("reused batch", {"num_iterations": 2})):
        times, extra = {"plain": [], "rank": []}, []
        for round_index in range(rounds):
            for variant in (("plain", "rank") if round_index % 2 == 0 else ("rank", "plain")):
                step, extra_pass = mean_step_time(variant, options)
                times[variant].append(step)
                extra += [extra_pass] if variant == "rank" else []
        plain, rank = statistics.median(times["plain"]), statistics.median(times["rank"])
        print(f"{name:13s} GRPOTrainer {1000 * plain:6.1f} ms/step   GRPORankTrainer {1000 * rank:6.1f} ms/step   "
              f"ratio {rank / plain:.2f}   (extra l_i pass {1000 * statistics.median(extra):5.1f} ms/step)")


if __name__ == "__main__":
    main(sys.argv[1:])
