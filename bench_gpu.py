"""
GPU benchmark of GRPO_rank steps at the paper's scale: a LLaMA-7B-shaped LM (random weights unless
--lm is given) behind a CLIP ViT-L/14-336-shaped tower (random weights unless --vision is given),
LoRA (or QLoRA with --load_in_4bit=True), bf16, 50 frames, G = 5.

$ python bench_gpu.py                                   # one GPU, bf16 + LoRA
$ python bench_gpu.py --load_in_4bit=True               # QLoRA, the paper's setting
$ torchrun --nproc_per_node=4 bench_gpu.py --baseline_step_s=12.3   # FSDP2 as train.py; scaling vs 1 GPU
$ python bench_gpu.py --tiny=True --load_in_4bit=True    # tiny shapes on the GPU: checks the script in seconds
$ python bench_gpu.py --cpu_smoke=True                  # the same code path, tiny shapes, on the CPU
$ python bench_gpu.py --cpu=True --layers=2 --dtype=float32 --load_in_4bit=True   # the paper's widths, 2 layers, CPU

Random parts are built from configs and written with save_pretrained to a cache directory, so the
policy is loaded through model.py's normal pretrained path (from_pretrained, bitsandbytes, peft).
Each step is train_step.train_step, the one train.py runs (train.py's defaults under
config/paper_7b.py, with this script's batch shape), timed by phase with torch.cuda.synchronize()
around every timer:
    data          decoding the batch's clips (random frames written once as lossless mp4 files)
    encode        the vision tower over B x T frames (once per prompt)
    generation    B x G samples, one batched KV-cached generate
    rollout_logp  the no-grad scoring pass of the rollout (+ decoding the text)
    oracle        ranking the groups (the reference Oracle: string matching) and the rank advantages
    reference     the reference adapter's log-probs (KL term)
    forward       the training passes with grad, and the loss (x mu)
    backward      loss.backward() (x mu)
    optimizer     gradient clipping and AdamW (x mu)
reported as medians over the timed steps, with generated tokens/s and torch.cuda.max_memory_allocated.
Under torchrun every rank reports its own figures; rank 0 writes them all, and with --baseline_step_s
(the 1-GPU step time at the same per-GPU batch) the weak-scaling efficiency baseline / step time
(ideal 1.0) and the throughput speed-up N x baseline / step time (ideal N). Writes results/bench_gpu.json.

Beside every measurement it prints `estimate`: a model of the same step at full depth (32 LM layers,
24 vision layers) on one H100 / H200 and on 4 of them, from the step's FLOPs and bytes by phase at the
paper's widths and stated assumptions (the share of peak FLOP/s the matmuls reach, the per-layer cost
of each decoding step), so the first GPU run can be held against it. --layers=N measures the paper's
widths at N layers (the CPU proof of the shapes, dtypes and memory of the path).
"""
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch

