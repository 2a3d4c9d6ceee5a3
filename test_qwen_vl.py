"""Tests for qwen_vl.py / qwen_parts.py / policies.py: transformers' Qwen2.5-VL as the policy.

Everything runs on the tiny random Qwen2.5-VL (64-d, 2-block vision tower with window attention; 128-d,
2-layer LM with grouped-query attention), on CPU in float32, no downloads. The reference for the numbers is
transformers' own Qwen2_5_VLForConditionalGeneration forward and generate, fed the inputs its processor
would build (input_ids with the video expanded, pixel_values_videos, video_grid_thw, second_per_grid_ts,
mm_token_type_ids), and Qwen2VLImageProcessorPil for the pixels."""
import importlib
import json
import os
import sys

import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as their_smart_resize

from data import load_jsonl, read_videos
from model import pad
from policies import load_policy, make_policy
from qwen_parts import TINY, fit_clip, prompt_positions, smart_resize, unpack_features, video_patches
from qwen_vl import QwenVLConfig, QwenVLPolicy
from rollout import completion_logprobs, rollout, sample_token
from synth import make_synthetic_dataset

SAMPLES = [{"id": "a", "question": "what colour is the square ?"},
           {"id": "b", "question": "how many squares are there ?", "options": ["one", "two", "three", "four"]},
           {"id": "c", "question": "where ?"}]
SECONDS = [1.0, 1.0, 0.5]     # short clips: here transformers 5.25's positions and Qwen's own rule agree
ANSWERS = ["red", "two squares", "left"]


def clips_of_three_sizes():
    """Three random clips of different lengths and sizes, each already at a tiny-model size (multiples of 16 px)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=g)
            for t, h, w in ((8, 64, 64), (6, 48, 80), (5, 32, 48))]


def vary(policy, scale=0.3, seed=0):
    """Redraw the language model's weights larger than their init (std 0.02), so that greedy answers and the
    first-token distribution vary with the input: a random model of init scale answers one token for all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.qwen.named_parameters():
            if ("language_model" in name or "lm_head" in name) and param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=g) * scale)
    return policy


@pytest.fixture(scope="module")
def tiny():
    """The tiny random policy with varied weights, read-only (tests that change it build their own)."""
    return vary(QwenVLPolicy(QwenVLConfig())).eval()


