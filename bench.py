"""
Benchmarks of the efficiency claims, each as variant A (this project's way) vs variant B (the naive
way, or the whole it is a part of), timed interleaved in one run (rounds alternate A, B, B, A, ...)
and reported as medians and a ratio.

$ python bench.py                       # CPU (CUDA when present): ~3-4 min on 2 busy cores, most of it ViT-B/16
$ python bench.py --quick=True          # one round per figure (~1 min)
$ python bench.py --repeats=5 --num_threads=2
$ python bench.py --only=oracle,step,loader      # some sections only (rollout,logprobs,decode,oracle,step,loader)

1. Rollouts ("rollout"), G = 4, 8, 16 responses for each of B = 4 prompts, max_new_tokens = 8:
   a. encode each video once + one batched, KV-cached generate (rollout.py) vs re-encoding the video
      for every sample (a per-sample trainer: for each of the B*G samples, encode_video on that one
      video, then generate 1 sample);
   b. the KV-cached generate vs a loop that re-runs the full forward over [prompt + generated so far]
      for every new token (`generate_no_cache` below).
   Both at the tiny default and at a CLIP ViT-B/16 vision tower (random init; --realistic=False skips it).
2. Sequence log-probs ("logprobs"): chunked logit - logsumexp (rollout.token_logprobs) vs a full-vocab
   float32 log_softmax + gather over bf16 logits (N=16, L=512, vocab 32000): peak memory above the logits, time.
3. Video decode ("decode"): decord vs PyAV on a short synthetic clip and a longer 320x240 video.
4. Oracle throughput ("oracle"): oracle.JudgeOracle against a local fake judge (an OpenAI-style
   /v1/chat/completions server on 127.0.0.1, started and stopped here, answering after judge_latency
   seconds), B = 16 groups of G = 8 distinct responses: oracle.rank_many with max_workers=1 vs 8.
5. One RL step of the main job's default config ("step"): train.py's loop body (load_frames, rollout,
   oracle_ranks, rank_advantages, the reference pass, mu = 2 iterations of forward + loss, backward,
   clip + AdamW step, the step's metrics), on the tiny policy from out/sft (or a fresh one) + LoRA,
   B = 16 prompts of the synthetic train set, G = 8; each phase as a share of the step, and samples/s.
   Runs at train.py's 2 torch threads (step_threads); on a busy 2-core machine 2 threads can be many
   times slower than 1 (see num_threads), so compare --step_threads=1 there.
6. Data loading ("loader"): decode (train.load_frames) + policy.preprocess of one batch of 16 videos
   vs the RL step, timed in the same steps as 5 (so "loader" alone runs the steps of 5 too).

Prints a table and writes results/bench.json. Targets are reported (ok / BELOW TARGET), never asserted.
"""
import contextlib
import http.server
import json
import os
import platform
import re
import resource
import threading
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import oracle
import rollout as rollout_lib
import train
from data import HAVE_DECORD, _write_mp4, load_jsonl, load_video, make_synthetic_dataset, make_synthetic_video
from grpo_rank import group_ndcg, grpo_rank_loss, rank_advantages, ranks_from_scores
from model import ModelConfig, VideoLM, positions, sample_token
from rollout import completion_logprobs, token_logprobs
from sft import cosine_lr

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
# 4. Oracle (judge) throughput
judge_latency = 0.05         # seconds the fake judge waits before each reply (a real judge LLM: usually longer)
judge_groups = 16            # B groups per rank_many call
judge_group_size = 8         # G responses per group, all distinct (nothing deduplicated)
judge_workers = 8            # the concurrent variant's max_workers (train.py's oracle_workers)
# 5. one RL step (train.py's main loop) and 6. data loading
step_count = 7               # timed steps after one untimed warm-up step (--quick: 3); figures are medians
step_sft_dir = "out/sft"     # the warm start train.py uses (out_dir/sft); a fresh VideoLM(ModelConfig()) if absent
step_batch_size = 16         # B prompts        } train.py's defaults; everything else of the step is
step_group_size = 8          # G                } read from train.py's globals (oracle, lora_r, lr, ...)
step_max_new_tokens = 8
step_iterations = 2          # mu
step_beta = 0.04
step_threads = 2             # torch threads for 5 and 6, as train.py's num_threads
only = ""                    # comma list of sections to run: rollout,logprobs,decode,oracle,step,loader,prefix; empty: all
step_share_prefix = True     # as train.py (share_prefix); False: the plain scoring pass (see the prefix section)
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


