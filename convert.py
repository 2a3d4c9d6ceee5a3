"""
Convert a LLaVA-style SFT checkpoint (the layout VLM-RLAIF releases) into a model.py checkpoint that
train.py takes as --sft_checkpoint.

$ python convert.py --src=/models/vlm-rlaif-sft --vision=/models/clip-vit-large-patch14-336 --out=/models/vlm-sft-videolm
$ python convert.py --src=/models/llava-7b-lora --base_lm=/models/llama-2-7b --vision=... --out=...   # LoRA release
$ python convert.py --src=/models/llama --projector=/models/mm_projector.bin --vision=... --out=...  # projector apart

Source layouts (one HF LLaMA directory, config.json with mm_* keys; architectures
LlavaLlamaForCausalLM or LlamaForCausalLM):
  (a) full model: the LM weights (model.layers.*, model.embed_tokens.weight, lm_head.weight) and the
      projector (model.mm_projector.*) in *.safetensors (+ model.safetensors.index.json when sharded)
      or pytorch_model*.bin; sometimes the vision tower too (model.vision_tower.vision_tower.vision_model.*);
  (b) the projector in a file of its own: mm_projector.safetensors / mm_projector.bin (or --projector=FILE);
  (c) LoRA adapters (adapter_config.json + adapter_model.*) over --base_lm, the projector and any
      resized embeddings in non_lora_trainables.* (LLaVA's convention) or a projector file. The adapter
      is merged into the base (peft merge_and_unload) before saving.

Output in --out:
  lm/        a clean HF LLaMA directory: the LM weights without the mm_* keys, a plain LlamaConfig, the tokenizer;
  vision/    only when the source carries its own vision tower weights that differ from --vision;
  config.json, model.safetensors, tokenizer/   the model.py checkpoint (VideoLM.save): the converted
             projector, and a ModelConfig pointing at lm/ (absolute path) and the vision tower.

Safety: pickles (.bin) are unpickled only with torch.load(weights_only=True), and never when a
safetensors file holding the same weights is there. Errors name the file and the tensor.

The converted model is VLM-RLAIF's own forward pass (test_convert.py checks the next-token logits
against a reference written from its code's description, to 1e-4): CLIP hidden_states[-2] without CLS
nor post-layernorm, frames padded to squares with CLIP's mean colour (image_aspect_ratio "pad"), bicubic
resize and centre crop, the projector on every frame's patches then the spatio-temporal pooling, and
the vicuna v1 prompt with BOS and the visual tokens at the <image> placeholder.
"""
import dataclasses
import gc
import glob
import json
import os
import sys
import warnings
import zipfile

import torch

import checkpoint
from configurator import configure

# -----------------------------------------------------------------------------
# defaults, overridable as --key=value
src = ""                     # the LLaVA-style directory (layout a, b or c above)
vision = ""                  # CLIP vision tower dir / hub id; empty: the source config's mm_vision_tower
out = ""                     # the model.py checkpoint directory to write
base_lm = ""                 # layout (c): the HF LLaMA the LoRA adapter was trained on
projector = ""               # a projector file, overriding the one found in src
dtype = "bfloat16"           # dtype of the saved LM and of the model config ("float32" for exact CPU checks)
num_frames = 50              # frames per video in the model config (the paper: 50)
keep_vision_tower = True     # a vision tower inside src that differs from --vision is written to out/vision
# -----------------------------------------------------------------------------

SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")
NON_LORA_FILES = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
SIDE_FILES = set(PROJECTOR_FILES + NON_LORA_FILES + ADAPTER_FILES)   # never LM weight shards
PROJECTOR_TYPES = {"linear": "linear", "mlp2x_gelu": "mlp2x_gelu"}   # LLaVA name -> model.py name
PROJECTOR_KEYS = {"linear": {"weight", "bias"}, "mlp2x_gelu": {"0.weight", "0.bias", "2.weight", "2.bias"}}
LLAMA_ARCHITECTURES = {"LlavaLlamaForCausalLM", "LlamaForCausalLM"}
# config.json keys LLaVA adds to the LLaMA config (besides every mm_* key); a plain LlamaConfig drops them
LLAVA_CONFIG_KEYS = {"image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
                     "use_mm_proj", "tokenizer_padding_side", "tokenizer_model_max_length", "unfreeze_mm_vision_tower",
                     "vision_tower", "mm_tunable_parts", "pretrain_mm_mlp_adapter", "num_frames"}


