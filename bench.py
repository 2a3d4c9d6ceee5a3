"""
The README's efficiency figures, each as variant A (this project's way) vs variant B (the naive way,
or the whole it is a part of), timed interleaved in one run (rounds alternate A B, B A, ...) and
reported as medians and a ratio. Targets are reported (ok / BELOW TARGET), never asserted.

$ python bench.py            # every section (~4 min on 2 cores, most of it ViT-B/16); --only=step,prefix

  rollout   B = 4 prompts, G = 4 / 8 / 16: encode each video once + one batched KV-cached generate
            (rollout.py) vs re-encoding the video for every sample; the KV-cached generate vs re-running
            the whole prefix for every new token. At the tiny default and behind a CLIP ViT-B/16-shaped
            tower (random init; --realistic=False skips it).
  logprobs  rollout.token_logprobs (chunked logit - logsumexp) vs a float32 log_softmax + gather over bf16
            logits (N 16, L 512, vocab 32k): peak memory above the logits (a fresh process per run), time.
  decode    decord vs PyAV, a short synthetic clip and a longer 320x240 video.
  oracle    oracle.JudgeOracle.rank_many with 8 workers vs 1, against a fake judge on 127.0.0.1.
  step      train_step.train_step on the main job's config (train.py's defaults, read without
            importing it), the SFT warm start of out/sft + LoRA: each phase as a share of the step;
            and decoding + preprocessing a batch vs the step (would a background loader help?).
  prefix    scoring a rollout's completions, forward + backward: share_prefix vs the full pass (also checkpointed).

Writes results/bench.json (a run with --only replaces just its own sections' figures there).
"""
import http.server
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from configurator import configure, cosine_lr, option_keys, read_config_file
from data import HAVE_DECORD, load_jsonl, load_video
from model import ModelConfig, VideoLM, positions
from oracle import JudgeOracle, make_oracle
from rollout import sample_token, token_logprobs
from synth import make_synthetic_dataset, make_synthetic_video, write_mp4
from train_step import PhaseTimer, StepConfig, load_frames, train_step

# -----------------------------------------------------------------------------
repeats = 3                  # timed rounds per figure; each figure reports the median round
quick = False                # one round per figure
num_threads = 1              # CPU. On a shared 2-core machine a 2-thread OpenMP region stalls whenever the
                             # other core is busy (measured), which swamps generation's small ops.
seed = 0
out_json = "results/bench.json"
only = ""                    # comma list of sections; empty: all
batch_size = 4               # rollout: B prompts, G responses each
group_sizes = "4,8,16"
max_new_tokens = 8
num_frames = 8
realistic = True             # also the ViT-B/16-shaped tower (the slow part of the run)
lp_rows, lp_length, lp_vocab = 16, 512, 32000
long_frames, long_width, long_height, long_sample = 300, 320, 240, 50
judge_latency = 0.05         # seconds the fake judge thinks before each reply
judge_groups, judge_workers = 16, 8
step_count = 7               # timed steps after one warm-up (--quick: 3)
step_sft_dir = "out/sft"     # the warm start train.py makes; a fresh VideoLM if absent
step_threads = 2             # train.py's num_threads; on a busy machine compare --step_threads=1
step_share_prefix = True     # as train.py; False: the plain scoring pass
# -----------------------------------------------------------------------------
SECTIONS = ("rollout", "logprobs", "decode", "oracle", "step", "prefix")
HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = read_config_file(os.path.join(HERE, "train.py"), skip_other=True)   # the main job's defaults
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
timer = PhaseTimer(cuda=DEVICE == "cuda")


def timed(fn):
    timer.seconds = {}
    with timer("run"):   # (on CUDA, synchronised)
        fn()
    return timer.seconds["run"]


def interleaved(variants, rounds):
    """variants: {name: fn} -> {name: [seconds]}; each round runs every variant, in reverse order on
    every other round (A B, B A, ...), so that drift hits all alike."""
    times = {name: [] for name in variants}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            times[name].append(timed(variants[name]))
    return times