def transformers_inputs(policy, clips, seconds, prompt_ids, prompt_mask, completions=()):
    """What Qwen2.5-VL's processor would hand its model for these prompts (+ completions appended), built
    independently of QwenVLPolicy.prompt_inputs: each prompt's one <|video_pad|> expanded to t*h*w/4 tokens
    (the grid from transformers' smart_resize), left-padded; pixel_values_videos; second_per_grid_ts as
    temporal_patch / (frames / seconds); mm_token_type_ids 2 on video tokens."""
    video, rows, grids = policy.video_token_id, [], []
    for clip in clips:
        h, w = their_smart_resize(clip.shape[1], clip.shape[2], 16, policy.processing["min_pixels"],
                                  policy.processing["max_pixels"])
        grids.append([(len(clip) + 1) // 2, h // 8, w // 8])
    for b, ids in enumerate(prompt_ids):
        ids = ids[prompt_mask[b] > 0].tolist()
        at, count = ids.index(video), grids[b][0] * grids[b][1] * grids[b][2] // 4
        rows.append(ids[:at] + [video] * count + ids[at + 1:] + (completions[b] if completions else []))
    input_ids, attention_mask = pad(rows, policy.tokenizer.pad_token_id)
    pixels = torch.cat([video_patches(policy.fit_frames(c), 8, 2, 2, policy.processing["mean"], policy.processing["std"])[0]
                        for c in clips])
    second_per_grid = torch.tensor([2 / (len(c) / s) for c, s in zip(clips, seconds)], dtype=torch.float32)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=pixels,
                video_grid_thw=torch.tensor(grids), second_per_grid_ts=second_per_grid,
                mm_token_type_ids=(input_ids == video).int() * 2)



# ----------------------------------------------------------------------------- a. scoring equals transformers' forward

@pytest.mark.parametrize("share_prefix", [False, True])
@torch.no_grad()
def test_scoring_logits_equal_the_transformers_forward(tiny, share_prefix):
    """Left-padded prompts of three lengths, clips of three sizes (a list), G = 2 completions each: every
    completion token's logits equal transformers' forward of [prompt with video, completion] to 1e-5."""
    clips, G = clips_of_three_sizes(), 2
    features = tiny.encode_video(clips, seconds=SECONDS)
    prompt_ids, prompt_mask = tiny.encode_prompts(SAMPLES)
    assert len(set(prompt_mask.sum(1).tolist())) == 3
    completion_ids, completion_mask = tiny.encode_answers([a for a in ANSWERS for _ in range(G)])
    completion_ids[1::2, 0] = 7                                    # the two completions of a group differ
    tiny.config.share_prefix = share_prefix
    try:
        ours = tiny.completion_logits(features, prompt_ids, prompt_mask, completion_ids, completion_mask, group_size=G)
    finally:
        tiny.config.share_prefix = False
    for g in range(G):
        rows = [completion_ids[b * G + g][completion_mask[b * G + g] > 0].tolist() for b in range(3)]
        inputs = transformers_inputs(tiny, clips, SECONDS, prompt_ids, prompt_mask, rows)
        theirs = tiny.lm(**inputs).logits
        width = inputs["input_ids"].shape[1]
        for b, row in enumerate(rows):
            expected = theirs[b, width - len(row) - 1:width - 1]
            assert torch.allclose(ours[b * G + g, :len(row)], expected, atol=1e-5, rtol=0), (b, g)


def test_the_shared_prefix_holds_under_gradient_checkpointing(monkeypatch):
    """With gradient checkpointing (config/paper_7b.py's setting) the shared prefix still runs once per prompt:
    the same logits and LoRA gradients as the full pass, the prefix's keys read again in the backward's replay."""
    import rollout as rollout_module
    torch.manual_seed(0)
    policy = vary(QwenVLPolicy(QwenVLConfig(gradient_checkpointing=True))).train()
    policy.add_lora(4, 8)
    with torch.no_grad():
        for name, param in policy.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    clips, G = clips_of_three_sizes(), 2
    features = policy.encode_video(clips, seconds=SECONDS)
    prompt_ids, prompt_mask = policy.encode_prompts(SAMPLES)
    completion_ids, completion_mask = policy.encode_answers([a for a in ANSWERS for _ in range(G)])
    reads, real_update = [], rollout_module.PrefixLayer.update
    monkeypatch.setattr(rollout_module.PrefixLayer, "update", lambda *a, **k: reads.append(1) or real_update(*a, **k))
    results = {}
    for share in (False, True):
        policy.config.share_prefix = share
        policy.zero_grad()
        logits = policy.completion_logits(features, prompt_ids, prompt_mask, completion_ids, completion_mask, G)
        (logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) * completion_mask).sum().backward()
        grads = [p.grad.clone() for n, p in policy.named_parameters() if "lora_" in n and p.grad is not None]
        results[share] = (logits.detach(), grads)
    layers = policy.qwen.config.get_text_config().num_hidden_layers
    assert len(reads) == 2 * layers                                    # the forward, then the replay
    kept = completion_mask.bool()
    assert torch.allclose(results[True][0][kept], results[False][0][kept], atol=1e-5)
    assert results[True][1] and len(results[True][1]) == len(results[False][1])
    for shared, full in zip(*(results[share][1] for share in (True, False))):
        assert (shared - full).norm() <= 1e-4 * full.norm()


# ----------------------------------------------------------------------------- b. greedy equals transformers' generate

