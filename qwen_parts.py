"""
The parts of transformers' Qwen2.5-VL outside the policy class (qwen_vl.py): the model and tokenizer (the tiny
one built from configs, or a local model directory), and the model's inputs built as its processor builds
them. Its video processors need torchvision, which does not import on the project's CPU machines; the rules
below are the model's own (read from transformers 5.25 and the Qwen2.5-VL release), the code the project's.

    frames uint8 (T, H, W, 3)
      -> smart_resize: each side a multiple of patch * merge, the pixel count within [min_pixels,
         max_pixels], the aspect ratio kept (PIL bicubic, as Qwen2VLImageProcessorPil resizes)   fit_clip
      -> x / 255 (in float64, then float32), (x - mean) / std; T padded to a multiple of the temporal
         patch with copies of the last frame; cut into (temporal_patch x patch x patch) patches in the
         video processor's order: the merge x merge patches the merger joins are consecutive   video_patches
      -> grid (t, h, w) in patches; the LM sees t * h * w / merge^2 video tokens
    second_per_grid_ts = temporal_patch / sampled fps, the sampled fps = frames / clip duration (qwen-vl-utils);
      the duration is the container's (data.read_videos: a sample's "seconds"); where none is known,
      DEFAULT_FPS is assumed.

    3-D M-RoPE positions (temporal, height, width) of a prompt [text, video, text]:
      text tokens: p, p+1, ... on all three axes;
      a video starting at p: temporal p + floor(i * interval) for temporal patch i, where interval =
         tokens_per_second * second_per_grid_ts; height p + row, width p + column of its merged token;
      the text after a video starts one past the largest position so far (Qwen2.5-VL's own rule, and
         transformers' through 5.2, see its issue #45381; 5.25's get_rope_index starts it at p + max(h, w)
         / merge instead, which overlaps the temporal positions of a clip longer in time than in space,
         and its own generate then continues from the largest + 1, disagreeing with its own forward
         there; this code never does);
      generated tokens: one past the one before, the first one past the prompt's largest position.
"""
import json
import math
import os

import numpy as np
import torch

from data import CLIP_MEAN, CLIP_STD
from synth import synthetic_vocab, word_tokenizer

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"]
# Qwen's chat format for the tiny tokenizer (the real models ship their own template): a default system turn,
# then each turn as <|im_start|>role\n...<|im_end|>\n, a video as <|vision_start|><|video_pad|><|vision_end|>
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY = "tiny-qwen2_5_vl"
FAMILIES = ("qwen2_5_vl",)      # config.json model_type values this module runs
# the tiny model: 64 px synthetic clips stay 64 px (patch 8, merge 2: 4x4 video tokens per 2 frames)
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=8, spatial_merge_size=2,
                   temporal_patch_size=2, tokens_per_second=2, window_size=32, fullatt_block_indexes=[1])
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, rope_parameters={
                     "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
TINY_PIXELS = (32 * 32, 64 * 64)   # min_pixels, max_pixels of the tiny model: 64 px synthetic clips stay 64 px
DEFAULT_FPS = 2.0   # sampled fps assumed for a clip of unknown duration: the rate qwen-vl-utils samples at by default


# ----------------------------------------------------------------------------- the model and its tokenizer

def tiny_tokenizer():
    """The synthetic task's word-level tokenizer plus Qwen's special tokens and chat format; EOS is <|im_end|>."""
    tokenizer = word_tokenizer(synthetic_vocab() + ["system", "user", "assistant", "you", "are", "helpful"])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.eos_token, tokenizer.chat_template = "<|im_end|>", TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_model(tokenizer):
    """A random Qwen2.5-VL of TINY_VISION / TINY_TEXT sizes for `tokenizer` (seed set by the caller)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start",
                                                                               "vision_end", "im_end")}
    text = dict(TINY_TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                eos_token_id=ids["im_end"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(TINY_VISION, out_hidden_size=text["hidden_size"]),
                              image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
                              vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    return Qwen2_5_VLForConditionalGeneration(config)


def model_type(path):
    """The model_type of a transformers model directory's config.json (None: not one)."""
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f).get("model_type")