def figure(name, a, b, a_raw, b_raw, unit="s", target=None, note="", share=False):
    """One row. ratio: how much better A is (B/A for times, A/B for memory, below 1 a saving);
    share=True: A is a part of B (a phase of a step), ratio A/B. target: (">=" | "<=", x)."""
    a_med, b_med = statistics.median(a_raw), statistics.median(b_raw)
    ratio = b_med / a_med if unit == "s" and not share else a_med / b_med
    status = "" if target is None else "ok" if (ratio >= target[1] if target[0] == ">=" else ratio <= target[1]) \
        else "BELOW TARGET"
    return {"figure": name, "a": a, "b": b, "unit": unit, "a_median": a_med, "b_median": b_med, "a_raw": a_raw,
            "b_raw": b_raw, "ratio": ratio, "ratio_is": "share A/B" if share else "B/A" if unit == "s" else "A/B",
            "target": f"{target[0]} {target[1]}x" if target else "", "status": status, "note": note}


# ----------------------------------------------------------------------------- rollout

def rollout_policy(kind):
    """'tiny': VideoLM(ModelConfig()), frames 64x64; 'vit_b16': the same LM behind a CLIP ViT-B/16-shaped
    tower (hidden 768, 12 layers and heads, MLP 3072, patch 16, 224 px)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    size = 64 if kind == "tiny" else 224
    policy = VideoLM(ModelConfig() if kind == "tiny" else ModelConfig(tiny_vision_hidden=768, tiny_image_size=224))
    if kind != "tiny":   # the tiny config's tower has 4 heads and an MLP of 2 x hidden: swap in ViT-B/16's shape
        torch.manual_seed(seed)
        policy.vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                         num_attention_heads=12, image_size=224, patch_size=16))
        policy.vision.requires_grad_(False)
    rng = np.random.default_rng(seed)
    clips = [make_synthetic_video(rng, ["colour", "count", "position", "order"][i % 4], num_frames=num_frames, size=size)
             for i in range(batch_size)]
    samples = [{"question": question} for _, question, _ in clips]
    return policy.to(DEVICE).eval(), samples, torch.stack([torch.from_numpy(frames) for frames, _, _ in clips])


def generate_no_cache(policy, features, prompt_ids, prompt_mask, group_size, greedy=False):
    """model.generate without its KV cache: every new token re-runs the LM over the whole sequence."""
    embeds, mask = policy.prompt_embeddings(features, prompt_ids, prompt_mask)
    embeds, mask = embeds.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    tokens, generator = [], torch.Generator(DEVICE).manual_seed(seed)
    for _ in range(max_new_tokens):
        logits = policy.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask),
                           logits_to_keep=1, use_cache=False).logits[:, -1].float()
        tokens.append(sample_token(logits, greedy=greedy, generator=generator))
        embeds = torch.cat([embeds, policy.lm.get_input_embeddings()(tokens[-1]).unsqueeze(1)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(tokens, 1)


@torch.no_grad()
def rollout_figures(kind, rounds):
    """Tiny: both rollouts end to end. ViT-B/16 (B*G tower passes a round would take minutes) in parts: encode-once =
    encode(B videos) + generate(B*G); per-sample = B*G x one per-sample step (encode one video, generate one)."""
    policy, samples, frames = rollout_policy(kind)
    sizes = [int(g) for g in group_sizes.split(",")]
    features = policy.encode_video(frames)
    prompt_ids, prompt_mask = policy.encode_prompts(samples)
    never = lambda done: False      # no early stop at EOS: every variant generates max_new_tokens, the same work
    kv = lambda g: policy.generate(features, prompt_ids, prompt_mask, group_size=g, max_new_tokens=max_new_tokens,
                                   generator=torch.Generator(DEVICE).manual_seed(seed), all_finished=never)
    same = torch.equal(policy.generate(features, prompt_ids, prompt_mask, group_size=2, max_new_tokens=max_new_tokens,
                                       greedy=True, all_finished=never)[0],
                       generate_no_cache(policy, features, prompt_ids, prompt_mask, 2, True))
    once = lambda g: (policy.encode_video(frames), policy.encode_prompts(samples), kv(g))
    one_step = lambda b: policy.generate(policy.encode_video(frames[b:b + 1]), *policy.encode_prompts(samples[b:b + 1]),
                                         max_new_tokens=max_new_tokens, all_finished=never,
                                         generator=torch.Generator(DEVICE).manual_seed(seed))
    per_sample = lambda g: [one_step(i // g) for i in range(batch_size * g)]
    variants = {}
    for g in sizes:
        variants.update({f"kv{g}": lambda g=g: kv(g),
                         f"nocache{g}": lambda g=g: generate_no_cache(policy, features, prompt_ids, prompt_mask, g)})
        if kind == "tiny":
            variants.update({f"once{g}": lambda g=g: once(g), f"per_sample{g}": lambda g=g: per_sample(g)})
    if kind != "tiny":
        variants.update(encode=lambda: (policy.encode_video(frames), policy.encode_prompts(samples)),
                        step=lambda: one_step(0))
    times = interleaved(variants, rounds)
    label, rows = {"tiny": "tiny", "vit_b16": "ViT-B/16"}[kind], []
    prefix = f"B={batch_size}, {num_frames} frames, {features.shape[1]} visual + {prompt_ids.shape[1]} prompt tokens"
    for g in sizes:
        if kind == "tiny":
            a, b, how = times[f"once{g}"], times[f"per_sample{g}"], "both end to end"
        else:
            a = [e + k for e, k in zip(times["encode"], times[f"kv{g}"])]
            b = [s * batch_size * g for s in times["step"]]
            how = f"A = encode + KV generate; B = {batch_size * g} x one per-sample step (timed once per round)"
        rows.append(figure(f"rollout {label} G={g}: encode-once vs re-encode", "encode once + batched KV generate",
                           "re-encode per sample", a, b, target=(">=", 3.0) if kind != "tiny" and g == 8 else None,
                           note=f"{prefix}, {max_new_tokens} new tokens; {how}"))
    for g in sizes:
        rows.append(figure(f"generate {label} G={g}: KV cache vs none", "batched, KV cache", "batched, no cache",
                           times[f"kv{g}"], times[f"nocache{g}"], note=f"{prefix}; greedy tokens identical: {same}"))
    return rows


# ----------------------------------------------------------------------------- sequence log-probs

def logprob_run(variant):
    """In a fresh process: (peak bytes above the bf16 logits, seconds, checksum) of one variant."""
    rss = lambda field: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")   # VmRSS,
                             if line.startswith(field + ":"))                                  # VmHWM: the peak
    gen = torch.Generator(DEVICE).manual_seed(seed)
    logits = torch.empty(lp_rows, lp_length, lp_vocab, dtype=torch.bfloat16, device=DEVICE).normal_(generator=gen)
    ids = torch.randint(lp_vocab, (lp_rows, lp_length), generator=gen, device=DEVICE)
    fn = token_logprobs if variant == "chunked" else \
        lambda z, t: torch.log_softmax(z.float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        open("/proc/self/clear_refs", "w").write("5")            # VmHWM := now (Linux >= 4.0); closed at once
    base = torch.cuda.memory_allocated() if DEVICE == "cuda" else rss("VmRSS")
    seconds = min(timed(lambda: fn(logits, ids).sum().item()) for _ in range(2))   # the first pays page faults
    peak = (torch.cuda.max_memory_allocated() if DEVICE == "cuda" else rss("VmHWM")) - base
    return peak, seconds, fn(logits[:1, :8], ids[:1, :8]).sum().item()


def logprob_figures(rounds):
    results = {"chunked": [], "full": []}
    for r in range(rounds):
        for variant in (["chunked", "full"] if r % 2 == 0 else ["full", "chunked"]):   # CPU: a fresh process each
            command = [sys.executable, __file__, "_logprob", variant, f"--num_threads={num_threads}", f"--seed={seed}"]
            results[variant].append(logprob_run(variant) if DEVICE == "cuda" else json.loads(subprocess.run(
                command, check=True, capture_output=True, text=True, cwd=HERE).stdout.splitlines()[-1]))
    agree = abs(results["chunked"][0][2] - results["full"][0][2]) < 1e-3
    note = (f"N={lp_rows}, L={lp_length}, V={lp_vocab}, bf16 logits ({lp_rows * lp_length * lp_vocab * 2 >> 20} MB) "
            f"not counted; {'cuda max_memory_allocated' if DEVICE == 'cuda' else 'VmHWM of a fresh process'}; "
            f"results agree: {agree}")
    name = "token_logprobs(chunk_tokens=1024)"
    mb = {v: [peak / 2**20 for peak, _, _ in runs] for v, runs in results.items()}
    return [figure(f"seq log-probs peak MB: {name}", name, "fp32 log_softmax+gather", mb["chunked"], mb["full"],
                   unit="MB", target=("<=", 0.3), note=note),
            figure(f"seq log-probs time: {name}", name, "fp32 log_softmax+gather",
                   [s for _, s, _ in results["chunked"]], [s for _, s, _ in results["full"]], note="min of 2 calls")]


# ----------------------------------------------------------------------------- decode

def decode_figures(rounds):
    if not HAVE_DECORD:
        print("  decord is not installed: no decode figures")
        return []
    rows, rng = [], np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        short, long = os.path.join(tmp, "short.mp4"), os.path.join(tmp, "long.mp4")
        write_mp4(short, make_synthetic_video(rng, "order", num_frames=num_frames, size=64)[0])
        y, x = np.mgrid[0:long_height, 0:long_width]
        frames = np.zeros((long_frames, long_height, long_width, 3), dtype=np.uint8)
        for t in range(long_frames):     # a square moving over a drifting gradient, a little noise
            frames[t] = np.stack([(x + 2 * t) % 256, (y + t) % 256, np.full_like(x, 3 * t % 256)], -1) \
                + rng.integers(0, 8, (long_height, long_width, 3))
            top, left = (7 * t) % (long_height - 40), (5 * t) % (long_width - 40)
            frames[t, top:top + 40, left:left + 40] = (230, 40, 40)
        write_mp4(long, frames, fps=30, options={})              # x264's default (lossy) settings
        for name, path, count in ((f"short ({num_frames} frames 64x64, all decoded)", short, num_frames),
                                  (f"long ({long_frames} frames {long_width}x{long_height}, {long_sample} sampled)",
                                   long, long_sample)):
            diff = (load_video(path, count, "decord").float() - load_video(path, count, "pyav").float()).abs().mean()
            times = interleaved({b: lambda b=b: load_video(path, count, b) for b in ("decord", "pyav")}, max(rounds, 5))
            rows.append(figure(f"decode {name}", "decord", "PyAV", times["decord"], times["pyav"],
                               note=f"load_video; mean |decord - PyAV| {diff:.2f}/255"))
    return rows


# ----------------------------------------------------------------------------- Oracle

class FakeJudge(http.server.BaseHTTPRequestHandler):
    """POST /v1/chat/completions -> {"ranking": the prompt's "[k]" ids reversed}, after judge_latency s."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ids = [int(k) for k in re.findall(r"^\[(\d+)\] ", body["messages"][-1]["content"], flags=re.M)]
        time.sleep(judge_latency)
        content = json.dumps({"ranking": ids[::-1]})
        reply = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        for key, value in (("Content-Type", "application/json"), ("Content-Length", str(len(reply)))):
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(reply)

    log_message = lambda self, *args: None   # quiet


def oracle_figures(rounds):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    server.daemon_threads, server.request_queue_size = True, 64
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        judge = JudgeOracle(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="fake", api_key_env="")
        samples = train_set()[:judge_groups]
        groups = [[f"answer {b} {i}" for i in range(TRAIN["num_generations"])] for b in range(judge_groups)]
        results = []
        check = lambda workers: results.append(judge.rank_many(samples, groups, max_workers=workers))
        times = interleaved({"concurrent": lambda: check(judge_workers), "sequential": lambda: check(1)},
                            3 if quick else max(rounds, 5))
    finally:
        server.shutdown()
        server.server_close()
    valid = all(isinstance(r, list) and sorted(r) == list(range(len(groups[0]))) for result in results for r in result)
    return [figure(f"oracle judge B={judge_groups} G={len(groups[0])}: {judge_workers} workers vs 1",
                   f"rank_many max_workers={judge_workers}", "rank_many max_workers=1", times["concurrent"],
                   times["sequential"], note=f"fake judge on 127.0.0.1, {judge_latency * 1000:.0f} ms a reply; every "
                                             f"ranking a valid permutation: {valid}; ideal ~{judge_workers}x")]


# ----------------------------------------------------------------------------- one RL step, shared prefix

def train_set():
    """The main job's synthetic train split (made by train.py, or here, in its data_dir)."""
    return load_jsonl(make_synthetic_dataset(TRAIN["data_dir"], TRAIN["num_train"], TRAIN["num_eval"])["train"])


def step_policy(share_prefix):
    """What train.py trains: the SFT warm start + LoRA + the reference snapshot, dropout off."""
    found = os.path.exists(os.path.join(step_sft_dir, "config.json"))
    policy = VideoLM.load(step_sft_dir, share_prefix=share_prefix) if found else VideoLM(ModelConfig(share_prefix=share_prefix))
    policy.add_lora(TRAIN["lora_r"], TRAIN["lora_alpha"], TRAIN["lora_dropout"], TRAIN["lora_target_modules"])
    policy.snapshot_reference(), policy.disable_dropout()
    return policy.to(DEVICE), f"{'SFT checkpoint ' + step_sft_dir if found else 'fresh VideoLM'}, share_prefix={share_prefix}"


# (key, label): train_step's phases; encode and generate timed inside the rollout, the rest of it by difference
STEP_PHASES = [("data", "decode the batch's videos"), ("encode", "rollout: encode_video"),
               ("generate", "rollout: generate"), ("rollout_rest", "rollout: scoring pass, prompts, text"),
               ("oracle", "Oracle ranks"), ("advantages", "rank advantages"), ("reference", "reference log-probs"),
               ("forward", "training forward + loss (x mu)"), ("backward", "backward (x mu)"),
               ("optimizer", "zero_grad, clip, AdamW (x mu)"), ("metrics", "step metrics"), ("other", "other")]


def step_figures(rounds):
    torch.set_num_threads(step_threads)
    torch.manual_seed(TRAIN["seed"])
    config = StepConfig.from_options(TRAIN)
    samples, (policy, source) = train_set(), step_policy(step_share_prefix)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=TRAIN["learning_rate"])
    oracle, generator = make_oracle(TRAIN["oracle"]), torch.Generator(DEVICE).manual_seed(TRAIN["seed"])
    steps, record, load = 3 if quick else max(step_count, rounds), {key: [] for key, _ in STEP_PHASES + [("step", 0)]}, []
    step_timer = PhaseTimer(cuda=DEVICE == "cuda")
    for method, phase in (("encode_video", "encode"), ("generate", "generate")):
        step_timer.wrap(policy, method, phase)
    for step in range(1 + steps):                                    # step 0 warms up
        batch = samples[step * TRAIN["batch_size"]:(step + 1) * TRAIN["batch_size"]]
        lr = cosine_lr(step, 100, TRAIN["warmup_steps"], TRAIN["learning_rate"])
        step_timer.seconds = {}
        with step_timer("step"):
            train_step(policy, optimizer, batch, oracle, config, lr, generator, step, timer=step_timer)
        t = step_timer.seconds
        frames = load_frames(batch, policy)[0].to(DEVICE)
        preprocess = timed(lambda: policy.preprocess(frames))        # outside the step: the loader figure
        if step == 0:
            continue
        t["rollout_rest"] = t["rollout"] - t["encode"] - t["generate"]
        t["other"] = t["step"] - sum(t.get(k, 0.0) for k in ("data", "rollout", "oracle", "advantages", "reference",
                                                               "forward", "backward", "optimizer", "metrics"))
        for key in record:
            record[key].append(t.get(key, 0.0))
        load.append(t["data"] + preprocess)
    torch.set_num_threads(num_threads)
    count = config.num_generations * TRAIN["batch_size"]
    summary = (f"train_step on train.py's defaults ({source}, B={TRAIN['batch_size']} x G={config.num_generations}, "
               f"mu={config.num_iterations}, beta={config.beta}), {step_threads} torch thread(s), median of {steps} "
               f"steps after 1 warm-up: {statistics.median(record['step']):.3f} s = "
               f"{count / statistics.median(record['step']):.0f} samples/s; load avg {os.getloadavg()[0]:.2f}")
    rows = [figure(f"RL step: {label}", label, "whole RL step", record[key], record["step"], share=True,
                   note=summary if key == "data" else "") for key, label in STEP_PHASES]
    rows[0]["samples_per_s"] = count / statistics.median(record["step"])
    rows.append(figure(f"loader: decode+preprocess B={TRAIN['batch_size']} vs RL step", "decode + preprocess",
                       "whole RL step", load, record["step"],
                       note="ratio > 1: a background loader would keep up; the step decodes synchronously"))
    return rows