@torch.no_grad()
def test_greedy_generation_with_one_prefill_equals_transformers_generate(tiny):
    """G = 3 rows per prompt from one prefill per prompt and the repeated cache, token for token what
    transformers' generate answers greedily on the same batch; a stale rope_deltas left in the model
    changes nothing (positions are passed explicitly)."""
    clips, G, new = clips_of_three_sizes(), 3, 6
    features = tiny.encode_video(clips, seconds=SECONDS)
    prompt_ids, prompt_mask = tiny.encode_prompts(SAMPLES)
    prefill_rows = []
    hook = tiny.lm.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_rows.append(len(kwargs["inputs_embeds"])) if "inputs_embeds" in kwargs
        else None, with_kwargs=True)
    tiny.qwen.model.rope_deltas = torch.full((9, 1), 1000)          # what a previous call might have left
    try:
        ids, mask, truncated = tiny.generate(features, prompt_ids, prompt_mask, group_size=G, max_new_tokens=new,
                                             greedy=True)
    finally:
        hook.remove()
        tiny.qwen.model.rope_deltas = None
    assert prefill_rows == [3]                                      # the prompts ran once, not G times
    inputs = transformers_inputs(tiny, clips, SECONDS, prompt_ids, prompt_mask)
    theirs = tiny.lm.generate(**inputs, do_sample=False, max_new_tokens=new, eos_token_id=tiny.tokenizer.eos_token_id,
                              pad_token_id=tiny.tokenizer.pad_token_id)[:, inputs["input_ids"].shape[1]:]
    tiny.qwen.model.rope_deltas = None
    assert len({tuple(row) for row in theirs.tolist()}) == 3        # the prompts get different answers
    for b in range(3):
        for g in range(G):
            kept = int(mask[b * G + g].sum())
            assert ids[b * G + g, :kept].tolist() == theirs[b, :kept].tolist(), (b, g)
            assert kept == theirs.shape[1] or theirs[b, kept - 1] == tiny.tokenizer.eos_token_id


# ----------------------------------------------------------------------------- c. sampling at temperature 0.5

@torch.no_grad()
def test_first_token_frequencies_match_the_reported_probabilities(tiny, monkeypatch):
    """At T = 0.5, how often each first answer token is drawn matches exp(old_logp), the tempered probability
    the rollout reports; the untempered softmax would not (mirrors test_train's test for VideoLM)."""
    draws = 4000
    monkeypatch.setattr(tiny.config, "share_prefix", True)           # the prompt scored once, not 4000 times
    clip = clips_of_three_sizes()[:1]
    batch = rollout(tiny, SAMPLES[:1], clip, draws, max_new_tokens=1, temperature=0.5,
                    generator=torch.Generator().manual_seed(0))
    assert tiny.encode_calls >= 1 and batch.features.shape[0] == 1    # one clip encoded for 4000 samples
    first, reported = batch.completion_ids[:, 0], batch.old_logp[:, 0].exp()
    plain = torch.softmax(tiny.completion_logits(batch.features, batch.prompt_ids, batch.prompt_mask,
                                                 batch.completion_ids[:1], batch.completion_mask[:1])[0, 0], -1)
    gaps, plain_gaps = [], []
    for token in first.unique():
        frequency = (first == token).float().mean().item()
        gaps.append(abs(frequency - reported[first == token][0].item()))
        plain_gaps.append(abs(frequency - plain[token].item()))
    assert len(gaps) >= 3, "the test needs a spread distribution"
    assert max(gaps) < 0.03 and sum(gaps) < 0.1, gaps
    assert sum(plain_gaps) > 0.3, plain_gaps
    assert torch.equal(completion_logprobs(tiny, batch), batch.old_logp)


# ----------------------------------------------------------------------------- d. frames -> pixel_values_videos

@pytest.mark.parametrize("height, width, patch, min_pixels, max_pixels", [
    (64, 64, 8, 32 * 32, 64 * 64),              # the tiny model's size: no resize
    (50, 90, 8, 32 * 32, 64 * 64),              # over max_pixels: shrunk
    (20, 30, 8, 32 * 32, 64 * 64),              # under min_pixels: grown
    (300, 500, 14, 56 * 56, 28 * 28 * 1280)])   # Qwen2.5-VL's patch 14 and pixel bounds