def figure(name, a, b, a_raw, b_raw, unit="s", better="lower", target=None, note="", share=False):
    """One row. The ratio is always 'how much better A is': B/A for times, A/B for memory
    (so a memory ratio below 1 is a saving); target is (">=", x) or ("<=", x).
    share=True: A is a part of B (a phase of a step), the ratio is A/B, printed as a percentage."""
    a_med, b_med = statistics.median(a_raw), statistics.median(b_raw)
    ratio = b_med / a_med if unit == "s" and not share else a_med / b_med
    status = ""
    if target is not None:
        op, value = target
        status = "ok" if (ratio >= value if op == ">=" else ratio <= value) else "BELOW TARGET"
    return {"figure": name, "a": a, "b": b, "unit": unit, "a_median": a_med, "b_median": b_med,
            "a_raw": a_raw, "b_raw": b_raw, "ratio": ratio,
            "ratio_is": "share A/B" if share else "B/A" if unit == "s" else "A/B",
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


# ----------------------------------------------------------------------------- 4. Oracle throughput

class FakeJudgeServer(http.server.ThreadingHTTPServer):
    """A stand-in judge LLM: POST /v1/chat/completions -> an OpenAI-style chat completion whose
    content is {"ranking": [...]}, the "[k]" ids of the prompt's candidate lines (JudgeOracle's
    rank_prompt), in reverse, after `latency` seconds (the judge's thinking time). One thread per
    request, as a real server serves requests concurrently."""
    daemon_threads = True
    request_queue_size = 64          # > max_workers: no refused connects (a refused one retries after 1 s)

    def __init__(self, latency):
        super().__init__(("127.0.0.1", 0), FakeJudgeHandler)
        self.latency, self.requests, self.lock = latency, 0, threading.Lock()

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class FakeJudgeHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        prompt = body["messages"][-1]["content"]
        ids = [int(k) for k in re.findall(r"^\[(\d+)\] ", prompt, flags=re.M)]
        time.sleep(self.server.latency)
        reply = json.dumps({
            "id": f"chatcmpl-bench-{self.server.requests}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": json.dumps({"ranking": ids[::-1]})}}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 2 * len(ids), "total_tokens": 0},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)
        with self.server.lock:
            self.server.requests += 1

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def fake_judge(latency):
    """A FakeJudgeServer on a free loopback port for the duration of the block."""
    if any(os.environ.get(k) for k in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")):
        os.environ["no_proxy"] = ",".join(filter(None, [os.environ.get("no_proxy"), "127.0.0.1"]))
    server = FakeJudgeServer(latency)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def train_set():
    """The main job's synthetic train split (made once by train.py; cached in train.data_dir)."""
    return load_jsonl(make_synthetic_dataset(train.data_dir, num_train=train.num_train, num_eval=train.num_eval)["train"])


def judge_groups_of(count, group_size):
    """count samples of the synthetic train set and group_size distinct responses for each."""
    samples = train_set()[:count]
    words = ["red", "blue", "green", "yellow", "two", "three", "left", "right", "the circle", "a square"]
    groups = [[f"{words[(b + i) % len(words)]} {i}" for i in range(group_size)] for b in range(count)]
    return samples, groups


def oracle_figures(rounds):
    samples, groups = judge_groups_of(judge_groups, judge_group_size)
    with fake_judge(judge_latency) as server:
        judge = oracle.JudgeOracle(base_url=server.base_url, model="fake-judge", api_key_env="", seed=seed)
        oracle.rank_many(judge, samples[:2], groups[:2], max_workers=2)          # warm-up
        server.requests, results = 0, []
        check = lambda workers: results.append(oracle.rank_many(judge, samples, groups, max_workers=workers))
        rounds_ = 3 if quick else max(rounds, 5)     # a round is ~1 s: more rounds, steadier medians
        times = interleaved({"concurrent": lambda: check(judge_workers), "sequential": lambda: check(1)}, rounds_)
        requests = server.requests
    valid = all(isinstance(ranks, list) and sorted(ranks) == list(range(judge_group_size))
                for result in results for ranks in result)
    ideal = min(judge_workers, judge_groups)
    note = (f"B={judge_groups} groups of G={judge_group_size} distinct responses, fake judge on 127.0.0.1 "
            f"answering after {judge_latency * 1000:.0f} ms; oracle.rank_many (as train.oracle_ranks calls it); "
            f"{requests} requests for {len(results)} calls ({len(results) * judge_groups} expected), every "
            f"ranking a valid permutation: {valid}; ideal ratio ~{ideal}x (B / max_workers waves of one "
            f"latency each); {rounds_} rounds")
    return [figure(f"oracle judge B={judge_groups} G={judge_group_size}: {judge_workers} workers vs 1",
                   f"rank_many max_workers={judge_workers}", "rank_many max_workers=1",
                   times["concurrent"], times["sequential"], note=note)]


# ----------------------------------------------------------------------------- 5. one RL step, 6. loading

class Phases:
    """Wall time per named phase of one step; a phase may be entered many times (summed)."""

    def __init__(self):
        self.times = {}

    @contextlib.contextmanager
    def __call__(self, name):
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, name, fn):
        def timed_fn(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)
        return timed_fn


