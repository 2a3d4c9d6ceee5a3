"""The paper's setting as far as a CPU can prove it: QLoRA (4-bit NF4 + double quantisation through
bitsandbytes, which runs on the CPU since 0.49) through model.py and train.py, a converted checkpoint
in 4 bit, and the users' literal command, `torchrun --nproc_per_node=4 train.py`, end to end and
resumed at 4 and at 2 processes. The "pretrained" parts are tiny random models written with
save_pretrained (bench_gpu.save_random_parts): no downloads."""
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import bench_gpu
import train
from data import load_jsonl, write_jsonl
from model import ModelConfig, VideoLM
from synth import make_synthetic_dataset, synthetic_vocab, word_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
RL_ARGS = ["--sft_steps=2", "--sft_batch_size=4", "--batch_size=2", "--num_generations=2", "--max_new_tokens=3",
           "--eval_size=4", "--eval_batch_size=4", "--save_every=100", "--lora_r=4", "--num_threads=1"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(vision_dir, lm_dir): a tiny CLIP and a tiny LLaMA whose tokenizer covers the synthetic task's words."""
    root = str(tmp_path_factory.mktemp("parts"))
    return bench_gpu.save_random_parts(root, bench_gpu.TINY_VISION, bench_gpu.TINY_LM,
                                       word_tokenizer(synthetic_vocab()), "float32", "cpu")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), num_train=16, num_eval=4)


def four_bit_layers(policy):
    import bitsandbytes as bnb
    return [m for m in policy.lm.modules() if isinstance(m, bnb.nn.Linear4bit)]


def run_train(*args):
    module = importlib.reload(train)   # train keeps its configuration in module globals
    return module.main(list(args))


# ----------------------------------------------------------------------------- QLoRA on the CPU

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlora_loads_nf4_double_quant_on_the_cpu_and_trains_only_the_adapters(parts, dtype):
    vision_dir, lm_dir = parts
    policy = VideoLM(ModelConfig(vision=vision_dir, lm=lm_dir, load_in_4bit=True, lora_r=8, dtype=dtype, num_frames=2))
    quant = policy.lm.get_base_model().config.quantization_config
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == getattr(torch, dtype)
    layers = four_bit_layers(policy)
    assert len(layers) == 2 * 7                                          # q k v o gate up down, 2 layers
    assert layers[0].weight.dtype == torch.uint8 and layers[0].weight.quant_state.quant_type == "nf4"
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)
    features = policy.encode_video(torch.randint(0, 256, (2, 2, 32, 32, 3), dtype=torch.uint8))
    ids, mask = policy.encode_prompts([{"question": "what colour is the square ?"}] * 2)
    answer_ids, answer_mask = policy.encode_answers(["red", "blue"])
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(5):                                                 # the loss falls through the 4-bit base
        logits = policy.completion_logits(features, ids, mask, answer_ids, answer_mask)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), answer_ids.flatten())
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]
        assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_qlora_without_bitsandbytes_is_a_clear_error(parts, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ValueError, match="load_in_4bit=True .*needs bitsandbytes: pip install bitsandbytes"):
        VideoLM(ModelConfig(lm=parts[1], load_in_4bit=True, lora_r=4))


def test_rl_steps_with_load_in_4bit_then_resume_continue_the_same_run(parts, synth, tmp_path):
    vision_dir, lm_dir = parts
    common = [f"--train_data={synth['train']}", f"--eval_data={synth['eval']}", f"--vision={vision_dir}",
              f"--lm={lm_dir}", "--load_in_4bit=True", "--max_steps=2", *RL_ARGS]
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    run_train(*common, f"--out_dir={whole}")
    run_train(*common, f"--out_dir={split}", "--stop_after_steps=1")
    saved = VideoLM.load(os.path.join(split, "ckpt", "model"))
    assert saved.config.load_in_4bit and saved.has_lora and four_bit_layers(saved)   # loads back in 4 bit
    results = run_train(*common, f"--out_dir={split}", "--resume=True")
    read = lambda out: [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in read(split)] == [1, 2] and results["after"]["n"] == 4
    assert [r["loss"] for r in read(split)] == [r["loss"] for r in read(whole)]       # the same run, bit for bit


def test_one_rl_step_in_bfloat16_with_4_bit_weights(parts, synth, tmp_path):
    vision_dir, lm_dir = parts
    run_train(f"--train_data={synth['train']}", f"--eval_data={synth['eval']}", f"--vision={vision_dir}",
              f"--lm={lm_dir}", "--load_in_4bit=True", "--dtype=bfloat16", "--max_steps=1", f"--out_dir={tmp_path}",
              *RL_ARGS)
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert row["nonfinite_steps"] == 0 and all(isinstance(row[k], float) for k in ("loss", "kl", "entropy"))
    saved = VideoLM.load(str(tmp_path / "ckpt" / "model"))
    assert saved.config.dtype == "bfloat16" and next(saved.projector.parameters()).dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU kernels' limit")
def test_qlora_on_widths_the_cpu_kernels_cannot_take_is_a_clear_error(tmp_path):
    import test_convert as tc
    llama, tokenizer = tc.tiny_llama()                                   # hidden size 32
    llama.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"multiples of 64, and .*lm has \{'hidden_size': 32"):
        VideoLM(ModelConfig(lm=str(tmp_path / "lm"), load_in_4bit=True, lora_r=4))