# ----------------------------------------------------------------------------- reading weights, safely

def load_tensors(path):
    """One weight file -> {name: tensor} on the CPU. safetensors as is; a pickle (.bin/.pt) only
    through torch.load(weights_only=True), which refuses anything but tensors and plain containers."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    sibling = os.path.splitext(path)[0] + ".safetensors"
    if os.path.exists(sibling):
        raise ValueError(f"{path}: refusing to unpickle it, {sibling} holds the same weights; pass that file instead")
    try:   # mmap keeps a 10 GB shard out of RAM until its tensors are used (zip-format pickles only)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:   # weights_only raises UnpicklingError on any object that is not plain data
        lines = [line for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise ValueError(f"{path}: not a plain tensor file, refusing to load it (torch.load(weights_only=True) "
                         f"failed: {reason}). Only convert a pickle you trust, e.g. to safetensors, yourself") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def weight_files(directory):
    """The LM weight files of an HF directory: the safetensors set if there is one (the pickles beside
    it are then never opened), else the pytorch_model*.bin set. [] when there are none."""
    for index_name, pattern in ((SAFE_INDEX, "*.safetensors"), (BIN_INDEX, "pytorch_model*.bin")):
        index = os.path.join(directory, index_name)
        if os.path.exists(index):
            with open(index) as f:
                return sorted({os.path.join(directory, name) for name in json.load(f)["weight_map"].values()})
        found = sorted(p for p in glob.glob(os.path.join(directory, pattern)) if os.path.basename(p) not in SIDE_FILES)
        if found:
            return found
    return []


def first_existing(directory, names):
    """The first of `names` present in `directory` (safetensors names come first), or None."""
    for name in names:
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def split_state(state):
    """A LLaVA state dict -> (lm, projector, vision) dicts. Keys are normalised: the peft prefix
    "base_model.model." goes, projector keys keep what follows "mm_projector." ("0.weight"), vision
    keys keep what follows "vision_model." ("encoder.layers.0. ..."). Rotary inv_freq buffers
    (saved by old transformers) are dropped: they are recomputed, not loaded."""
    lm, proj, vis = {}, {}, {}
    for key, tensor in state.items():
        name = key.removeprefix("base_model.model.")
        if name.startswith("model.model."):          # LLaVA's LoRA trainer nests one level deeper
            name = name.removeprefix("model.")
        if "mm_projector." in name:
            proj[name.split("mm_projector.", 1)[1]] = tensor
        elif "vision_tower." in name:
            tail = name.split("vision_model.", 1)[1] if "vision_model." in name else name.rsplit("vision_tower.", 1)[1]
            vis[tail] = tensor
        elif not name.endswith("rotary_emb.inv_freq"):
            lm[name] = tensor
    return lm, proj, vis


# ----------------------------------------------------------------------------- the LM

def llama_config(values, source):
    """A plain LlamaConfig from a LLaVA config.json dict: mm_* and LLaVA's own keys dropped."""
    from transformers import LlamaConfig
    archs = values.get("architectures") or ["LlamaForCausalLM"]
    if not set(archs) & LLAMA_ARCHITECTURES:
        raise ValueError(f"{source}: architectures {archs} is not a LLaMA; convert.py handles "
                         f"{sorted(LLAMA_ARCHITECTURES)}")
    clean = {k: v for k, v in values.items() if not k.startswith("mm_") and k not in LLAVA_CONFIG_KEYS}
    clean.update(architectures=["LlamaForCausalLM"], model_type="llama")
    return LlamaConfig.from_dict(clean)