def processing_of(path, model):
    """How frames become pixels for this model: {patch, merge, temporal, mean, std, min_pixels, max_pixels,
    tokens_per_second}, from the directory's video_preprocessor_config.json or preprocessor_config.json."""
    vision = model.config.vision_config
    found = {"patch": vision.patch_size, "merge": vision.spatial_merge_size, "temporal": vision.temporal_patch_size,
             "tokens_per_second": vision.tokens_per_second, "mean": CLIP_MEAN, "std": CLIP_STD}
    if path is None:
        return dict(found, min_pixels=TINY_PIXELS[0], max_pixels=TINY_PIXELS[1])
    files = [os.path.join(path, name) for name in ("video_preprocessor_config.json", "preprocessor_config.json")]
    if not any(map(os.path.exists, files)):
        raise FileNotFoundError(f"{path}: no preprocessor_config.json (the model's mean, std and pixel bounds)")
    with open(next(f for f in files if os.path.exists(f))) as f:
        saved = json.load(f)
    size = saved.get("size") or {}
    return dict(found, mean=tuple(saved.get("image_mean", CLIP_MEAN)), std=tuple(saved.get("image_std", CLIP_STD)),
                min_pixels=saved.get("min_pixels", size.get("shortest_edge", 56 * 56)),
                max_pixels=saved.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280)))


def build_parts(config):
    """(model, tokenizer, processing) from a QwenVLConfig: the tiny one from configs, or a local directory."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(config.seed)     # the tiny model's random init is part of the config
    if config.base == TINY:
        if config.load_in_4bit:
            raise ValueError("load_in_4bit=True needs a pretrained model directory as base, not the tiny one")
        if config.tokenizer and not os.path.isdir(config.tokenizer):    # nothing is downloaded, ever
            raise ValueError(f"tokenizer={config.tokenizer!r} is not a local directory (a Qwen policy loads nothing "
                             "from a hub: give a local copy's path)")
        tokenizer = (AutoTokenizer.from_pretrained(config.tokenizer, local_files_only=True) if config.tokenizer
                     else tiny_tokenizer())
        model, path = tiny_model(tokenizer), None
    else:
        path = config.base
        if not os.path.exists(os.path.join(path, "config.json")) or model_type(path) not in FAMILIES:
            raise ValueError(f"base={path!r} is neither {TINY!r} nor a transformers model directory whose config.json "
                             f"has a model_type in {FAMILIES}")
        quantization = None
        if config.load_in_4bit:
            from transformers import BitsAndBytesConfig
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=getattr(torch, config.dtype),
                                              llm_int8_skip_modules=["model.visual", "lm_head"])
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, config.dtype),
                                                                   quantization_config=quantization, local_files_only=True)
        for module in model.modules():
            # bitsandbytes 0.50 repacks 4-bit weights at the first CPU forward without grad for an inference
            # kernel whose logits differ (0.04 measured) from the training path's, and after which a training
            # forward fails: one path for sampling, scoring and training alike
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or path, local_files_only=True)
        if tokenizer.chat_template is None and os.path.exists(os.path.join(path, "chat_template.jinja")):
            with open(os.path.join(path, "chat_template.jinja")) as f:
                tokenizer.chat_template = f.read()
    if tokenizer.chat_template is None:
        raise ValueError(f"{config.tokenizer or config.base}: the tokenizer has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not config.load_in_4bit:
        model.to(getattr(torch, config.dtype))
    processing = processing_of(path, model)
    processing["min_pixels"] = config.min_pixels or processing["min_pixels"]
    processing["max_pixels"] = config.max_pixels or processing["max_pixels"]
    return model, tokenizer, processing

# ----------------------------------------------------------------------------- frames -> pixel_values_videos

def smart_resize(height, width, factor, min_pixels, max_pixels):
    """(height, width) -> the model's input size: both multiples of `factor` (patch * merge), the area
    within [min_pixels, max_pixels], the aspect ratio as close as those allow."""
    if max(height, width) > 200 * min(height, width):
        raise ValueError(f"a {height}x{width} frame: the aspect ratio must be under 200 for Qwen-VL models")
    new_h, new_w = round(height / factor) * factor, round(width / factor) * factor
    if new_h * new_w > max_pixels:           # shrink: floor, so the area stays under the cap
        scale = math.sqrt(height * width / max_pixels)
        new_h = max(factor, math.floor(height / scale / factor) * factor)
        new_w = max(factor, math.floor(width / scale / factor) * factor)
    elif new_h * new_w < min_pixels:         # grow: ceil, so the area reaches the floor
        scale = math.sqrt(min_pixels / (height * width))
        new_h, new_w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return new_h, new_w


def fit_clip(frames, factor, min_pixels, max_pixels):
    """One clip at the model's input size: uint8 (T, H, W, 3) -> uint8 (T, h, w, 3), h and w from
    smart_resize (PIL bicubic on each frame); a clip already at its size is returned as is."""
    from PIL import Image
    height, width = frames.shape[1:3]
    size = smart_resize(height, width, factor, min_pixels, max_pixels)
    if size == (height, width):
        return frames
    resized = [np.asarray(Image.fromarray(frame).resize(size[::-1], Image.Resampling.BICUBIC))
               for frame in frames.cpu().numpy()]
    return torch.from_numpy(np.stack(resized))


def video_patches(frames, patch_size, merge_size, temporal_patch_size, mean, std):
    """A fitted clip -> (patches (t*h*w, 3 * temporal_patch * patch^2) float32, grid [t, h, w]).
    frames: uint8 (T, H', W', 3), H' and W' multiples of patch * merge (fit_clip)."""
    height, width = frames.shape[1:3]
    factor = patch_size * merge_size
    if height % factor or width % factor:
        raise ValueError(f"frames of {height}x{width} px: each side must be a multiple of patch * merge = {factor} "
                         "(bring the clip to the model's size with fit_frames first)")
    pad = -len(frames) % temporal_patch_size           # the last frame repeated up to a whole temporal patch
    frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)]) if pad else frames
    pixels = (frames.double() * (1 / 255)).float()     # the image processor's rescale: float64, then float32
    pixels = (pixels - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    t, h, w = len(frames) // temporal_patch_size, height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    blocks = pixels.view(t, temporal_patch_size, h // m, m, p, w // m, m, p, 3)
    # -> (t, h/m, w/m, m, m, channel, temporal, p, p): each merge block's m*m patches in a row
    blocks = blocks.permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return blocks.reshape(t * h * w, 3 * temporal_patch_size * p * p), [t, h, w]


def seconds_per_grid(num_frames, temporal_patch_size, seconds=None, fps=DEFAULT_FPS):
    """second_per_grid_ts of a clip: temporal_patch / sampled fps, the sampled fps being num_frames / the
    clip's duration in seconds (qwen-vl-utils), or `fps` where the duration is unknown (None or <= 0)."""
    sampled_fps = num_frames / seconds if seconds else fps
    return temporal_patch_size / sampled_fps

