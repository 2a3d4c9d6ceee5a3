"""
Rollout time of transformers' Qwen2.5-VL as the policy: this project's way vs the two ways transformers samples G.

    A  QwenVLPolicy: encode the B clips once (vision tower), prefill each [video, prompt] once and repeat its
       KV cache for its G samples, decode B*G rows together (qwen_vl.py, the rollout of rollout.py)
    B  transformers 5.25's generate(num_return_sequences=G, do_sample=True): it encodes the videos once
       (mm_encoder_outputs) and then expands the inputs: the [video, prompt] prefix is prefilled B*G times
    C  generate on the inputs expanded G times before the call, each row with its own copy of the video: the
       vision tower and the prefix run B*G times. This is what transformers 4.x's generate(num_return_sequences)
       did (it expanded pixel_values_videos before the prefill), the version Video-R1 samples with.

Same prompts and clips (their durations given, so all three use the same positions), same number of samples and
new tokens (no early stop at EOS anywhere), the tiny Qwen2.5-VL language model (hidden 128, 2 layers; or
lm_hidden x lm_layers) behind a ViT-B-shaped Qwen2.5-VL vision tower (hidden 768,
12 blocks, 12 heads, MLP 3072, patch 14, windows of 112 px, full attention in blocks 3, 7, 11), random
weights, CPU. Timed interleaved (A B C, C B A, ...), medians, ratios B / A and C / A. The inputs of B and C
are built before the clock starts (their processor's work is not counted); A's clock includes its own.

$ python bench_policies.py                      # B = 2, G = 4, 8, 16, 112 px frames (~3 min on 2 idle cores)
$ python bench_policies.py --lm_hidden=1024 --lm_layers=8 --expanded=False   # where the repeated prefill shows
"""
import statistics
import sys
import time

import numpy as np
import torch

from configurator import configure
from model import pad
from qwen_parts import TINY_VISION, unpack_features, video_patches
from qwen_vl import QwenVLConfig, QwenVLPolicy
from synth import CATEGORIES, FPS, make_synthetic_video

# -----------------------------------------------------------------------------
repeats = 2                  # timed rounds; each figure reports the median round
num_threads = 1              # CPU; a second thread mostly contends on a shared 2-core machine
seed = 0
batch_size = 2               # B prompts, G samples each
group_sizes = "4,8,16"
max_new_tokens = 8
num_frames = 8
frame_size = 112             # px; 112: 8 x 8 patches of 14 per frame, 4 temporal patches -> 256 patches, 64 video tokens
lm_hidden = 128              # the language model: the tiny one (128 x 2 layers), or larger to see the prefill's share
lm_layers = 2
expanded = True              # also C (slow: the tower runs B*G times)
# -----------------------------------------------------------------------------
VIT_B = dict(TINY_VISION, depth=12, hidden_size=768, intermediate_size=3072, num_heads=12, patch_size=14,
             window_size=112, fullatt_block_indexes=[3, 7, 11])