def check_shapes(expected, state, source, what):
    """Every tensor of `expected` ({name: shape}) is in `state` with that shape, and nothing else is."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: the {what} weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {name}: expected shape {tuple(shape)}, got {tuple(state[name].shape)}")


def build_lm(config, state, torch_dtype, source):
    """LlamaForCausalLM from a config and a state dict, after checking names and shapes ourselves
    (so an error names the tensor and the file). The skeleton is built on the meta device: no memory."""
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    expected = {name: t.shape for name, t in skeleton.state_dict().items()}
    if config.tie_word_embeddings:   # the head is the embedding matrix; checkpoints may or may not repeat it
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)
    check_shapes(expected, state, source, "LM")
    del skeleton
    return LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state, dtype=torch_dtype)


def read_config(directory):
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_lm_dir(directory, torch_dtype):
    """An HF LLaMA directory (plain or LLaVA) -> (lm, projector state, vision state, weight files)."""
    files = weight_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory}: no LM weights (*.safetensors or pytorch_model*.bin)")
    state = {}
    for path in files:
        state.update(load_tensors(path))
    lm_state, proj, vis = split_state(state)
    del state
    lm = build_lm(llama_config(read_config(directory), os.path.join(directory, "config.json")), lm_state,
                  torch_dtype, ", ".join(files))
    return lm, proj, vis, files


def merge_lora(adapter_dir, base_dir, non_lora, torch_dtype):
    """Layout (c): base LLaMA + non-LoRA trainables (e.g. resized embeddings) + merged LoRA -> plain LM."""
    from peft import PeftModel
    adapter = first_existing(adapter_dir, ADAPTER_FILES)
    if adapter is None:
        raise FileNotFoundError(f"{adapter_dir}: adapter_config.json but no {' or '.join(ADAPTER_FILES)}")
    load_tensors(adapter)   # peft loads it again itself; this checks a pickle with weights_only first
    lm, _, _, _ = load_lm_dir(base_dir, torch_dtype)
    if non_lora:
        rows = non_lora.get("model.embed_tokens.weight", non_lora.get("lm_head.weight"))
        if rows is not None and rows.shape[0] != lm.get_input_embeddings().weight.shape[0]:
            lm.resize_token_embeddings(rows.shape[0])   # LLaVA adds tokens; the trainables hold the new rows
        expected = {name: t.shape for name, t in lm.state_dict().items() if name in non_lora}
        check_shapes(expected, {k: non_lora[k] for k in non_lora if k in expected}, adapter_dir, "non-LoRA")
        unknown = sorted(set(non_lora) - set(expected))
        if unknown:
            raise ValueError(f"{adapter_dir}: non-LoRA trainables that are not LM weights: {unknown[:5]}")
        lm.load_state_dict(non_lora, strict=False)
    return PeftModel.from_pretrained(lm, adapter_dir).merge_and_unload()


# ----------------------------------------------------------------------------- the projector

def projector_kind(declared, proj, source):
    """model.py's projector name from config.json's mm_projector_type (LLaVA's default: linear) and
    the keys present, which must agree."""
    if declared is None:
        declared = "mlp2x_gelu" if "0.weight" in proj else "linear"
    kind = PROJECTOR_TYPES[declared]   # an unknown declared type was refused before the weights were read
    if set(proj) != PROJECTOR_KEYS[kind]:
        raise ValueError(f"{source}: projector type {declared!r} expects tensors mm_projector."
                         f"{{{', '.join(sorted(PROJECTOR_KEYS[kind]))}}}, found {sorted(proj)}")
    return kind


def projector_state(kind, proj, vision_dim, lm_dim, source):
    """Check the converted projector against model.make_projector's shapes -> state dict for it."""
    from model import make_projector
    with torch.device("meta"):
        expected = {name: t.shape for name, t in make_projector(kind, vision_dim, lm_dim).state_dict().items()}
    for name, shape in expected.items():
        if tuple(proj[name].shape) != tuple(shape):
            raise ValueError(f"{source}: tensor mm_projector.{name}: expected shape {tuple(shape)} "
                             f"(vision hidden {vision_dim} -> LM hidden {lm_dim}), got {tuple(proj[name].shape)}")
    return {name: proj[name] for name in expected}


def read_projector_file(path):
    """A projector file: LLaVA's keys (model.mm_projector.0.weight ...) or bare ones (0.weight ...)."""
    state = load_tensors(path)
    _, proj, _ = split_state(state)
    return proj or state


# ----------------------------------------------------------------------------- the vision tower

def vision_tower(vision_path, vis, out_dir, source, keep=True):
    """The vision tower the checkpoint will use: `vision_path`, or out_dir/vision when the source holds
    tower weights that differ from it (LLaVA freezes the tower, so usually they are the same)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    if not vis or not keep:
        return vision_path, CLIPVisionConfig.from_pretrained(vision_path)
    reference = CLIPVisionModel.from_pretrained(vision_path)
    vis = {k: v for k, v in vis.items() if not k.endswith("position_ids")}   # a buffer old checkpoints saved
    # transformers 4 names the tower's tensors "vision_model.encoder...", 5 drops the prefix: compare without it
    state = reference.state_dict()
    names = {name.removeprefix("vision_model."): name for name in state}
    expected = {short: state[name] for short, name in names.items()}
    check_shapes({k: t.shape for k, t in expected.items()}, vis, source, "vision tower")
    if all(torch.equal(vis[k].to(t.dtype), t) for k, t in expected.items()):
        return vision_path, reference.config
    reference.load_state_dict({names[k]: v for k, v in vis.items()})
    path = os.path.join(out_dir, "vision")
    reference.save_pretrained(path)
    print(f"convert: the vision tower in {source} differs from {vision_path}; wrote it to {path}")
    return path, reference.config


# ----------------------------------------------------------------------------- the whole conversion

def convert(src_dir, out_dir, vision_path="", base_lm_dir="", projector_file="", dtype_name="bfloat16", frames=50,
            keep_vision=True):
    """Convert `src_dir` (layout a, b or c) into a VideoLM checkpoint at `out_dir`. Returns the
    ModelConfig written. The LM is written to out_dir/lm first and freed before VideoLM loads it back."""
    from transformers import AutoTokenizer
    from model import ModelConfig, VideoLM, _torch_dtype
    torch_dtype = _torch_dtype(dtype_name)
    out_dir = os.path.abspath(out_dir)   # the model config stores paths; relative ones would depend on the cwd
    is_lora = os.path.exists(os.path.join(src_dir, "adapter_config.json"))
    if is_lora and not base_lm_dir:
        raise ValueError(f"{src_dir} holds LoRA adapters (adapter_config.json): pass --base_lm=DIR, "
                         "the LLaMA they were trained on")
    meta_dir = base_lm_dir if is_lora and not read_config(src_dir) else src_dir   # where the mm_* keys are
    meta_source, meta = os.path.join(meta_dir, "config.json"), read_config(meta_dir)

    # 0. what config.json says about the vision side, checked before gigabytes of weights are read
    declared = meta.get("mm_projector_type")
    if declared is not None and declared not in PROJECTOR_TYPES:
        raise ValueError(f"{meta_source}: unknown projector type {declared!r} (mm_projector_type); model.py "
                         f"supports {sorted(PROJECTOR_TYPES)}")
    vision_path = vision_path or meta.get("mm_vision_tower", "")
    if not vision_path:
        raise ValueError(f"{meta_source} names no mm_vision_tower: pass --vision=DIR_OR_ID")
    feature = meta.get("mm_vision_select_feature", "patch")
    if feature != "patch":   # model.py drops CLS, as LLaVA's "patch" does
        raise ValueError(f"{meta_source}: mm_vision_select_feature={feature!r}; model.py supports 'patch' only")
    if "mm_vision_select_layer" not in meta:
        warnings.warn(f"{meta_source} has no mm_vision_select_layer; using -2 (LLaVA's usual)")
    if meta.get("mm_use_im_start_end"):
        warnings.warn("the source wraps visual tokens in <im_start>/<im_end>; model.py does not")

    # 1. the LM (and whatever else sits in its weights)
    non_lora_file = first_existing(src_dir, NON_LORA_FILES)
    non_lora = split_state(load_tensors(non_lora_file)) if non_lora_file else ({}, {}, {})
    if is_lora:
        lm = merge_lora(src_dir, base_lm_dir, non_lora[0], torch_dtype)
        proj, vis, searched = {}, non_lora[2], []
        tokenizer_dir = src_dir if glob.glob(os.path.join(src_dir, "tokenizer*")) else base_lm_dir
    else:
        lm, proj, vis, searched = load_lm_dir(src_dir, torch_dtype)
        tokenizer_dir = src_dir

    # 2. the projector: --projector, else inside the weights, else the LoRA trainables, else mm_projector.*
    proj_source = ", ".join(searched)
    if projector_file:
        proj, proj_source = read_projector_file(projector_file), projector_file
    elif not proj and non_lora[1]:
        proj, proj_source = non_lora[1], non_lora_file
    elif not proj and first_existing(src_dir, PROJECTOR_FILES):
        proj_source = first_existing(src_dir, PROJECTOR_FILES)
        proj = read_projector_file(proj_source)
    if not proj:
        looked = searched + [os.path.join(src_dir, name) for name in PROJECTOR_FILES + NON_LORA_FILES]
        raise ValueError(f"no projector weights (mm_projector.*) in {', '.join(looked)}; pass --projector=FILE")
    kind = projector_kind(declared, proj, proj_source)

    # 3-4. the output, assembled in a temporary directory and moved into place at the end (checkpoint.py):
    # the vision tower (when the source carries its own), the clean LM directory, the model.py files
    written = {}

    def fill(stage):
        tower, vision_config = vision_tower(vision_path, vis, stage, proj_source, keep_vision)
        lm_dim = lm.get_input_embeddings().embedding_dim
        if meta.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
            raise ValueError(f"{meta_source}: mm_hidden_size {meta['mm_hidden_size']} but the vision tower "
                             f"{tower} has hidden size {vision_config.hidden_size}")
        projector = projector_state(kind, proj, vision_config.hidden_size, lm_dim, proj_source)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, config=lm.config)   # not the LLaVA config.json
        rows = lm.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            raise ValueError(f"{tokenizer_dir}: the tokenizer has {len(tokenizer)} tokens, the LM's embeddings {rows} rows")
        lm.to(torch_dtype).save_pretrained(os.path.join(stage, "lm"))
        tokenizer.save_pretrained(os.path.join(stage, "lm"))
        lm.to("meta")                       # free the weights before VideoLM loads them back
        gc.collect()
        staged = ModelConfig(vision=tower, lm=os.path.join(stage, "lm"), projector=kind, num_frames=frames,
                             vision_layer=meta.get("mm_vision_select_layer", -2),
                             vision_post_layernorm=False,   # LLaVA feeds pre-post-layernorm features
                             project_first=True,            # LLaVA's encode_images, then the pooling
                             image_pad=meta.get("image_aspect_ratio") == "pad",   # expand2square
                             template="v1", dtype=dtype_name)
        model = VideoLM(staged)
        model.projector.load_state_dict({name: t.to(torch_dtype) for name, t in projector.items()})
        final = lambda p: os.path.join(out_dir, os.path.relpath(p, stage)) if p.startswith(stage) else p
        written["config"] = dataclasses.replace(staged, vision=final(tower), lm=final(staged.lm))
        model.write(stage, config=written["config"])
    checkpoint.write_dir(out_dir, fill)
    config = written["config"]
    print(f"convert: {src_dir} -> {out_dir} (projector {kind} from {proj_source}, LM {config.lm}, vision {config.vision})")
    return config


def main(argv):
    configure(argv, globals())
    if not src or not out:
        raise SystemExit("usage: python convert.py --src=DIR --vision=DIR_OR_ID --out=OUT_DIR [--base_lm=DIR] [--projector=FILE]")
    return convert(src, out, vision, base_lm, projector, dtype, num_frames, keep_vision_tower)


if __name__ == "__main__":
    main(sys.argv[1:])
