"""
Rollout time of transformers' Qwen2.5-VL as the policy, this project's way vs the way Video-R1 and TRL sample.

    A  QwenVLPolicy: encode the B clips once (vision tower), embed the B prompts, prefill each prompt once and
       repeat its KV cache for its G samples, decode B*G rows (qwen_vl.py; the rollout of rollout.py)
    B  Qwen2_5_VLForConditionalGeneration.generate(num_return_sequences=G, do_sample=True) on the processor's
       inputs: the inputs are expanded G times before the prefill, so the vision tower and the whole
       [video, prompt] prefix run B*G times

Same prompts and clips, same number of samples and new tokens (no early stop at EOS on either side), the
tiny Qwen2.5-VL language model (hidden 128, 2 layers) behind a ViT-B-shaped Qwen2.5-VL vision tower
(hidden 768, 12 blocks, 12 heads, MLP 3072, patch 14, windows of 112 px, full attention in blocks 3, 7, 11),
random weights, CPU. Timed interleaved (A B, B A, ...), medians, ratio B / A. The inputs of B are built before
the clock starts (its processor's work is not counted); A's clock includes its own frame processing.

$ python bench_policies.py                      # B = 2, G = 4, 8, 16, 112 px frames (~3 min on 2 cores)
$ python bench_policies.py --frame_size=224 --repeats=1
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
from synth import CATEGORIES, make_synthetic_video

# -----------------------------------------------------------------------------
repeats = 2                  # timed rounds; each figure reports the median round
num_threads = 1              # CPU; a second thread mostly contends on a shared 2-core machine
seed = 0
batch_size = 2               # B prompts, G samples each
group_sizes = "4,8,16"
max_new_tokens = 8
num_frames = 8
frame_size = 112             # px; 112: 8 x 8 patches of 14 per frame, 4 temporal patches -> 256 patches, 64 video tokens
# -----------------------------------------------------------------------------
VIT_B = dict(TINY_VISION, depth=12, hidden_size=768, intermediate_size=3072, num_heads=12, patch_size=14,
             window_size=112, fullatt_block_indexes=[3, 7, 11])


def vit_policy():
    """The tiny Qwen2.5-VL with its vision tower swapped for a ViT-B-shaped one (output: the LM's hidden size)."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    torch.manual_seed(seed)
    policy = QwenVLPolicy(QwenVLConfig(min_pixels=frame_size ** 2, max_pixels=frame_size ** 2))
    vision = Qwen2_5_VLVisionConfig(**VIT_B, out_hidden_size=policy.lm.config.text_config.hidden_size)
    policy.lm.model.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision).requires_grad_(False)
    policy.lm.config.vision_config = vision
    policy.processing["patch"] = vision.patch_size
    return policy.eval()


def processor_inputs(policy, clips, prompt_ids, prompt_mask):
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
                second_per_grid_ts=torch.tensor([2 / policy.config.fps] * len(clips)))


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
    prompt_ids, prompt_mask = policy.encode_prompts(samples)
    inputs = processor_inputs(policy, clips, prompt_ids, prompt_mask)
    never = lambda done: False            # both sides generate max_new_tokens: the same work
    ours = lambda g: policy.generate(policy.encode_video(clips), *policy.encode_prompts(samples), group_size=g,
                                     max_new_tokens=max_new_tokens, all_finished=never,
                                     generator=torch.Generator().manual_seed(seed))
    theirs = lambda g: policy.lm.generate(**inputs, do_sample=True, num_return_sequences=g, max_new_tokens=max_new_tokens,
                                          min_new_tokens=max_new_tokens, pad_token_id=policy.tokenizer.pad_token_id)
    with torch.no_grad():   # the same answers, greedily (G = 2), before timing anything
        a = policy.generate(policy.encode_video(clips), prompt_ids, prompt_mask, group_size=2, greedy=True,
                            max_new_tokens=max_new_tokens, all_finished=never)[0]
        b = policy.lm.generate(**inputs, do_sample=False, num_return_sequences=2, max_new_tokens=max_new_tokens,
                               min_new_tokens=max_new_tokens, pad_token_id=policy.tokenizer.pad_token_id)
        same = torch.equal(a, b[:, inputs["input_ids"].shape[1]:])
        policy.lm.model.rope_deltas = None
        visual_tokens = int(unpack_features(policy.encode_video(clips))[0].prod(-1).sum()) // 4 // batch_size
    print(f"B = {batch_size}, {num_frames} frames of {frame_size} px ({visual_tokens} video tokens per prompt), "
          f"{prompt_ids.shape[1]} prompt tokens, {max_new_tokens} new tokens; ViT-B-shaped tower, CPU, "
          f"{num_threads} thread(s); greedy answers identical: {same}")
    for g in [int(x) for x in group_sizes.split(",")]:
        times = {"ours": [], "theirs": []}
        for r in range(repeats):
            for name in (["ours", "theirs"] if r % 2 == 0 else ["theirs", "ours"]):
                start = time.perf_counter()
                with torch.no_grad():
                    (ours if name == "ours" else theirs)(g)
                policy.lm.model.rope_deltas = None
                times[name].append(time.perf_counter() - start)
        a, b = statistics.median(times["ours"]), statistics.median(times["theirs"])
        print(f"G = {g:2d}: encode once + prefill once + repeated cache {a:7.2f} s | generate(num_return_sequences) "
              f"{b:7.2f} s | ratio {b / a:5.1f}x   (rounds: {[round(t, 2) for t in times['ours']]} vs "
              f"{[round(t, 2) for t in times['theirs']]})")


if __name__ == "__main__":
    main(sys.argv[1:])