def test_pixels_equal_the_image_processor_on_static_clips(height, width, patch, min_pixels, max_pixels):
    """A clip whose frames come in identical pairs [a, a, b, b, c] (c padded with itself) patchifies to what
    Qwen2VLImageProcessorPil gives for the images a, b, c, exactly; its grid is smart_resize's."""
    g = torch.Generator().manual_seed(height)
    images = torch.randint(0, 256, (3, height, width, 3), dtype=torch.uint8, generator=g)
    clip = images[[0, 0, 1, 1, 2]]
    fitted = fit_clip(clip, patch * 2, min_pixels, max_pixels)
    ours, grid = video_patches(fitted, patch, 2, 2, Qwen2VLImageProcessorPil.image_mean, Qwen2VLImageProcessorPil.image_std)
    processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                         size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    theirs = processor(images=list(images.numpy()), return_tensors="pt")
    h, w = their_smart_resize(height, width, patch * 2, min_pixels, max_pixels)
    assert grid == [3, h // patch, w // patch] and theirs["image_grid_thw"].tolist() == [[1, h // patch, w // patch]] * 3
    assert (h, w) == (height, width) or fitted.shape[1:3] != clip.shape[1:3]
    assert torch.equal(ours, theirs["pixel_values"])


def test_smart_resize_equals_transformers_over_many_sizes():
    g = torch.Generator().manual_seed(0)
    for height, width in torch.randint(8, 2000, (500, 2), generator=g).tolist():
        for bounds in ((56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28), (32 * 32, 64 * 64)):
            assert smart_resize(height, width, 28, *bounds) == their_smart_resize(height, width, 28, *bounds)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500, 28, 56 * 56, 28 * 28 * 1280)


def test_a_frame_not_at_a_multiple_of_patch_times_merge_is_refused():
    with pytest.raises(ValueError, match="multiple of patch \\* merge = 16"):
        video_patches(torch.zeros(2, 40, 64, 3, dtype=torch.uint8), 8, 2, 2, (0, 0, 0), (1, 1, 1))


# ----------------------------------------------------------------------------- positions the trainer can trust

def test_text_after_a_long_clip_starts_past_its_last_temporal_position():
    """A clip longer in time than in space: [2 text, video of grid (4, 4, 4) at interval 2, 3 text]. The video's
    temporal positions reach 2 + 6; the text after it starts at 9 (Qwen2.5-VL's rule), not at 2 + 4."""
    ids = [5, 5] + [9] * 16 + [5, 5, 5]
    positions, following = prompt_positions(ids, 9, [4, 4, 4], torch.tensor(2.0), 2)
    assert positions[:, :2].tolist() == [[0, 1]] * 3
    assert positions[0, 2:18].tolist() == [2] * 4 + [4] * 4 + [6] * 4 + [8] * 4
    assert positions[1, 2:18].tolist() == [2, 2, 3, 3] * 4 and positions[2, 2:18].tolist() == [2, 3] * 8
    assert positions[:, 18:].tolist() == [[9, 10, 11]] * 3 and following == 12
    with pytest.raises(ValueError, match="holds 15 video tokens, its clip needs 16"):
        prompt_positions(ids[:2] + ids[3:], 9, [4, 4, 4], torch.tensor(2.0), 2)


@pytest.mark.parametrize("share_prefix", [False, True])
@torch.no_grad()
def test_sampled_logits_are_the_scored_logits_on_long_clips(tiny, monkeypatch, share_prefix):
    """Clips of unknown duration (so 2 fps: longer in time than in space), left padding, G = 2: teacher forcing
    the sampled completions reproduces the logits generate sampled from, so the first pass's ratio is 1."""
    clips = clips_of_three_sizes()
    features = tiny.encode_video(clips)
    assert unpack_features(features)[1].tolist() == [1.0, 1.0, 1.0]
    prompt_ids, prompt_mask = tiny.encode_prompts(SAMPLES)
    recorded = []

    def recording(logits, *args, **kwargs):
        recorded.append(logits.clone())
        return sample_token(logits, *args, **kwargs)
    monkeypatch.setattr(sys.modules["rollout"], "sample_token", recording)   # the decoding loop's (rollout.py)
    ids, mask, _ = tiny.generate(features, prompt_ids, prompt_mask, group_size=2, max_new_tokens=5, temperature=2.0,
                                 generator=torch.Generator().manual_seed(0))
    assert len(set(map(tuple, ids.tolist()))) > 3
    monkeypatch.setattr(tiny.config, "share_prefix", share_prefix)
    logits = tiny.completion_logits(features, prompt_ids, prompt_mask, ids, mask, group_size=2)
    on = mask.bool()
    assert torch.allclose(logits[on], torch.stack(recorded, 1)[on], atol=1e-5)


# ----------------------------------------------------------------------------- LoRA, the reference, save / load

