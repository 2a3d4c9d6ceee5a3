"""
Which policy a name or a directory means: the one place that knows every policy class (model.VideoLM, the
paper's architecture; qwen_vl.QwenVLPolicy, transformers' Qwen2.5-VL). train.py and eval.py call these.

    make_policy("tiny", **options)             VideoLM(ModelConfig(**options)), the embedded default
    make_policy("tiny-qwen2_5_vl", **options)  QwenVLPolicy(QwenVLConfig(**options)), built from a small config
    load_policy(DIR, **overrides)              a checkpoint written by either class's save(), or a transformers
                                               model directory of a supported family (config.json's model_type)
"""
import json
import os

from model import CONFIG, ModelConfig, VideoLM
from qwen_parts import FAMILIES, TINY
from qwen_vl import QwenVLConfig, QwenVLPolicy

POLICIES = ("tiny", TINY)    # the names make_policy builds without any download


def make_policy(name, **options):
    """A policy built from configs: "tiny" (VideoLM's options) or TINY (QwenVLConfig's options)."""
    if name == "tiny":
        return VideoLM(ModelConfig.from_dict(options))
    if name == TINY:
        return QwenVLPolicy(QwenVLConfig.from_dict(options))
    raise ValueError(f"unknown policy {name!r}; known: {POLICIES}, or load a directory with load_policy")


def load_policy(path, **overrides):
    """A policy from a directory, nothing downloaded: a VideoLM or QwenVLPolicy checkpoint (their save()), or a
    transformers model directory whose config.json names a model_type in qwen_parts.FAMILIES. overrides:
    config fields to change (dtype, load_in_4bit, gradient_checkpointing, num_frames, share_prefix, lora_r...)."""
    config_path = os.path.join(path, CONFIG)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: neither a policy checkpoint nor a transformers model directory (no {CONFIG})")
    with open(config_path) as f:
        meta = json.load(f)
    if "model_type" in meta:                   # a transformers model directory
        if meta["model_type"] not in FAMILIES:
            raise ValueError(f"{config_path}: model_type {meta['model_type']!r} is not a supported policy; "
                             f"supported: {list(FAMILIES)}")
        return QwenVLPolicy(QwenVLConfig.from_dict({**overrides, "base": path}))
    if meta.get("policy") in FAMILIES:          # QwenVLPolicy.save
        return QwenVLPolicy.load(path, **overrides)
    return VideoLM.load(path, **overrides)
