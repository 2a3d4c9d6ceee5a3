"""Tests for convert.py (LLaVA-style SFT checkpoint -> model.py checkpoint) and a CPU smoke run of
bench_gpu.py. Every "pretrained" directory is built here from tiny configs: no downloads."""
import importlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

import convert
from model import VideoLM, video_chatgpt_pool
from synth import word_tokenizer

WORDS = ["red", "green", "blue", "one", "two", "three", "yes", "no", "square"]
VISION_HIDDEN, LM_HIDDEN = 48, 32      # different, so a transposed projector cannot pass
FRAMES = 3
IDS = torch.tensor([[2, 5, 9, 14, 7, 3], [4, 4, 11, 6, 20, 8]])


# ----------------------------------------------------------------------------- tiny "pretrained" parts

def tiny_llama(seed=0, tokenizer=None):
    tokenizer = tokenizer or word_tokenizer(WORDS)
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=LM_HIDDEN, intermediate_size=2 * LM_HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    return llama.eval(), tokenizer


def known_projector(kind):
    """Projector tensors with recognisable values (LLaVA's names, without the model.mm_projector. prefix)."""
    shapes = {"linear": {"weight": (LM_HIDDEN, VISION_HIDDEN), "bias": (LM_HIDDEN,)},
              "mlp2x_gelu": {"0.weight": (LM_HIDDEN, VISION_HIDDEN), "0.bias": (LM_HIDDEN,),
                             "2.weight": (LM_HIDDEN, LM_HIDDEN), "2.bias": (LM_HIDDEN,)}}[kind]
    return {name: torch.linspace(-0.5, 0.5 + i, torch.Size(shape).numel()).reshape(shape)
            for i, (name, shape) in enumerate(shapes.items())}


def llava_config(llama, kind="mlp2x_gelu", **extra):
    values = llama.config.to_dict()
    values.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
                  mm_vision_tower="openai/clip-vit-large-patch14-336", mm_projector_type=kind,
                  mm_hidden_size=VISION_HIDDEN, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                  mm_use_im_start_end=False, mm_use_im_patch_token=False, use_mm_proj=True,
                  image_aspect_ratio="pad", tune_mm_mlp_adapter=False)
    values.update(extra)
    return values