def test_a_converted_checkpoint_loads_and_generates_in_4_bit(tmp_path, monkeypatch):
    import convert
    import test_convert as tc
    from transformers import CLIPVisionConfig, CLIPVisionModel
    monkeypatch.setattr(tc, "LM_HIDDEN", 64)                            # bitsandbytes' CPU kernels: multiples of 64
    vision_dir = str(tmp_path / "clip")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=tc.VISION_HIDDEN, intermediate_size=2 * tc.VISION_HIDDEN,
                                     num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                     patch_size=8)).save_pretrained(vision_dir)
    tc.write_llava(tmp_path / "src")
    convert.convert(str(tmp_path / "src"), str(tmp_path / "out"), vision_dir, dtype_name="float32", frames=2)
    policy = VideoLM.load(str(tmp_path / "out"), load_in_4bit=True).eval()
    assert policy.config.load_in_4bit and four_bit_layers(policy)
    features = policy.encode_video(torch.randint(0, 256, (2, 2, 40, 56, 3), dtype=torch.uint8))
    ids, mask = policy.encode_prompts([{"question": "what colour ?"}, {"question": "how many ?"}])
    tokens, keep, _ = policy.generate(features, ids, mask, group_size=2, max_new_tokens=3)
    assert tokens.shape[0] == 4 and len(policy.decode(tokens, keep)) == 4


# ----------------------------------------------------------------------------- the literal 4-process command

def question_of(request):
    """The question a judge request asks about (JudgeOracle.rank_prompt's "Question: ..." line)."""
    text = request["body"]["messages"][-1]["content"]
    return re.search(r"^Question: (.*)$", text, flags=re.M).group(1)


def test_torchrun_four_processes_end_to_end_then_resumed_at_four_and_at_two(tmp_path):
    """`torchrun --nproc_per_node=4 train.py` (gloo, FSDP2), resumed at world size 4 and then 2. Every
    question is unique and the Oracle is a judge on loopback that records what it is asked: each group
    is ranked in one call, so no group was split between processes."""
    from test_oracle import FakeJudge
    synth = make_synthetic_dataset(str(tmp_path / "synth"), num_train=48, num_eval=4)
    rows = load_jsonl(synth["train"])
    for row in rows:
        row["question"] = f"{row['question']} ( {row['id']} )"            # one question per prompt
    train_path = str(tmp_path / "synth" / "unique.jsonl")
    write_jsonl(train_path, rows)
    judge = FakeJudge()
    judge.thread.start()
    out = str(tmp_path / "out")
    args = [os.path.join(HERE, "train.py"), "--max_steps=3", "--sft_steps=10", "--eval_size=4", f"--out_dir={out}",
            f"--train_data={train_path}", f"--eval_data={synth['eval']}", "--batch_size=2", "--num_generations=4",
            "--max_new_tokens=3", "--num_threads=1", "--save_every=100", "--oracle=judge",
            f"--judge_base_url={judge.url}", "--judge_model=fake", "--stop_after_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    asked = []                                                          # each launch runs one step
    try:
        for world, resume in ((4, False), (4, True), (2, True)):
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                       *args, f"--resume={resume}"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            asked.append([question_of(request) for request in judge.requests[sum(map(len, asked)):]])
    finally:
        judge.server.shutdown()
        judge.server.server_close()
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["oracle_failures"] == 0 for m in metrics)
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["after"]["n"] == 4 and results["config"]["oracle"] == "judge"
    for questions, prompts in zip(asked, (8, 8, 4)):      # 2 prompts on each process; a group whose G answers
        assert 0 < len(questions) <= prompts              # are all the same needs no call
        assert len(set(questions)) == len(questions)      # each group ranked in one call, by one process
    assert not set(asked[0]) & set(asked[1])              # the resumed step takes the epoch's next prompts
    VideoLM.load(os.path.join(out, "ckpt", "model"))      # the sharded run's checkpoint loads alone


# ----------------------------------------------------------------------------- the GPU script's CPU-safe parts

def test_gpu_check_script_runs_its_cpu_safe_parts_and_writes_the_record(tmp_path):
    """gpu_check.sh --cpu: bench_gpu.py's tiny path and a one-process FSDP2 step over gloo, each under its own
    time limit, merged into one JSON record (on a GPU the same script runs test_gpu.py and the 7B shapes)."""
    record = tmp_path / "bench_gpu.json"
    env = {**os.environ, "GPU_CHECK_DIR": str(tmp_path / "logs"), "GPU_CHECK_JSON": str(record), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), "--cpu"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = json.load(open(record))["checks"]
    assert set(checks) == {"tiny_cpu", "fsdp_gloo"} and all(c["exit"] == 0 for c in checks.values())
    fsdp = checks["fsdp_gloo"]["result"]
    assert fsdp["config"]["fsdp"] and fsdp["step_s"] > 0 and fsdp["per_rank"][0]["generation_tokens_per_s"] > 0
    gpus = fsdp["estimate"]["gpus"]                                      # the full-depth estimate rides along
    assert set(gpus) == {"H100", "H200"} and all(g["step_s"] > 0 and g["memory_gb"] > 0 for g in gpus.values())