def test_lora_goes_on_the_language_model_only_and_the_tower_stays_frozen():
    torch.manual_seed(0)
    policy = QwenVLPolicy(QwenVLConfig(lora_r=4))
    lora = [name for name, _ in policy.lm.named_parameters() if "lora_" in name]
    assert lora and all(".language_model." in name for name in lora)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in lora} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    policy.snapshot_reference()
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".default." in n or ".visual.merger." in n}
    assert any(".visual.merger." in n for n in trainable)           # the tiny merger trains (it is random)
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".visual." in n and ".merger." not in n)
    features = policy.encode_video(clips_of_three_sizes()[:2])
    prompt_ids, prompt_mask = policy.encode_prompts(SAMPLES[:2])
    answer_ids, answer_mask = policy.encode_answers(ANSWERS[:2])
    policy.completion_logits(features, prompt_ids, prompt_mask, answer_ids, answer_mask).sum().backward()
    grads = {name: p.grad for name, p in policy.named_parameters() if p.requires_grad}
    assert all(grad is not None for grad in grads.values())
    assert all(grad.abs().sum() > 0 for name, grad in grads.items() if "lora_B" in name or ".merger." in name)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_reference_snapshot_then_a_step_then_save_and_load(tmp_path, lora_r):
    """Right after the snapshot the reference (the "ref" adapter + a merger copy, or without LoRA a copy of the
    whole model) scores as the policy; after a step they differ and the reference has not moved; save -> load
    gives identical logits for both."""
    torch.manual_seed(0)
    policy = vary(QwenVLPolicy(QwenVLConfig(lora_r=lora_r)))
    policy.snapshot_reference()
    clips = clips_of_three_sizes()
    features = policy.encode_video(clips, seconds=SECONDS)
    prompt_ids, prompt_mask = policy.encode_prompts(SAMPLES)
    answer_ids, answer_mask = policy.encode_answers(ANSWERS)
    score = lambda model, reference=False: model.completion_logits(features, prompt_ids, prompt_mask, answer_ids,
                                                                   answer_mask, reference=reference)
    with torch.no_grad():
        before = score(policy)
        assert torch.equal(score(policy, reference=True), before)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    (-score(policy).log_softmax(-1).gather(-1, answer_ids.unsqueeze(-1)).sum()).backward()
    optimizer.step()
    policy.eval()
    with torch.no_grad():
        after, reference = score(policy), score(policy, reference=True)
    assert not torch.allclose(after, before) and torch.equal(reference, before)
    policy.save(str(tmp_path / "ckpt"))
    loaded = load_policy(str(tmp_path / "ckpt")).eval()
    assert isinstance(loaded, QwenVLPolicy) and loaded.config == policy.config
    assert (loaded.ref_lm is None) == (lora_r > 0) and (loaded.ref_merger is None) == (lora_r == 0)
    with torch.no_grad():
        assert torch.equal(score(loaded), after) and torch.equal(score(loaded, reference=True), reference)


def test_a_transformers_directory_loads_offline_and_answers_as_transformers_does(tiny, tmp_path):
    """save_pretrained writes a model directory (config.json with model_type, weights, tokenizer with its chat
    template, preprocessor_config.json); load_policy recognises it and answers greedily as before."""
    path = str(tmp_path / "hf")
    tiny.save_pretrained(path)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= set(os.listdir(path))
    loaded = load_policy(path).eval()
    assert loaded.config.base == path and loaded.processing == tiny.processing
    clips = clips_of_three_sizes()
    answers = []
    for policy in (tiny, loaded):
        features = policy.encode_video(clips)
        ids, mask, _ = policy.generate(features, *policy.encode_prompts(SAMPLES), max_new_tokens=5, greedy=True)
        answers.append(policy.decode(ids, mask))
    assert answers[0] == answers[1]
    with pytest.raises(ValueError, match=r"unknown QwenVLConfig keys \['lora_rank'\]; known: \['base', "):
        load_policy(path, lora_rank=8)
    with open(os.path.join(path, "config.json")) as f:
        text = f.read()
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(text.replace('"qwen2_5_vl"', '"llava_next_video"'))
    with pytest.raises(ValueError, match=r"'llava_next_video' is not a supported policy; supported: \['qwen2_5_vl'\]"):
        load_policy(path)
    with pytest.raises(ValueError, match="unknown policy 'qwen'; known"):
        make_policy("qwen")