def step_policy():
    """The policy train.py trains: the SFT warm start (out/sft) + LoRA + the reference snapshot."""
    if os.path.exists(os.path.join(step_sft_dir, "config.json")):
        policy, source = VideoLM.load(step_sft_dir), f"SFT checkpoint {step_sft_dir}"
    else:
        policy, source = VideoLM(ModelConfig()), f"fresh VideoLM(ModelConfig()) (no SFT checkpoint at {step_sft_dir})"
    if train.lora_r > 0 and not policy.has_lora:
        policy.add_lora(train.lora_r, train.lora_alpha, train.lora_dropout, train.lora_target_modules)
    policy.snapshot_reference()
    policy.config.share_prefix = step_share_prefix
    if step_share_prefix:
        source += ", share_prefix=True"
    return policy.to(DEVICE), source


# the phases of one step, in train.py's order: (key, label); "rollout" is split into its parts
STEP_PHASES = [("data", "load_frames (decode 16 videos)"), ("encode", "rollout: policy.encode_video"),
               ("generate", "rollout: policy.generate"), ("score", "log-probs: rollout scoring pass"),
               ("rollout_rest", "rollout: prompts, decode, ties"), ("oracle", "train.oracle_ranks"),
               ("advantages", "rank_advantages"), ("reference", "log-probs: reference pass"),
               ("forward", "train forward + loss (x mu)"), ("backward", "backward (x mu)"),
               ("optimizer", "zero_grad, clip, AdamW step (x mu)"), ("metrics", "step metrics"),
               ("other", "other (unaccounted)")]


