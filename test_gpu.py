"""GPU-only tests: QLoRA (4-bit NF4) on CUDA through model.py, one RL step of train.py in bf16 on CUDA
(with and without 4-bit), generation on CUDA, a converted LLaVA-style checkpoint generated and evaluated
on CUDA, and bench_gpu.py at tiny shapes. Every test here is skipped without CUDA (CI never has a GPU);
their device-independent halves run on the CPU in test_paper_setting.py, and gpu_check.sh runs this file
first. The "pretrained" parts are tiny random models written with save_pretrained."""
import importlib
import json
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (bitsandbytes 4-bit layers, bf16 on CUDA)")

import bench_gpu
from model import ModelConfig, VideoLM
from test_paper_setting import parts, synth   # noqa: F401  (the same tiny "pretrained" parts and data, as fixtures)

CUDA = torch.device("cuda")
RL_ARGS = ["--sft_steps=2", "--sft_batch_size=4", "--max_steps=1", "--batch_size=2", "--num_generations=2",
           "--max_new_tokens=4", "--eval_size=4", "--eval_batch_size=4", "--save_every=100", "--lora_r=8",
           "--num_threads=1", "--dtype=bfloat16"]


def frames_on_cuda(batch=2, num_frames=4):
    return torch.randint(0, 256, (batch, num_frames, 64, 64, 3), dtype=torch.uint8, device=CUDA)


def test_qlora_loads_nf4_double_quant_bf16_compute_and_trains_only_adapters(parts):
    import bitsandbytes as bnb
    vision_dir, lm_dir = parts
    policy = VideoLM(ModelConfig(vision=vision_dir, lm=lm_dir, load_in_4bit=True, lora_r=8, dtype="bfloat16",
                                 num_frames=4)).to(CUDA)
    quant = policy.lm.get_base_model().config.quantization_config
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    layers = [m for m in policy.lm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)
    assert layers[0].weight.quant_state.quant_type == "nf4"
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)
    # a forward and backward through the 4-bit base reach the adapters
    features = policy.encode_video(frames_on_cuda())
    ids, mask = policy.encode_prompts([{"question": "what colour is the square?"}] * 2)
    answer_ids, answer_mask = policy.encode_answers(["red", "blue"])
    logits = policy.completion_logits(features, ids, mask, answer_ids, answer_mask)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), answer_ids.flatten())
    loss.backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]
    assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_one_rl_step_bf16_on_cuda(parts, synth, tmp_path, load_in_4bit):
    import train
    vision_dir, lm_dir = parts
    module = importlib.reload(train)   # train keeps its configuration in module globals
    results = module.main([f"--train_data={synth['train']}", f"--eval_data={synth['eval']}", f"--vision={vision_dir}",
                           f"--lm={lm_dir}", f"--load_in_4bit={load_in_4bit}", f"--out_dir={tmp_path}"] + RL_ARGS)
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1 and all(isinstance(rows[0][k], float) for k in ("loss", "kl", "entropy"))
    assert rows[0]["nonfinite_steps"] == 0 and torch.isfinite(torch.tensor(rows[0]["loss"]))
    assert "accuracy" in results["after"]
    saved = VideoLM.load(str(tmp_path / "ckpt" / "model"))
    assert saved.config.dtype == "bfloat16" and saved.config.load_in_4bit == load_in_4bit and saved.has_lora


@torch.no_grad()
def test_generate_on_cuda_in_bf16(parts):
    vision_dir, lm_dir = parts
    policy = VideoLM(ModelConfig(vision=vision_dir, lm=lm_dir, dtype="bfloat16", lora_r=8, num_frames=4)).to(CUDA).eval()
    features = policy.encode_video(frames_on_cuda())
    assert features.is_cuda and features.dtype == torch.bfloat16
    ids, mask = policy.encode_prompts([{"question": "what colour is the square?"}, {"question": "how many squares?"}])
    generator = torch.Generator(device=CUDA).manual_seed(0)
    tokens, keep, truncated = policy.generate(features, ids, mask, group_size=3, max_new_tokens=5, generator=generator)
    assert tokens.is_cuda and tokens.shape[0] == 6 and tokens.shape[1] <= 5 and keep.shape == tokens.shape
    assert truncated.shape == (6,) and len(policy.decode(tokens, keep)) == 6
    greedy = [policy.generate(features, ids, mask, max_new_tokens=5, greedy=True)[0] for _ in range(2)]
    assert torch.equal(greedy[0], greedy[1])


@torch.no_grad()
def test_converted_checkpoint_runs_on_cuda(tmp_path):
    import convert
    import test_convert as tc
    vision_dir = str(tmp_path / "clip")
    from transformers import CLIPVisionConfig, CLIPVisionModel
    CLIPVisionModel(CLIPVisionConfig(hidden_size=tc.VISION_HIDDEN, intermediate_size=2 * tc.VISION_HIDDEN,
                                     num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                     patch_size=8)).save_pretrained(vision_dir)
    tc.write_llava(tmp_path / "src")
    convert.convert(str(tmp_path / "src"), str(tmp_path / "out"), vision_dir, frames=4)   # bf16, the default
    policy = VideoLM.load(str(tmp_path / "out")).to(CUDA).eval()
    assert policy.config.dtype == "bfloat16" and next(policy.lm.parameters()).dtype == torch.bfloat16
    features = policy.encode_video(frames_on_cuda())
    ids, mask = policy.encode_prompts([{"question": "what colour?"}, {"question": "how many?"}])
    tokens, keep, _ = policy.generate(features, ids, mask, group_size=2, max_new_tokens=3)
    assert tokens.is_cuda and tokens.shape[0] == 4
    from eval import evaluate                                 # and evaluated, as eval.py --checkpoint does
    from synth import make_synthetic_dataset
    from data import load_jsonl
    made = make_synthetic_dataset(str(tmp_path / "synth"), num_train=4, num_eval=6)
    results = evaluate(policy, load_jsonl(made["eval"]), task="exact", batch_size=3, progress=False)
    assert results["n"] == 6 and 0.0 <= results["accuracy"] <= 1.0


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_bench_gpu_tiny_on_cuda(tmp_path, load_in_4bit):
    module = importlib.reload(bench_gpu)
    out_json = tmp_path / "bench_gpu.json"
    result = module.main(["--tiny=True", "--dtype=bfloat16", f"--load_in_4bit={load_in_4bit}",
                          f"--out_json={out_json}", f"--cache_dir={tmp_path / 'parts'}", "--baseline_step_s=1.0"])
    assert os.path.exists(out_json) and result["device"] == torch.cuda.get_device_name(0)
    rank = result["per_rank"][0]
    assert rank["peak_memory_gib"] > 0 and rank["generation_tokens_per_s"] > 0
    assert result["scaling"]["efficiency"] == pytest.approx(1.0 / result["step_s"])
