"""
Benchmarks of the three efficiency claims, each as variant A (this project's way) vs variant B
(the naive way), timed interleaved in one run (rounds alternate A, B, B, A, ...) and reported as
medians and a ratio.

$ python bench.py                       # CPU (CUDA when present): ~3 min on 2 busy cores, most of it ViT-B/16
$ python bench.py --quick=True          # one round per figure (~1 min)
$ python bench.py --repeats=5 --num_threads=2

1. Rollouts, G = 4, 8, 16 responses for each of B = 4 prompts, max_new_tokens = 8:
   a. encode each video once + one batched, KV-cached generate (rollout.py) vs re-encoding the video
      for every sample (a per-sample trainer: for each of the B*G samples, encode_video on that one
      video, then generate 1 sample);
   b. the KV-cached generate vs a loop that re-runs the full forward over [prompt + generated so far]
      for every new token (`generate_no_cache` below).
   Both at the tiny default and at a CLIP ViT-B/16 vision tower (random init).
2. Sequence log-probs: chunked logit - logsumexp (rollout.token_logprobs) vs a full-vocab float32
   log_softmax + gather over bf16 logits (N=16, L=512, vocab 32000): peak memory above the logits, time.
3. Video decode: decord vs PyAV on a short synthetic clip and a longer 320x240 video.

Prints a table and writes results/bench.json. Targets are reported (ok / BELOW TARGET), never asserted.
"""
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from data import HAVE_DECORD, _write_mp4, load_video, make_synthetic_video
from model import ModelConfig, VideoLM, positions, sample_token
from rollout import token_logprobs

# -----------------------------------------------------------------------------
repeats = 3                  # timed rounds per figure; each figure reports the median round
quick = False                # True: one round per figure
num_threads = 1              # CPU only. 1, not 2: on a shared 2-core machine, a 2-thread OpenMP region
                             # stalls ~8 ms on every op whenever the other core is busy (measured), which
                             # swamps the small ops of generation. On an idle machine try --num_threads=2.
seed = 0
out_json = "results/bench.json"
# 1. rollouts
batch_size = 4               # B prompts
group_sizes = "4,8,16"       # G
max_new_tokens = 8
num_frames = 8
per_sample_k = 1             # ViT-B/16: per-sample steps timed per round, scaled to B*G (see rollout_figures)
realistic = True             # also run the CLIP ViT-B/16-shaped vision tower (the slow part of the run)
# 2. sequence log-probs
lp_rows = 16                 # N = B x G
lp_length = 512              # L
lp_vocab = 32000
lp_chunk_tokens = "1024"     # token_logprobs' chunk_tokens to measure; 1024 is its default
# 3. video decode
long_frames = 300
long_width, long_height = 320, 240
long_sample = 50             # frames sampled from the long video (the paper: 50)
# -----------------------------------------------------------------------------


def configure(argv):
    """--key=value overrides of the globals above (bools take True/False)."""
    for arg in argv:
        key, sep, value = arg.removeprefix("--").partition("=")
        default = globals().get(key)
        if not arg.startswith("--") or not sep or key.startswith("_") or not isinstance(default, (bool, int, float, str)):
            raise SystemExit(f"unknown or malformed option {arg!r}")
        if isinstance(default, bool):
            globals()[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, str):
            globals()[key] = value
        else:
            globals()[key] = type(default)(value)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(variants, rounds):
    """variants: {name: fn}. Runs `rounds` rounds, every variant once per round, the order reversed
    on every other round (A B C, C B A, ...) so that drift hits all alike -> {name: [seconds]}."""
    names = list(variants)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(variants[name]))
    return times


def figure(name, a, b, a_raw, b_raw, unit="s", better="lower", target=None, note=""):
    """One row. The ratio is always 'how much better A is': B/A for times, A/B for memory
    (so a memory ratio below 1 is a saving); target is (">=", x) or ("<=", x)."""
    a_med, b_med = statistics.median(a_raw), statistics.median(b_raw)
    ratio = b_med / a_med if unit == "s" else a_med / b_med
    status = ""
    if target is not None:
        op, value = target
        status = "ok" if (ratio >= value if op == ">=" else ratio <= value) else "BELOW TARGET"
    return {"figure": name, "a": a, "b": b, "unit": unit, "a_median": a_med, "b_median": b_med,
            "a_raw": a_raw, "b_raw": b_raw, "ratio": ratio, "ratio_is": "B/A" if unit == "s" else "A/B",
            "target": f"{target[0]} {target[1]}x" if target else "", "status": status, "note": note}