def measure_steps(steps):
    """Runs 1 + steps RL steps exactly as train.py's main loop does (single process) and times each
    phase of each step; after each step (outside it) also times policy.preprocess of its frames.
    -> dict of per-step lists (seconds) keyed by STEP_PHASES keys + "step", "preprocess"; and info."""
    load_avg = os.getloadavg()[0]                        # before this section adds its own load
    torch.set_num_threads(step_threads)
    torch.manual_seed(train.seed)
    try:
        train_samples = train_set()
        policy, source = step_policy()
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=train.learning_rate,
                                      weight_decay=train.weight_decay)
        oracle_ = train.build_oracle()
        generator = torch.Generator(device=DEVICE).manual_seed(train.seed)
        ph = Phases()
        policy.encode_video = ph.wrap("encode", policy.encode_video)     # instance attributes: rollout()
        policy.generate = ph.wrap("generate", policy.generate)           # calls these wrappers
        order = torch.randperm(len(train_samples), generator=torch.Generator().manual_seed(train.seed))
        total_steps = max(1, len(train_samples) // step_batch_size) * train.epochs
        record = {key: [] for key, _ in STEP_PHASES}
        record.update(step=[], preprocess=[])
        lengths, failures_seen = [], 0
        for step in range(1 + steps):
            start = (step * step_batch_size) % (len(train_samples) - step_batch_size + 1)
            samples = [train_samples[i] for i in order[start:start + step_batch_size].tolist()]
            ph.times = {}
            sync()
            step_start = time.perf_counter()

            with ph("data"):
                frames, samples, failed = train.load_frames(samples, policy.config.num_frames)
            with ph("rollout"):
                scoring, rollout_lib.completion_logprobs = rollout_lib.completion_logprobs, ph.wrap("score", completion_logprobs)
                try:
                    batch = rollout_lib.rollout(policy, samples, frames.to(DEVICE), step_group_size, step_max_new_tokens,
                                                train.temperature, train.top_p, train.mask_truncated_completions, generator)
                finally:
                    rollout_lib.completion_logprobs = scoring
            with ph("oracle"):
                oracle_rank, valid, failures = train.oracle_ranks(oracle_, samples, batch.responses, train.oracle_workers)
            with ph("advantages"):
                advantages = torch.zeros(len(samples), step_group_size)
                if valid.any():
                    advantages[valid] = rank_advantages(oracle_rank[valid], batch.seq_logp[valid].cpu(),
                                                        train.advantage, train.dcg_kind, train.bound)
                advantages = advantages.to(DEVICE).view(-1)
            with ph("reference"):
                ref_logp = None
                if step_beta != 0 or train.ratio_policy == "reference":
                    with torch.no_grad():
                        ref_logp = completion_logprobs(policy, batch, reference=True)
                old_logp = batch.old_logp if train.ratio_policy == "rollout" else ref_logp
            with ph("optimizer"):
                lr = cosine_lr(step, total_steps, train.warmup_steps, train.learning_rate)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                policy.train()
            losses = []
            for _ in range(step_iterations):
                with ph("forward"):
                    logp = completion_logprobs(policy, batch, with_entropy=train.entropy_coef != 0)
                    logp, entropy = logp if isinstance(logp, tuple) else (logp, None)
                    loss, stats = grpo_rank_loss(logp, old_logp, ref_logp if step_beta != 0 else None, advantages,
                                                 batch.loss_mask, train.epsilon, train.epsilon_high or None, step_beta,
                                                 entropy, train.entropy_coef, train.loss_agg)
                    finite = bool(torch.isfinite(loss))
                if not finite:
                    break
                with ph("optimizer"):
                    optimizer.zero_grad(set_to_none=True)
                with ph("backward"):
                    loss.backward()
                with ph("optimizer"):
                    grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), train.grad_clip)
                    if torch.isfinite(grad_norm):
                        optimizer.step()
                    losses.append(loss.item())
            with ph("metrics"):   # what train.py computes for its metrics line
                ndcg = group_ndcg(ranks_from_scores(batch.seq_logp.cpu()), oracle_rank, train.dcg_kind)
                correct = [float(train.sample_correct(s, r)) for s, group in zip(samples, batch.responses) for r in group]
                _ = [ndcg.mean().item(), advantages.abs().mean().item(), sum(correct) / len(correct),
                     (batch.entropy * batch.completion_mask).sum().item(), batch.truncated.float().mean().item()]
                lengths.append(batch.completion_mask.sum(-1).float().mean().item())

            sync()
            total = time.perf_counter() - step_start
            preprocess = timed(lambda: policy.preprocess(frames.to(DEVICE)))   # outside the step: figure 6
            if step == 0:
                continue                                                        # warm-up
            failures_seen += len(failures) + len(failed)
            t = ph.times
            t["rollout_rest"] = t["rollout"] - t.get("encode", 0) - t.get("generate", 0) - t.get("score", 0)
            t["other"] = total - sum(t.get(key, 0.0) for key in
                                     ("data", "rollout", "oracle", "advantages", "reference", "forward", "backward",
                                      "optimizer", "metrics"))
            for key, _ in STEP_PHASES:
                record[key].append(t.get(key, 0.0))
            record["step"].append(total)
            record["preprocess"].append(preprocess)
        info = {"source": source, "oracle": repr(oracle_), "threads": torch.get_num_threads(), "load_avg": load_avg,
                "mean_length": statistics.mean(lengths[1:]), "failures": failures_seen,
                "trainable": sum(p.numel() for p in policy.trainable_parameters())}
        return record, info
    finally:
        torch.set_num_threads(num_threads)


_steps_cache = {}


def step_measurements(rounds):
    """measure_steps once per run, shared by the step and loader sections."""
    if "result" not in _steps_cache:
        _steps_cache["result"] = measure_steps(3 if quick else max(step_count, rounds))
    return _steps_cache["result"]


