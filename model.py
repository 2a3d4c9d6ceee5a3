"""
The policy: a video-language model in the VLM-RLAIF / Video-ChatGPT mould (paper, Appendix A.1).

    frames (T, H, W, 3) uint8 -> (padded to a square,) resized and centre-cropped as CLIPImageProcessor
      -> frozen CLIP ViT, patch features of the second-to-last layer, CLS dropped   (T, S, C)
      -> Video-ChatGPT pooling: T temporal tokens (mean over patches of each frame)
                                + S spatial tokens (mean over frames of each patch)  (T + S, C)
      -> projector (linear or 2-layer MLP; before the pooling with project_first)   (T + S, D)
      -> causal LM fed the prompt (data.build_prompt's template) with the visual tokens at its
         IMAGE_TOKEN placeholder, then the answer tokens, as inputs_embeds

The video is encoded once per prompt (`encode_video`); the G samples of a group and every
log-prob pass reuse those features. LoRA (peft) goes on the LM; the reference policy of
Algorithm 1 line 3 is a second adapter ("ref") plus a copy of the small projector, not a
second model. The embedded default ("tiny") builds every part from a small config with random
weights and a word-level tokenizer over the synthetic task's vocabulary: no downloads. VideoLM follows
the policy interface written down in policies.py (qwen_vl.QwenVLPolicy is the other policy).
"""
import contextlib
import copy
import json
import os
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from safetensors.torch import save_file

import checkpoint
from data import IMAGE, build_prompt, clip_pixels, fit_frames
from rollout import positions, prefill, sample_completions, shared_prefix_logits
from synth import tiny_lm, tiny_vision, word_tokenizer

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer"
IMAGE_TOKEN = -200   # the prompt id standing for the visual tokens (LLaVA's IMAGE_TOKEN_INDEX)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")   # peft calls a deprecated name


@dataclass
class ModelConfig:
    vision: str = "tiny"          # "tiny", or a local dir / hub id of a CLIP vision model
    lm: str = "tiny"              # "tiny", or a local dir / hub id of any causal LM
    tokenizer: str = ""           # default: the LM's own; the tiny LM gets a word-level one
    projector: str = "mlp2x_gelu"  # or "linear"
    num_frames: int = 8           # frames sampled per video (the paper: 50)
    vision_layer: int = -2        # LLaVA convention: second-to-last layer
    vision_post_layernorm: bool = True  # at the tiny size, SFT stays at the answer prior without it
    lora_r: int = 0               # 0: no LoRA, the LM itself is trained (the tiny SFT)
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj"
    load_in_4bit: bool = False    # QLoRA: NF4 base weights (bitsandbytes; CUDA, or slowly on the CPU)
    dtype: str = "float32"        # "bfloat16" for real models on GPU
    gradient_checkpointing: bool = False
    share_prefix: bool = False    # score a group's G completions on one cached pass over their shared prompt
    image_pad: bool = False       # pad frames to a square with CLIP's mean colour first (VLM-RLAIF)
    project_first: bool = False   # projector on every frame's patches, then the pooling (VLM-RLAIF)
    template: str = "plain"       # data.TEMPLATES: "plain" (the tiny default) | "v1" (VLM-RLAIF's vicuna v1)
    # the tiny default: sized so the whole main job fits minutes on 2 CPU cores
    tiny_image_size: int = 32
    tiny_patch_size: int = 8
    tiny_vision_hidden: int = 64
    tiny_vision_layers: int = 2
    tiny_lm_hidden: int = 128
    tiny_lm_layers: int = 2
    seed: int = 0

    @classmethod
    def from_dict(cls, values):
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(f.name for f in fields(cls))}")
        return cls(**values)