# ----------------------------------------------------------------------------- 1. rollouts

class NoEOS:
    """The policy's tokenizer with an EOS id that is never sampled (-1): every variant then generates
    exactly max_new_tokens tokens per sample, so all of them time the same amount of work."""
    eos_token_id = -1

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def build_policy(kind):
    """'tiny': VideoLM(ModelConfig()), frames 64x64. 'vit_b16': the same tiny LM behind a CLIP
    ViT-B/16-shaped tower (hidden 768, 12 layers, 12 heads, MLP 3072, patch 16, 224 px), random init."""
    if kind == "tiny":
        policy, frame_size = VideoLM(ModelConfig()), 64
    else:
        # ModelConfig's tiny tower hard-codes num_attention_heads=4 and intermediate_size=2*hidden
        # (1536 here, not ViT-B's 3072), so swap in the exact ViT-B/16 shape; the projector
        # (768 -> LM width) fits either.
        from transformers import CLIPVisionConfig, CLIPVisionModel
        policy = VideoLM(ModelConfig(tiny_vision_hidden=768, tiny_vision_layers=12,
                                     tiny_image_size=224, tiny_patch_size=16))
        torch.manual_seed(seed)
        policy.vision = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=224, patch_size=16)).requires_grad_(False)
        frame_size = 224
    policy.tokenizer = NoEOS(policy.tokenizer)
    return policy.to(DEVICE).eval(), frame_size


def synthetic_batch(count, frame_size):
    """count (sample, frames) pairs of the synthetic task -> samples, uint8 (count, T, S, S, 3)."""
    rng = np.random.default_rng(seed)
    samples, frames = [], []
    for i in range(count):
        video, question, _ = make_synthetic_video(rng, ["colour", "count", "position", "order"][i % 4],
                                                  num_frames=num_frames, size=frame_size)
        samples.append({"question": question})
        frames.append(torch.from_numpy(video))
    return samples, torch.stack(frames)


def generator():
    return torch.Generator(DEVICE).manual_seed(seed)