def step_figures(rounds):
    record, info = step_measurements(rounds)
    samples = step_batch_size * step_group_size
    step_med = statistics.median(record["step"])
    summary = (f"one RL step of train.py's default config: {info['source']} + LoRA r={train.lora_r} "
               f"(+ 'ref' adapter), B={step_batch_size} prompts x G={step_group_size} = {samples} samples, "
               f"max_new_tokens={step_max_new_tokens} (mean generated {info['mean_length']:.1f}), "
               f"mu={step_iterations}, beta={step_beta}, oracle {info['oracle']} ({train.oracle_workers} workers), "
               f"{info['threads']} torch thread(s) (step_threads; train.py's num_threads is {train.num_threads}, the other "
               f"sections use {num_threads}); "
               f"median of {len(record['step'])} steps after 1 warm-up: step {show(step_med, 's')} = "
               f"{samples / step_med:.0f} samples/s (steps {show(min(record['step']), 's')} .. "
               f"{show(max(record['step']), 's')}); phase medians need not add up to 100%; timings vary with machine "
               f"load (load avg {info['load_avg']:.2f} on {os.cpu_count()} CPUs before the steps); "
               f"oracle/decode failures: {info['failures']}")
    if step_threads > 1 and info["load_avg"] > (os.cpu_count() or 1) - 1:
        summary += (f". WARNING: busy machine and {step_threads} torch threads: every OpenMP region can wait a "
                    f"scheduler slice for a descheduled thread (see num_threads above), which inflates the many-op "
                    f"phases (backward, forward) most; compare --step_threads=1")
    rows = []
    for key, label in STEP_PHASES:
        rows.append(figure(f"RL step: {label}", label, "whole RL step", record[key], record["step"], share=True,
                           note=summary if not rows else ""))
    rows[0]["samples_per_s"] = samples / step_med
    return rows


def loader_figures(rounds):
    record, info = step_measurements(rounds)
    load = [d + p for d, p in zip(record["data"], record["preprocess"])]
    share = statistics.median(record["data"]) / statistics.median(record["step"])
    note = (f"A: train.load_frames + policy.preprocess of one batch of {step_batch_size} videos "
            f"({policy_frames_note()}), timed in the same steps as the RL step figures; B: the whole step "
            f"(which includes load_frames: train.py decodes synchronously, {share:.1%} of the step). "
            f"ratio > 1: a background loader would keep up with training, the loader is not the bottleneck")
    return [figure(f"loader: decode+preprocess B={step_batch_size} vs RL step", "load_frames + preprocess",
                   "whole RL step", load, record["step"], note=note)]


def policy_frames_note():
    meta = os.path.join(train.data_dir, "meta.json")
    try:
        with open(meta) as f:
            m = json.load(f)
        return f"synthetic mp4s, {m['num_frames']} frames {m['size']}x{m['size']}, {train.num_frames} sampled"
    except (OSError, ValueError, KeyError):
        return f"{train.num_frames} frames sampled"


# ----------------------------------------------------------------------------- report

def machine():
    info = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "device": DEVICE, "num_threads": torch.get_num_threads(), "load_avg_start": os.getloadavg(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
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
              f"{r['ratio']:.1%} of B" if r["ratio_is"] == "share A/B" else f"{r['ratio']:.2f}x ({r['ratio_is']})",
              r["target"], r["status"]] for r in rows]
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
    print("A, B: medians over rounds; ratio: how many times better A is (B/A for time, A/B for memory); "
          "'% of B': the median of a part as a share of the median whole")


SECTIONS = ("rollout", "logprobs", "decode", "oracle", "step", "loader", "prefix")


def prefix_figures(rounds):
    """Scoring a rollout's completions, forward + backward as in a training pass: the full pass
    (each of the B*G rows runs [visual, prompt, completion]) vs share_prefix (the [visual, prompt]
    prefix once per prompt, its KV cache repeated for the G completions). Same policy, same tokens."""
    torch.set_num_threads(step_threads)
    torch.manual_seed(train.seed)
    policy, source = step_policy()
    samples = train_set()[:step_batch_size]
    frames, samples, _ = train.load_frames(samples, policy.config.num_frames)
    features = policy.encode_video(frames.to(DEVICE))
    prompt_ids, prompt_mask = policy.encode_prompts(samples)
    ids, mask, _ = policy.generate(features, prompt_ids, prompt_mask, group_size=step_group_size,
                                   max_new_tokens=step_max_new_tokens, generator=torch.Generator(DEVICE).manual_seed(0))

    def scoring(share):
        def run():
            policy.config.share_prefix = share
            policy.zero_grad(set_to_none=True)
            logits = policy.completion_logits(features, prompt_ids, prompt_mask, ids, mask, group_size=step_group_size)
            (token_logprobs(logits, ids) * mask).sum().backward()
        return run
    times = interleaved({"full": scoring(False), "shared": scoring(True)}, max(rounds, 5))
    policy.config.share_prefix = step_share_prefix
    torch.set_num_threads(num_threads)
    note = (f"{source}; B={step_batch_size} prompts x G={step_group_size}, prefix {features.shape[1]} visual + "
            f"{prompt_ids.shape[1]} prompt tokens, completions {ids.shape[1]} tokens (mean {mask.sum(-1).float().mean():.1f}); "
            f"forward + backward of the log-probs; {step_threads} torch thread(s)")
    return [figure(f"prefix: score B={step_batch_size} G={step_group_size}, shared prefix vs full", "share_prefix=True",
                   "full pass per row", times["shared"], times["full"], note=note)]