class Payload:
    """A pickle that would run code when unpickled: it creates a directory."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def write_malicious_bin(path, sentinel):
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Payload(sentinel)}, path)


def write_llava(path, kind="mlp2x_gelu", weights="safetensors", projector_inside=True, seed=0, config_extra=None,
                extra_state=None, tokenizer=None):
    """A tiny LLaVA-style directory. weights: safetensors | sharded | bin | both (safetensors, plus a .bin
    that must never be unpickled). Returns (original llama, its tokenizer, projector tensors)."""
    os.makedirs(path, exist_ok=True)
    llama, tokenizer = tiny_llama(seed, tokenizer)
    projector = known_projector(kind)
    state = {name: t.clone() for name, t in llama.state_dict().items()}
    if projector_inside:
        state.update({f"model.mm_projector.{name}": t for name, t in projector.items()})
    state.update(extra_state or {})
    if weights in ("safetensors", "both"):
        save_file(state, os.path.join(path, "model.safetensors"))
    if weights == "both":
        write_malicious_bin(os.path.join(path, "pytorch_model.bin"), os.path.join(path, "PWNED"))
    if weights == "bin":
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    if weights == "sharded":
        names = sorted(state)
        halves = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for file, keys in halves.items():
            save_file({k: state[k] for k in keys}, os.path.join(path, file))
        with open(os.path.join(path, convert.SAFE_INDEX), "w") as f:
            json.dump({"metadata": {}, "weight_map": {k: file for file, keys in halves.items() for k in keys}}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(llava_config(llama, kind, **(config_extra or {})), f)
    tokenizer.save_pretrained(path)
    return llama, tokenizer, projector


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
    torch.manual_seed(1)
    path = str(tmp_path_factory.mktemp("clip") / "clip")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN,
                                     num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                     patch_size=8)).save_pretrained(path)
    return path


def run(src, out, vision_dir, **options):
    """convert.convert with float32 (exact comparisons) and few frames; returns the loaded VideoLM."""
    convert.convert(str(src), str(out), vision_dir, dtype_name="float32", frames=FRAMES, **options)
    return VideoLM.load(str(out))


def assert_projector(policy, projector):
    state = policy.projector.state_dict()
    assert set(state) == set(projector)
    for name, tensor in projector.items():
        assert torch.equal(state[name], tensor), name


@torch.no_grad()
def assert_same_logits(policy, llama):
    assert torch.equal(policy.lm(input_ids=IDS).logits, llama(input_ids=IDS).logits)


@pytest.fixture(scope="module")
def converted(vision_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    llama, tokenizer, projector = write_llava(root / "src")
    policy = run(root / "src", root / "out", vision_dir)
    return root, policy, llama, tokenizer, projector


# ----------------------------------------------------------------------------- layout (a): full LM dir

def test_full_checkpoint_loads_with_the_known_projector_and_the_original_lm(converted, vision_dir):
    root, policy, llama, tokenizer, projector = converted
    assert policy.config.projector == "mlp2x_gelu" and policy.config.vision_layer == -2
    assert policy.config.vision_post_layernorm is False and policy.config.num_frames == FRAMES
    assert policy.config.lm == str(root / "out" / "lm") and policy.config.vision == vision_dir
    assert not policy.has_lora and policy.config.load_in_4bit is False
    assert_projector(policy, projector)
    assert_same_logits(policy, llama)
    assert policy.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_clean_lm_dir_has_no_llava_keys(converted):
    root = converted[0]
    with open(root / "out" / "lm" / "config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert not [k for k in config if k.startswith("mm_") or k in convert.LLAVA_CONFIG_KEYS]
    from safetensors import safe_open
    with safe_open(str(root / "out" / "lm" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "mm_projector" in k or "vision_tower" in k]
    # the LM dir is a plain HF checkpoint: it loads on its own and matches the original
    lm = LlamaForCausalLM.from_pretrained(str(root / "out" / "lm")).eval()
    with torch.no_grad():
        assert torch.equal(lm(input_ids=IDS).logits, converted[2](input_ids=IDS).logits)


@torch.no_grad()
def test_pretrained_path_encodes_video_without_post_layernorm_and_generates(converted):
    policy = converted[1].eval()
    frames = torch.randint(0, 256, (2, FRAMES, 40, 48, 3), dtype=torch.uint8)
    features = policy.encode_video(frames)
    assert features.shape == (2, FRAMES, 16, VISION_HIDDEN)        # project_first: pooled after the projector
    # LLaVA's features: hidden_states[-2], CLS dropped, no post_layernorm
    hidden = policy.vision(pixel_values=policy.preprocess(frames), output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(features, hidden[:, 1:].reshape(2, FRAMES, 16, VISION_HIDDEN), atol=1e-6)
    tokens = policy.visual_tokens(features, policy.projector)
    assert torch.allclose(tokens, video_chatgpt_pool(policy.projector(features)), atol=1e-6)
    ids, mask = policy.encode_prompts([{"question": "what colour is the square?"}, {"question": "how many?"}])
    tokens, keep, truncated = policy.generate(features, ids, mask, group_size=2, max_new_tokens=3, greedy=True)
    assert tokens.shape[0] == 4 and tokens.shape[1] <= 3 and keep.shape == tokens.shape and truncated.shape == (4,)
    assert len(policy.decode(tokens, keep)) == 4


def test_sharded_safetensors_and_linear_projector(vision_dir, tmp_path):
    llama, _, projector = write_llava(tmp_path / "src", kind="linear", weights="sharded")
    policy = run(tmp_path / "src", tmp_path / "out", vision_dir)
    assert policy.config.projector == "linear"
    assert_projector(policy, projector)
    assert_same_logits(policy, llama)


def test_pickle_only_checkpoint_loads_with_weights_only(vision_dir, tmp_path, monkeypatch):
    llama, _, projector = write_llava(tmp_path / "src", weights="bin")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    convert.convert(str(tmp_path / "src"), str(tmp_path / "out"), vision_dir, dtype_name="float32", frames=FRAMES)
    assert calls and all(k.get("weights_only") is True for k in calls)
    monkeypatch.undo()
    policy = VideoLM.load(str(tmp_path / "out"))
    assert_projector(policy, projector)
    assert_same_logits(policy, llama)


def test_safetensors_win_and_the_pickle_beside_them_is_never_opened(vision_dir, tmp_path, monkeypatch):
    llama, _, projector = write_llava(tmp_path / "src", weights="both")
    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a[0]) or real_load(*a, **k))
    convert.convert(str(tmp_path / "src"), str(tmp_path / "out"), vision_dir, dtype_name="float32", frames=FRAMES)
    assert not [p for p in opened if str(p).endswith("pytorch_model.bin")]
    monkeypatch.undo()
    assert not (tmp_path / "src" / "PWNED").exists()
    policy = VideoLM.load(str(tmp_path / "out"))
    assert_projector(policy, projector)
    assert_same_logits(policy, llama)


def test_malicious_pickle_is_refused_with_the_file_named(vision_dir, tmp_path):
    write_llava(tmp_path / "src", weights="safetensors")
    os.remove(tmp_path / "src" / "model.safetensors")
    bad = tmp_path / "src" / "pytorch_model.bin"
    write_malicious_bin(bad, tmp_path / "PWNED")
    with pytest.raises(ValueError, match="pytorch_model.bin.*refusing") as err:
        convert.convert(str(tmp_path / "src"), str(tmp_path / "out"), vision_dir, dtype_name="float32")
    assert "weights_only" in str(err.value)
    assert not (tmp_path / "PWNED").exists()
    # and a pickle is never used when its safetensors twin is there
    save_file(known_projector("linear"), str(tmp_path / "proj.safetensors"))
    torch.save(known_projector("linear"), tmp_path / "proj.bin")
    with pytest.raises(ValueError, match=r"proj\.bin.*proj\.safetensors"):
        convert.load_tensors(str(tmp_path / "proj.bin"))


# ----------------------------------------------------------------------------- errors

def test_missing_projector_names_the_files(vision_dir, tmp_path):
    write_llava(tmp_path / "src", projector_inside=False)
    with pytest.raises(ValueError, match="no projector weights") as err:
        convert.convert(str(tmp_path / "src"), str(tmp_path / "out"), vision_dir, dtype_name="float32")
    assert str(tmp_path / "src" / "model.safetensors") in str(err.value)
    assert "mm_projector.bin" in str(err.value)


def test_unknown_projector_type(vision_dir, tmp_path):
    write_llava(tmp_path / "src", config_extra={"mm_projector_type": "mlp3x_gelu"})
    with pytest.raises(ValueError, match="unknown projector type 'mlp3x_gelu'") as err:
        convert.convert(str(tmp_path / "src"), str(tmp_path / "out"), vision_dir, dtype_name="float32")
    assert str(tmp_path / "src" / "config.json") in str(err.value)


def test_projector_shape_mismatch_names_the_tensor(vision_dir, tmp_path):
    write_llava(tmp_path / "src", extra_state={"model.mm_projector.0.weight": torch.zeros(LM_HIDDEN, 40)})
    expected = rf"mm_projector\.0\.weight: expected shape \({LM_HIDDEN}, {VISION_HIDDEN}\).*got \({LM_HIDDEN}, 40\)"
    with pytest.raises(ValueError, match=expected):
        convert.convert(str(tmp_path / "src"), str(tmp_path / "out"), vision_dir, dtype_name="float32")


def test_lm_shape_mismatch_names_the_tensor(vision_dir, tmp_path):
    write_llava(tmp_path / "src", extra_state={"model.norm.weight": torch.ones(LM_HIDDEN + 1)})
    expected = rf"tensor model\.norm\.weight: expected shape \({LM_HIDDEN},\), got \({LM_HIDDEN + 1},\)"
    with pytest.raises(ValueError, match=expected):
        convert.convert(str(tmp_path / "src"), str(tmp_path / "out"), vision_dir, dtype_name="float32")


def test_vision_hidden_size_mismatch(vision_dir, tmp_path):
    write_llava(tmp_path / "src", config_extra={"mm_hidden_size": 1024})
    with pytest.raises(ValueError, match="mm_hidden_size 1024.*hidden size 48"):
        convert.convert(str(tmp_path / "src"), str(tmp_path / "out"), vision_dir, dtype_name="float32")


# ----------------------------------------------------------------------------- layouts (b) and (c)

def test_separate_projector_file(vision_dir, tmp_path):
    llama, _, projector = write_llava(tmp_path / "src", projector_inside=False)
    torch.save({f"model.mm_projector.{k}": v for k, v in projector.items()}, tmp_path / "src" / "mm_projector.bin")
    policy = run(tmp_path / "src", tmp_path / "out", vision_dir)   # mlp2x_gelu: projected, then pooled, as LLaVA
    assert_projector(policy, projector)
    assert_same_logits(policy, llama)
    # --projector=FILE, bare keys, overrides what the source holds
    other = {k: v * 2 for k, v in projector.items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    assert_projector(run(tmp_path / "src", tmp_path / "out2", vision_dir,
                         projector_file=str(tmp_path / "other.safetensors")), other)


def test_lora_adapter_is_merged_into_the_base(vision_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    base, tokenizer = tiny_llama(seed=3)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    torch.manual_seed(4)   # init_lora_weights=False: non-zero B, so the merge changes the logits
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False)).eval()
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    projector = known_projector("mlp2x_gelu")
    torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in projector.items()},
               adapter / "non_lora_trainables.bin")   # LLaVA's name and key layout for the extra weights
    with open(adapter / "config.json", "w") as f:
        json.dump(llava_config(base), f)
    with pytest.raises(ValueError, match="--base_lm"):
        convert.convert(str(adapter), str(tmp_path / "out"), vision_dir, dtype_name="float32")
    policy = run(adapter, tmp_path / "out", vision_dir, base_lm_dir=str(tmp_path / "base"))
    assert_projector(policy, projector)
    with torch.no_grad():
        merged, adapted = policy.lm(input_ids=IDS).logits, peft_model(input_ids=IDS).logits
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            unadapted = plain(input_ids=IDS).logits
    assert torch.allclose(merged, adapted, atol=1e-5)
    assert not torch.allclose(merged, unadapted, atol=1e-3)


def llava_tower_keys(tower):
    """A CLIPVisionModel's tensors under LLaVA's names (transformers 4 kept a "vision_model." level)."""
    return {"model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v.clone()
            for k, v in tower.state_dict().items()}


def test_vision_tower_inside_the_source_is_kept_when_it_differs(vision_dir, tmp_path):
    fc1 = "encoder.layers.0.mlp.fc1.weight"
    tuned = CLIPVisionModel.from_pretrained(vision_dir)
    name = next(n for n in tuned.state_dict() if n.endswith(fc1))
    with torch.no_grad():
        tuned.get_parameter(name).add_(1.0)
    write_llava(tmp_path / "src", extra_state=llava_tower_keys(tuned))
    policy = run(tmp_path / "src", tmp_path / "out", vision_dir)
    assert policy.config.vision == str(tmp_path / "out" / "vision")
    assert torch.equal(policy.vision.get_parameter(name), tuned.get_parameter(name))
    # an unchanged tower is not copied
    write_llava(tmp_path / "src2", extra_state=llava_tower_keys(CLIPVisionModel.from_pretrained(vision_dir)))
    assert run(tmp_path / "src2", tmp_path / "out2", vision_dir).config.vision == vision_dir
    assert not (tmp_path / "out2" / "vision").exists()


def test_command_line(vision_dir, tmp_path):
    write_llava(tmp_path / "src", kind="linear")
    module = importlib.reload(convert)
    config = module.main([f"--src={tmp_path / 'src'}", f"--vision={vision_dir}", f"--out={tmp_path / 'out'}",
                          "--dtype=float32", "--num_frames=4"])
    assert config.num_frames == 4 and config.projector == "linear"
    assert VideoLM.load(str(tmp_path / "out")).config.dtype == "float32"


# ----------------------------------------------------------------------------- bench_gpu.py on the CPU

def test_bench_gpu_cpu_smoke(tmp_path):
    import bench_gpu
    module = importlib.reload(bench_gpu)
    out_json = tmp_path / "bench_gpu.json"
    result = module.main(["--cpu_smoke=True", f"--out_json={out_json}", f"--cache_dir={tmp_path / 'parts'}"])
    with open(out_json) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert result["world_size"] == 1 and result["step_s"] > 0
    assert set(result["split_s"]) == {"decode", "generation", "oracle", "logprobs", "backward", "encode"}
    rank = result["per_rank"][0]
    assert rank["generated_tokens_per_step"] > 0 and rank["generation_tokens_per_s"] > 0
    assert all(seconds >= 0 for seconds in rank["phases_s"].values())
    assert sum(rank["split"].values()) <= rank["step_s"] * 1.01


# ----------------------------------------------------------------------------- the same model as VLM-RLAIF's

# Written from the description of VLM-RLAIF's code (its conversation template "v1", tokenizer_image_token,
# expand2square + CLIPImageProcessor, encode_images then the spatio-temporal pooling), not from model.py.
V1_SYSTEM_TEXT = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QUESTIONS = ["what colour is the square?", "how many squares are there?"]


def llama_style_tokenizer():
    """What matters of LLaMA's tokenizer here, built locally: every tokenized piece of text gets a BOS,
    and sentencepiece's "▁" before its first word, so the text on each side of <image> gets its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    split = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    texts = [V1_SYSTEM_TEXT + " USER: "] + [f"\n{q} ASSISTANT:" for q in QUESTIONS] + [" ".join(WORDS)]
    pieces = sorted({piece for text in texts for piece, _ in split.pre_tokenize_str(text)})
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + pieces)},
                                      unk_token="<unk>"))
    core.pre_tokenizer, core.decoder = split, decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@torch.no_grad()
