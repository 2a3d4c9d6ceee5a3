"""Tests for model.py (the video policy) and sft.py (the supervised warm start).

Everything runs on the tiny config (32 px frames, patch 8 -> S = 16 patches, 64-d vision, 128-d LM)
or on tiny "pretrained" directories written by the session fixtures: no downloads, CPU only."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import checkpoint
import model
import rollout as rollout_module
import sft
from data import IMAGE, build_prompt, load_jsonl, load_video
from model import ModelConfig, VideoLM, make_projector
from rollout import sample_token
from synth import make_synthetic_dataset, synthetic_vocab, word_tokenizer
from rollout import rollout

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP's RGB normalisation, written out
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
S = (32 // 8) ** 2          # patches of the tiny tower: (image_size / patch_size)^2
C = 64                      # tiny vision hidden size


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes: one thread is faster, and far faster when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), num_train=32, num_eval=8)


@pytest.fixture(scope="session")
def train_samples(synth):
    return load_jsonl(synth["train"])


@pytest.fixture(scope="session")
def frames(train_samples):
    """uint8 (4, 8, 64, 64, 3): the first four training videos."""
    return torch.stack([load_video(s["video"], 8) for s in train_samples[:4]])


@pytest.fixture(scope="session")
def tiny():
    """The tiny random policy, read-only (tests that change it build their own)."""
    torch.manual_seed(0)
    return VideoLM(ModelConfig()).eval()


@pytest.fixture(scope="session")
def pretrained_dirs(tmp_path_factory):
    """A tiny CLIP vision tower and a tiny LLaMA + tokenizer saved the way hub models are."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(1)
    vision_dir, lm_dir = str(root / "clip"), str(root / "llama")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(vision_dir)
    tokenizer = word_tokenizer(synthetic_vocab())
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)).save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    return vision_dir, lm_dir


def questions(*texts):
    return [{"question": text} for text in texts]


