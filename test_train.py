"""Tests for rollout.py and train.py: Algorithm 1's invariants, resume, faults, torchrun + FSDP2."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import grpo_rank
import train
import train_step
from configurator import configure
from data import load_jsonl, write_jsonl
from grpo_rank import ranks_from_scores
from model import ModelConfig, VideoLM
from oracle import OracleError
from rollout import completion_logprobs, rollout
from sft import train_sft
from synth import make_synthetic_dataset

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = ["--batch_size=4", "--num_generations=4", "--max_new_tokens=4", "--eval_size=8", "--save_every=100",
         "--num_threads=1"]


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return make_synthetic_dataset(str(root), num_train=64, num_eval=16)


@pytest.fixture(scope="session")
def sft_dir(synth, tmp_path_factory):
    """A warm start shared by the tests: 30 SFT steps of the tiny model."""
    torch.manual_seed(0)
    policy = VideoLM(ModelConfig())
    train_sft(policy, load_jsonl(synth["train"]), steps=30, batch_size=16, progress=False)
    path = str(tmp_path_factory.mktemp("sft") / "sft")
    policy.save(path)
    return path


def run_train(*args):
    """train.main with fresh modules (monkeypatches of earlier tests gone)."""
    importlib.reload(train_step)
    module = importlib.reload(train)
    return module, module.main(list(args))


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def common(synth, sft_dir, out_dir):
    return [f"--train_data={synth['train']}", f"--eval_data={synth['eval']}", f"--sft_checkpoint={sft_dir}",
            f"--out_dir={out_dir}"] + SMALL


def small_rollout(sft_dir, synth, group_size=4, share_prefix=False):
    from train_step import load_frames
    policy = VideoLM.load(sft_dir, share_prefix=share_prefix)
    policy.add_lora(8, 16)
    policy.snapshot_reference()
    samples = load_jsonl(synth["train"])[:3]
    frames, samples, _ = load_frames(samples, policy)
    batch = rollout(policy, samples, frames, group_size, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    return policy, batch


# ----------------------------------------------------------------------------- rollout

def test_rollout_encodes_once_and_groups_are_contiguous(sft_dir, synth):
    policy, batch = small_rollout(sft_dir, synth)
    assert policy.encode_calls == 1                       # B prompts, G samples each: one encode
    assert batch.completion_ids.shape[0] == 3 * 4 and batch.seq_logp.shape == (3, 4)
    assert len(batch.responses) == 3 and all(len(group) == 4 for group in batch.responses)
    # l_i is the masked sum of the token log-probs, row b*G + i belongs to prompt b
    summed = (batch.old_logp * batch.completion_mask).sum(-1).view(3, 4)
    assert torch.allclose(batch.seq_logp, summed, atol=1e-6)
    # EOS-aware mask: ones, then zeros; a row is truncated exactly when it has no EOS
    eos = policy.tokenizer.eos_token_id
    for ids, mask, cut in zip(batch.completion_ids, batch.completion_mask, batch.truncated):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()
        assert bool(cut) == (eos not in ids[:length].tolist())


def test_predicted_ranks_follow_sequence_logprobs(sft_dir, synth):
    _, batch = small_rollout(sft_dir, synth)
    predicted = ranks_from_scores(batch.seq_logp)
    for b in range(3):
        order = batch.seq_logp[b].argsort(descending=True)
        assert predicted[b, order[0]] == 0                 # the most likely response is ranked first
        assert (predicted[b].unsqueeze(0) <= predicted[b].unsqueeze(1)).eq(
            batch.seq_logp[b].unsqueeze(0) >= batch.seq_logp[b].unsqueeze(1)).all()


@pytest.mark.parametrize("share_prefix", [False, True])
def test_ratio_is_exactly_one_on_the_first_pass(sft_dir, synth, share_prefix):
    policy, batch = small_rollout(sft_dir, synth, share_prefix=share_prefix)
    policy.train()
    logp = completion_logprobs(policy, batch)
    ratio = torch.exp(logp - batch.old_logp)[batch.completion_mask.bool()]
    assert torch.equal(ratio, torch.ones_like(ratio))


@torch.no_grad()
def test_scores_are_of_the_tempered_distribution_that_was_sampled(sft_dir, synth):
    # at T = 0.5, how often each first answer token is drawn matches exp(old_logp), the probability the
    # ratio, l_i and the entropy use; the untempered softmax would not
    from train_step import load_frames
    policy = VideoLM.load(sft_dir)
    frames, samples, _ = load_frames(load_jsonl(synth["train"])[:1], policy)
    draws = 4000
    batch = rollout(policy, samples, frames, draws, max_new_tokens=1, temperature=0.5,
                    generator=torch.Generator().manual_seed(0))
    first, reported = batch.completion_ids[:, 0], batch.old_logp[:, 0].exp()
    plain = torch.softmax(policy.completion_logits(batch.features, batch.prompt_ids, batch.prompt_mask,
                                                   batch.completion_ids, batch.completion_mask, draws)[:, 0], -1)
    gaps, plain_gaps = [], []
    for token in first.unique():
        frequency = (first == token).float().mean().item()
        gaps.append(abs(frequency - reported[first == token][0].item()))
        plain_gaps.append(abs(frequency - plain[0, token].item()))
    assert max(gaps) < 0.03 and sum(gaps) < 0.1, gaps             # L1 distance over the tokens drawn
    assert sum(plain_gaps) > 0.3, plain_gaps                        # the test tells the two apart
    assert torch.equal(completion_logprobs(policy, batch), batch.old_logp)   # every pass scores the same way


def test_reference_is_frozen_within_an_epoch_and_refreshed_at_its_start(sft_dir, synth, tmp_path):
    policy, batch = small_rollout(sft_dir, synth)
    with torch.no_grad():
        ref_before = completion_logprobs(policy, batch, reference=True)
    # a training step moves the policy but not the reference
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    (-completion_logprobs(policy, batch).sum()).backward()
    optimizer.step()
    with torch.no_grad():
        assert torch.equal(completion_logprobs(policy, batch, reference=True), ref_before)
        moved = completion_logprobs(policy, batch)
    assert not torch.allclose(moved, ref_before)
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".ref." in n or n.startswith("ref_"))
    policy.snapshot_reference()                                       # Algorithm 1 line 3
    with torch.no_grad():
        assert torch.equal(completion_logprobs(policy, batch, reference=True), moved)


# ----------------------------------------------------------------------------- train.py

def test_one_step_changes_only_lora_and_projector(synth, sft_dir, tmp_path):
    out = str(tmp_path / "out")
    run_train(*common(synth, sft_dir, out), "--max_steps=1", "--beta=0.0")
    before = VideoLM.load(sft_dir).state_dict()
    after = VideoLM.load(os.path.join(out, "ckpt", "model")).state_dict()
    changed = {name for name, tensor in after.items()
               if name in before and not torch.equal(tensor, before[name])}
    base_names = {name.replace("base_model.model.", "").replace(".base_layer", ""): name for name in after}
    for plain, name in base_names.items():
        if plain in before and "lora_" not in name and not name.startswith("projector."):
            assert torch.equal(after[name], before[plain]), f"{name} changed"
    assert any(name.startswith("projector.") for name in changed)
    assert any("lora_B.default" in name and not torch.equal(tensor, torch.zeros_like(tensor))
               for name, tensor in after.items())


def test_the_default_advantage_does_not_collapse_at_beta_0(tmp_path):
    # The length collapse of issue 16 (README, Results): without the KL term, lambda's answers run to
    # max_new_tokens within ~20 steps from this warm start; the default advantage's must not.
    data = make_synthetic_dataset(str(tmp_path / "synth"), num_train=256, num_eval=8)
    torch.manual_seed(0)
    policy = VideoLM(ModelConfig())
    train_sft(policy, load_jsonl(data["train"]), steps=100, batch_size=16, progress=False)
    policy.save(str(tmp_path / "sft"))
    default = importlib.reload(train).advantage
    assert default != "lambda"
    truncated = {}
    for method in (default, "lambda"):
        out = str(tmp_path / method)
        run_train(f"--train_data={data['train']}", f"--eval_data={data['eval']}", f"--sft_checkpoint={tmp_path / 'sft'}",
                  f"--out_dir={out}", "--batch_size=8", "--eval_size=8", "--save_every=100", "--num_threads=1",
                  "--beta=0", f"--advantage={method}", "--max_steps=40", "--epochs=10")
        truncated[method] = [row["truncated_fraction"] for row in read_metrics(out)]
    assert max(truncated[default]) < 0.2 and sum(truncated[default][-10:]) / 10 < 0.05, truncated[default]
    assert sum(truncated["lambda"][-10:]) / 10 > 0.5, truncated["lambda"]   # the test sees a collapse


def test_main_job_writes_results_metrics_and_checkpoint(synth, sft_dir, tmp_path):
    out = str(tmp_path / "out")
    _, results = run_train(*common(synth, sft_dir, out), "--max_steps=2")
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    for key in ("before", "after", "config", "seconds"):
        assert key in saved
    assert 0.0 <= saved["before"]["accuracy"] <= 1.0 and saved["before"]["by_category"]
    assert saved["before"]["n"] == 8                         # eval_size of the eval split
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "mean_abs_advantage", "ndcg_agreement", "all_tied_fraction", "kl", "entropy",
                "clip_fraction", "response_length", "oracle_failures", "skipped_samples", "samples_per_s", "seconds"):
        assert key in rows[0]
    assert os.path.exists(os.path.join(out, "ckpt", "model", "model.safetensors"))
    assert saved["config"]["advantage"] == "lambda_floor"


def test_resume_reproduces_the_uninterrupted_run(synth, sft_dir, tmp_path):
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    run_train(*common(synth, sft_dir, straight), "--max_steps=4")
    run_train(*common(synth, sft_dir, interrupted), "--max_steps=4", "--stop_after_steps=2")
    assert [r["step"] for r in read_metrics(interrupted)] == [1, 2]
    run_train(*common(synth, sft_dir, interrupted), "--max_steps=4", "--resume=True")
    a, b = read_metrics(straight), read_metrics(interrupted)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a[2:], b[2:]):
        assert row_a["loss"] == pytest.approx(row_b["loss"], abs=1e-5)
        assert row_a["mean_abs_advantage"] == pytest.approx(row_b["mean_abs_advantage"], abs=1e-5)


def test_oracle_failure_gives_zero_advantages_and_is_counted():
    class Flaky:
        def rank(self, sample, responses):
            if sample["id"] == "bad":
                raise OracleError("judge timed out")
            if sample["id"] == "short":
                return [0, 1]                                      # not a ranking of G responses
            return [0, 1, 1, 3]
    samples = [{"id": "ok"}, {"id": "bad"}, {"id": "short"}]
    oracle_rank, valid, failures = train_step.oracle_ranks(Flaky(), samples, [["a", "b", "c", "d"]] * 3, workers=1)
    assert valid.tolist() == [True, False, False]
    assert oracle_rank[0].tolist() == [0, 1, 1, 3] and oracle_rank[1:].eq(0).all()
    assert "sample bad" in failures[0] and "timed out" in failures[0]
    assert "invalid ranking for sample short" in failures[1]


def test_oracle_failures_counted_in_a_run(synth, sft_dir, tmp_path, monkeypatch):
    class Down:
        def rank(self, sample, responses):
            raise OracleError("connection refused")
    out = str(tmp_path / "out")
    module = importlib.reload(train)
    monkeypatch.setattr(module, "build_oracle", lambda: Down())
    with pytest.warns(UserWarning, match="oracle failed"):
        module.main(common(synth, sft_dir, out) + ["--max_steps=1", "--beta=0.0"])
    row = read_metrics(out)[0]
    assert row["oracle_failures"] == 4 and row["mean_abs_advantage"] == 0.0 and row["loss"] == 0.0


def broken_train_file(synth, tmp_path, missing):
    rows = load_jsonl(synth["train"])[:16]
    for row in rows[:missing]:
        row["video"] = str(tmp_path / f"missing-{row['id']}.mp4")
    path = str(tmp_path / "train.jsonl")
    write_jsonl(path, rows)
    return path


def test_bad_video_is_skipped_and_counted(synth, sft_dir, tmp_path):
    train_file = broken_train_file(synth, tmp_path, missing=1)
    out = str(tmp_path / "out")
    args = common(synth, sft_dir, out) + [f"--train_data={train_file}", "--batch_size=16", "--max_steps=1"]
    with pytest.warns(UserWarning, match="missing-"):
        run_train(*args)
    assert read_metrics(out)[0]["skipped_samples"] == 1


def test_too_many_bad_videos_abort_with_a_clear_message(synth, sft_dir, tmp_path):
    train_file = broken_train_file(synth, tmp_path, missing=3)
    args = common(synth, sft_dir, str(tmp_path / "out")) + [f"--train_data={train_file}", "--batch_size=16"]
    with pytest.raises(RuntimeError, match="3 of 16 videos failed to decode"), pytest.warns(UserWarning):
        run_train(*args)


def test_nonfinite_loss_skips_the_step_and_aborts_after_three(synth, sft_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    module = importlib.reload(train)
    real_loss = train_step.grpo_rank_loss
    monkeypatch.setattr(train_step, "grpo_rank_loss", lambda *a, **k: (real_loss(*a, **k)[0] * float("nan"), {}))
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row"), pytest.warns(UserWarning, match="non-finite"):
        module.main(common(synth, sft_dir, out) + ["--max_steps=5", "--save_every=1"])
    rows = read_metrics(out)
    assert [r["nonfinite_steps"] for r in rows] == [1, 2, 3]
    # no optimizer step was taken: the checkpoints hold the warm start's LoRA (B = 0) and projector
    state = VideoLM.load(os.path.join(out, "ckpt", "model")).state_dict()
    sft_state = VideoLM.load(sft_dir).state_dict()
    assert all(torch.equal(state[n], sft_state[n]) for n in sft_state if n.startswith("projector."))
    assert all(t.abs().max() == 0 for n, t in state.items() if "lora_B" in n)


def test_checkpoint_never_holds_nonfinite_weights_and_survives_a_crash(sft_dir, tmp_path, monkeypatch):
    policy = VideoLM.load(sft_dir)
    optimizer = torch.optim.AdamW(policy.trainable_parameters())
    path = str(tmp_path / "ckpt")
    generator = torch.Generator()
    checkpoint.save_training(path, policy, optimizer, generator, {"step": 1})
    with torch.no_grad():
        policy.projector[0].weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        checkpoint.save_training(path, policy, optimizer, generator, {"step": 2})
    assert checkpoint.load_state(path, "train_state")["step"] == 1
    # a crash between the two renames: the old checkpoint is still found and loads
    with torch.no_grad():
        policy.projector[0].weight[0, 0] = 0.0
    real_rename, calls = os.rename, []

    def crash_on_second(src, dst):   # killed after PATH -> PATH.old, before PATH.tmp -> PATH
        calls.append(src)
        if src == path + ".tmp":
            raise KeyboardInterrupt("killed")
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_training(path, policy, optimizer, generator, {"step": 3})
    monkeypatch.setattr(os, "rename", real_rename)
    assert path in calls                                 # the old checkpoint had been moved aside
    found = checkpoint.latest(path)
    assert found == path + ".old"
    assert checkpoint.load_state(found, "train_state")["step"] == 1
    VideoLM.load(os.path.join(found, "model"))


def test_bad_options_fail_with_clear_messages():
    with pytest.raises(SystemExit, match="unknown option 'learning_rat'.*learning_rate"):
        run_train("--learning_rat=1e-3")
    with pytest.raises(SystemExit, match="--advantage must be one of"):
        run_train("--advantage=ppo")
    with pytest.raises(SystemExit, match="--floor must be >= 0"):
        run_train("--floor=-0.1")
    with pytest.raises(SystemExit, match="--max_steps expects a int, got .ten."):
        run_train("--max_steps=ten")
    with pytest.raises(SystemExit, match="config file 'nope.py' not found"):
        run_train("nope.py")


def test_the_step_options_read_from_train_py_are_its_defaults():
    # bench.py and bench_gpu.py build the main job's StepConfig from train.py's text, without importing it
    from configurator import read_config_file
    module = importlib.reload(train)
    from_text = train_step.StepConfig.from_options(read_config_file(os.path.join(HERE, "train.py"), skip_other=True))
    assert from_text == train_step.StepConfig.from_options(vars(module))
    assert module.floor == grpo_rank.FLOOR     # experiments.py reads train.py's floor from grpo_rank


def test_config_file_and_overrides(tmp_path):
    config = tmp_path / "cfg.py"
    config.write_text("learning_rate = 3e-4\nadvantage = 'paper'\n")
    namespace = {"learning_rate": 1e-3, "advantage": "lambda", "resume": False, "max_steps": 200}
    configure([str(config), "--advantage=rank_reward", "--resume=True", "--max_steps=7"], namespace)
    options = {k: v for k, v in namespace.items() if not k.startswith("_")}
    assert options == {"learning_rate": 3e-4, "advantage": "rank_reward", "resume": True, "max_steps": 7}
    config.write_text("max_steps = '10'\n")
    with pytest.raises(SystemExit, match="cfg.py: max_steps expects a int, got '10'"):
        configure([str(config)], namespace)


# ----------------------------------------------------------------------------- torchrun + FSDP2

def test_only_explicit_runtime_options_override_a_loaded_checkpoint(tmp_path):
    module = importlib.reload(train)
    assert module.runtime_overrides(configure(["--learning_rate=1e-4"], vars(module))) == {}
    config = tmp_path / "gpu.py"
    config.write_text("dtype = 'bfloat16'\nload_in_4bit = True\n")
    given = configure([str(config), "--num_frames=50"], vars(module))
    assert module.runtime_overrides(given) == {"dtype": "bfloat16", "load_in_4bit": True, "num_frames": 50}
    importlib.reload(train)


def test_each_prompt_belongs_to_exactly_one_process():
    for world in (1, 2, 4):
        batch_index = train_step.global_batch_indices(100, epoch=1, step_in_epoch=2, global_batch=8 * world, seed=0)
        shards = [train_step.prompts_of_process(batch_index, rank, world) for rank in range(world)]
        assert sorted(sum(shards, [])) == sorted(batch_index.tolist())          # every prompt is owned ...
        assert len(set(sum(shards, []))) == len(batch_index)                    # ... by exactly one process
        assert all(len(shard) == 8 for shard in shards)
    # the permutation depends on the epoch only: a resumed run sees the same prompts
    assert torch.equal(train_step.global_batch_indices(100, 1, 3, 16, 0), train_step.global_batch_indices(100, 1, 3, 16, 0))
    assert not torch.equal(train_step.global_batch_indices(100, 1, 3, 16, 0), train_step.global_batch_indices(100, 2, 3, 16, 0))


def test_dropout_is_off_in_rl_so_the_first_pass_ratio_is_one(synth, sft_dir, tmp_path):
    out = str(tmp_path / "out")
    run_train(*common(synth, sft_dir, out), "--max_steps=1", "--num_iterations=1", "--lora_dropout=0.3")
    row = read_metrics(out)[0]
    assert row["ratio"] == 1.0 and row["clip_fraction"] == 0.0


def test_nonfinite_sequence_logprob_skips_the_group_not_the_run(synth, sft_dir, tmp_path, monkeypatch):
    module = importlib.reload(train)
    real_rollout = train_step.rollout

    def broken_rollout(*args, **kwargs):
        batch = real_rollout(*args, **kwargs)
        batch.seq_logp[0, 1] = float("nan")
        return batch
    monkeypatch.setattr(train_step, "rollout", broken_rollout)
    out = str(tmp_path / "out")
    with pytest.warns(UserWarning, match="non-finite sequence log-probs"):
        module.main(common(synth, sft_dir, out) + ["--max_steps=2"])
    assert [r["nonfinite_groups"] for r in read_metrics(out)] == [1, 2]


# ----------------------------------------------------------------------------- hostile input and faults

def test_resume_never_unpickles_and_runs_no_code_from_a_checkpoint(synth, sft_dir, tmp_path):
    out = str(tmp_path / "out")
    run_train(*common(synth, sft_dir, out), "--max_steps=2", "--stop_after_steps=1")
    ckpt, marker = os.path.join(out, "ckpt"), tmp_path / "pwned"
    assert not [name for name in os.listdir(ckpt) if name.endswith((".pt", ".pkl", ".bin"))]   # nothing pickled

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"step": 1, "payload": Payload()}, os.path.join(ckpt, "train_state.pt"))   # a crafted pickle
    run_train(*common(synth, sft_dir, out), "--max_steps=2", "--resume=True")
    assert not marker.exists() and [r["step"] for r in read_metrics(out)] == [1, 2]


def test_resume_refuses_a_corrupted_training_state_naming_the_file(synth, sft_dir, tmp_path):
    out = str(tmp_path / "out")
    run_train(*common(synth, sft_dir, out), "--max_steps=2", "--stop_after_steps=1")
    state = os.path.join(out, "ckpt", "train_state.safetensors")
    with open(state, "r+b") as f:
        f.seek(os.path.getsize(state) - 3)
        f.write(b"\xff\xff\xff")
    with pytest.raises(checkpoint.CheckpointError, match="train_state.safetensors: checksum mismatch"):
        run_train(*common(synth, sft_dir, out), "--max_steps=2", "--resume=True")


def test_resume_with_other_model_options_is_an_error_and_the_truth_is_recorded(synth, sft_dir, tmp_path):
    out = str(tmp_path / "out")
    run_train(*common(synth, sft_dir, out), "--max_steps=2", "--stop_after_steps=1", "--lora_r=4")
    with pytest.raises(SystemExit, match=r"--lora_r=8 \(the checkpoint has 4\)"):
        run_train(*common(synth, sft_dir, out), "--max_steps=2", "--resume=True", "--lora_r=8")
    _, results = run_train(*common(synth, sft_dir, out), "--max_steps=2", "--resume=True")   # lora_r not given
    assert results["config"]["lora_r"] == 4


def test_a_step_skipped_in_its_second_pass_changes_no_weight(synth, sft_dir, tmp_path, monkeypatch):
    importlib.reload(train_step)
    module = importlib.reload(train)
    real_loss, calls = train_step.grpo_rank_loss, []

    def second_pass_nan(*args, **kwargs):   # step 1: pass 1 fine (an optimizer step is taken), pass 2 NaN
        calls.append(1)
        loss, stats = real_loss(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 2 else loss), stats
    monkeypatch.setattr(train_step, "grpo_rank_loss", second_pass_nan)
    out = str(tmp_path / "out")
    with pytest.warns(UserWarning, match="non-finite loss or gradient"):
        module.main(common(synth, sft_dir, out) + ["--max_steps=1", "--num_iterations=2"])
    assert read_metrics(out)[0]["nonfinite_steps"] == 1
    state = VideoLM.load(os.path.join(out, "ckpt", "model")).state_dict()
    sft_state = VideoLM.load(sft_dir).state_dict()
    assert all(torch.equal(state[n], sft_state[n]) for n in sft_state if n.startswith("projector."))
    assert all(t.abs().max() == 0 for n, t in state.items() if "lora_B" in n)   # LoRA B starts at zero


def test_the_abort_message_names_a_checkpoint_that_exists(synth, sft_dir, tmp_path, monkeypatch):
    importlib.reload(train_step)
    module = importlib.reload(train)
    real_loss = train_step.grpo_rank_loss
    monkeypatch.setattr(train_step, "grpo_rank_loss", lambda *a, **k: (real_loss(*a, **k)[0] * float("nan"), {}))
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="No checkpoint was written yet; the run started from"), \
            pytest.warns(UserWarning):
        module.main(common(synth, sft_dir, out) + ["--max_steps=5", "--save_every=100"])
    assert not os.path.exists(os.path.join(out, "ckpt"))


def test_a_half_written_metrics_line_is_dropped_with_a_warning_on_resume(synth, sft_dir, tmp_path):
    out = str(tmp_path / "out")
    run_train(*common(synth, sft_dir, out), "--max_steps=2", "--stop_after_steps=1")
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 2, "loss": 0.1')                      # killed mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl:2: unreadable metrics line dropped"):
        run_train(*common(synth, sft_dir, out), "--max_steps=2", "--resume=True")
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


@pytest.mark.parametrize("option, message", [
    ("--save_every=0", "--save_every must be >= 1, got 0"), ("--max_new_tokens=0", "--max_new_tokens must be >= 1"),
    ("--num_frames=0", "--num_frames must be >= 1"), ("--temperature=-1.0", "--temperature must be >= 0"),
    ("--max_steps=-5", "--max_steps must be >= 0"), ("--lora_r=-1", "--lora_r must be >= 0"),
    ("--eval_size=-1", "--eval_size must be >= 0"), ("--learning_rate=nan", "--learning_rate must be finite"),
    ("--learning_rate=inf", "--learning_rate must be finite"), ("--top_p=1.5", r"--top_p must be in \[1e-09, 1\]"),
    ("--judge_max_seconds=0.0", "--judge_max_seconds must be >= 0.001"), ("--entropy_coef=nan", "--entropy_coef must be finite")])
def test_numeric_options_are_checked_at_start(option, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        run_train(option, f"--out_dir={tmp_path / 'out'}")
    assert not os.path.exists(tmp_path / "out")                # nothing was started


def test_an_unwritable_out_dir_fails_before_any_training(synth, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    trained = []
    monkeypatch.setattr(train, "train_sft", lambda *a, **k: trained.append(1))
    with pytest.raises(SystemExit, match="is not writable"):
        train.main([f"--out_dir={blocker / 'out'}", f"--train_data={synth['train']}", f"--eval_data={synth['eval']}"])
    assert not trained


def test_temperature_zero_warns_that_there_is_nothing_to_learn(synth, sft_dir, tmp_path):
    with pytest.warns(UserWarning, match="temperature=0 samples greedily"):
        run_train(*common(synth, sft_dir, str(tmp_path / "out")), "--temperature=0.0", "--max_steps=0")


def test_a_config_file_with_a_syntax_error_names_file_and_line(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("learning_rate = 3e-4\nbeta = (0.1\n")
    with pytest.raises(SystemExit, match=r"broken.py:2: syntax error"):
        run_train(str(config))
    config.write_text("import os\nlearning_rate = os.getenv('LR')\n")            # read, never executed
    with pytest.raises(SystemExit, match=r"broken.py:1: only `name = literal` assignments"):
        run_train(str(config))


def test_trl_names_and_the_earlier_loss_agg_alias(synth, sft_dir, tmp_path):
    _, results = run_train(*common(synth, sft_dir, str(tmp_path / "a")), "--max_steps=1", "--loss_agg=token",
                           "--top_k=3", "--repetition_penalty=1.2", "--use_bias_correction_kl=True")
    assert results["config"]["loss_type"] == "bnpo" and results["config"]["top_k"] == 3
    with pytest.raises(SystemExit, match="--loss_type must be one of"):
        run_train("--loss_type=sequence")
    _, results = run_train(*common(synth, sft_dir, str(tmp_path / "b")), "--max_steps=1", "--loss_type=dapo")
    assert results["config"]["loss_type"] == "dapo" and read_metrics(str(tmp_path / "b"))[0]["nonfinite_steps"] == 0


def test_judge_time_limits_are_train_options():
    module = importlib.reload(train)
    configure(["--oracle=judge", "--judge_model=m", "--judge_timeout=2.0", "--judge_max_seconds=5.0",
               "--judge_max_retries=1"], vars(module))
    judge = module.build_oracle()
    assert (judge.client["timeout"], judge.client["max_seconds"], judge.client["max_retries"]) == (2.0, 5.0, 1)
    importlib.reload(train)


# ----------------------------------------------------------------------------- watching and scaling a run

def test_tensorboard_gets_the_metrics_and_the_evaluations(synth, sft_dir, tmp_path):
    pytest.importorskip("tensorboard")                        # optional: pip install tensorboard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "out")
    run_train(*common(synth, sft_dir, out), "--max_steps=2", "--report_to=tensorboard")
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/sample_accuracy", "train/kl", "eval/accuracy"} <= tags
    assert any(tag.startswith("eval/by_category/") for tag in tags)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in read_metrics(out)])


def test_tensorboard_missing_says_how_to_install_it_before_any_work(synth, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="needs the tensorboard package: pip install tensorboard"):
        run_train(f"--train_data={synth['train']}", f"--eval_data={synth['eval']}", f"--out_dir={out}",
                  "--report_to=tensorboard", *SMALL)
    assert not (out / "sft").exists()          # said before the warm start trains, not after it


def test_any_runs_metrics_become_a_curves_png(synth, sft_dir, tmp_path):
    import experiments
    out = str(tmp_path / "out")
    run_train(*common(synth, sft_dir, out), "--max_steps=3", "--eval_every=2")
    path = importlib.reload(experiments).main(["--study=plot", f"--plot_dir={out}"])
    assert path == os.path.join(out, "curves.png") and os.path.getsize(path) > 10_000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_two_torchrun_nodes_on_loopback_then_resume_on_one_process(synth, tmp_path):
    """Two nodes of one process each (--nnodes=2, a c10d rendezvous on 127.0.0.1) train 2 steps; the
    checkpoint holds full, unsharded state, so a single process resumes it and trains on."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = str(tmp_path / "out")
    args = [os.path.join(HERE, "train.py"), "--max_steps=3", "--stop_after_steps=2", "--sft_steps=10", "--eval_size=8",
            f"--out_dir={out}", f"--train_data={synth['train']}", f"--eval_data={synth['eval']}",
            "--batch_size=4", "--num_generations=4", "--num_threads=1", "--save_every=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=loopback-test", *args], cwd=str(tmp_path), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [node.communicate(timeout=240)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), logs[0][-3000:] + logs[1][-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    state = checkpoint.load_state(os.path.join(out, "ckpt"), "train_state")
    assert len(state["rng"]["generators"]) == 2                 # both nodes' sampling streams were saved
    module, results = run_train(*args[1:], "--resume=True", "--stop_after_steps=0")   # world size 1 now
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3] and results["after"]["n"] == 8