@torch.no_grad()
def generate_no_cache(policy, features, prompt_ids, prompt_mask, group_size, max_new_tokens,
                      temperature=1.0, top_p=1.0, greedy=False, generator=None):
    """model.generate without the KV cache: every new token re-runs the LM over the whole
    [visual, prompt, generated so far] sequence. Never stops early (no EOS), like NoEOS."""
    embeds, mask = policy.prompt_embeddings(features, prompt_ids, prompt_mask)
    embeds, mask = embeds.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    embed_tokens = policy.lm.get_input_embeddings()
    tokens = []
    for _ in range(max_new_tokens):
        out = policy.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask),
                        logits_to_keep=1, use_cache=False)
        next_token = sample_token(out.logits[:, -1].float(), temperature, top_p, greedy, generator)
        tokens.append(next_token)
        embeds = torch.cat([embeds, embed_tokens(next_token).unsqueeze(1)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(tokens, 1)


def encode_once_rollout(policy, samples, frames, group_size):
    """What rollout.py does before scoring: encode B videos once, one batched KV-cached generate."""
    features = policy.encode_video(frames)
    prompt_ids, prompt_mask = policy.encode_prompts(samples)
    return policy.generate(features, prompt_ids, prompt_mask, group_size=group_size,
                           max_new_tokens=max_new_tokens, generator=generator())


def per_sample_rollout(policy, samples, frames, group_size, count=None):
    """A per-sample trainer: sample i (of B*G, prompt i // G) encodes its video and generates one
    response. count: stop after that many samples (the rest are the same work again)."""
    total = len(samples) * group_size
    for i in range(total if count is None else count):
        b = (i // group_size) % len(samples)
        features = policy.encode_video(frames[b:b + 1])
        prompt_ids, prompt_mask = policy.encode_prompts(samples[b:b + 1])
        policy.generate(features, prompt_ids, prompt_mask, group_size=1,
                        max_new_tokens=max_new_tokens, generator=generator())


def rollout_figures(kind, rounds):
    """Times, interleaved in each round, the KV-cached and the no-cache generate of B*G samples for
    every G, and the two rollouts. Tiny: both rollouts end to end, for every G. ViT-B/16: B*G ViT
    encodes per round would take minutes, so the rollouts are timed in their sequential parts:
        encode-once(G) = encode(B videos + prompts) + generate(B*G)    (summed per round)
        per-sample(G)  = B*G / k * time(k per-sample steps)            (every step is the same work)"""
    policy, frame_size = build_policy(kind)
    samples, frames = synthetic_batch(batch_size, frame_size)
    sizes = [int(g) for g in group_sizes.split(",")]
    decompose = kind != "tiny"
    with torch.no_grad():
        features = policy.encode_video(frames)
        prompt_ids, prompt_mask = policy.encode_prompts(samples)
        # the naive loop must produce the same tokens as the cached one (greedy, so no sampling noise)
        cached = policy.generate(features, prompt_ids, prompt_mask, group_size=2,
                                 max_new_tokens=max_new_tokens, greedy=True)
        naive = generate_no_cache(policy, features, prompt_ids, prompt_mask, 2, max_new_tokens, greedy=True)
        same_tokens = bool(torch.equal(cached[0], naive))
        lengths = {g: policy.generate(features, prompt_ids, prompt_mask, group_size=g, max_new_tokens=max_new_tokens,
                                      generator=generator())[1].sum(1).float().mean().item() for g in sizes}
        per_sample_rollout(policy, samples, frames, 1, count=1)   # warm-up of the per-sample path

        variants = {}
        for g in sizes:
            variants[f"kv{g}"] = lambda g=g: policy.generate(features, prompt_ids, prompt_mask, group_size=g,
                                                             max_new_tokens=max_new_tokens, generator=generator())
            variants[f"nocache{g}"] = lambda g=g: generate_no_cache(policy, features, prompt_ids, prompt_mask,
                                                                    g, max_new_tokens, generator=generator())
            if not decompose:
                variants[f"once{g}"] = lambda g=g: encode_once_rollout(policy, samples, frames, g)
                variants[f"per_sample{g}"] = lambda g=g: per_sample_rollout(policy, samples, frames, g)
        if decompose:
            variants["encode"] = lambda: (policy.encode_video(frames), policy.encode_prompts(samples))
            variants["steps"] = lambda: per_sample_rollout(policy, samples, frames, max(sizes), count=per_sample_k)
        times = interleaved(variants, rounds)

    label = {"tiny": "tiny", "vit_b16": "ViT-B/16"}[kind]
    visual_tokens = features.shape[1]
    rows = []
    for g in sizes:
        note = (f"B={batch_size}, {num_frames} frames {frame_size}px, {visual_tokens} visual tokens, "
                f"{max_new_tokens} new tokens (mean generated {lengths[g]:.1f}); ")
        if decompose:
            once = [e + k for e, k in zip(times["encode"], times[f"kv{g}"])]
            per_sample = [t * batch_size * g / per_sample_k for t in times["steps"]]
            note += (f"A = encode {batch_size} videos (median {statistics.median(times['encode']):.2f} s) + KV "
                     f"generate; B = {batch_size * g} x one per-sample step (median "
                     f"{statistics.median(times['steps']) / per_sample_k:.2f} s, {per_sample_k} timed per round)")
        else:
            once, per_sample = times[f"once{g}"], times[f"per_sample{g}"]
            note += "both end to end"
        rows.append(figure(f"rollout {label} G={g}: encode-once vs re-encode",
                           "encode once + batched KV generate", "re-encode per sample", once, per_sample,
                           target=(">=", 3.0) if kind == "vit_b16" and g == 8 else None, note=note))
    for g in sizes:
        rows.append(figure(f"generate {label} G={g}: KV cache vs none", "batched, KV cache",
                           "batched, no cache", times[f"kv{g}"], times[f"nocache{g}"],
                           note=f"{batch_size * g} rows, prefix {visual_tokens}+{prompt_ids.shape[1]} tokens, "
                                f"{max_new_tokens} new; greedy tokens identical: {same_tokens}"))
    del policy
    return rows


# ----------------------------------------------------------------------------- 2. sequence log-probs

def full_log_softmax(logits, token_ids):
    return torch.log_softmax(logits.float(), -1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def logprob_variant(variant):
    """variant: 'full' or 'chunked<rows>' -> the function under test."""
    if variant == "full":
        return full_log_softmax
    rows = int(variant.removeprefix("chunked"))
    return lambda logits, ids: token_logprobs(logits, ids, chunk_tokens=rows)


def make_logits():
    """bf16 logits filled in place (no float32 temporary), as from a bf16 model, and target ids."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    logits = torch.empty(lp_rows, lp_length, lp_vocab, dtype=torch.bfloat16, device=DEVICE)
    logits.normal_(generator=gen).mul_(3)
    ids = torch.randint(lp_vocab, (lp_rows, lp_length), generator=gen, device=DEVICE)
    return logits, ids


def peak_rss():
    """This process image's peak RSS in bytes. VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss
    starts at the high-water mark the parent had at fork (the ViT-B/16 bench leaves ~800 MB), which
    would hide a smaller peak; VmHWM belongs to the new image only, and can be reset."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KB on Linux


def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def logprob_child(variant):
    """Runs in a fresh process (CPU): peak RSS above the logits, and the time."""
    torch.set_num_threads(num_threads)
    fn = logprob_variant(variant)
    logits, ids = make_logits()
    try:                                                            # peak := now (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = current_rss()                                            # the logits included
    hidden = peak_rss() - base                                      # > 0: a peak already above base
    times = []
    for _ in range(2):                                              # min of 2: the first includes page faults
        times.append(timed(lambda: fn(logits, ids).sum().item()))
    peak = peak_rss() - base
    checksum = fn(logits[:1, :8], ids[:1, :8]).sum().item()
    print(json.dumps({"peak": peak, "hidden": hidden, "time": min(times), "checksum": checksum}))


def logprob_measure(variant):
    """-> (peak bytes above the logits, seconds, checksum). CPU: a fresh subprocess per call."""
    if DEVICE == "cpu":
        args = [sys.executable, os.path.abspath(__file__), "_logprob_child", variant,
                *[f"--{k}={globals()[k]}" for k in ("num_threads", "seed", "lp_rows", "lp_length", "lp_vocab")]]
        out = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        if out["hidden"] > 64 << 20:
            print(f"  warning: {variant}: RSS high-water mark was {out['hidden'] / 2**20:.0f} MB above the "
                  f"baseline before the run; its peak may be understated")
        return out["peak"], out["time"], out["checksum"]
    fn = logprob_variant(variant)
    logits, ids = make_logits()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    seconds = min(timed(lambda: fn(logits, ids).sum().item()) for _ in range(2))
    peak = torch.cuda.max_memory_allocated() - base
    checksum = fn(logits[:1, :8], ids[:1, :8]).sum().item()
    del logits, ids
    torch.cuda.empty_cache()
    return peak, seconds, checksum


def logprob_figures(rounds):
    variants = [f"chunked{r}" for r in lp_chunk_tokens.split(",")] + ["full"]
    peaks, seconds, checks = {v: [] for v in variants}, {v: [] for v in variants}, {}
    for r in range(rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            peak, sec, checks[v] = logprob_measure(v)
            peaks[v].append(peak / 2**20)
            seconds[v].append(sec)
    agree = max(abs(checks[v] - checks["full"]) for v in variants) < 1e-3
    logits_mb = lp_rows * lp_length * lp_vocab * 2 / 2**20
    how = "peak RSS (VmHWM) of a fresh process per run" if DEVICE == "cpu" else "cuda max_memory_allocated"
    rows = []
    for v in variants[:-1]:
        name = f"token_logprobs(chunk_tokens={v.removeprefix('chunked')})"
        note = (f"N={lp_rows}, L={lp_length}, V={lp_vocab}, bf16 logits {logits_mb:.0f} MB not counted; {how}; "
                f"results agree: {agree}")
        rows.append(figure(f"seq log-probs peak MB: {name}", name, "fp32 log_softmax+gather",
                           peaks[v], peaks["full"], unit="MB", target=("<=", 0.3), note=note))
        rows.append(figure(f"seq log-probs time: {name}", name, "fp32 log_softmax+gather",
                           seconds[v], seconds["full"], note="min of 2 calls per process"))
    return rows


# ----------------------------------------------------------------------------- 3. video decode

def write_long_video(path):
    """long_frames frames of long_width x long_height at 30 fps (H.264, yuv420p): a square moving
    over a slowly changing gradient with a little noise, so the encoder has something to code."""
    import av
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:long_height, 0:long_width]
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = long_width, long_height, "yuv420p"
        for t in range(long_frames):
            frame = np.stack([(x + 2 * t) % 256, (y + t) % 256, np.full_like(x, (3 * t) % 256)], -1)
            frame = frame + rng.integers(0, 8, frame.shape)
            top, left = (7 * t) % (long_height - 40), (5 * t) % (long_width - 40)
            frame[top:top + 40, left:left + 40] = (230, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_figures(rounds):
    if not HAVE_DECORD:
        print("  decord is not installed: skipping the decode figures")
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        short, long = os.path.join(tmp, "short.mp4"), os.path.join(tmp, "long.mp4")
        frames, _, _ = make_synthetic_video(np.random.default_rng(seed), "order", num_frames=num_frames, size=64)
        _write_mp4(short, frames)
        write_long_video(long)
        for name, path, count in ((f"short ({num_frames} frames 64x64, all decoded)", short, num_frames),
                                  (f"long ({long_frames} frames {long_width}x{long_height}, {long_sample} "
                                   f"sampled)", long, long_sample)):
            a = load_video(path, count, backend="decord")
            b = load_video(path, count, backend="pyav")
            diff = (a.float() - b.float()).abs().mean().item() if a.shape == b.shape else float("nan")
            rounds_ = max(rounds, 5)                 # decoding is quick: more rounds, steadier medians
            times = interleaved({"decord": lambda: load_video(path, count, backend="decord"),
                                 "pyav": lambda: load_video(path, count, backend="pyav")}, rounds_)
            rows.append(figure(f"decode {name}", "decord", "PyAV", times["decord"], times["pyav"],
                               note=f"load_video; same shape {tuple(a.shape) == tuple(b.shape)}, mean |diff| "
                                    f"{diff:.2f}/255; {rounds_} rounds; decoders use their own threads"))
    return rows


# ----------------------------------------------------------------------------- report

def machine():
    info = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "device": DEVICE, "num_threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["device_name"] = torch.cuda.get_device_name() if DEVICE == "cuda" else info["cpu"]
    return info


def show(value, unit):
    if unit == "MB":
        return f"{value:.0f} MB"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def print_table(rows, info):
    header = ["figure", "variant A", "A", "variant B", "B", "ratio", "target", "status"]
    lines = [[r["figure"], r["a"], show(r["a_median"], r["unit"]), r["b"], show(r["b_median"], r["unit"]),
              f"{r['ratio']:.2f}x ({r['ratio_is']})", r["target"], r["status"]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    print(fmt(header))
    print("-+-".join("-" * w for w in widths))
    for cells in lines:
        print(fmt(cells))
    print("\nnotes:")
    for r in rows:
        if r["note"]:
            print(f"  {r['figure']}: {r['note']}")
    print(f"\nmachine: {info['device_name']} ({info['device']}), {info['cpu_count']} CPUs, "
          f"torch {info['torch']}, {info['num_threads']} torch thread(s), load avg {info['load_avg_start'][0]:.2f} "
          f"at start / {info['load_avg_end'][0]:.2f} at end, {info['wall_s']:.0f} s")
    print("A, B: medians over rounds; ratio: how many times better A is (B/A for time, A/B for memory)")


def main():
    global repeats
    if quick:
        repeats = 1
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    start = time.perf_counter()
    info = machine()
    print(f"bench on {DEVICE} ({info['device_name']}), {repeats} round(s) per figure")
    rows = []
    for kind in ["tiny"] + (["vit_b16"] if realistic else []):
        print(f"rollouts: {kind} ...", flush=True)
        rows += rollout_figures(kind, repeats)
    print("sequence log-probs ...", flush=True)
    rows += logprob_figures(repeats)
    print("video decode ...", flush=True)
    rows += decode_figures(repeats)
    info["load_avg_end"], info["wall_s"] = os.getloadavg(), time.perf_counter() - start
    print()
    print_table(rows, info)
    os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
    config = {k: v for k, v in globals().items() if not k.startswith("_") and k.islower()
              and isinstance(v, (bool, int, float, str)) and k != "DEVICE"}
    with open(out_json, "w") as f:
        json.dump({"machine": info, "config": config, "figures": rows}, f, indent=2)
    print(f"wrote {out_json}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_logprob_child":
        configure(sys.argv[3:])
        logprob_child(sys.argv[2])
    else:
        configure(sys.argv[1:])
        main()
