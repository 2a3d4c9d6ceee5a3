"""
Which policy a name or a directory means: the one place that knows every policy class (model.VideoLM, the
paper's architecture; qwen_vl.QwenVLPolicy, transformers' Qwen2.5-VL). train.py and eval.py call these.

    make_policy("videolm", **options)          VideoLM(ModelConfig(**options)): the paper's architecture, tiny by default
    make_policy("tiny-qwen2_5_vl", **options)  QwenVLPolicy(QwenVLConfig(**options)), built from a small config
    load_policy(DIR, **overrides)              a checkpoint written by either class's save(), or a transformers
                                               model directory of a supported family (config.json's model_type)

THE POLICY INTERFACE (model.VideoLM and QwenVLPolicy both follow it; rollout.py, train_step.py, eval.py and
sft.py use nothing else):
    config                 .num_frames (frames sampled per clip), .share_prefix, .lora_* , .dtype
    fit_frames(clip)       uint8 (T, H, W, 3) -> the clip at the model's input size, as decoded (data.read_videos)
    encode_video(frames, seconds=None)   a batch of fitted clips (a uint8 tensor, or a list when their sizes
                           differ) and their durations (data.read_videos puts each in its sample's "seconds";
                           None: unknown) -> features (B, ...): a tensor the trainer may index, cat, .to() and
                           .cpu(); the vision tower runs here, once per prompt
    encode_prompts(samples, mc_format="oneline") -> prompt_ids, prompt_mask: (B, P) long, left-padded
    encode_answers(answers)   -> ids, mask: (B, L) long, right-padded, EOS appended
    generate(features, prompt_ids, prompt_mask, group_size, max_new_tokens, greedy, generator, all_finished,
             **sampling)   -> completion_ids (B*G, L), completion_mask (B*G, L), truncated (B*G,) bool;
                           each prompt run once (prefill), its KV cache repeated for its G samples
    completion_logits(features, prompt_ids, prompt_mask, completion_ids, completion_mask, group_size=1,
                      reference=False) -> (B*G, L, vocab), the logits predicting each completion token
    decode(ids, mask)      -> strings, stopping at EOS
    snapshot_reference(), reference(), has_lora, add_lora(r, alpha, dropout, target_modules),
    trainable_parameters(), disable_dropout(), train()/eval(), device, encode_calls (a counter),
    save(path) / load(path, **overrides) (checkpoint.write_dir: safetensors + JSON + sha256 manifest),
    lm and ref_lm (train_step.shard shards their decoder layers).
"""
import os

import checkpoint
from model import CONFIG, ModelConfig, VideoLM
from qwen_parts import FAMILIES, TINY
from qwen_vl import QwenVLConfig, QwenVLPolicy

POLICIES = ("videolm", TINY)   # what make_policy builds (from configs, or VideoLM from pretrained parts)


def make_policy(name, **options):
    """A policy built from configs: "videolm" (ModelConfig's options) or TINY (QwenVLConfig's options)."""
    if name == "videolm":
        return VideoLM(ModelConfig.from_dict(options))
    if name == TINY:
        return QwenVLPolicy(QwenVLConfig.from_dict(options))
    raise ValueError(f"unknown policy {name!r}; known: {POLICIES}, or load a directory with load_policy")


def load_policy(path, hub_ids=(), **overrides):
    """A policy from a directory, nothing downloaded: a VideoLM or QwenVLPolicy checkpoint (their save()), or a
    transformers model directory whose config.json names a model_type in qwen_parts.FAMILIES. overrides:
    config fields to change (dtype, load_in_4bit, gradient_checkpointing, num_frames, share_prefix, lora_r...).
    hub_ids: the hub ids a VideoLM checkpoint's parts may be downloaded from (VideoLM.load); none by default."""
    config_path = os.path.join(path, CONFIG)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: neither a policy checkpoint nor a transformers model directory (no {CONFIG})")
    checkpoint.verify(path)                   # a checkpoint's checksums first (a model directory has none)
    meta = checkpoint.read_json(config_path)
    if not isinstance(meta, dict):
        raise checkpoint.CheckpointError(f"{config_path}: not a model config (expected a JSON object)")
    if "model_type" in meta:                   # a transformers model directory
        if meta["model_type"] not in FAMILIES:
            raise ValueError(f"{config_path}: model_type {meta['model_type']!r} is not a supported policy; "
                             f"supported: {list(FAMILIES)}")
        return QwenVLPolicy(QwenVLConfig.from_dict({**overrides, "base": path}))
    if meta.get("policy") in FAMILIES:          # QwenVLPolicy.save
        return QwenVLPolicy.load(path, **overrides)
    return VideoLM.load(path, hub_ids=hub_ids, **overrides)