def vlm_rlaif_next_token_logits(lm, tokenizer, vision_dir, projector, kind, frames, question):
    """VLM-RLAIF's forward pass for one video and question -> the logits of the first answer token."""
    from PIL import Image
    from transformers import CLIPImageProcessor
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    squares = []
    for frame in frames.numpy():                       # expand2square: centred on the mean colour
        image = Image.fromarray(frame)
        side = max(image.size)
        square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in processor.image_mean))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        squares.append(square)
    pixels = torch.as_tensor(processor(images=squares, return_tensors="np")["pixel_values"])
    tower = CLIPVisionModel.from_pretrained(vision_dir).eval()
    patches = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]   # no CLS, no post-LN
    if kind == "linear":
        projected = patches @ projector["weight"].T + projector["bias"]
    else:
        hidden = torch.nn.functional.gelu(patches @ projector["0.weight"].T + projector["0.bias"])
        projected = hidden @ projector["2.weight"].T + projector["2.bias"]
    visual = torch.cat([projected.mean(1), projected.mean(0)])      # T temporal means, then S spatial means
    before, after = [tokenizer(text)["input_ids"] for text in
                     f"{V1_SYSTEM_TEXT} USER: <image>\n{question} ASSISTANT:".split("<image>")]
    assert before[0] == after[0] == tokenizer.bos_token_id          # one BOS kept, at the start
    embed = lm.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor(before)), visual, embed(torch.tensor(after[1:]))]).unsqueeze(0)
    return lm(inputs_embeds=embeds).logits[0, -1]