def make_projector(kind, vision_dim, lm_dim):
    if kind == "linear":
        return nn.Linear(vision_dim, lm_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
    raise ValueError(f"projector must be 'linear' or 'mlp2x_gelu', got {kind!r}")


def _torch_dtype(name):
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def build_parts(config, vocab_words=None):
    """(vision tower, causal LM, tokenizer) from a ModelConfig: tiny ones from configs, or pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel
    dtype = _torch_dtype(config.dtype)
    torch.manual_seed(config.seed)     # the tiny parts' random init is part of the config
    vision = tiny_vision(config) if config.vision == "tiny" else CLIPVisionModel.from_pretrained(config.vision, dtype=dtype)
    if config.lm == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer) if config.tokenizer else word_tokenizer(vocab_words)
        lm = tiny_lm(config, tokenizer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.lm)
        quantization = None
        if config.load_in_4bit:       # bitsandbytes >= 0.49 runs NF4 layers on the CPU too (slowly): CI tests QLoRA
            try:
                import bitsandbytes  # noqa: F401  (transformers would fail later, with less to go on)
            except ImportError:
                raise ValueError("load_in_4bit=True (QLoRA) needs bitsandbytes: pip install bitsandbytes "
                                 f"(or --load_in_4bit=False to train in {config.dtype})") from None
            check_4bit_widths(config.lm)
            from transformers import BitsAndBytesConfig
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        lm = AutoModelForCausalLM.from_pretrained(config.lm, dtype=dtype, quantization_config=quantization)
    if tokenizer.pad_token is None:    # LLaMA ships without one; padding is always masked anyway
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if config.load_in_4bit and config.lm == "tiny":
        raise ValueError("load_in_4bit=True needs a pretrained LM (--lm=PATH), not the tiny default")
    return vision, lm, tokenizer


def check_4bit_widths(lm_path):
    """bitsandbytes' 4-bit CPU kernels (0.50) need every layer's input width to be a multiple of 64 (real LMs'
    are: 4096, 11008); name the LM and its widths instead of failing inside bitsandbytes at the first forward."""
    from transformers import AutoConfig
    if torch.cuda.is_available():
        return
    text = AutoConfig.from_pretrained(lm_path).get_text_config()
    widths = {name: getattr(text, name, 0) for name in ("hidden_size", "intermediate_size")}
    if any(width % 64 for width in widths.values()):
        raise ValueError(f"load_in_4bit=True on the CPU: bitsandbytes' 4-bit kernels need layer widths that are "
                         f"multiples of 64, and {lm_path} has {widths}. Use --load_in_4bit=False, or a CUDA GPU.")


def copy_frozen(pairs):
    """pi_ref <- pi_theta for (reference parameter, trained parameter) pairs: copied in place (a sharded model
    keeps its layout), the reference's left frozen."""
    with torch.no_grad():
        for ref_param, param in pairs:
            ref_param.copy_(param)
            ref_param.requires_grad_(False)


def lora_reference_pairs(lm):
    """(the "ref" adapter's weight, the trained "default" adapter's twin) for every LoRA weight of a peft model."""
    return [(param, lm.get_parameter(name.replace(".ref.", ".default.")))
            for name, param in lm.named_parameters() if ".ref." in name]


@contextlib.contextmanager
def reference_adapter(lm):
    """Inside this block the peft model computes with its "ref" adapter; after it, with "default" again and the
    reference's weights frozen (peft flips requires_grad with the active adapter)."""
    lm.set_adapter("ref")
    try:
        yield lm
    finally:
        lm.set_adapter("default")
        for name, param in lm.named_parameters():
            if ".ref." in name:
                param.requires_grad_(False)


class VideoLM(nn.Module):

    def __init__(self, config, vocab_words=None):
        super().__init__()
        self.config = config
        self.vision, self.lm, self.tokenizer = build_parts(config, vocab_words)
        self.vision.requires_grad_(False)               # frozen, always
        lm_dim = self.lm.get_input_embeddings().embedding_dim
        self.projector = make_projector(config.projector, self.vision.config.hidden_size, lm_dim)
        self.projector.to(_torch_dtype(config.dtype))
        self.ref_projector = None                         # set by snapshot_reference()
        self.ref_lm = None                                # only without LoRA: a full copy
        self.encode_calls = 0                             # counted, so tests can check encode-once
        if config.lm != "tiny":
            # a pretrained LM trains only through LoRA: checkpoints hold adapters + projector (MB), not its weights (GB)
            self.lm.requires_grad_(False)
        if config.gradient_checkpointing:   # non-reentrant: the shared prefix's cache must keep its gradients
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora_r > 0:
            self._wrap_lora()

    # ------------------------------------------------------------------ LoRA and the reference policy

    def _wrap_lora(self):
        from peft import get_peft_model, prepare_model_for_kbit_training
        if self.config.load_in_4bit:
            self.lm = prepare_model_for_kbit_training(
                self.lm, use_gradient_checkpointing=self.config.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lm = get_peft_model(self.lm, self._lora_config())

    def _lora_config(self):
        from peft import LoraConfig
        return LoraConfig(r=self.config.lora_r, lora_alpha=self.config.lora_alpha,
                          lora_dropout=self.config.lora_dropout, bias="none",
                          target_modules=[m.strip() for m in self.config.lora_target_modules.split(",")])

    @property
    def has_lora(self):
        return hasattr(self.lm, "peft_config")

    def add_lora(self, r, alpha=16, dropout=0.0, target_modules="q_proj,k_proj,v_proj,o_proj"):
        """Put LoRA adapters on the LM (e.g. RL from a fully fine-tuned tiny SFT model)."""
        if self.has_lora:
            raise ValueError("the LM already has LoRA adapters")
        self.config.lora_r, self.config.lora_alpha = r, alpha
        self.config.lora_dropout, self.config.lora_target_modules = dropout, target_modules
        self._wrap_lora()

    def snapshot_reference(self):
        """pi_ref <- pi_theta (Algorithm 1 line 3): copy the trained adapter into the "ref" adapter
        (or the whole LM when there is no LoRA) and the projector into ref_projector. The copies
        are made on the first call and refreshed in place after, so a sharded model keeps its layout."""
        if self.has_lora and "ref" not in self.lm.peft_config:
            self.lm.add_adapter("ref", self._lora_config())
        if not self.has_lora and self.ref_lm is None:
            self.ref_lm = copy.deepcopy(self.lm)
        if self.ref_projector is None:
            self.ref_projector = copy.deepcopy(self.projector)
        pairs = list(zip(self.ref_projector.parameters(), self.projector.parameters()))
        pairs += (lora_reference_pairs(self.lm) if self.has_lora
                  else list(zip(self.ref_lm.parameters(), self.lm.parameters())))
        copy_frozen(pairs)

    @contextlib.contextmanager
    def reference(self):
        """Inside this block the LM and projector are the reference policy's."""
        if self.ref_projector is None:
            raise RuntimeError("no reference policy yet: call snapshot_reference() first")
        if self.has_lora:
            with reference_adapter(self.lm) as lm:
                yield lm, self.ref_projector
        else:
            yield self.ref_lm, self.ref_projector

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode=True):
        super().train(mode)
        self.vision.eval()            # frozen tower: no dropout, ever
        return self

    def disable_dropout(self):
        """RL runs without dropout: every pass must score the same policy (the first pass's ratio is 1)."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0

    # ------------------------------------------------------------------ video

    @property
    def device(self):
        return next(self.projector.parameters()).device

    def fit_frames(self, frames):
        """One clip to the tower's input size: uint8 (T, H, W, 3) -> (T, S, S, 3) (data.fit_frames)."""
        return fit_frames(frames, self.vision.config.image_size, self.config.image_pad)

    def preprocess(self, frames):
        """uint8 (B, T, H, W, 3), any size -> float (B*T, 3, S, S), the tower's normalised input."""
        if frames.shape[2:4] != (self.vision.config.image_size,) * 2:
            frames = torch.stack([self.fit_frames(clip) for clip in frames.cpu()])
        return clip_pixels(frames.to(self.device))

    @torch.no_grad()
    def encode_video(self, frames, seconds=None):
        """uint8 (B, T, H, W, 3) -> visual features, once per prompt: pooled (B, T + S, C), or with
        project_first the frames' patches (B, T, S, C), pooled after the projector (visual_tokens).
        The projector is applied later, so the reference policy can use its own. seconds (the clips'
        durations) is ignored: Video-ChatGPT's pooling has no time positions."""
        self.encode_calls += 1
        batch, num_frames = frames.shape[:2]
        pixels = self.preprocess(frames.to(self.device)).to(self.vision.dtype)
        hidden = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[self.config.vision_layer]
        patches = hidden[:, 1:]                                       # drop CLS: (B*T, S, C)
        if self.config.vision_post_layernorm:
            patches = self.vision.post_layernorm(patches)
        patches = patches.reshape(batch, num_frames, patches.shape[1], patches.shape[2])   # (B, T, S, C)
        return patches if self.config.project_first else video_chatgpt_pool(patches)

    def visual_tokens(self, features, projector):
        """encode_video's features -> (B, T + S, D) visual token embeddings. project_first (VLM-RLAIF):
        the projector on every frame's patches, then the pooling; else pool, then project (the same for
        a linear projector, not for mlp2x_gelu)."""
        features = features.to(next(projector.parameters()).dtype)
        return video_chatgpt_pool(projector(features)) if self.config.project_first else projector(features)

    # ------------------------------------------------------------------ text

    def encode_prompts(self, samples, mc_format="oneline"):
        """Prompts of dataset rows -> (ids, mask), each (B, P) long, left-padded; each row holds one
        IMAGE_TOKEN where the visual tokens go. Like LLaVA's tokenizer_image_token, the text on either
        side of the placeholder is tokenized on its own and only the first piece keeps a BOS."""
        bos, encoded = self.tokenizer.bos_token_id, []
        for sample in samples:
            text = build_prompt(sample["question"], sample.get("options"), self.config.template, mc_format)
            pieces = [self.tokenizer(piece)["input_ids"] for piece in text.split(IMAGE)]
            ids = pieces[0]
            for piece in pieces[1:]:
                ids = ids + [IMAGE_TOKEN] + (piece[1:] if bos is not None and piece[:1] == [bos] else piece)
            encoded.append(ids)
        return pad(encoded, self.tokenizer.pad_token_id, self.device)

    def encode_answers(self, answers):
        """Answer strings -> (ids, mask), each (B, L) long, right-padded, EOS appended."""
        eos = self.tokenizer.eos_token_id
        encoded = [self.tokenizer(" " + a.strip(), add_special_tokens=False)["input_ids"] + [eos] for a in answers]
        return pad(encoded, self.tokenizer.pad_token_id, self.device, left=False)

    def decode(self, completion_ids, completion_mask):
        """(N, L) ids -> N strings, stopping at EOS."""
        eos, texts = self.tokenizer.eos_token_id, []
        for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist()):
            kept = [t for t, m in zip(ids, mask) if m and t != eos]
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True).strip())
        return texts

    # ------------------------------------------------------------------ the LM

    def prompt_embeddings(self, features, prompt_ids, prompt_mask, lm=None, projector=None):
        """The prompt with the V visual tokens spliced in at its IMAGE_TOKEN, left-padded as one sequence.
        features: encode_video's; prompt_ids, prompt_mask: (B, P) -> embeds (B, P-1+V, D), mask (B, P-1+V)."""
        lm = self.lm if lm is None else lm
        visual = self.visual_tokens(features, self.projector if projector is None else projector)
        text = lm.get_input_embeddings()(prompt_ids.clamp(min=0))
        visual, length, count = visual.to(text.dtype), prompt_ids.shape[1], visual.shape[1]
        at = (prompt_ids == IMAGE_TOKEN).long().argmax(1, keepdim=True)           # (B, 1) the placeholder
        j = torch.arange(length - 1 + count, device=prompt_ids.device).unsqueeze(0)   # output positions
        is_visual = (j >= at) & (j < at + count)
        from_text = torch.where(j < at, j, j - count + 1).clamp(0, length - 1)   # skipping the placeholder
        from_visual = (j - at).clamp(0, count - 1)
        pick = lambda source, index: source.gather(1, index.unsqueeze(-1).expand(-1, -1, source.shape[-1]))
        embeds = torch.where(is_visual.unsqueeze(-1), pick(visual, from_visual), pick(text, from_text))
        return embeds, torch.where(is_visual, 1, prompt_mask.gather(1, from_text)).to(prompt_mask.dtype)

    def completion_logits(self, features, prompt_ids, prompt_mask, completion_ids, completion_mask,
                          group_size=1, reference=False):
        """Logits predicting each completion token. features: (B, V, C); prompt_*: (B, P);
        completion_*: (B*group_size, L) -> (B*group_size, L, vocab). Each prompt's embeddings are
        computed once and repeated for its group (never re-encoded)."""
        context = self.reference() if reference else contextlib.nullcontext((self.lm, self.projector))
        with context as (lm, projector):
            embeds, mask = self.prompt_embeddings(features, prompt_ids, prompt_mask, lm, projector)
            if self.config.share_prefix and group_size > 1:      # the prefix once per prompt (rollout.py)
                return shared_prefix_logits(lm, embeds, mask, completion_ids, completion_mask, group_size)
            embeds, mask = embeds.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
            embeds = torch.cat([embeds, lm.get_input_embeddings()(completion_ids)], 1)
            mask = torch.cat([mask, completion_mask.to(mask.dtype)], 1)
            total, length = mask.shape[1], completion_ids.shape[1]
            predicting = torch.arange(total - length - 1, total - 1, device=mask.device)   # position t predicts token t+1
            out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask),
                     logits_to_keep=predicting, use_cache=False)
            return out.logits

    @torch.no_grad()
    def generate(self, features, prompt_ids, prompt_mask, group_size=1, max_new_tokens=8, greedy=False,
                 generator=None, all_finished=None, **sampling):
        """Sample group_size completions per prompt in one batched, KV-cached loop, the prompt run once (prefill).
        features: encode_video's; prompt_*: (B, P) -> completion_ids (B*G, L) (pad after EOS), completion_mask (B*G, L)
        (1 up to and including EOS), truncated (B*G,) bool (no EOS). sampling: rollout.sample_token's temperature,
        top_p, top_k, repetition_penalty (prompt and completion tokens). all_finished: done (B*G,) bool -> stop?
        (default: every row has its EOS); sharded processes pass configurator.all_finished (agreed by all)."""
        embeds, mask = self.prompt_embeddings(features, prompt_ids, prompt_mask)
        cache, logits = prefill(self.lm, embeds, mask, group_size)
        seen = torch.where((prompt_mask > 0) & (prompt_ids >= 0), prompt_ids, -1).repeat_interleave(group_size, 0)
        return sample_completions(self.lm, cache, logits[:, -1], mask.repeat_interleave(group_size, 0), seen,
                                  [self.tokenizer.eos_token_id], self.tokenizer.pad_token_id, max_new_tokens,
                                  greedy=greedy, generator=generator, all_finished=all_finished, **sampling)

    # ------------------------------------------------------------------ save / load

    def _saved(self, name):
        """Which weights a checkpoint holds: projectors and adapters always; the base parts only
        when they were built from a config (tiny), since pretrained ones reload from their path."""
        if name.startswith(("projector.", "ref_projector.")) or "lora_" in name:
            return True
        part = "vision" if name.startswith("vision.") else "lm" if name.startswith(("lm.", "ref_lm.")) else None
        return part is not None and getattr(self.config, part) == "tiny"

    def save(self, path, state=None):
        """Weights (safetensors), config (JSON) and tokenizer into one directory, written atomically with
        a checksum manifest (checkpoint.write_dir). `state`: a full state dict gathered from a sharded
        model (default: this module's own)."""
        checkpoint.write_dir(path, lambda directory: self.write(directory, state))

    def write(self, directory, state=None, config=None):
        """save's files into an existing directory (a checkpoint being assembled); `config`: the
        ModelConfig to record, when it differs from the one the model was built with (convert.py)."""
        state = self.state_dict() if state is None else state
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in state.items() if self._saved(name)},
                  os.path.join(directory, WEIGHTS))
        with open(os.path.join(directory, CONFIG), "w") as f:
            json.dump({"model": asdict(config or self.config), "reference": self.ref_projector is not None}, f, indent=2)
        self.tokenizer.save_pretrained(os.path.join(directory, TOKENIZER))

    @classmethod
    def load(cls, path, hub_ids=(), **overrides):
        """Rebuild from `save`'s directory; overrides change config fields (e.g. dtype). Refuses, naming the file, a
        checkpoint whose checksums do not match, whose weights are not finite, or with a hub id not in hub_ids."""
        config_path = os.path.join(path, CONFIG)
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{path}: not a model checkpoint (no {CONFIG})")
        checkpoint.verify(path)
        meta = checkpoint.read_json(config_path)
        try:
            config = ModelConfig.from_dict({**meta["model"], **overrides})
        except (ValueError, KeyError, TypeError) as err:
            raise checkpoint.CheckpointError(f"{config_path}: not a model config ({type(err).__name__}: {err})") from None
        checkpoint.local_parts(config, config_path, hub_ids)
        config.tokenizer = config.tokenizer or (os.path.join(path, TOKENIZER) if config.lm == "tiny" else "")
        model = cls(config)
        model.config.tokenizer = meta["model"]["tokenizer"]
        if meta.get("reference"):
            model.snapshot_reference()
        checkpoint.load_weights(model, os.path.join(path, WEIGHTS))
        return model


# ---------------------------------------------------------------------- small helpers

def video_chatgpt_pool(patches):
    """Video-ChatGPT pooling. patches: (B, T, S, C) -> (B, T + S, C): T temporal tokens (mean
    over the S patches of each frame), then S spatial tokens (mean over the T frames of each patch)."""
    return torch.cat([patches.mean(2), patches.mean(1)], 1)


def pad(sequences, pad_id, device=None, left=True):
    """Lists of token ids -> (ids, mask), each (N, width) long, padded on the left or the right."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        where = slice(width - len(seq), width) if left else slice(0, len(seq))
        if seq:
            ids[row, where], mask[row, where] = torch.tensor(seq), 1
    return ids.to(device), mask.to(device)