# ----------------------------------------------------------------------------- hostile input and faults, second round

@pytest.fixture(scope="module")
def stopped_run(synth, sft_dir, tmp_path_factory):
    """A run stopped after step 1 of 2 with --template=v1, which the warm start (a checkpoint) does not use."""
    out = str(tmp_path_factory.mktemp("stopped") / "out")
    with pytest.warns(UserWarning, match="--template='v1' is not used: the loaded model has 'plain'"):
        run_train(*common(synth, sft_dir, out), "--max_steps=2", "--stop_after_steps=1", "--template=v1")
    return out


def copy_run(run, tmp_path):
    import shutil
    out = str(tmp_path / "out")
    shutil.copytree(run, out)
    return out, os.path.join(out, "ckpt")


def test_what_the_model_used_is_recorded_and_a_resume_refuses_other_seeing_options(stopped_run, synth, sft_dir, tmp_path):
    out, ckpt = copy_run(stopped_run, tmp_path)
    assert checkpoint.load_state(ckpt, "train_state")["config"]["template"] == "plain"       # the truth, not the option
    for option, saved in (("--template=v1", "'plain'"), ("--image_pad=True", "False"), ("--project_first=True", "False"),
                          ("--tokenizer=/elsewhere", "''"), ("--vision_post_layernorm=false", "'true'")):
        with pytest.raises(SystemExit, match=f"{option.split('=')[0]}=.* \\(the checkpoint has {saved}\\)"):
            run_train(*common(synth, sft_dir, out), "--max_steps=2", "--resume=True", option)