@torch.no_grad()
def videolm_next_token_logits(policy, frames, question):
    from model import positions
    features = policy.encode_video(frames.unsqueeze(0))
    ids, mask = policy.encode_prompts([{"question": question}])
    embeds, mask = policy.prompt_embeddings(features, ids, mask)
    return policy.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask)).logits[0, -1]


def write_layout(root, kind, layout):
    """A VLM-RLAIF checkpoint in `layout` (full | projector_file | lora) -> (convert options, the
    reference LM, its tokenizer, the projector tensors)."""
    tokenizer = llama_style_tokenizer()
    if layout != "lora":
        llama, _, projector = write_llava(root / "src", kind=kind, tokenizer=tokenizer,
                                          projector_inside=layout == "full", seed=5)
        if layout == "projector_file":
            torch.save({f"model.mm_projector.{k}": v for k, v in projector.items()}, root / "src" / "mm_projector.bin")
        return {}, llama, tokenizer, projector
    from peft import LoraConfig, get_peft_model
    base, _ = tiny_llama(seed=6, tokenizer=tokenizer)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    torch.manual_seed(7)
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False)).eval()
    adapted.save_pretrained(root / "src")
    projector = known_projector(kind)
    torch.save({f"base_model.model.model.mm_projector.{k}": v for k, v in projector.items()},
               root / "src" / "non_lora_trainables.bin")
    with open(root / "src" / "config.json", "w") as f:
        json.dump(llava_config(base, kind), f)
    return {"base_lm_dir": str(root / "base")}, adapted, tokenizer, projector