def prefix_figures(rounds):
    """Forward + backward of the completions' log-probs: share_prefix (the [video, prompt] prefix once
    per prompt, its KV cache repeated for the G completions) vs the full pass per row; same tokens."""
    torch.set_num_threads(step_threads)
    policy, source = step_policy(False)
    frames, samples, _ = load_frames(train_set()[:TRAIN["batch_size"]], policy)
    features = policy.encode_video(frames.to(DEVICE))
    prompt_ids, prompt_mask = policy.encode_prompts(samples)
    group = TRAIN["num_generations"]
    ids, mask, _ = policy.generate(features, prompt_ids, prompt_mask, group_size=group,
                                   max_new_tokens=TRAIN["max_new_tokens"], generator=torch.Generator(DEVICE).manual_seed(0))

    def scoring(share):
        def run():
            policy.config.share_prefix = share
            policy.zero_grad(set_to_none=True)
            logits = policy.completion_logits(features, prompt_ids, prompt_mask, ids, mask, group_size=group)
            (token_logprobs(logits, ids) * mask).sum().backward()
        return run
    rows = []
    for checkpointing in (False, True):   # config/paper_7b.py checkpoints: the shared prefix must hold there too
        if checkpointing:
            policy.train().lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        times = interleaved({"full": scoring(False), "shared": scoring(True)}, max(rounds, 5))
        rows.append(figure(f"prefix: score B={len(samples)} G={group}, shared prefix vs full"
                           + (", gradient checkpointing" if checkpointing else ""), "share_prefix=True",
                           "full pass per row", times["shared"], times["full"],
                           note=f"{source}; prefix {features.shape[1]} + {prompt_ids.shape[1]} tokens, completions "
                                f"{ids.shape[1]}; {step_threads} torch thread(s)"))
    torch.set_num_threads(num_threads)
    return rows