def randomize_lora_b(policy, adapter="default", scale=0.05):
    """LoRA B starts at zero (the adapter is a no-op, and lora_A gets no gradient): make it count."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in policy.lm.named_parameters():
            if f"lora_B.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def all_logits(policy, features, samples, answers, reference=False):
    prompt_ids, prompt_mask = policy.encode_prompts(samples)
    answer_ids, answer_mask = policy.encode_answers(answers)
    with torch.no_grad():
        return policy.completion_logits(features, prompt_ids, prompt_mask, answer_ids, answer_mask,
                                        reference=reference)


SAMPLES = questions("what colour is the square ?", "where is the square ?")
ANSWERS = ["red", "two blue squares"]


# ----------------------------------------------------------------------------- shapes and pooling

def test_encode_video_gives_t_plus_s_tokens(tiny):
    for num_frames in (4, 8):
        video = torch.randint(0, 256, (2, num_frames, 32, 32, 3), dtype=torch.uint8)
        assert tiny.encode_video(video).shape == (2, num_frames + S, C)


def test_encode_video_pools_second_to_last_layer_patches_without_cls(tiny):
    video = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = tiny.vision(pixel_values=tiny.preprocess(video), output_hidden_states=True).hidden_states
    assert len(hidden) == 2 + 1 and hidden[-2].shape == (2 * 3, 1 + S, C)     # embeddings + 2 layers; CLS first
    patches = tiny.vision.post_layernorm(hidden[-2][:, 1:]).reshape(2, 3, S, C)
    expected = torch.cat([patches.mean(2), patches.mean(1)], 1)
    assert torch.allclose(tiny.encode_video(video), expected, atol=1e-5)


def test_other_frame_sizes_are_resized_and_centre_cropped(tiny):
    for height, width in ((48, 80), (80, 48), (64, 64), (20, 30)):
        video = torch.randint(0, 256, (2, 3, height, width, 3), dtype=torch.uint8)
        assert tiny.preprocess(video).shape == (2 * 3, 3, 32, 32)
        assert tiny.encode_video(video).shape == (2, 3 + S, C)


def test_video_chatgpt_pool_matches_loops():
    torch.manual_seed(0)
    B, T, P, D = 2, 3, 5, 4
    patches = torch.randn(B, T, P, D)
    expected = torch.zeros(B, T + P, D)
    for b in range(B):
        for t in range(T):                 # temporal tokens: mean over the patches of frame t
            expected[b, t] = sum(patches[b, t, s] for s in range(P)) / P
        for s in range(P):                 # spatial tokens: mean over the frames of patch s
            expected[b, T + s] = sum(patches[b, t, s] for t in range(T)) / T
    assert torch.allclose(model.video_chatgpt_pool(patches), expected, atol=1e-6)


def test_preprocess_normalises_a_constant_frame_by_hand(tiny):
    rgb = (200, 100, 50)
    video = torch.tensor(rgb, dtype=torch.uint8).expand(1, 2, 48, 80, 3).contiguous()
    pixels = tiny.preprocess(video)
    assert pixels.shape == (2, 3, 32, 32)
    for channel in range(3):
        expected = (rgb[channel] / 255.0 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        assert torch.allclose(pixels[:, channel], torch.full((2, 32, 32), expected), atol=1e-4)


def test_preprocess_at_tower_size_is_a_per_pixel_normalisation(tiny):
    torch.manual_seed(0)
    video = torch.randint(0, 256, (1, 2, 32, 32, 3), dtype=torch.uint8)
    pixels = tiny.preprocess(video)
    for frame in range(2):
        for channel in range(3):       # channels first, RGB order kept, no resampling
            expected = (video[0, frame, :, :, channel].float() / 255 - CLIP_MEAN[channel]) / CLIP_STD[channel]
            assert torch.allclose(pixels[frame, channel], expected, atol=1e-5)


# ----------------------------------------------------------------------------- what trains

def backward_once(policy):
    policy.train()
    video = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = policy.encode_video(video)
    prompt_ids, prompt_mask = policy.encode_prompts(SAMPLES)
    answer_ids, answer_mask = policy.encode_answers(ANSWERS)
    logits = policy.completion_logits(features, prompt_ids, prompt_mask, answer_ids, answer_mask)
    F.cross_entropy(logits.flatten(0, 1), answer_ids.flatten()).backward()


def test_lora_and_projector_get_gradients_frozen_parts_do_not():
    torch.manual_seed(0)
    policy = VideoLM(ModelConfig())
    policy.add_lora(4, 8)
    randomize_lora_b(policy)
    policy.snapshot_reference()
    backward_once(policy)
    for name, param in policy.vision.named_parameters():
        assert param.grad is None and not param.requires_grad, name
    lora_default, lora_ref, base = 0, 0, 0
    for name, param in policy.lm.named_parameters():
        if ".default." in name:
            assert "lora_A" in name or "lora_B" in name
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            lora_default += 1
        elif ".ref." in name:
            assert param.grad is None and not param.requires_grad, name
            lora_ref += 1
        else:
            assert param.grad is None and not param.requires_grad, name
            base += 1
    assert lora_default == lora_ref == 2 * 4 * 2 and base > 0     # A, B x 4 modules x 2 layers
    for name, param in policy.projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for param in policy.ref_projector.parameters():
        assert param.grad is None and not param.requires_grad
    trainable = {id(p) for p in policy.trainable_parameters()}
    assert trainable == {id(p) for n, p in policy.named_parameters() if ".default." in n or n.startswith("projector.")}


def test_reference_pass_keeps_ref_frozen_and_default_trainable():
    torch.manual_seed(0)
    policy = VideoLM(ModelConfig())
    policy.add_lora(4, 8)
    policy.snapshot_reference()
    features = torch.randn(2, 4 + S, C)
    all_logits(policy, features, SAMPLES, ANSWERS, reference=True)
    for name, param in policy.lm.named_parameters():
        assert param.requires_grad == (".default." in name), name


def test_without_lora_the_lm_trains_but_the_tower_does_not():
    torch.manual_seed(0)
    policy = VideoLM(ModelConfig())
    assert policy.config.lora_r == 0 and not policy.has_lora
    backward_once(policy)
    for name, param in policy.vision.named_parameters():
        assert param.grad is None and not param.requires_grad, name
    for name, param in list(policy.lm.named_parameters()) + list(policy.projector.named_parameters()):
        assert param.grad is not None, name
    lm_grads = [p.grad for p in policy.lm.parameters()]
    assert sum(g.abs().sum() for g in lm_grads) > 0
    assert policy.lm.get_input_embeddings().weight.grad.abs().sum() > 0
    assert not any(p is q for p in policy.trainable_parameters() for q in policy.vision.parameters())


# ----------------------------------------------------------------------------- groups and generation

def test_rollout_encodes_each_video_once_and_groups_are_contiguous(frames, train_samples):
    torch.manual_seed(0)
    policy = VideoLM(ModelConfig()).eval()
    samples = [dict(s) for s in train_samples[:2]]
    samples[1]["question"] = "how many squares are there ? where is the square ?"
    G = 3
    batch = rollout(policy, samples, frames[:2], G, max_new_tokens=5, temperature=0)
    assert policy.encode_calls == 1
    assert batch.completion_ids.shape[0] == 2 * G and batch.features.shape == (2, 8 + S, C)
    singles, _, _ = policy.generate(batch.features, batch.prompt_ids, batch.prompt_mask, group_size=1,
                                    max_new_tokens=5, greedy=True)
    assert policy.encode_calls == 1
    assert not torch.equal(singles[0], singles[1])      # the two prompts are told apart
    length = min(singles.shape[1], batch.completion_ids.shape[1])
    for b in range(2):
        for i in range(G):                              # row b*G + i is prompt b's
            assert torch.equal(batch.completion_ids[b * G + i, :length], singles[b, :length])
        assert len(set(batch.responses[b])) == 1


class ScriptedSampler:
    """Stands in for sample_token: returns script[:, step], records the logits it was given."""

    def __init__(self, script):
        self.script, self.step, self.logits = script, 0, []

    def __call__(self, logits, *args, **kwargs):
        self.logits.append(logits.clone())
        token = self.script[:, self.step]
        self.step += 1
        return token


def test_generate_mask_is_eos_aware(tiny, monkeypatch):
    eos, pad = tiny.tokenizer.eos_token_id, tiny.tokenizer.pad_token_id
    word = tiny.tokenizer.convert_tokens_to_ids("red")
    script = torch.full((4, 5), word)
    script[0, 0] = eos           # EOS first; later tokens of this row must become pad
    script[1, 2] = eos
    script[3, 4] = eos           # EOS as the last allowed token: not truncated
    sampler = ScriptedSampler(script)
    monkeypatch.setattr(rollout_module, "sample_token", sampler)
    features = torch.randn(2, 4 + S, C)
    prompt_ids, prompt_mask = tiny.encode_prompts(SAMPLES)
    ids, mask, truncated = tiny.generate(features, prompt_ids, prompt_mask, group_size=2, max_new_tokens=5)
    R, P = word, pad
    assert ids.tolist() == [[eos, P, P, P, P], [R, R, eos, P, P], [R, R, R, R, R], [R, R, R, R, eos]]
    assert mask.tolist() == [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True, False]


def test_generate_stops_when_every_row_has_ended(tiny, monkeypatch):
    eos = tiny.tokenizer.eos_token_id
    script = torch.full((2, 8), tiny.tokenizer.convert_tokens_to_ids("blue"))
    script[0, 1], script[1, 2] = eos, eos
    monkeypatch.setattr(rollout_module, "sample_token", ScriptedSampler(script))
    prompt_ids, prompt_mask = tiny.encode_prompts(SAMPLES)
    ids, mask, truncated = tiny.generate(torch.randn(2, 4 + S, C), prompt_ids, prompt_mask, max_new_tokens=8)
    assert ids.shape == mask.shape == (2, 3)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]] and not truncated.any()


def test_sampled_generation_invariants(tiny):
    """Real sampling (hot, so EOS shows up): 1s up to and including the first EOS, then 0s and pad."""
    eos, pad = tiny.tokenizer.eos_token_id, tiny.tokenizer.pad_token_id
    prompt_ids, prompt_mask = tiny.encode_prompts(SAMPLES)
    ids, mask, truncated = tiny.generate(torch.randn(2, 4 + S, C, generator=torch.Generator().manual_seed(0)),
                                         prompt_ids, prompt_mask, group_size=16, max_new_tokens=10,
                                         temperature=20.0, generator=torch.Generator().manual_seed(0))
    assert ids.shape[0] == 32 and 0 < int(truncated.sum()) < 32     # both kinds occur
    for row_ids, row_mask, cut in zip(ids.tolist(), mask.tolist(), truncated.tolist()):
        if eos in row_ids:
            end = row_ids.index(eos)
            assert not cut
            assert row_mask == [1] * (end + 1) + [0] * (len(row_ids) - end - 1)
            assert row_ids[end + 1:] == [pad] * (len(row_ids) - end - 1)
        else:
            assert cut and row_mask == [1] * len(row_ids)


def test_kv_cached_generation_agrees_with_the_full_forward(tiny, monkeypatch):
    """Teacher forcing the generated tokens reproduces the logits generate sampled from, with
    left padding (prompts of different lengths) and groups."""
    samples = questions("what colour is the square ?", "where ?", "how many squares can you see in the frame ?")
    prompt_ids, prompt_mask = tiny.encode_prompts(samples)
    assert len(set(prompt_mask.sum(1).tolist())) == 3                  # three lengths: left padding
    features = torch.randn(3, 4 + S, C, generator=torch.Generator().manual_seed(1))
    recorded = []

    def recording(logits, *args, **kwargs):
        recorded.append(logits.clone())
        return sample_token(logits, *args, **kwargs)

    monkeypatch.setattr(rollout_module, "sample_token", recording)
    ids, mask, _ = tiny.generate(features, prompt_ids, prompt_mask, group_size=2, max_new_tokens=6,
                                 temperature=3.0, generator=torch.Generator().manual_seed(0))
    assert len(set(map(tuple, ids.tolist()))) > 1
    logits = tiny.completion_logits(features, prompt_ids, prompt_mask, ids, mask, group_size=2)
    assert logits.shape == (6, ids.shape[1], len(tiny.tokenizer))
    on = mask.bool()
    assert torch.allclose(logits[on], torch.stack(recorded, 1)[on], atol=1e-4)


def test_generate_prefills_once(tiny):
    """The prompt runs once per prompt and its KV cache is repeated for the G samples: the same samples as
    generating from G copies of each prompt (the prompt run G times), left padding included."""
    samples = questions("what colour is the square ?", "where ?", "how many squares can you see in the frame ?")
    prompt_ids, prompt_mask = tiny.encode_prompts(samples)
    features = torch.randn(3, 4 + S, C, generator=torch.Generator().manual_seed(1))
    prefill_rows = []
    hook = tiny.lm.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_rows.append(len(kwargs["inputs_embeds"])) if "inputs_embeds" in kwargs else None,
        with_kwargs=True)
    sample = lambda *inputs, group_size: tiny.generate(*inputs, group_size=group_size, max_new_tokens=6, temperature=3.0,
                                                       generator=torch.Generator().manual_seed(0))
    grouped = sample(features, prompt_ids, prompt_mask, group_size=4)
    copies = sample(*(t.repeat_interleave(4, 0) for t in (features, prompt_ids, prompt_mask)), group_size=1)
    hook.remove()
    assert prefill_rows == [3, 12]
    assert len(set(map(tuple, grouped[0].tolist()))) > 3
    for ours, theirs in zip(grouped, copies):         # ids, mask, truncated
        assert torch.equal(ours, theirs)


def test_left_padding_does_not_change_a_prompts_logits(tiny):
    """A prompt batched with a longer one (so left-padded) gets the logits it gets alone."""
    samples = questions("where ?", "how many squares can you see in the frame ? what colour is the square ?")
    features = torch.randn(2, 4 + S, C, generator=torch.Generator().manual_seed(3))
    batched = all_logits(tiny, features, samples, ["red", "two"])
    alone = all_logits(tiny, features[:1], samples[:1], ["red"])
    assert tiny.encode_prompts(samples)[1][0].tolist().count(0) > 5
    assert torch.allclose(batched[0, :2], alone[0], atol=1e-5)


def test_greedy_generation_equals_teacher_forced_argmax(tiny):
    samples = questions("what colour is the square ?", "where ?", "how many squares can you see in the frame ?")
    prompt_ids, prompt_mask = tiny.encode_prompts(samples)
    features = torch.randn(3, 8 + S, C, generator=torch.Generator().manual_seed(2))
    ids, mask, _ = tiny.generate(features, prompt_ids, prompt_mask, group_size=2, max_new_tokens=8, greedy=True)
    assert ids.shape[0] == 6
    for b in range(3):
        assert torch.equal(ids[2 * b], ids[2 * b + 1])       # greedy: a group is G copies
    logits = tiny.completion_logits(features, prompt_ids, prompt_mask, ids, mask, group_size=2)
    on = mask.bool()
    assert torch.equal(logits.argmax(-1)[on], ids[on])


# ----------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("with_reference", [False, True])
def test_save_load_tiny_without_lora(tmp_path, with_reference):
    torch.manual_seed(0)
    policy = VideoLM(ModelConfig(num_frames=4)).eval()
    if with_reference:                      # without LoRA the reference is a full copy of the LM
        with torch.no_grad():
            policy.projector[0].weight.mul_(0.5)
            policy.lm.get_input_embeddings().weight.mul_(0.5)
        policy.snapshot_reference()
        with torch.no_grad():
            policy.projector[0].weight.mul_(3.0)
            policy.lm.get_input_embeddings().weight.mul_(3.0)
    video = torch.randint(0, 256, (2, 4, 48, 80, 3), dtype=torch.uint8)
    path = str(tmp_path / "ckpt")
    policy.save(path)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert os.path.isdir(os.path.join(path, "tokenizer"))
    torch.manual_seed(123)                 # loading must not depend on the global seed
    loaded = VideoLM.load(path).eval()
    assert loaded.config == policy.config
    features = policy.encode_video(video)
    assert torch.equal(loaded.encode_video(video), features)
    assert torch.equal(all_logits(loaded, features, SAMPLES, ANSWERS), all_logits(policy, features, SAMPLES, ANSWERS))
    assert (loaded.ref_lm is not None) == with_reference
    if with_reference:
        ref_logits = all_logits(policy, features, SAMPLES, ANSWERS, reference=True)
        assert not torch.allclose(ref_logits, all_logits(policy, features, SAMPLES, ANSWERS))
        assert torch.equal(all_logits(loaded, features, SAMPLES, ANSWERS, reference=True), ref_logits)


def test_save_load_tiny_with_lora_and_reference(tmp_path):
    torch.manual_seed(0)
    policy = VideoLM(ModelConfig())
    policy.add_lora(4, 8)
    randomize_lora_b(policy)                        # "trained": neither part is at its seeded init
    with torch.no_grad():
        policy.projector[0].weight.mul_(0.5)
    policy.snapshot_reference()
    randomize_lora_b(policy, scale=0.2)             # the policy moves away from its reference
    with torch.no_grad():
        policy.projector[0].weight.mul_(3.0)
    policy.eval()
    path = str(tmp_path / "ckpt")
    policy.save(path)
    assert {"model.safetensors", "config.json", "tokenizer"} <= set(os.listdir(path))
    loaded = VideoLM.load(path).eval()
    assert loaded.has_lora and loaded.ref_projector is not None
    features = torch.randn(2, 8 + S, C, generator=torch.Generator().manual_seed(0))
    logits = all_logits(policy, features, SAMPLES, ANSWERS)
    ref_logits = all_logits(policy, features, SAMPLES, ANSWERS, reference=True)
    assert not torch.allclose(logits, ref_logits)         # two different policies were saved
    assert torch.equal(all_logits(loaded, features, SAMPLES, ANSWERS), logits)
    assert torch.equal(all_logits(loaded, features, SAMPLES, ANSWERS, reference=True), ref_logits)


def test_loading_a_directory_that_is_not_a_checkpoint(tmp_path):
    path = str(tmp_path / "not_a_checkpoint")
    os.makedirs(path)
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        VideoLM.load(path)


def edited_checkpoint(tiny, tmp_path, **changes):
    path = str(tmp_path / "ckpt")
    tiny.save(path)
    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    meta["model"].update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(meta, f)
    os.remove(os.path.join(path, "manifest.json"))   # edited by hand: no manifest (with one, the edit is refused)
    return path


@pytest.mark.parametrize("part", ["vision", "lm", "tokenizer"])
def test_loading_a_checkpoint_never_goes_to_the_network_unless_the_hub_id_was_asked_for(tiny, tmp_path, monkeypatch, part):
    import socket
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel
    hub_id = "some-org/some-model"
    path = edited_checkpoint(tiny, tmp_path, **{part: hub_id})
    fetched = []

    def fetch(name, *args, **kwargs):               # what a download would start with
        fetched.append(name)
        raise OSError(f"no network in this test ({name})")
    for cls in (AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel):
        monkeypatch.setattr(cls, "from_pretrained", fetch)
    monkeypatch.setattr(socket.socket, "connect", lambda *a: fetched.append("socket") or 1 / 0)
    with pytest.raises(checkpoint.CheckpointError, match=f"config.json: {part} is '{hub_id}', not a local directory"):
        VideoLM.load(path)
    assert fetched == []
    with pytest.raises(OSError, match="no network in this test"):     # named on the command line: it may go
        VideoLM.load(path, hub_ids={hub_id})
    assert hub_id in fetched


def test_checkpoint_with_other_layer_count_raises_valueerror_naming_it(tiny, tmp_path):
    path = edited_checkpoint(tiny, tmp_path, tiny_lm_layers=1)
    with pytest.raises(ValueError, match=re.escape(path)):
        VideoLM.load(path)


def test_checkpoint_with_other_hidden_size_raises_valueerror_naming_it(tiny, tmp_path):
    path = edited_checkpoint(tiny, tmp_path, tiny_lm_hidden=64)
    with pytest.raises(ValueError, match=re.escape(path) + ".*shape"):
        VideoLM.load(path)


def test_config_and_projector_validation():
    with pytest.raises(ValueError, match="lora_rank"):
        ModelConfig.from_dict({"lora_rank": 8})
    assert ModelConfig.from_dict({"lora_r": 8}).lora_r == 8
    with pytest.raises(ValueError, match="conv"):
        make_projector("conv", 64, 128)
    assert isinstance(make_projector("linear", 64, 128), torch.nn.Linear)
    assert make_projector("mlp2x_gelu", 64, 128)(torch.zeros(3, 64)).shape == (3, 128)


# ----------------------------------------------------------------------------- pretrained parts, QLoRA

def test_qlora_needs_a_pretrained_lm():
    with pytest.raises(ValueError, match="pretrained"):
        VideoLM(ModelConfig(load_in_4bit=True))


def test_pretrained_parts_build_run_and_save_only_the_trained_weights(pretrained_dirs, tmp_path):
    vision_dir, lm_dir = pretrained_dirs
    policy = VideoLM(ModelConfig(vision=vision_dir, lm=lm_dir, lora_r=4, num_frames=4))
    randomize_lora_b(policy)
    policy.snapshot_reference()
    policy.eval()
    video = torch.randint(0, 256, (2, 4, 48, 80, 3), dtype=torch.uint8)
    features = policy.encode_video(video)
    assert features.shape == (2, 4 + S, 32)
    prompt_ids, prompt_mask = policy.encode_prompts(SAMPLES)
    ids, mask, truncated = policy.generate(features, prompt_ids, prompt_mask, group_size=2, max_new_tokens=4)
    assert ids.shape == mask.shape and ids.shape[0] == 4 and truncated.shape == (4,)
    assert len(policy.decode(ids, mask)) == 4

    path = str(tmp_path / "ckpt")
    policy.save(path)
    saved = load_file(os.path.join(path, "model.safetensors"))
    assert any("lora_" in name for name in saved) and any(n.startswith("projector.") for n in saved)
    for name in saved:
        assert name.startswith(("projector.", "ref_projector.")) or "lora_" in name, name
    loaded = VideoLM.load(path).eval()
    assert torch.equal(loaded.encode_video(video), features)
    assert torch.equal(all_logits(loaded, features, SAMPLES, ANSWERS), all_logits(policy, features, SAMPLES, ANSWERS))
    assert torch.equal(all_logits(loaded, features, SAMPLES, ANSWERS, reference=True),
                       all_logits(policy, features, SAMPLES, ANSWERS, reference=True))


def test_pretrained_lm_without_lora_is_frozen(pretrained_dirs):
    # A pretrained LM is trained through LoRA only, so its checkpoint never needs the base weights.
    vision_dir, lm_dir = pretrained_dirs
    policy = VideoLM(ModelConfig(vision=vision_dir, lm=lm_dir, lora_r=0))
    assert not any(p.requires_grad for p in policy.lm.parameters())
    assert all(p.requires_grad for p in policy.projector.parameters())
    assert {id(p) for p in policy.trainable_parameters()} == {id(p) for p in policy.projector.parameters()}


# ----------------------------------------------------------------------------- tokenizer and prompt

def test_word_tokenizer_round_trip(tiny, train_samples):
    unk = tiny.tokenizer.unk_token_id
    for word in synthetic_vocab():
        ids = tiny.tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != unk, word
    samples = train_samples[:6] + [{"question": "What Colour is THE square?", "options": ["Red", "blue", "one", "two"]}]
    ids, mask = tiny.encode_prompts(samples)
    for sample, row_ids, row_mask in zip(samples, ids.tolist(), mask.tolist()):
        assert row_mask == sorted(row_mask)                       # left padded
        kept = [i for i, m in zip(row_ids, row_mask) if m]
        assert kept[0] == model.IMAGE_TOKEN                      # the plain template: the video first
        kept = kept[1:]
        assert unk not in kept
        text = build_prompt(sample["question"], sample.get("options")).replace(IMAGE, "")
        words = re.findall(r"\w+|[^\w\s]+", text.lower())
        assert tiny.tokenizer.convert_ids_to_tokens(kept) == words
        assert tiny.tokenizer.decode(kept).split() == words


def test_build_prompt():
    assert build_prompt("  what colour is the square ? ") == "<image>USER: what colour is the square ? ASSISTANT:"
    prompt = build_prompt("what colour is the square ?", ["red", "blue", "green"])
    assert prompt.startswith("<image>USER: what colour is the square ?")
    assert "(A) red (B) blue (C) green" in prompt and "(D)" not in prompt
    assert prompt.endswith("ASSISTANT:")
    assert build_prompt("what is the man doing?", template="v1") == (   # VLM-RLAIF's vicuna v1
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nwhat is the man doing? ASSISTANT:")
    with pytest.raises(ValueError, match="template must be one of"):
        build_prompt("q", template="llava_v0")


# ----------------------------------------------------------------------------- sampling

def test_sample_token_greedy_top_p_and_seeded_temperature():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_token(logits, greedy=True), logits.argmax(-1))
    assert torch.equal(sample_token(logits, temperature=0), logits.argmax(-1))
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        assert torch.equal(sample_token(logits, top_p=1e-6, generator=generator), logits.argmax(-1))
    # nucleus: probs (0.1, 0.6, 0.3), top_p=0.8 keeps {1, 2}, 0.5 keeps {1}
    three = torch.tensor([0.1, 0.6, 0.3]).log().expand(4000, 3)
    drawn = sample_token(three, top_p=0.8, generator=torch.Generator().manual_seed(2))
    assert set(drawn.tolist()) == {1, 2} and abs((drawn == 1).float().mean().item() - 2 / 3) < 0.04
    assert set(sample_token(three, top_p=0.5, generator=torch.Generator().manual_seed(2)).tolist()) == {1}
    # temperature: seeded draws repeat, another seed differs, frequencies follow softmax(z / T)
    first = sample_token(logits, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, sample_token(logits, temperature=1.5, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(first, sample_token(logits, temperature=1.5, generator=torch.Generator().manual_seed(4)))
    two = torch.tensor([0.0, math.log(9.0)]).expand(4000, 2)       # T=2: p(1) = 3 / 4
    drawn = sample_token(two, temperature=2.0, generator=torch.Generator().manual_seed(5))
    assert abs(drawn.float().mean().item() - 0.75) < 0.03


# ----------------------------------------------------------------------------- SFT

def test_sft_lowers_the_loss(train_samples):
    torch.manual_seed(0)
    policy = VideoLM(ModelConfig())
    losses = sft.train_sft(policy, train_samples, steps=30, batch_size=16, progress=False)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]
    assert not policy.training and policy.encode_calls == 1     # 32 videos, one encode batch


def test_answer_loss_averages_over_answer_tokens_only(tiny):
    tokenizer, eos = tiny.tokenizer, tiny.tokenizer.eos_token_id
    features = torch.randn(2, 8 + S, C, generator=torch.Generator().manual_seed(0))
    samples = [{"question": "what colour is the square ?", "answer": "red"},
               {"question": "how many squares are there ?", "answer": "two blue squares"}]
    answer_ids, answer_mask = tiny.encode_answers([s["answer"] for s in samples])
    for row, sample in enumerate(samples):
        expected = tokenizer.convert_tokens_to_ids(sample["answer"].split()) + [eos]
        assert answer_ids[row, :len(expected)].tolist() == expected
        assert answer_mask[row].tolist() == [1] * len(expected) + [0] * (answer_ids.shape[1] - len(expected))

    def by_hand(rows):
        logits = all_logits(tiny, features, rows, [s["answer"] for s in rows])
        total, count = 0.0, 0
        for row, sample in enumerate(rows):
            targets = tokenizer.convert_tokens_to_ids(sample["answer"].split()) + [eos]
            for t, target in enumerate(targets):
                total -= torch.log_softmax(logits[row, t].double(), -1)[target].item()
                count += 1
        assert count == 2 + 4                                 # answer words + EOS, nothing else
        return total / count

    with torch.no_grad():
        loss = sft.answer_loss(tiny, features, samples).item()
        assert loss == pytest.approx(by_hand(samples), rel=1e-5)
        longer = [dict(samples[0], question="what is the colour of the square ? which colour appears first ?"),
                  samples[1]]
        longer_loss = sft.answer_loss(tiny, features, longer).item()
    assert longer_loss == pytest.approx(by_hand(longer), rel=1e-5)   # same normaliser, new context
    assert longer_loss != pytest.approx(loss, rel=1e-6)               # the question conditions the answer


def test_cosine_lr_schedule():
    peak, warmup, total = 1e-3, 10, 110
    lrs = [sft.cosine_lr(step, total, warmup, peak) for step in range(total + 1)]
    for step in range(warmup):                                # linear ramp to the peak
        assert lrs[step] == pytest.approx(peak * (step + 1) / warmup)
    assert lrs[warmup - 1] == pytest.approx(peak) and lrs[warmup] == pytest.approx(peak)
    assert max(lrs) == pytest.approx(peak)
    decay = lrs[warmup:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lrs[warmup + (total - warmup) // 2] == pytest.approx(peak * 0.55)    # half way: 0.1 + 0.9 / 2
    assert lrs[total] == pytest.approx(0.1 * peak)
    assert lrs[total - 1] == pytest.approx(0.1 * peak, rel=1e-2)   # the last step is nearly there
    assert sft.cosine_lr(10 * total, total, warmup, peak) == pytest.approx(0.1 * peak)   # stays at the floor


# ----------------------------------------------------------------------------- shared-prefix scoring

@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_scoring_equals_the_full_pass_with_gradients(frames, train_samples, checkpointing, monkeypatch):
    torch.manual_seed(0)
    policy = VideoLM(ModelConfig(gradient_checkpointing=checkpointing)).train()
    policy.add_lora(8, 16)
    randomize_lora_b(policy)
    policy.snapshot_reference()
    randomize_lora_b(policy, scale=0.1)                 # the reference differs from the policy
    samples = [dict(s) for s in train_samples[:3]]
    samples[1]["question"] = "how many squares are there ? where is the square ?"   # prompts of other lengths
    G = 4
    features = policy.encode_video(frames[:3])
    prompt_ids, prompt_mask = policy.encode_prompts(samples)
    completion_ids, completion_mask, _ = policy.generate(features, prompt_ids, prompt_mask, group_size=G,
                                                         max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    assert completion_mask.sum(-1).min() < completion_mask.shape[1]     # some rows end early (padding after EOS)
    results, prefix_reads = {}, []
    real_update = rollout_module.PrefixLayer.update
    monkeypatch.setattr(rollout_module.PrefixLayer, "update", lambda *args, **kwargs: prefix_reads.append(1) or real_update(*args, **kwargs))
    for share in (False, True):
        policy.config.share_prefix = share
        policy.zero_grad()
        logits = policy.completion_logits(features, prompt_ids, prompt_mask, completion_ids, completion_mask, G)
        (logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) * completion_mask).sum().backward()
        if share:   # each decoder layer read the shared prefix once, and again in the backward's replay if checkpointed
            assert len(prefix_reads) == policy.lm.config.num_hidden_layers * (2 if checkpointing else 1)
        with torch.no_grad():
            reference = policy.completion_logits(features, prompt_ids, prompt_mask, completion_ids,
                                                 completion_mask, G, reference=True)
        results[share] = (logits.detach(), reference, [p.grad.clone() for p in policy.trainable_parameters()])
    kept = completion_mask.bool()
    assert torch.allclose(results[True][0][kept], results[False][0][kept], atol=1e-5)
    assert torch.allclose(results[True][1][kept], results[False][1][kept], atol=1e-5)
    assert not torch.allclose(results[False][0][kept], results[False][1][kept], atol=1e-3)
    for shared, full in zip(results[True][2], results[False][2]):
        assert (shared - full).norm() <= 1e-4 * full.norm()


def test_sample_token_top_k_and_repetition_penalty():
    logits = torch.tensor([[3.0, 2.9, 1.0, -2.0]])
    drawn = {sample_token(logits, top_k=2, generator=torch.Generator().manual_seed(s)).item() for s in range(40)}
    assert drawn == {0, 1}                                   # only the two best tokens can be drawn
    seen = torch.tensor([[0, 3, -1]])                        # token 0 and 3 seen (-1: none)
    penalised = sample_token(logits, greedy=True, repetition_penalty=2.0, seen=seen)
    assert penalised.item() == 1                             # 3.0 / 2 < 2.9: the repeated token loses
    assert sample_token(logits, greedy=True, repetition_penalty=1.0, seen=seen).item() == 0
    negative = torch.tensor([[-1.0, -1.5]])                  # a negative logit is multiplied: -1 -> -2
    assert sample_token(negative, greedy=True, repetition_penalty=2.0, seen=torch.tensor([[0]])).item() == 1
