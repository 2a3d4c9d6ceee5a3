"""
Supervised warm start: the paper starts RL from an SFT model (Sec. 5.1, Appendix A.1).

Cross-entropy on the answer tokens only (visual and prompt positions are context, not targets),
AdamW, linear warm-up then cosine decay. The vision tower is frozen, so each training video is
decoded and encoded once and its pooled features reused for every step.

$ python sft.py                                  # tiny default on the synthetic set
$ python sft.py --steps=600 --out_dir=out/sft600
Prints held-out exact-match accuracy per category and saves a model.py checkpoint.
"""
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

from configurator import configure, cosine_lr
from data import load_jsonl, read_videos
from eval import evaluate
from tables import print_results
from policies import POLICIES, make_policy
from synth import make_synthetic_dataset

# -----------------------------------------------------------------------------
# defaults, overridable as --key=value
out_dir = "out/sft"
policy = "videolm"           # policies.POLICIES: "videolm" (the tiny default of the paper's architecture) | "tiny-qwen2_5_vl"
data_dir = "data/synth"      # the synthetic set is generated here if train_data is empty
train_data = ""              # a JSONL (data.py format); empty: synthetic
eval_data = ""
eval_size = 300
steps = 300
batch_size = 32
learning_rate = 1e-3
weight_decay = 0.0
warmup_steps = 20
seed = 0
num_threads = 2              # results depend on the thread count: fix it
# -----------------------------------------------------------------------------


def encode_dataset(policy, samples, batch_size=64, progress=True):
    """Video features of every sample: (N, V, ...), and the samples whose video loaded.
    A video that fails to load is skipped with a warning naming it (counted by the caller)."""
    features, kept = [], []
    for start in tqdm(range(0, len(samples), batch_size), desc="encode videos", disable=not progress, leave=False):
        frames, rows, failures = read_videos(samples[start:start + batch_size], policy.config.num_frames,
                                             policy.fit_frames)
        for sample, err in failures:
            warnings.warn(f"skipping sample {sample['id']}: {err}")
        if frames is not None:
            features.append(policy.encode_video(frames, seconds=[r.get("seconds") for r in rows]).cpu())
            kept += rows
    if not kept:
        raise RuntimeError("no training video could be loaded")
    width = max(f.shape[1] for f in features)   # a policy whose features vary in width pads them with zeros
    return torch.cat([torch.cat([f, f.new_zeros(len(f), width - f.shape[1], *f.shape[2:])], 1) for f in features]), kept


def answer_loss(policy, features, samples):
    """Mean cross-entropy of the answer tokens given [video, prompt]. features: (B, V, C)."""
    prompt_ids, prompt_mask = policy.encode_prompts(samples)
    answer_ids, answer_mask = policy.encode_answers([s["answer"] for s in samples])
    logits = policy.completion_logits(features, prompt_ids, prompt_mask, answer_ids, answer_mask)
    token_loss = F.cross_entropy(logits.flatten(0, 1).float(), answer_ids.flatten(), reduction="none")
    mask = answer_mask.flatten().float()
    return (token_loss * mask).sum() / mask.sum()


def train_sft(policy, samples, steps=300, batch_size=32, learning_rate=1e-3, weight_decay=0.0,
              warmup_steps=20, seed=0, progress=True):
    """Fine-tune `policy` in place on (video, question, answer) rows. Returns the loss per step."""
    features, samples = encode_dataset(policy, samples, progress=progress)
    features = features.to(policy.device)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    policy.train()
    losses = []
    bar = tqdm(range(steps), desc="sft", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, warmup_steps, learning_rate)
        index = torch.randint(len(samples), (min(batch_size, len(samples)),), generator=generator)
        loss = answer_loss(policy, features[index.to(features.device)], [samples[i] for i in index.tolist()])
        if not torch.isfinite(loss):
            raise RuntimeError(f"sft: non-finite loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    policy.eval()
    return losses


def main(argv):
    configure(argv, globals())
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    paths = {"train": train_data, "eval": eval_data}
    if not train_data:
        paths = make_synthetic_dataset(data_dir)
    train_samples = load_jsonl(paths["train"])
    if policy not in POLICIES:
        raise SystemExit(f"--policy must be one of {POLICIES}, got {policy!r}")
    model = make_policy(policy, seed=seed)
    start = time.time()
    losses = train_sft(model, train_samples, steps, batch_size, learning_rate, weight_decay, warmup_steps, seed)
    print(f"sft: {steps} steps in {time.time() - start:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    model.save(out_dir)
    if paths.get("eval"):
        results = evaluate(model, load_jsonl(paths["eval"])[:eval_size], task="exact")
        print_results(results, title=f"held-out exact match after SFT ({out_dir})")


if __name__ == "__main__":
    main(sys.argv[1:])