def test_qlora_quantises_the_language_model_only_and_trains_its_adapters(tiny, tmp_path):
    """load_in_4bit: the language model's linear layers become NF4 (bitsandbytes runs them on the CPU too); the
    vision tower, the merger and lm_head stay as they were; LoRA on top gets gradients; the reference works."""
    path = str(tmp_path / "hf")
    tiny.save_pretrained(path)
    policy = load_policy(path, load_in_4bit=True, lora_r=4)
    kinds = {name: type(module).__name__ for name, module in policy.qwen.named_modules()}
    assert kinds["model.language_model.layers.0.mlp.up_proj"] == "Linear4bit"
    assert kinds["model.language_model.layers.0.self_attn.q_proj.base_layer"] == "Linear4bit"
    assert not any(kind == "Linear4bit" for name, kind in kinds.items() if ".visual." in name or name == "lm_head")
    policy.snapshot_reference()
    features = policy.encode_video(clips_of_three_sizes()[:1])
    prompt_ids, prompt_mask = policy.encode_prompts(SAMPLES[:1])
    answer_ids, answer_mask = policy.encode_answers(ANSWERS[:1])
    logits = policy.completion_logits(features, prompt_ids, prompt_mask, answer_ids, answer_mask)
    logits.float().logsumexp(-1).sum().backward()
    assert policy.trainable_parameters() and all(p.grad is not None for p in policy.trainable_parameters())
    with torch.no_grad():
        reference = policy.completion_logits(features, prompt_ids, prompt_mask, answer_ids, answer_mask, reference=True)
    assert torch.equal(reference, logits.detach())


# ----------------------------------------------------------------------------- through the trainer, unchanged

@pytest.fixture(scope="module")
def synth_samples(tmp_path_factory):
    return load_jsonl(make_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), num_train=8, num_eval=0)["train"])


def test_read_videos_returns_a_list_when_the_policy_keeps_clips_at_different_sizes(synth_samples):
    heights = iter([48, 32])
    frames, kept, failed = read_videos(synth_samples[:2], 4, lambda clip: clip[:, :next(heights)])
    assert isinstance(frames, list) and [tuple(f.shape) for f in frames] == [(4, 48, 64, 3), (4, 32, 64, 3)]
    frames, _, _ = read_videos(synth_samples[:2], 4, lambda clip: clip[:, :48])
    assert isinstance(frames, torch.Tensor) and frames.shape == (2, 4, 48, 64, 3)


def test_train_step_and_sft_run_on_the_tiny_qwen_policy(synth_samples):
    """sft.train_sft and one train_step (rollout, Oracle, reference, mu = 2 passes) on synthetic videos,
    through data.read_videos and the policy's fit_frames, without any Qwen-specific code in the trainer."""
    from grpo_rank import METHODS
    from oracle import make_oracle
    from sft import train_sft
    from train_step import StepConfig, train_step
    samples = synth_samples
    torch.manual_seed(0)
    policy = make_policy(TINY, num_frames=4)
    losses = train_sft(policy, samples, steps=5, batch_size=4, warmup_steps=1, progress=False)
    assert losses[-1] < losses[0]
    policy.add_lora(4, 8)
    policy.snapshot_reference()
    policy.disable_dropout()
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    config = StepConfig(num_generations=4, max_new_tokens=3, temperature=1.0, top_p=1.0, mask_truncated_completions=False,
                        advantage=METHODS[0], dcg_kind="eq10", bound="symmetric", scale_rewards="group", floor=0.1,
                        ratio_policy="rollout", beta=0.04, epsilon=0.2, epsilon_high=0.0, entropy_coef=0.0,
                        loss_type="grpo", use_bias_correction_kl=False, top_k=0, repetition_penalty=1.0,
                        num_iterations=2, grad_clip=1.0, oracle_workers=1, max_bad_video_fraction=0.5)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    metrics = train_step(policy, optimizer, samples[:2], make_oracle("reference"), config, 1e-2,
                         torch.Generator().manual_seed(0))
    assert not metrics["nonfinite_step"] and metrics["samples"] == 8
    assert any(not torch.equal(b, p) for b, p in zip(before, policy.trainable_parameters()))


# ----------------------------------------------------------------------------- e, f. through train.py and eval.py

