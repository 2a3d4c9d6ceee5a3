"""Tests for trl_grpo_rank.py: GRPO_rank inside TRL's GRPOTrainer, on a tiny random Llama and the word-level
tokenizer (no downloads). Skipped when trl is not installed."""
import faulthandler
import gc
import json
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("trl")
from datasets import Dataset                                       # noqa: E402  (trl depends on it)
from transformers import LlamaConfig, LlamaForCausalLM             # noqa: E402
from trl import GRPOConfig                                          # noqa: E402

from grpo_rank import grpo_rank_loss, rank_advantages, ranks_from_scores   # noqa: E402
from synth import word_tokenizer                                   # noqa: E402
from trl_grpo_rank import GRPORankTrainer, as_ranking, tie_identical       # noqa: E402

QUESTIONS = [("what colour is the square ?", "red"), ("how many squares are there ?", "two"),
             ("where is the square ?", "left"), ("which colour appears first ?", "blue")]
WORKER_TIMEOUT = 120   # seconds; a 2-process run takes 10-40 s on 2 busy cores
TEMPERATURE = 0.8   # not 1: l_i must be the log-prob of what was sampled, at the sampling temperature


def tiny_lm(tokenizer, seed=0):
    """A random 2-layer Llama over the tokenizer's vocabulary (about 20k parameters)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


def grpo_config(out_dir, **options):
    defaults = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=6, max_steps=2,
                    learning_rate=1e-2, temperature=TEMPERATURE, report_to="none", use_cpu=True, save_strategy="no",
                    logging_steps=1, seed=0, disable_tqdm=True)
    return GRPOConfig(output_dir=str(out_dir), **{**defaults, **options})


def dataset(copies=2):
    return Dataset.from_list([{"prompt": q, "answer": a} for q, a in QUESTIONS] * copies)


class ShortestFirst:
    """A test Oracle, called like a TRL reward function on one group: the answer's word first, then shorter first;
    equal completions tie. Records every group it is shown."""

    def __init__(self):
        self.groups = []

    def __call__(self, prompts, completions, answer, **kwargs):
        self.groups.append({"prompts": list(prompts), "completions": list(completions), "answer": list(answer)})
        scores = [2.0 * (a in c.split()) - len(c.split()) / 10 for c, a in zip(completions, answer)]
        return ranks_from_scores(torch.tensor([scores]))[0].tolist()


def assert_whole_group(group, completion_ids, tokenizer):
    """The Oracle saw one group whole: the G completions at the group's places in TRL's batch (completion_ids, the
    G token lists there), all of one prompt, with that prompt's dataset row."""
    assert group["completions"] == tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    assert len(set(group["prompts"])) == 1 and group["answer"] == [dict(QUESTIONS)[group["prompts"][0]]] * 4