def test_resume_over_a_checkpoint_that_does_not_verify_is_refused_never_a_fresh_start(stopped_run, synth, sft_dir, tmp_path):
    out, ckpt = copy_run(stopped_run, tmp_path)
    metrics = open(os.path.join(out, "metrics.jsonl"), "rb").read()
    os.remove(os.path.join(ckpt, "manifest.json"))                                 # lacks only the manifest
    files = sorted(checkpoint.files_of(ckpt))
    with pytest.raises(checkpoint.CheckpointError, match=r"resume refused: .*ckpt: no manifest.json"):
        run_train(*common(synth, sft_dir, out), "--max_steps=2", "--resume=True")
    assert open(os.path.join(out, "metrics.jsonl"), "rb").read() == metrics and checkpoint.files_of(ckpt) == files
    os.rename(ckpt, ckpt + ".bad")
    copy_run(stopped_run, tmp_path / "good")
    os.rename(str(tmp_path / "good" / "out" / "ckpt"), ckpt + ".old")             # a good previous one is named
    os.rename(ckpt + ".bad", ckpt)
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt.old is still there: move it to .*ckpt to resume"):
        run_train(*common(synth, sft_dir, out), "--max_steps=2", "--resume=True")
    # an empty model config (a full disk, a hand edit) under a manifest: named, not a JSONDecodeError
    out, ckpt = copy_run(stopped_run, tmp_path / "empty")
    open(os.path.join(ckpt, "model", "config.json"), "w").close()
    with pytest.raises(checkpoint.CheckpointError, match=r"model/config.json: checksum mismatch"):
        run_train(*common(synth, sft_dir, out), "--max_steps=2", "--resume=True")