def vit_policy():
    """The tiny Qwen2.5-VL policy with a ViT-B-shaped vision tower and an LM of lm_hidden x lm_layers."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    policy = QwenVLPolicy(QwenVLConfig(min_pixels=frame_size ** 2, max_pixels=frame_size ** 2))
    text = dict(policy.lm.config.text_config.to_dict(), hidden_size=lm_hidden, intermediate_size=lm_hidden * 4,
                num_hidden_layers=lm_layers, num_attention_heads=lm_hidden // 32, num_key_value_heads=lm_hidden // 64)
    text.pop("layer_types", None)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(VIT_B, out_hidden_size=lm_hidden),
                              **{key: getattr(policy.lm.config, key) for key in
                                 ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")})
    policy.lm = Qwen2_5_VLForConditionalGeneration(config).requires_grad_(False)
    policy.processing["patch"] = VIT_B["patch_size"]
    return policy.eval()


def processor_inputs(policy, clips, seconds, prompt_ids, prompt_mask):
    """What Qwen2.5-VL's processor hands its model: the video expanded to t*h*w/4 <|video_pad|> tokens, left-padded."""
    p, video = policy.processing, policy.video_token_id
    patches, grids = zip(*[video_patches(policy.fit_frames(c), p["patch"], 2, 2, p["mean"], p["std"]) for c in clips])
    rows = []
    for b, ids in enumerate(prompt_ids):
        ids = ids[prompt_mask[b] > 0].tolist()
        at = ids.index(video)
        rows.append(ids[:at] + [video] * (grids[b][0] * grids[b][1] * grids[b][2] // 4) + ids[at + 1:])
    input_ids, attention_mask = pad(rows, policy.tokenizer.pad_token_id)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=torch.cat(patches),
                video_grid_thw=torch.tensor(grids), mm_token_type_ids=(input_ids == video).int() * 2,
                second_per_grid_ts=torch.tensor([2 / (len(c) / s) for c, s in zip(clips, seconds)]))


def expand(inputs, group_size):
    """processor_inputs with every prompt and its video repeated group_size times (rows b*G .. b*G+G-1)."""
    patches = inputs["pixel_values_videos"].split(inputs["video_grid_thw"].prod(-1).tolist())
    repeated = {key: inputs[key].repeat_interleave(group_size, 0) for key in
                ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw", "second_per_grid_ts")}
    return dict(repeated, pixel_values_videos=torch.cat([p for p in patches for _ in range(group_size)]))


def main(argv):
    configure(argv, globals())
    torch.set_num_threads(num_threads)
    policy = vit_policy()
    rng = np.random.default_rng(seed)
    clips, samples = [], []
    for b in range(batch_size):
        frames, question, _ = make_synthetic_video(rng, CATEGORIES[b % 4], num_frames=num_frames, size=frame_size)
        clips.append(torch.from_numpy(frames))
        samples.append({"question": question})
    seconds = [num_frames / FPS] * batch_size        # the synthetic clips' duration: positions as the processor's
    prompt_ids, prompt_mask = policy.encode_prompts(samples)
    inputs = processor_inputs(policy, clips, seconds, prompt_ids, prompt_mask)
    never = lambda done: False            # both sides generate max_new_tokens: the same work
    ours = lambda g: policy.generate(policy.encode_video(clips, seconds), *policy.encode_prompts(samples), group_size=g,
                                     max_new_tokens=max_new_tokens, all_finished=never,
                                     generator=torch.Generator().manual_seed(seed))
    sampling = dict(do_sample=True, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                    pad_token_id=policy.tokenizer.pad_token_id)
    theirs = lambda g: policy.lm.generate(**inputs, num_return_sequences=g, **sampling)
    expand_then_generate = lambda g: policy.lm.generate(**expand(inputs, g), **sampling)
    with torch.no_grad():   # the same answers, greedily (G = 2), before timing anything
        a = policy.generate(policy.encode_video(clips, seconds), prompt_ids, prompt_mask, group_size=2, greedy=True,
                            max_new_tokens=max_new_tokens, all_finished=never)[0]
        b = policy.lm.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                               pad_token_id=policy.tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1]:]
        same = torch.equal(a, b.repeat_interleave(2, 0))
        policy.lm.model.rope_deltas = None
        visual_tokens = int(unpack_features(policy.encode_video(clips, seconds))[0].prod(-1).sum()) // 4 // batch_size
    print(f"B = {batch_size}, {num_frames} frames of {frame_size} px ({visual_tokens} video tokens per prompt), "
          f"{prompt_ids.shape[1]} prompt tokens, {max_new_tokens} new tokens; ViT-B-shaped tower, LM {lm_hidden} x "
          f"{lm_layers} layers, CPU, "
          f"{num_threads} thread(s); greedy answers identical: {same}")
    variants = {"A": ours, "B": theirs, **({"C": expand_then_generate} if expanded else {})}
    for g in [int(x) for x in group_sizes.split(",")]:
        times = {name: [] for name in variants}
        for r in range(repeats):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                start = time.perf_counter()
                with torch.no_grad():
                    variants[name](g)
                policy.lm.model.rope_deltas = None
                times[name].append(time.perf_counter() - start)
        a, b, c = (statistics.median(times[name]) if times.get(name) else float("nan") for name in "ABC")
        print(f"G = {g:2d}: A encode once + prefill once {a:6.2f} s | B generate(num_return_sequences) {b:6.2f} s "
              f"({b / a:4.1f}x A) | C expanded inputs {c:6.2f} s ({c / a:4.1f}x A)   rounds: "
              + "; ".join(f"{name} {[round(t, 2) for t in times[name]]}" for name in variants))

if __name__ == "__main__":
    main(sys.argv[1:])