@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """`python train.py --policy=tiny-qwen2_5_vl` on the synthetic task's colour questions (6 answers, learnable
    in seconds): a 100-step SFT warm start, then 30 GRPO_rank steps. -> (synthetic paths, out_dir, results)"""
    import train
    from data import write_jsonl
    root = tmp_path_factory.mktemp("qwen_run")
    made = make_synthetic_dataset(str(root / "synth"), num_train=512, num_eval=160)
    paths = {}
    for split in ("train", "eval"):
        paths[split] = str(root / "synth" / f"colour_{split}.jsonl")
        write_jsonl(paths[split], [r for r in load_jsonl(made[split]) if r["category"] == "colour"])
    out = str(root / "out")
    results = importlib.reload(train).main([
        "--policy=tiny-qwen2_5_vl", f"--train_data={paths['train']}", f"--eval_data={paths['eval']}", f"--out_dir={out}",
        "--sft_steps=100", "--sft_batch_size=16", "--max_steps=30", "--epochs=100", "--batch_size=8", "--warmup_steps=2",
        "--num_generations=8", "--max_new_tokens=4", "--num_threads=1", "--save_every=1000", "--eval_batch_size=40"])
    return paths, out, results


def test_train_py_on_the_tiny_qwen_policy_raises_held_out_accuracy(colour_run):
    _, out, results = colour_run
    assert results["config"]["policy"] == TINY and results["before"]["n"] == results["after"]["n"] >= 30
    assert results["after"]["accuracy"] >= results["before"]["accuracy"] + 0.05      # measured: 37.5 -> 50.0 %
    saved = load_policy(os.path.join(out, "ckpt", "model"))
    assert isinstance(saved, QwenVLPolicy) and saved.has_lora and saved.config.num_frames == 8