def test_a_second_run_on_an_out_dir_in_use_stops_at_once_naming_the_holder(synth, sft_dir, tmp_path):
    import time
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "lock = open(sys.argv[1], 'a+'); fcntl.flock(lock, fcntl.LOCK_EX)\n"
                               "lock.seek(0); lock.truncate(); lock.write(str(os.getpid())); lock.flush()\n"
                               "print('locked', flush=True); time.sleep(120)", str(out / "train.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"                   # a run holds out_dir
        start = time.monotonic()
        with pytest.raises(SystemExit, match=f"--out_dir=.* is in use by another run \\(pid {holder.pid}"):
            run_train(*common(synth, sft_dir, str(out)), "--max_steps=1")
        assert time.monotonic() - start < 10 and sorted(os.listdir(out)) == ["train.lock"]   # nothing was written
    finally:
        holder.kill()
        holder.wait()
    import records
    records.lock_out_dir(str(out)).close()                                     # the kernel released it with the holder


def test_a_full_disk_never_leaves_a_partial_results_json_or_checkpoint(tmp_path):
    script = ("import os, resource, signal, sys\n"
              f"sys.path.insert(0, {HERE!r})\n"
              "import checkpoint, records\n"
              "out = sys.argv[1]\n"
              "write = lambda size: lambda d: open(os.path.join(d, 'weights.bin'), 'wb').write(b'1' * size)\n"
              "checkpoint.write_dir(os.path.join(out, 'ckpt'), write(1000))             # a good checkpoint\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))   # the disk is full\n"
              "for name, save in (('checkpoint', lambda: checkpoint.write_dir(os.path.join(out, 'ckpt'), write(10**6))),\n"
              "                   ('results', lambda: records.RunLog(out, True).results({'x': 'y' * 10**6}))):\n"
              "    try:\n"
              "        save()\n"
              "    except OSError as err:\n"
              "        print(name, err)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    ckpt = str(tmp_path / "ckpt")
    assert f"{ckpt}: the checkpoint could not be written" in lines["checkpoint"], done.stdout + done.stderr
    assert f"the last complete one, {ckpt}, is kept" in lines["checkpoint"]
    assert f"{tmp_path / 'results.json'} not written" in lines["results"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]                          # no ckpt.tmp, results.json(.tmp)
    assert checkpoint.verify(ckpt) and os.path.getsize(os.path.join(ckpt, "weights.bin")) == 1000


def test_max_bad_video_fraction_1_is_refused_and_an_all_bad_batch_stops_the_run(synth, sft_dir, tmp_path):
    train_file = broken_train_file(synth, tmp_path, missing=16)
    args = common(synth, sft_dir, str(tmp_path / "out")) + [f"--train_data={train_file}", "--batch_size=16"]
    with pytest.raises(SystemExit, match="--max_bad_video_fraction must be below 1"):
        run_train(*args, "--max_bad_video_fraction=1.0")
    with pytest.raises(RuntimeError, match="16 of 16 videos failed to decode"), pytest.warns(UserWarning):
        run_train(*args, "--max_bad_video_fraction=0.99")


def test_a_process_whose_videos_all_fail_stops_every_process(synth, sft_dir, tmp_path, monkeypatch):
    """Under torchrun one process's share of a batch can all fail while the batch as a whole stays under
    max_bad_video_fraction: that process has nothing to run the step's forwards with, which FSDP needs of
    every process, so all of them stop, naming the videos (simulated: another process's 12 good videos)."""
    module = importlib.reload(train_step)
    real_reduce = module.reduce_sum
    monkeypatch.setattr(module, "reduce_sum", lambda values, device: (
        [values[0], values[1] + 12, *values[2:]] if len(values) == 3 else real_reduce(values, device)))
    policy = VideoLM.load(sft_dir)
    policy.add_lora(4, 8)
    policy.snapshot_reference()
    samples = [dict(s, video=str(tmp_path / f"missing{i}.mp4")) for i, s in enumerate(load_jsonl(synth["train"])[:4])]
    config = module.StepConfig.from_options({**vars(importlib.reload(train)), "max_bad_video_fraction": 0.5})
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    with pytest.raises(RuntimeError, match=r"4 of 16 videos failed to decode .*all of one process's.*missing0.mp4"), \
            pytest.warns(UserWarning, match="missing0.mp4"):
        module.train_step(policy, optimizer, samples, None, config, 1e-3, torch.Generator().manual_seed(0))


def test_bad_files_and_dirs_are_named_not_raw_tracebacks(synth, tmp_path):
    import records
    latin = tmp_path / "latin.py"
    latin.write_bytes(b"learning_rate = 1e-3  # r\xe9glage\n")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for config, message in ((latin, "latin.py: cannot read the config file"), (deep, "deep.json: not valid JSON")):
        with pytest.raises(SystemExit, match=message):
            run_train(str(config))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit, match=f"--data_dir={blocker}/synth: cannot make the synthetic dataset there"):
        run_train(f"--data_dir={blocker}/synth", f"--out_dir={tmp_path / 'out'}", *SMALL)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1}\n{"step": 2, "loss": "\xff\xfe"}\n')     # not UTF-8
    with pytest.warns(UserWarning, match="metrics.jsonl:2: unreadable metrics line dropped"):
        records.keep_metrics_until(str(metrics), 2)
    assert metrics.read_text() == '{"step": 1}\n'


def test_a_judge_key_that_cannot_be_sent_stops_the_run_at_start_without_showing_it(synth, sft_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-0123456789\nabcdef")          # a newline inside
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"--oracle=judge: the API key in \$OPENAI_API_KEY holds") as info:
        run_train(*common(synth, sft_dir, str(out)), "--oracle=judge", "--judge_model=m", "--max_steps=1")
    assert "0123456789" not in str(info.value) and sorted(os.listdir(out)) == ["train.lock"]   # before any work