# -----------------------------------------------------------------------------
# defaults, overridable as --key=value
lm = ""                      # an HF causal LM dir; empty: random weights of LLaMA-7B shape
vision = ""                  # a CLIP vision dir; empty: random weights of CLIP ViT-L/14-336 shape
load_in_4bit = False         # QLoRA: NF4 base weights (CUDA only)
dtype = "bfloat16"
gradient_checkpointing = True
share_prefix = True          # as train.py: score each group on one pass over its [video, prompt] prefix
lora_r = 64                  # the paper's QLoRA rank
lora_alpha = 16
batch_size = 4               # prompts per GPU (the paper: 16 per GPU; 4 keeps the KV cache of B*G=20 small)
num_generations = 5          # G (the paper)
max_new_tokens = 64
num_frames = 50              # (the paper)
temperature = 1.0
steps = 3                    # timed steps
warmup_steps = 1             # untimed steps first (CUDA kernels, allocator)
learning_rate = 1e-5
baseline_step_s = 0.0        # the 1-GPU step time to compare a torchrun run against; 0: none
cache_dir = ""               # where random parts are written; empty: $TMPDIR/bench_gpu_parts
out_json = "results/bench_gpu.json"
tiny = False                 # tiny shapes and settings (TINY_SMOKE) on the GPU: a quick check of the script
cpu_smoke = False            # the same on the CPU: tests this script without a GPU
cpu = False                  # run the chosen shapes (not tiny) on the CPU: with --layers, the paper's widths
layers = 0                   # decoder layers of the random LM and vision tower (widths unchanged); 0: full depth
fsdp = False                 # shard with FSDP2 even in one process (under torchrun: the NCCL / gloo path alone)
estimate_only = False        # print the full-depth estimate of these settings and exit (nothing is built or run)
num_threads = 0              # CPU threads for torch; 0: torch's default
seed = 0
# -----------------------------------------------------------------------------

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)
TINY_LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)   # vocab: the tokenizer's
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)
TINY_SMOKE = dict(batch_size=2, num_generations=2, max_new_tokens=4, num_frames=2, steps=2, warmup_steps=0,
                  lora_r=4, dtype="float32", load_in_4bit=False, gradient_checkpointing=False, num_threads=1)
QUESTION, ANSWER = "what colour is the square?", "red"   # the Oracle grades against this; random weights miss