def token_logp(model, batch, temperature):
    """Token log-probs (n, L) of the batch's completions, from logits computed here (not TRL's log-prob function)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    logits = model(input_ids=ids, attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)).logits
    logits = logits[:, batch["prompt_ids"].shape[1] - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


class Recording(GRPORankTrainer):
    """Records, for each rollout, the advantages the trainer put in the batch and l_i computed independently; for each
    loss, TRL's value and grpo_rank_loss's on the same batch (computed before TRL's, on the same weights)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts, self.losses, self.extra_passes = [], [], 0

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        # every sampled token: mask_truncated_completions empties a cut-off completion's mask, which then fills its row
        sampled = batch["completion_mask"].clone()
        sampled[sampled.sum(-1) == 0] = 1
        with torch.no_grad():
            seq_logp = (token_logp(self.model, {**batch, "completion_mask": sampled}, self.temperature) * sampled).sum(-1)
        self.rollouts.append({"advantages": batch["advantages"].clone(), "seq_logp": seq_logp, "masked_rows":
                              int((batch["completion_mask"].sum(-1) == 0).sum()), "completion_ids":
                              [row[mask.bool()].tolist() for row, mask in zip(batch["completion_ids"], sampled)]})
        return batch

    def _rollout_token_logp(self, *args):
        self.extra_passes += 1
        return super()._rollout_token_logp(*args)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logp = token_logp(model, inputs, self.temperature)
        old_logp = inputs.get("old_per_token_logps", logp.detach())
        ours, _ = grpo_rank_loss(logp, old_logp, inputs.get("ref_per_token_logps"), inputs["advantages"],
                                 inputs["completion_mask"], epsilon=self.args.epsilon, beta=self.beta,
                                 loss_type=self.loss_type, max_completion_length=self.max_completion_length,
                                 num_items=inputs["num_items_in_batch"] / self.accelerator.num_processes,
                                 use_bias_correction_kl=self.args.use_bias_correction_kl)
        theirs = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append((theirs.item(), ours.item()))
        return theirs


@pytest.mark.parametrize("setting", ["extra_pass", "trl_old_logps", "mask_truncated", "kl_grpo_loss"])
def test_two_steps_use_rank_advantages_and_trls_loss(setting, tmp_path):
    # extra_pass: on-policy, TRL computes no old log-probs, so l_i costs one no-grad pass; trl_old_logps: each rollout
    # is used twice (num_iterations=2), TRL computes them and l_i reuses them; mask_truncated: the same, but TRL's hide
    # the cut-off completions (mask_truncated_completions), so l_i takes the extra pass; kl_grpo_loss: beta > 0 (TRL
    # builds the reference from a path) and loss_type "grpo" instead of TRL's default "dapo"
    tokenizer = word_tokenizer()
    model, options = tiny_lm(tokenizer), {}
    if setting in ("trl_old_logps", "mask_truncated"):
        options = dict(num_iterations=2, max_steps=4, mask_truncated_completions=setting == "mask_truncated")
    elif setting == "kl_grpo_loss":
        model.save_pretrained(tmp_path / "tiny")
        model, options = str(tmp_path / "tiny"), dict(beta=0.04, loss_type="grpo")
    oracle = ShortestFirst()
    trainer = Recording(model, args=grpo_config(tmp_path / "out", **options), train_dataset=dataset(),
                        processing_class=tokenizer, oracle=oracle)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()

    assert len(trainer.rollouts) == 2 and len(oracle.groups) == 4          # 2 rollouts x 2 groups of G = 4
    assert trainer.extra_passes == (0 if setting == "trl_old_logps" else 2)
    for r, rollout in enumerate(trainer.rollouts):
        groups = oracle.groups[2 * r:2 * r + 2]
        for b, group in enumerate(groups):
            assert_whole_group(group, rollout["completion_ids"][4 * b:4 * b + 4], tokenizer)
        ranks = torch.tensor([as_ranking(ShortestFirst()(**group), 4) for group in groups])
        seq_logp = tie_identical(rollout["seq_logp"].view(2, 4), rollout["completion_ids"])
        expected = rank_advantages(ranks, seq_logp, "lambda_floor")
        assert rollout["advantages"].abs().sum() > 0                       # the check below can fail
        assert (rollout["masked_rows"] > 0) == (setting == "mask_truncated")
        assert torch.allclose(rollout["advantages"], expected.view(-1), atol=1e-6), (rollout["advantages"], expected)
    for theirs, ours in trainer.losses:
        assert theirs == pytest.approx(ours, rel=1e-5, abs=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))   # it trained


def test_reward_functions_are_a_scorer_and_bad_rankings_fail_only_their_group(tmp_path):
    # no Oracle: the weighted sum of TRL's reward functions is ranked within each group
    tokenizer = word_tokenizer()

    def length_reward(completions, **kwargs):
        return [float(len(c.split())) for c in completions]

    def answer_reward(completions, answer, **kwargs):
        return [float(a in c.split()) for c, a in zip(completions, answer)]

    trainer = Recording(tiny_lm(tokenizer), [length_reward, answer_reward], args=grpo_config(
        tmp_path / "a", max_steps=1, reward_weights=[-0.1, 2.0]), train_dataset=dataset(), processing_class=tokenizer)
    trainer.train()
    rollout, table = trainer.rollouts[0], trainer._logs
    scores = torch.tensor([-0.1 * l + 2.0 * a for l, a in zip(table["rewards"]["length_reward"],
                                                              table["rewards"]["answer_reward"])]).view(2, 4)
    expected = rank_advantages(ranks_from_scores(scores), tie_identical(rollout["seq_logp"].view(2, 4),
                                                                        rollout["completion_ids"]))
    assert torch.allclose(rollout["advantages"], expected.view(-1), atol=1e-6)
    assert list(table["advantages"]) == pytest.approx(expected.view(-1).tolist())   # the logged ones are ours

    # an Oracle reply that is not a ranking: that group gets zero advantages, a warning naming it, a count
    replies = iter([[0, 1, 2], [0, 1, 1, 3]])   # group 0: three ranks for four completions
    trainer = Recording(tiny_lm(tokenizer), args=grpo_config(tmp_path / "b", max_steps=1), train_dataset=dataset(),
                        processing_class=tokenizer, oracle=lambda prompts, completions, **kwargs: next(replies),
                        rank_method="rank_reward")
    with pytest.warns(UserWarning, match=r"group 0 \(prompt .*\): the oracle replied \[0, 1, 2\]"):
        trainer.train()
    advantages = trainer.rollouts[0]["advantages"].view(2, 4)
    assert trainer.oracle_failures == 1 and torch.equal(advantages[0], torch.zeros(4))
    assert torch.allclose(advantages[1], rank_advantages(torch.tensor([[0, 1, 1, 3]]), torch.zeros(1, 4),
                                                         "rank_reward")[0], atol=1e-6)
    with pytest.raises(ValueError, match="method must be one of"):
        GRPORankTrainer(tiny_lm(tokenizer), args=grpo_config(tmp_path / "c"), train_dataset=dataset(),
                        processing_class=tokenizer, oracle=ShortestFirst(), rank_method="ndcg")