def main():
    global repeats
    if quick:
        repeats = 1
    sections = [name.strip() for name in only.split(",") if name.strip()] or list(SECTIONS)
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {unknown}; valid: {','.join(SECTIONS)}")
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    start = time.perf_counter()
    info = machine()
    print(f"bench on {DEVICE} ({info['device_name']}), {repeats} round(s) per figure; sections: {','.join(sections)}")
    rows = []
    if "rollout" in sections:
        for kind in ["tiny"] + (["vit_b16"] if realistic else []):
            print(f"rollouts: {kind} ...", flush=True)
            rows += rollout_figures(kind, repeats)
    if "logprobs" in sections:
        print("sequence log-probs ...", flush=True)
        rows += logprob_figures(repeats)
    if "decode" in sections:
        print("video decode ...", flush=True)
        rows += decode_figures(repeats)
    if "oracle" in sections:
        print("oracle (fake judge) ...", flush=True)
        rows += oracle_figures(repeats)
    if "step" in sections or "loader" in sections:
        print("RL step ...", flush=True)
    if "step" in sections:
        rows += step_figures(repeats)
    if "loader" in sections:
        rows += loader_figures(repeats)
    if "prefix" in sections:
        print("shared-prefix scoring ...", flush=True)
        rows += prefix_figures(repeats)
    info["load_avg_end"], info["wall_s"] = os.getloadavg(), time.perf_counter() - start
    print()
    print_table(rows, info)
    os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
    config = {k: v for k, v in globals().items() if not k.startswith("_") and k.islower()
              and isinstance(v, (bool, int, float, str)) and k != "DEVICE"}
    for row in rows:
        row["run"] = info["date"]
    result = {"machine": info, "config": config, "sections": sections, "figures": rows}
    kept, runs = keep_previous(sections)
    if kept:   # a partial run replaces only its own sections' figures in an existing out_json
        result["figures"] = kept + rows
        result["other_runs"] = runs   # machine and config of the runs the kept figures came from, by "run"
    with open(out_json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out_json}" + (f" (kept {len(kept)} figures of other sections from earlier runs)" if kept else ""))


def section_of(row):
    """Which section a figure row belongs to (rows of older files carry no tag)."""
    prefixes = {"rollout ": "rollout", "generate ": "rollout", "seq log-probs": "logprobs", "decode ": "decode",
                "oracle ": "oracle", "RL step:": "step", "loader:": "loader", "prefix:": "prefix"}
    return next((sec for prefix, sec in prefixes.items() if row["figure"].startswith(prefix)), None)


def keep_previous(sections):
    """For a partial run (--only): out_json's figures of the sections not run now, and
    {run: {"machine", "config"}} of the runs they came from; ([], {}) otherwise."""
    if set(sections) == set(SECTIONS) or not os.path.exists(out_json):
        return [], {}
    try:
        with open(out_json) as f:
            previous = json.load(f)
        runs = {previous["machine"].get("date", "previous"): {"machine": previous["machine"],
                                                              "config": previous["config"]}}
        runs.update(previous.get("other_runs", {}))
        figures = [dict(r, run=r.get("run", next(iter(runs)))) for r in previous["figures"]
                   if section_of(r) not in sections]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [], {}
    return figures, {run: runs[run] for run in {r["run"] for r in figures} if run in runs}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_logprob_child":
        configure(sys.argv[3:])
        logprob_child(sys.argv[2])
    else:
        configure(sys.argv[1:])
        main()