def sized_tokenizer(vocab_size=None):
    """A word-level tokenizer (model.word_tokenizer) padded with filler words to exactly vocab_size
    tokens, so that every id a random LM samples decodes. None: just the template's words."""
    from model import word_tokenizer
    base = len(word_tokenizer([ANSWER]))
    fillers = [f"tok{i}" for i in range(max(0, (vocab_size or base) - base))]
    tokenizer = word_tokenizer([ANSWER] + fillers)
    assert vocab_size is None or len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def save_random_parts(root, vision_shape, lm_shape, tokenizer, dtype_name="float32", device="cpu"):
    """Random-weight CLIP vision tower and LLaMA from configs, written with save_pretrained so they
    load like downloaded ones. Returns (vision_dir, lm_dir); an existing complete pair is reused.
    vision_shape / lm_shape: CLIPVisionConfig / LlamaConfig keywords (the LM's vocab: the tokenizer's)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    vision_dir, lm_dir, done = os.path.join(root, "vision"), os.path.join(root, "lm"), os.path.join(root, "COMPLETE")
    if os.path.exists(done):
        return vision_dir, lm_dir
    torch_dtype = getattr(torch, dtype_name)
    torch.manual_seed(seed)
    with torch.device(device):   # on the GPU, 7B random inits take seconds instead of minutes
        tower = CLIPVisionModel(CLIPVisionConfig(**vision_shape)).to(torch_dtype)
        tower.save_pretrained(vision_dir)
        del tower
        lm_config = LlamaConfig(**{"vocab_size": len(tokenizer), **lm_shape}, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        causal = LlamaForCausalLM(lm_config).to(torch_dtype)
        causal.save_pretrained(lm_dir)
        del causal
    tokenizer.save_pretrained(lm_dir)
    open(done, "w").close()   # written last: a crash mid-save is not mistaken for a cache
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return vision_dir, lm_dir


def build_policy(device, rank, world):
    """The policy as train.py builds it for RL: pretrained parts, LoRA, the reference adapter, moved
    to the device, FSDP2-sharded under torchrun. Returns (policy, load seconds, parts description)."""
    from configurator import barrier
    from model import ModelConfig, VideoLM
    from train_step import shard
    start = time.time()
    vision_dir, lm_dir = vision, lm
    if not (vision and lm):
        small = tiny or cpu_smoke
        lm_shape, vision_shape = (TINY_LM, TINY_VISION) if small else (LLAMA_7B, CLIP_L_336)
        if layers and not small:
            lm_shape, vision_shape = ({**shape, "num_hidden_layers": layers} for shape in (lm_shape, vision_shape))
        tag = "tiny" if small else f"7b{layers or ''}"
        root = os.path.join(cache_dir or os.path.join(tempfile.gettempdir(), "bench_gpu_parts"), f"{tag}_{dtype}")
        tokenizer = sized_tokenizer(lm_shape.get("vocab_size"))
        if rank == 0:
            save_random_parts(root, vision_shape, lm_shape, tokenizer, dtype, device)
        barrier()
        random_vision, random_lm = save_random_parts(root, vision_shape, lm_shape, tokenizer, dtype, device)
        vision_dir, lm_dir = vision or random_vision, lm or random_lm
    config = ModelConfig(vision=vision_dir, lm=lm_dir, dtype=dtype, load_in_4bit=load_in_4bit, lora_r=lora_r,
                         lora_alpha=lora_alpha, gradient_checkpointing=gradient_checkpointing, num_frames=num_frames,
                         share_prefix=share_prefix,
                         vision_post_layernorm=False, seed=seed)
    policy = VideoLM(config)
    policy.snapshot_reference()
    policy.to(device)
    if world > 1 or fsdp:
        shard(policy)
    return policy, time.time() - start, {"vision": vision_dir, "lm": lm_dir}


def step_config():
    """train.py's defaults under config/paper_7b.py (the paper's setting), with this script's own
    batch shape: the step train.py would run, built without importing train.py."""
    from configurator import read_config_file
    from train_step import StepConfig
    here = os.path.dirname(os.path.abspath(__file__))
    options = {**read_config_file(os.path.join(here, "train.py"), skip_other=True),
               **read_config_file(os.path.join(here, "config", "paper_7b.py"))}
    options.update(num_generations=num_generations, max_new_tokens=max_new_tokens, temperature=temperature)
    return StepConfig.from_options(options)


def write_videos(root, size, rank):
    """batch_size random clips of num_frames frames at the tower's resolution, as lossless mp4 files
    the step decodes (its data phase), made once per shape. -> their paths"""
    from synth import write_mp4
    os.makedirs(root, exist_ok=True)
    generator = torch.Generator().manual_seed(seed + rank)
    paths = []
    for i in range(batch_size):
        path = os.path.join(root, f"r{rank}_{i}_{num_frames}x{size}.mp4")
        if not os.path.exists(path):
            write_mp4(path, torch.randint(0, 256, (num_frames, size, size, 3), dtype=torch.uint8,
                                          generator=generator).numpy())
        paths.append(path)
    return paths


def summarize(step_rows, generated, device, load_s, world):
    """Medians over the timed steps of one process -> a dict of its figures."""
    median = lambda key: statistics.median(row.get(key, 0.0) for row in step_rows)
    phases = {name: median(name) for name in ("data", "encode", "generation", "oracle", "advantages", "reference",
                                               "forward", "backward", "optimizer")}
    phases["rollout_logp"] = max(0.0, median("rollout") - phases["encode"] - phases["generation"])
    step_s = median("step")
    tokens = statistics.median(generated)
    row = {"step_s": step_s, "phases_s": phases,
           "split": {"decode": phases["data"], "generation": phases["generation"],
                     "oracle": phases["oracle"] + phases["advantages"],
                     "logprobs": phases["rollout_logp"] + phases["reference"] + phases["forward"],
                     "backward": phases["backward"] + phases["optimizer"], "encode": phases["encode"]},
           "generated_tokens_per_step": tokens,
           "generation_tokens_per_s": tokens / max(phases["generation"], 1e-9),
           "step_tokens_per_s": tokens / max(step_s, 1e-9),
           "samples_per_s": batch_size * num_generations / max(step_s, 1e-9),
           "load_s": load_s, "world_size": world}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        row["device_name"] = torch.cuda.get_device_name(device)
    else:
        row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        row["device_name"] = platform.processor() or "cpu"
    return row


# ----------------------------------------------------------------------------- the estimate at full depth

GPUS = {"H100": (989e12, 3.35e12, 80), "H200": (989e12, 4.8e12, 141)}   # dense bf16 FLOP/s, HBM bytes/s, GB
MATMUL_SHARE = 0.4           # assumed share of peak FLOP/s reached by the step's matmuls (NF4 dequantises first)
DECODE_LAYER_S = 0.5e-3      # assumed cost of one decoder layer in one decoding step (eager kernel launches)
FSDP_SLOWDOWN = 1.1          # assumed: per-layer all-gathers overlap the compute but not fully
PHASES = ("encode", "generation", "rollout_logp", "reference", "forward", "backward")


def step_model(lm_layers, vision_layers, prompts, prompt_tokens):
    """FLOPs by phase and peak bytes of one train_step at LLaMA-7B / CLIP ViT-L/14-336 widths. The LM passes
    score the [video, prompt] prefix once per prompt and each prompt's G completions against it."""
    D, F, V = LLAMA_7B["hidden_size"], LLAMA_7B["intermediate_size"], LLAMA_7B["vocab_size"]
    Dv, Fv = CLIP_L_336["hidden_size"], CLIP_L_336["intermediate_size"]
    patches = (CLIP_L_336["image_size"] // CLIP_L_336["patch_size"]) ** 2 + 1
    layer_params, vision_params = 4 * D * D + 3 * D * F, 4 * Dv * Dv + 2 * Dv * Fv
    prefix, rows, new = num_frames + patches - 1 + prompt_tokens, prompts * num_generations, max_new_tokens
    token_flops = lambda context: 2 * layer_params + 4 * context * D            # one token through one layer
    lm_pass = lm_layers * (prompts * prefix * token_flops(prefix) + rows * new * token_flops(prefix + new)) \
        + 2 * D * V * rows * new
    flops = {"encode": prompts * num_frames * patches * vision_layers * (2 * vision_params + 4 * patches * Dv),
             "generation": lm_pass, "rollout_logp": lm_pass, "reference": lm_pass, "forward": lm_pass,
             "backward": lm_pass * (2 if gradient_checkpointing else 1)}         # input grads (+ the replay)
    weight_bytes = 0.5625 if load_in_4bit else 2                               # NF4 + its double-quant scales
    weights = lm_layers * layer_params * weight_bytes + 2 * V * D * 2 + vision_layers * vision_params * 2
    lora = lm_layers * 4 * 2 * D * lora_r * (4 + 4 + 8 + 4)                    # fp32 weight, grad, Adam; the ref copy
    kv = lm_layers * rows * (prefix + new) * 2 * D * 2                         # the repeated cache, bf16
    boundaries = lm_layers * (prompts * prefix + rows * new) * D * 2           # checkpointed layer inputs
    logits = rows * new * V * 4
    return flops, {"weights": weights, "lora": lora, "kv": kv, "activations": boundaries + logits,
                   "peak": weights + lora + kv + boundaries + logits}


def estimate(measured_phases, measured_layers, vision_layers):
    """The measured step (phases in seconds; {} when none was run) beside its model at this depth and at full
    depth on H100 / H200, one and four GPUs."""
    prompt_tokens = 40
    here_flops, here_bytes = step_model(measured_layers, vision_layers, batch_size, prompt_tokens)
    full_flops, full_bytes = step_model(LLAMA_7B["num_hidden_layers"], CLIP_L_336["num_hidden_layers"], batch_size,
                                        prompt_tokens)
    weight_bytes = full_bytes["weights"] - 2 * LLAMA_7B["vocab_size"] * LLAMA_7B["hidden_size"] * 2
    gpus = {}
    for name, (peak_flops, bandwidth, memory_gb) in GPUS.items():
        seconds = {phase: full_flops[phase] / (MATMUL_SHARE * peak_flops) for phase in PHASES}
        seconds["generation"] += max_new_tokens * (weight_bytes / bandwidth
                                                   + LLAMA_7B["num_hidden_layers"] * DECODE_LAYER_S)
        step_s = sum(seconds.values())
        four_gb = (full_bytes["peak"] - full_bytes["weights"] * 3 / 4) / 1e9   # FSDP: a quarter of the weights each
        gpus[name] = {"phases_s": seconds, "step_s": step_s, "memory_gb": full_bytes["peak"] / 1e9,
                      "fits": full_bytes["peak"] / 1e9 < memory_gb, "four_gpus_step_s": step_s * FSDP_SLOWDOWN,
                      "four_gpus_memory_gb": four_gb,
                      "four_gpus_samples_per_s": 4 * batch_size * num_generations / (step_s * FSDP_SLOWDOWN)}
    return {"measured_layers": measured_layers, "measured_phases_s": measured_phases,
            "modelled_flops_here": here_flops, "modelled_bytes_here": here_bytes, "full_depth_flops": full_flops,
            "full_depth_bytes": full_bytes, "gpus": gpus,
            "assumptions": {"matmul_share_of_peak": MATMUL_SHARE, "decode_layer_s": DECODE_LAYER_S,
                            "fsdp_slowdown": FSDP_SLOWDOWN, "prompt_tokens": prompt_tokens, "gpus": GPUS}}


def print_estimate(found):
    here = found["measured_layers"]
    print(f"\n{'phase':<14} {'measured here':>14} {'TFLOP here':>11} {'TFLOP 32 layers':>16} "
          + " ".join(f"{name + ' est.':>10}" for name in found["gpus"]))
    for phase in PHASES:
        print(f"{phase:<14} {found['measured_phases_s'].get(phase, 0.0):>12.2f} s "
              f"{found['modelled_flops_here'][phase] / 1e12:>11.2f} {found['full_depth_flops'][phase] / 1e12:>16.1f} "
              + " ".join(f"{gpu['phases_s'][phase]:>8.2f} s" for gpu in found["gpus"].values()))
    print(f"modelled memory at {here} layers {found['modelled_bytes_here']['peak'] / 1e9:.1f} GB; at full depth "
          f"{found['full_depth_bytes']['peak'] / 1e9:.1f} GB (" + ", ".join(
              f"{k} {v / 1e9:.1f}" for k, v in found["full_depth_bytes"].items() if k != "peak") + ")")
    for name, gpu in found["gpus"].items():
        print(f"estimate {name}: step {gpu['step_s']:.1f} s, {gpu['memory_gb']:.0f} GB "
              f"({'fits' if gpu['fits'] else 'does NOT fit'}); 4 x {name} (FSDP2, same per-GPU batch): step "
              f"{gpu['four_gpus_step_s']:.1f} s, {gpu['four_gpus_memory_gb']:.0f} GB each, "
              f"{gpu['four_gpus_samples_per_s']:.1f} samples/s")
    print(f"assumptions: {found['assumptions']['matmul_share_of_peak']:.0%} of peak FLOP/s, "
          f"{found['assumptions']['decode_layer_s'] * 1e3:.1f} ms per layer per decoding step, FSDP2 "
          f"x{found['assumptions']['fsdp_slowdown']}; an estimate to hold the first GPU run against, not a figure")


def main(argv):
    from configurator import configure
    configure(argv, globals())
    if estimate_only:
        found = estimate({}, layers or LLAMA_7B["num_hidden_layers"], layers or CLIP_L_336["num_hidden_layers"])
        print_estimate(found)
        return found
    if tiny or cpu_smoke:   # tiny settings, except those given on the command line
        given = {arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")}
        globals().update({k: v for k, v in TINY_SMOKE.items() if k not in given})
    elif not torch.cuda.is_available() and not cpu:
        print("bench_gpu.py: no CUDA device here, nothing to measure (--cpu_smoke=True runs the code path "
              "on tiny shapes on the CPU; --cpu=True --layers=2 the paper's widths at 2 layers)")
        return None
    import torch.distributed as dist
    from configurator import setup_distributed, shutdown_distributed
    from oracle import make_oracle
    from train_step import PhaseTimer, train_step
    if fsdp and "WORLD_SIZE" not in os.environ:
        raise SystemExit("--fsdp=True runs under torchrun: torchrun --nproc_per_node=1 bench_gpu.py --fsdp=True ...")
    if fsdp and not dist.is_initialized():      # FSDP2 needs a process group, even of one process
        dist.init_process_group("nccl" if torch.cuda.is_available() and not (cpu or cpu_smoke) else "gloo")
    rank, world, device = setup_distributed()
    if cpu_smoke or cpu:
        device = torch.device("cpu")
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    policy, load_s, parts = build_policy(device, rank, world)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=learning_rate)
    oracle_ = make_oracle("reference")
    generator = torch.Generator(device=device).manual_seed(seed + 1000 * rank)
    size = policy.vision.config.image_size   # random clips at the tower's resolution: no resize
    root = os.path.join(cache_dir or os.path.join(tempfile.gettempdir(), "bench_gpu_parts"), "videos")
    samples = [{"id": f"bench{i}", "video": path, "question": QUESTION, "answer": ANSWER}
               for i, path in enumerate(write_videos(root, size, rank))]
    config = step_config()

    timer = PhaseTimer(cuda=device.type == "cuda")
    timer.wrap(policy, "encode_video", "encode")
    timer.wrap(policy, "generate", "generation")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, generated = [], []
    for step in range(warmup_steps + steps):
        timer.seconds = {}
        with timer("step"):
            metrics = train_step(policy, optimizer, samples, oracle_, config, learning_rate, generator, step, timer)
        if metrics["nonfinite_step"]:
            raise RuntimeError(f"non-finite loss or gradient in benchmark step {step}")
        if step >= warmup_steps:
            rows.append(dict(timer.seconds))
            generated.append(metrics["response_length"] * batch_size * num_generations)
    mine = summarize(rows, generated, device, load_s, world)

    ranks = [mine]
    if dist.is_initialized():
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    result = None
    if rank == 0:
        step_s = max(r["step_s"] for r in ranks)   # the step ends when the slowest rank does
        result = {"device": ranks[0]["device_name"], "world_size": world, "step_s": step_s,
                  "split_s": ranks[0]["split"], "per_rank": ranks, "parts": parts,
                  "config": {k: globals()[k] for k in ("load_in_4bit", "dtype", "gradient_checkpointing", "lora_r",
                                                       "batch_size", "num_generations", "max_new_tokens",
                                                       "num_frames", "steps", "warmup_steps", "tiny", "cpu_smoke",
                                                       "cpu", "layers", "fsdp", "share_prefix")}}
        result["estimate"] = estimate(mine["phases_s"], policy.lm.config.num_hidden_layers,
                                      policy.vision.config.num_hidden_layers)
        if baseline_step_s > 0:
            result["scaling"] = {"baseline_step_s": baseline_step_s,
                                 "efficiency": baseline_step_s / step_s,          # ideal 1.0 (same per-GPU batch)
                                 "throughput_speedup": world * baseline_step_s / step_s}   # ideal world
        os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(result, f, indent=2)
        split = ", ".join(f"{k} {v:.3f}" for k, v in result["split_s"].items())
        memory = f"{mine['peak_memory_gib']:.1f} GiB peak" if "peak_memory_gib" in mine else f"{mine['peak_rss_gib']:.1f} GiB RSS"
        print(f"bench_gpu: {world} x {result['device']}: step {step_s:.3f} s ({split}); "
              f"{mine['generation_tokens_per_s']:.0f} generated tokens/s; {memory}; wrote {out_json}")
        print_estimate(result["estimate"])
        if "scaling" in result:
            print(f"bench_gpu: scaling vs {baseline_step_s:.3f} s on 1 GPU: efficiency "
                  f"{result['scaling']['efficiency']:.2f}, throughput x{result['scaling']['throughput_speedup']:.2f}")
    shutdown_distributed()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