@pytest.mark.parametrize("kind, layout, height, width", [
    ("mlp2x_gelu", "full", 24, 40), ("linear", "full", 48, 80), ("mlp2x_gelu", "full", 32, 32),
    ("mlp2x_gelu", "projector_file", 40, 24), ("linear", "lora", 24, 40), ("mlp2x_gelu", "lora", 60, 36)])
def test_converted_checkpoint_is_vlm_rlaifs_model(vision_dir, tmp_path, kind, layout, height, width):
    options, reference_lm, tokenizer, projector = write_layout(tmp_path, kind, layout)
    policy = run(tmp_path / "src", tmp_path / "out", vision_dir, **options).eval()   # no extra flags
    config = policy.config
    assert (config.template, config.project_first, config.image_pad, config.vision_post_layernorm) == ("v1", True, True, False)
    frames = torch.randint(0, 256, (FRAMES, height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(height))
    for question in QUESTIONS:
        expected = vlm_rlaif_next_token_logits(reference_lm, tokenizer, vision_dir, projector, kind, frames, question)
        got = videolm_next_token_logits(policy, frames, question)
        assert got.shape == expected.shape and (got - expected).abs().max() < 1e-4, (got - expected).abs().max()
        assert expected.std() > 0.05                       # a real comparison, not two near-constant vectors