def test_resume_on_the_tiny_qwen_policy_continues_the_same_run(colour_run, tmp_path):
    import train
    paths, out, _ = colour_run
    common = [f"--sft_checkpoint={os.path.join(out, 'sft')}", f"--train_data={paths['train']}",
              f"--eval_data={paths['eval']}", "--max_steps=3", "--batch_size=4", "--num_generations=4",
              "--max_new_tokens=3", "--eval_size=4", "--num_threads=1", "--save_every=1000"]
    read = lambda run: [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    importlib.reload(train).main([*common, f"--out_dir={tmp_path / 'whole'}"])
    importlib.reload(train).main([*common, f"--out_dir={tmp_path / 'split'}", "--stop_after_steps=2"])
    importlib.reload(train).main([*common, f"--out_dir={tmp_path / 'split'}", "--resume=True"])
    whole, split = read(tmp_path / "whole"), read(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3]
    assert [r["loss"] for r in split] == [r["loss"] for r in whole]                 # bit for bit


def test_eval_py_scores_the_tiny_qwen_policy_in_every_task(colour_run, tmp_path):
    """eval.py --checkpoint on a Qwen checkpoint: exact match, multiple choice and judged open-ended QA (the
    judge on loopback answering yes for every prediction)."""
    import eval as eval_py
    from test_oracle import FakeJudge, completion
    paths, out, _ = colour_run
    checkpoint = os.path.join(out, "ckpt", "model")
    rows = load_jsonl(paths["eval"])[:6]
    choices = [dict(r, options=["red", "blue", "green", "purple"], answer="A") for r in rows]
    mc_path = str(tmp_path / "mc.jsonl")
    from data import write_jsonl
    write_jsonl(mc_path, choices)
    judge = FakeJudge()
    judge.behave = lambda index, body, headers: (200, {}, completion(json.dumps({"pred": "yes", "score": 4})), 0.0)
    judge.thread.start()
    try:
        for task, data, extra in (("exact", paths["eval"], []), ("mc", mc_path, []),
                                  ("open", paths["eval"], [f"--judge_base_url={judge.url}", "--judge_model=fake"])):
            results_path = str(tmp_path / f"{task}.json")
            assert importlib.reload(eval_py).main([f"--checkpoint={checkpoint}", f"--data={data}", f"--task={task}",
                                                   "--limit=6", "--quiet=True", f"--out={results_path}",
                                                   f"--predictions={tmp_path / task}.jsonl", *extra]) in (0, None)
            results = json.load(open(results_path))
            assert results["n"] == 6, (task, results)
    finally:
        judge.server.shutdown()
        judge.server.server_close()
    assert results["accuracy"] == 1.0 and len(judge.requests) == 6                   # the open task was judged


def test_a_transformers_directory_trains_with_sft_checkpoint_and_evaluates_with_checkpoint(colour_run, tmp_path):
    """A Qwen2.5-VL model directory as users have them (here: the colour run's warm start, saved with
    save_pretrained): train.py --sft_checkpoint=DIR puts LoRA on it and trains; eval.py --checkpoint=DIR scores it."""
    import eval as eval_py
    import train
    paths, out, _ = colour_run
    hf_dir = str(tmp_path / "hf")
    load_policy(os.path.join(out, "sft")).save_pretrained(hf_dir)
    results = importlib.reload(train).main([
        f"--sft_checkpoint={hf_dir}", f"--train_data={paths['train']}", f"--eval_data={paths['eval']}",
        f"--out_dir={tmp_path / 'rl'}", "--max_steps=2", "--batch_size=4", "--num_generations=4", "--max_new_tokens=3",
        "--eval_size=8", "--num_threads=1", "--save_every=1000", "--lora_r=4"])
    trained = load_policy(str(tmp_path / "rl" / "ckpt" / "model"))
    assert trained.has_lora and trained.config.base == hf_dir and results["after"]["n"] == 8
    rows = [json.loads(line) for line in open(tmp_path / "rl" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["nonfinite_steps"] == 0 for r in rows)
    results_path = str(tmp_path / "eval.json")
    importlib.reload(eval_py).main([f"--checkpoint={hf_dir}", f"--data={paths['eval']}", "--limit=8", "--quiet=True",
                                    f"--out={results_path}", f"--predictions={tmp_path / 'predictions.jsonl'}"])
    assert json.load(open(results_path))["n"] == 8


def test_a_bad_checkpoint_config_is_named_and_loading_never_reaches_a_hub(tiny, tmp_path):
    """load_policy (train.py --sft_checkpoint, eval.py --checkpoint) names a corrupted config.json; a Qwen
    checkpoint whose tokenizer is a hub id is refused, never downloaded."""
    from checkpoint import CheckpointError
    path = str(tmp_path / "ckpt")
    tiny.save(path)
    config_path = os.path.join(path, "config.json")
    original = open(config_path).read()
    for written in ('', '[1]'):
        with open(config_path, "w") as f:
            f.write(written)
        os.remove(os.path.join(path, "manifest.json"))                   # past the checksums, to the config itself
        with pytest.raises(CheckpointError, match="config.json"):
            load_policy(path)
        tiny.save(path)
    meta = json.loads(original)
    meta["model"]["tokenizer"] = "someorg/some-tokenizer"
    with open(config_path, "w") as f:
        json.dump(meta, f)
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(ValueError, match="'someorg/some-tokenizer' is not a local directory"):
        load_policy(path)


def test_a_pretrained_qwen_base_without_lora_is_refused_before_any_copy(tiny, tmp_path):
    import train
    hf_dir = str(tmp_path / "hf")
    tiny.save_pretrained(hf_dir)
    made = make_synthetic_dataset(str(tmp_path / "synth"), num_train=8, num_eval=2)
    with pytest.raises(SystemExit, match="--lora_r=0: the policy has nothing to train"):
        importlib.reload(train).main([f"--sft_checkpoint={hf_dir}", f"--train_data={made['train']}",
                                      f"--eval_data={made['eval']}", f"--out_dir={tmp_path / 'out'}", "--lora_r=0",
                                      "--batch_size=2", "--num_threads=1"])


@torch.no_grad()
def test_the_rollout_gives_the_policy_each_clips_duration(tiny):
    """The rollout hands encode_video each sample's "seconds" (read_videos puts the clip's duration there), so
    M-RoPE's time positions follow the clip: second_per_grid_ts = temporal patch / (frames / seconds); a sample
    without one falls back to the assumed fps."""
    clips = clips_of_three_sizes()[:2]
    samples = [dict(SAMPLES[0], seconds=4.0), dict(SAMPLES[2])]
    batch = rollout(tiny, samples, clips, 2, max_new_tokens=1, generator=torch.Generator().manual_seed(0))
    _, second_per_grid, _ = unpack_features(batch.features)
    assert second_per_grid.tolist() == pytest.approx([2 / (8 / 4.0), 2 / tiny.config.fps])