def test_identical_completions_share_l_i_and_rankings_are_checked():
    seq_logp = torch.tensor([[-1.0, -2.0, -1.0000001, -3.0]])
    tied = tie_identical(seq_logp, [[5, 6], [7], [5, 6], [5]])
    assert tied.tolist() == [[-1.0, -2.0, -1.0, -3.0]]
    assert as_ranking(torch.tensor([0, 1, 1, 3]), 4) == [0, 1, 1, 3]
    import numpy as np
    assert as_ranking(list(np.argsort([3.0, 1.0, 2.0, 0.0])), 4) == [3, 1, 2, 0]   # numpy ints, as argsort gives
    for bad in ([0, 1, 2], [0, 1, 2, 4], [0.0, 1, 2, 3], [True, 0, 1, 2], "0123", None):
        assert as_ranking(bad, 4) is None, bad


# ----------------------------------------------------------------------------- two processes (gloo)

def two_process_run(out_dir):
    """One process's part: 6 prompts per process, G = 4, so the global batch of 12 holds 3 groups and group 1
    (places 4-7) straddles the processes -> what this process saw and used."""
    tokenizer, oracle = word_tokenizer(), ShortestFirst()
    trainer = Recording(tiny_lm(tokenizer), args=grpo_config(out_dir, per_device_train_batch_size=6, max_steps=1,
                                                             ddp_backend="gloo"),
                        train_dataset=dataset(copies=3), processing_class=tokenizer, oracle=oracle)
    trainer.train()
    rollout = trainer.rollouts[0]
    return {"groups": oracle.groups, "advantages": rollout["advantages"].tolist(), "seq_logp": rollout["seq_logp"].tolist(),
            "completion_ids": rollout["completion_ids"]}


def two_process_worker(rank, world, port, out_dir):
    """One of two CPU processes (gloo): two_process_run, written to out_dir/rank{rank}.json."""
    faulthandler.dump_traceback_later(WORKER_TIMEOUT, exit=True)   # a stuck process fails the test, never hangs it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    record = two_process_run(out_dir)
    # free the trainer and its DDP model (which holds the process group) while both processes are alive: without this,
    # about 1 run in 10 hung at exit here, in a destructor (no Python frame on the stack); with it, none in 10
    gc.collect()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_processes_rank_whole_groups_once_and_keep_their_slice(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(two_process_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    # each group was ranked once, by one process (0: groups 0 and 2, 1: group 1), and it was whole
    assert [len(r["groups"]) for r in ranks] == [2, 1]
    groups = [ranks[0]["groups"][0], ranks[1]["groups"][0], ranks[0]["groups"][1]]
    # TRL's order: process 0 holds places 0-5, process 1 places 6-11; group 1 is places 4-7
    completions = [ids for r in ranks for ids in r["completion_ids"]]
    for b, group in enumerate(groups):
        assert_whole_group(group, completions[4 * b:4 * b + 4], word_tokenizer())
    seq_logp = tie_identical(torch.tensor([x for r in ranks for x in r["seq_logp"]]).view(3, 4), completions)
    oracle_rank = torch.tensor([as_ranking(ShortestFirst()(**group), 4) for group in groups])
    expected = rank_advantages(oracle_rank, seq_logp).view(-1)
    assert expected.abs().sum() > 0
    for r in range(2):   # each process kept its own slice of the whole batch's advantages
        assert torch.allclose(torch.tensor(ranks[r]["advantages"]), expected[6 * r:6 * r + 6], atol=1e-6)


def test_the_readmes_example_runs_as_written(tmp_path, monkeypatch):
    """The README's "Using GRPO_rank in TRL" example, executed as it is printed (from the repository root's
    modules, in a scratch directory so that its out/ lands there)."""
    import re
    here = os.path.dirname(os.path.abspath(__file__))
    readme = open(os.path.join(here, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Using GRPO_rank in TRL"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert os.path.isdir(tmp_path / "out" / "trl_grpo_rank")
    assert namespace["GRPORankTrainer"] is GRPORankTrainer