# ----------------------------------------------------------------------------- encoded clips, one tensor

def pack_features(patch_features, grids, second_per_grid):
    """B clips' vision features (pre-merger) as ONE float32 tensor, so that the trainer can index, concatenate
    and move them like any (B, ...) features: (B, 1 + N_max, C). Row 0 of each clip is a header [grid_t,
    grid_h, grid_w, second_per_grid_ts, 0...] (exact in float32), rows 1..N its N = t*h*w patch features,
    then zeros. patch_features: B tensors (N_b, C); grids: B [t, h, w]; second_per_grid: B floats."""
    width, channels = max(len(f) for f in patch_features), patch_features[0].shape[1]
    packed = torch.zeros(len(grids), 1 + width, channels, dtype=torch.float32, device=patch_features[0].device)
    for b, (features, grid, seconds) in enumerate(zip(patch_features, grids, second_per_grid)):
        packed[b, 0, :4] = torch.tensor([*grid, seconds], dtype=torch.float32)
        packed[b, 1:1 + len(features)] = features.float()
    return packed


def unpack_features(packed):
    """pack_features' tensor -> (grids (B, 3) long, second_per_grid (B,) float32, B tensors (N_b, C))."""
    grids, seconds = packed[:, 0, :3].long(), packed[:, 0, 3]
    counts = grids.prod(-1).tolist()
    return grids, seconds, [packed[b, 1:1 + n] for b, n in enumerate(counts)]

# ----------------------------------------------------------------------------- M-RoPE positions

def video_positions(start, grid, interval, merge_size):
    """(3, t * h/m * w/m) long positions of a video's tokens from `start`: temporal start + floor(i * interval)
    (interval a float32 scalar tensor, as transformers multiplies it), height start + row, width start + column."""
    t, h, w = int(grid[0]), int(grid[1]) // merge_size, int(grid[2]) // merge_size
    temporal = (torch.arange(t) * interval).long()
    axes = torch.meshgrid(temporal, torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(axes).reshape(3, -1) + start


def prompt_positions(ids, video_token_id, grid, interval, merge_size):
    """The 3-D positions of one prompt [text, video tokens, text] -> ((3, len(ids)) long, the next position):
    ids is the prompt with its video expanded to t*h*w/m^2 `video_token_id` tokens and no padding."""
    ids = torch.as_tensor(ids)
    at = (ids == video_token_id).nonzero()
    count = int(grid[0]) * int(grid[1]) * int(grid[2]) // merge_size ** 2
    if len(at) != count or (len(at) and int(at[-1] - at[0]) != count - 1):
        raise ValueError(f"a prompt holds {len(at)} video tokens, its clip needs {count} in one run")
    start = int(at[0])
    before = torch.arange(start).expand(3, -1)
    video = video_positions(start, grid, interval, merge_size)
    after_start = int(video.max()) + 1
    after = torch.arange(after_start, after_start + len(ids) - start - count).expand(3, -1)
    positions = torch.cat([before, video, after], 1)
    return positions, int(positions.max()) + 1