# ----------------------------------------------------------------------------- report

def print_table(rows):
    show = lambda value, unit: f"{value:.0f} MB" if unit == "MB" else f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    lines = [[r["figure"], r["a"], show(r["a_median"], r["unit"]), r["b"], show(r["b_median"], r["unit"]),
              f"{r['ratio']:.1%} of B" if r["ratio_is"] == "share A/B" else f"{r['ratio']:.2f}x ({r['ratio_is']})",
              r["target"], r["status"]] for r in rows]
    header = ["figure", "variant A", "A", "variant B", "B", "ratio", "target", "status"]
    print()
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    for cells in [header] + lines:
        print(" | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
    print("\nnotes:\n" + "\n".join(f"  {r['figure']}: {r['note']}" for r in rows if r["note"]))


def main(argv):
    configure(argv, globals())
    sections = [s.strip() for s in only.split(",") if s.strip()] or list(SECTIONS)
    if set(sections) - set(SECTIONS):
        raise SystemExit(f"--only: unknown section(s) {sorted(set(sections) - set(SECTIONS))}; valid: {','.join(SECTIONS)}")
    rounds = 1 if quick else repeats
    torch.set_num_threads(num_threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    machine = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else cpu, "cpus": os.cpu_count(),
               "torch": torch.__version__, "load_avg_start": os.getloadavg(), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    start, rows = time.perf_counter(), []
    figures = {"rollout": lambda n: [row for kind in ["tiny"] + ["vit_b16"] * realistic for row in rollout_figures(kind, n)],
               "logprobs": logprob_figures, "decode": decode_figures, "oracle": oracle_figures, "step": step_figures,
               "prefix": prefix_figures}
    for section in sections:
        print(f"{section} ...", flush=True)
        rows += [dict(row, section=section, run=machine["date"]) for row in figures[section](rounds)]
    machine.update(load_avg_end=os.getloadavg(), wall_s=time.perf_counter() - start)
    print_table(rows)
    print(f"\n{machine}; {num_threads} thread(s). A, B: medians over rounds; ratio: how many times better A is")
    kept, runs = [], {}
    if os.path.exists(out_json) and set(sections) != set(SECTIONS):   # keep the other sections' figures
        with open(out_json) as f:
            previous = json.load(f)
        kept = [r for r in previous["figures"] if r.get("section") not in sections]
        runs = {r: previous["runs"][r] for r in {k["run"] for k in kept} if r in previous.get("runs", {})}
    runs[machine["date"]] = {"machine": machine, "config": {k: globals()[k] for k in option_keys(globals())}}
    os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
    with open(out_json, "w") as f:
        json.dump({"figures": kept + rows, "runs": runs}, f, indent=1)
    print(f"wrote {out_json}" + (f" (kept {len(kept)} figures of other sections)" if kept else ""))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_logprob"]:          # a child process of logprob_figures
        configure(sys.argv[3:], globals())
        torch.set_num_threads(num_threads)
        print(json.dumps(logprob_run(sys.argv[2])))
    else:
        main(sys.argv[1:])
