"""
transformers' own Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) as the policy, through the interface the
trainer uses on model.VideoLM, with the same encode-once, prefill-once rollout.

It follows the policy interface written down in policies.py, as model.VideoLM does.

Qwen2.5-VL differs from VideoLM in what features are and where positions come from (qwen_parts.py): a clip
keeps its own smart-resized size (a batch of clips of different sizes is a list), its features are the vision
tower's patch states before the vision-to-LM merger (pack_features), and the prompt's one <|video_pad|> is
expanded to that clip's t*h*w/merge^2 tokens when the prompt is embedded, with 3-D M-RoPE positions computed
here and passed to every forward (prefill, each decoding step, scoring): nothing depends on the rope_deltas a
previous call left in the model. LoRA goes on the language model only; the vision tower is frozen; the merger
trains with train_merger=True (a copy of it joins the "ref" adapter). "tiny-qwen2_5_vl" builds the model
from a small config with random weights and the synthetic task's word-level tokenizer plus Qwen's special
tokens and chat format: no downloads.
"""
import contextlib
import copy
import json
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from safetensors.torch import save_file

import checkpoint
from data import question_text
from model import CONFIG, TOKENIZER, WEIGHTS, copy_frozen, lora_reference_pairs, pad, reference_adapter
from qwen_parts import (DEFAULT_FPS, FAMILIES, TINY, build_parts, fit_clip, pack_features, prompt_positions,
                        seconds_per_grid, unpack_features, video_patches)
from rollout import prefill, sample_completions, shared_prefix_logits


@dataclass
class QwenVLConfig:
    base: str = TINY              # TINY, or a local transformers model directory of a FAMILIES model
    tokenizer: str = ""           # default: the base's own (the tiny one is built from the synthetic vocabulary)
    num_frames: int = 8           # frames sampled per video
    fps: float = DEFAULT_FPS      # sampled frames per second assumed for a clip whose duration is not given
    min_pixels: int = 0           # per-frame pixel bounds of smart_resize; 0: the base's preprocessor_config.json
    max_pixels: int = 0
    train_merger: bool = False    # train the vision-to-LM merger too (always with the tiny base: it is random)
    lora_r: int = 0               # 0: no LoRA (the tiny LM trains in full; a pretrained one only through LoRA)
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj"   # within the language model only
    load_in_4bit: bool = False    # QLoRA: NF4 language model (bitsandbytes), vision tower and lm_head unquantised
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    share_prefix: bool = False    # score a group's G completions on one cached pass over their shared prompt
    seed: int = 0

    @classmethod
    def from_dict(cls, values):
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown QwenVLConfig keys {sorted(unknown)}; known: {sorted(f.name for f in fields(cls))}")
        return cls(**values)


class QwenVLPolicy(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.lm, self.tokenizer, self.processing = build_parts(config)
        self.video_token_id = self.lm.config.video_token_id
        stops = getattr(self.lm.generation_config, "eos_token_id", None)   # Qwen's: <|im_end|> and <|endoftext|>
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        self.stop_ids = sorted({self.tokenizer.eos_token_id, *stops})        # a sample ends at any of them
        self.ref_lm = None            # only without LoRA: a full copy
        self.ref_merger = None        # with LoRA and a trained merger: the reference policy's merger
        self.encode_calls = 0         # counted, so tests can check encode-once
        self.lm.requires_grad_(config.base == TINY)   # a pretrained LM trains only through LoRA: small checkpoints
        self.qwen.model.visual.requires_grad_(False)  # the vision tower is frozen, always
        if config.base == TINY:
            config.train_merger = True                  # a random merger must learn
        self.merger.requires_grad_(config.train_merger)
        if config.gradient_checkpointing:
            self.lm.gradient_checkpointing_enable()
        if config.lora_r > 0:
            self._wrap_lora()

    @property
    def qwen(self):
        """The transformers model itself (under peft's wrapper when there are adapters)."""
        return self.lm.get_base_model() if self.has_lora else self.lm

    @property
    def merger(self):
        return self.qwen.model.visual.merger

    # ------------------------------------------------------------------ LoRA and the reference policy

    def _wrap_lora(self):
        from peft import get_peft_model, prepare_model_for_kbit_training
        if self.config.load_in_4bit:
            self.lm = prepare_model_for_kbit_training(
                self.lm, use_gradient_checkpointing=self.config.gradient_checkpointing)
        self.lm = get_peft_model(self.lm, self._lora_config())
        self.merger.requires_grad_(self.config.train_merger)    # peft froze everything but the adapters

    def _lora_config(self):
        """LoRA on the language model's layers only: the vision blocks share module names (e.g. the MLP's)."""
        from peft import LoraConfig
        names = "|".join(m.strip() for m in self.config.lora_target_modules.split(","))
        return LoraConfig(r=self.config.lora_r, lora_alpha=self.config.lora_alpha, lora_dropout=self.config.lora_dropout,
                          bias="none", target_modules=rf".*\.language_model\..*\.({names})")

    @property
    def has_lora(self):
        return hasattr(self.lm, "peft_config")

    def add_lora(self, r, alpha=16, dropout=0.0, target_modules="q_proj,k_proj,v_proj,o_proj"):
        """Put LoRA adapters on the language model (e.g. RL from a fully fine-tuned tiny SFT model)."""
        if self.has_lora:
            raise ValueError("the language model already has LoRA adapters")
        self.config.lora_r, self.config.lora_alpha = r, alpha
        self.config.lora_dropout, self.config.lora_target_modules = dropout, target_modules
        self._wrap_lora()

    def snapshot_reference(self):
        """pi_ref <- pi_theta (Algorithm 1 line 3): the trained adapter copied into the "ref" adapter (plus the
        merger into ref_merger when it trains), or the whole model into ref_lm when there is no LoRA. The
        copies are made on the first call and refreshed in place after, so a sharded model keeps its layout."""
        if self.has_lora and "ref" not in self.lm.peft_config:
            self.lm.add_adapter("ref", self._lora_config())
        if not self.has_lora and self.ref_lm is None:
            self.ref_lm = copy.deepcopy(self.lm)
        if self.has_lora and self.config.train_merger and self.ref_merger is None:
            self.ref_merger = copy.deepcopy(self.merger)
        if self.has_lora:
            pairs = lora_reference_pairs(self.lm)
            if self.ref_merger is not None:
                pairs += list(zip(self.ref_merger.parameters(), self.merger.parameters()))
        else:
            pairs = list(zip(self.ref_lm.parameters(), self.lm.parameters()))
        copy_frozen(pairs)

    @contextlib.contextmanager
    def reference(self):
        """Inside this block (lm, merger) are the reference policy's."""
        if self.has_lora and "ref" in self.lm.peft_config:
            with reference_adapter(self.lm) as lm:
                yield lm, self.merger if self.ref_merger is None else self.ref_merger
        elif self.ref_lm is not None:
            yield self.ref_lm, self.ref_lm.model.visual.merger
        else:
            raise RuntimeError("no reference policy yet: call snapshot_reference() first")

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode=True):
        super().train(mode)
        self.qwen.model.visual.eval()     # the frozen tower: no dropout, ever
        if self.ref_lm is not None:
            self.ref_lm.model.visual.eval()
        return self

    def disable_dropout(self):
        """RL runs without dropout: every pass must score the same policy (the first pass's ratio is 1).
        Qwen's attention dropout is a rate on its attention modules, not an nn.Dropout."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0

    # ------------------------------------------------------------------ video

    @property
    def device(self):
        return next(self.merger.parameters()).device

    def fit_frames(self, frames):
        """One clip to the model's input size: uint8 (T, H, W, 3) -> (T, h, w, 3), h and w by smart_resize."""
        p = self.processing
        return fit_clip(frames, p["patch"] * p["merge"], p["min_pixels"], p["max_pixels"])

    @torch.no_grad()
    def encode_video(self, frames, seconds=None):
        """A batch of clips -> packed vision features (qwen_parts.pack_features): (B, 1 + N_max, C) float32.
        frames: uint8 (B, T, H, W, 3), or a list of B clips (T, H_b, W_b, 3) of different sizes; clips not at
        the model's size are fitted first. seconds: B clip durations (None: unknown, config.fps is assumed).
        The vision tower runs once on all B clips; the merger is applied later (the reference may own one)."""
        self.encode_calls += 1
        p, visual = self.processing, self.qwen.model.visual
        clips = [self.fit_frames(clip.cpu()) for clip in frames]
        pixels, grids = zip(*[video_patches(clip, p["patch"], p["merge"], p["temporal"], p["mean"], p["std"])
                              for clip in clips])
        second_per_grid = [seconds_per_grid(len(clip), p["temporal"], seconds[b] if seconds else None, self.config.fps)
                           for b, clip in enumerate(clips)]
        # the tower's output goes through the merger and back to the clip's patch order: the hook hands the
        # merger's input (each merge block's patch states, concatenated) on instead of its output
        group = lambda module, args, output: args[0].reshape(output.shape[0], -1)
        hook = visual.merger.register_forward_hook(group)
        try:
            out = visual(torch.cat(pixels).to(self.device, visual.patch_embed.proj.weight.dtype),
                         grid_thw=torch.tensor(grids, device=self.device))
        finally:
            hook.remove()
        states = out.pooler_output.reshape(-1, visual.config.hidden_size)
        return pack_features(states.split([t * h * w for t, h, w in grids]), grids, second_per_grid)

    # ------------------------------------------------------------------ text

    def encode_prompts(self, samples, mc_format="oneline"):
        """Dataset rows -> (ids, mask), each (B, P) long, left-padded: the chat template applied to one user
        turn [video, question] with the generation prompt; the video is still one <|video_pad|> here."""
        encoded = []
        for sample in samples:
            content = [{"type": "video"}, {"type": "text", "text": question_text(sample["question"], sample.get("options"),
                                                                                mc_format)}]
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids.count(self.video_token_id) != 1:
                raise ValueError(f"sample {sample.get('id')}: the chat template gave {ids.count(self.video_token_id)} "
                                 f"video tokens (id {self.video_token_id}), expected 1: {text!r}")
            encoded.append(ids)
        return pad(encoded, self.tokenizer.pad_token_id, self.device)

    def encode_answers(self, answers):
        """Answer strings -> (ids, mask), each (B, L) long, right-padded, EOS (<|im_end|>) appended."""
        eos = self.tokenizer.eos_token_id
        encoded = [self.tokenizer(a.strip(), add_special_tokens=False)["input_ids"] + [eos] for a in answers]
        return pad(encoded, self.tokenizer.pad_token_id, self.device, left=False)

    def decode(self, completion_ids, completion_mask):
        """(N, L) ids -> N strings, stopping at EOS (any of stop_ids)."""
        texts = []
        for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist()):
            kept = [t for t, m in zip(ids, mask) if m and t not in self.stop_ids]
            texts.append(self.tokenizer.decode(kept, skip_special_tokens=True).strip())
        return texts

    # ------------------------------------------------------------------ the LM

    def prompt_inputs(self, features, prompt_ids, prompt_mask, lm, merger):
        """Each prompt with its <|video_pad|> expanded to its clip's t*h*w/merge^2 tokens, whose embeddings are
        the merger's output, left-padded as one batch. features: encode_video's; prompt_*: (B, P) ->
        embeds (B, P', D), mask (B, P'), positions (3, B, P') long (padding: 0), next_position (B,) long."""
        grids, second_per_grid, patches = unpack_features(features.to(self.device))
        merge, video = self.processing["merge"], self.video_token_id
        video_embeds = merger(torch.cat(patches).to(next(merger.parameters()).dtype))   # (sum of counts, D)
        interval = self.processing["tokens_per_second"] * second_per_grid.cpu()
        rows, row_positions, next_position = [], [], []
        for b in range(len(prompt_ids)):
            ids = prompt_ids[b][prompt_mask[b] > 0].tolist()
            at, count = ids.index(video), int(grids[b].prod()) // merge ** 2
            rows.append(ids[:at] + [video] * count + ids[at + 1:])
            positions, following = prompt_positions(rows[-1], video, grids[b].tolist(), interval[b], merge)
            row_positions.append(positions)
            next_position.append(following)
        ids, mask = pad(rows, self.tokenizer.pad_token_id, self.device)
        positions = torch.zeros(3, *ids.shape, dtype=torch.long)
        for b, row in enumerate(row_positions):
            positions[:, b, ids.shape[1] - row.shape[1]:] = row
        embeds = lm.get_input_embeddings()(ids)
        is_video = ((ids == video) & (mask > 0)).unsqueeze(-1)
        embeds = embeds.masked_scatter(is_video, video_embeds.to(embeds.dtype))
        return embeds, mask, positions.to(self.device), torch.tensor(next_position, device=self.device)

    def completion_logits(self, features, prompt_ids, prompt_mask, completion_ids, completion_mask,
                          group_size=1, reference=False):
        """Logits predicting each completion token. features: encode_video's; prompt_*: (B, P); completion_*:
        (B*group_size, L) -> (B*group_size, L, vocab). Completion token j of a row sits at position
        next_position + j on all three axes, as in generate. The video is never re-encoded."""
        context = self.reference() if reference else contextlib.nullcontext((self.lm, self.merger))
        with context as (lm, merger):
            embeds, mask, positions, following = self.prompt_inputs(features, prompt_ids, prompt_mask, lm, merger)
            length = completion_ids.shape[1]
            completion_positions = (following.repeat_interleave(group_size)[:, None]
                                    + torch.arange(length, device=mask.device)).expand(3, -1, -1)
            if self.config.share_prefix and group_size > 1:   # the prefix once per prompt (rollout.py)
                return shared_prefix_logits(lm, embeds, mask, completion_ids, completion_mask, group_size,
                                            positions, completion_positions)
            embeds = torch.cat([embeds.repeat_interleave(group_size, 0), lm.get_input_embeddings()(completion_ids)], 1)
            mask = torch.cat([mask.repeat_interleave(group_size, 0), completion_mask.to(mask.dtype)], 1)
            positions = torch.cat([positions.repeat_interleave(group_size, 1), completion_positions], 2)
            total = mask.shape[1]
            predicting = torch.arange(total - length - 1, total - 1, device=mask.device)   # t predicts token t+1
            return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=predicting,
                      use_cache=False).logits

    @torch.no_grad()
    def generate(self, features, prompt_ids, prompt_mask, group_size=1, max_new_tokens=8, greedy=False,
                 generator=None, all_finished=None, **sampling):
        """Sample group_size completions per prompt in one batched, KV-cached loop, each prompt run once (prefill)
        and its cache repeated for its G rows; every step passes its 3-D positions. features: encode_video's;
        prompt_*: (B, P) -> completion_ids (B*G, L) (pad after EOS), completion_mask (B*G, L) (1 up to and
        including EOS), truncated (B*G,) bool (no EOS). sampling: rollout.sample_token's temperature, top_p,
        top_k, repetition_penalty. all_finished: done (B*G,) bool -> stop? (default: every row has its EOS)."""
        embeds, mask, positions, following = self.prompt_inputs(features, prompt_ids, prompt_mask, self.lm, self.merger)
        cache, logits = prefill(self.lm, embeds, mask, group_size, positions)
        following = following.repeat_interleave(group_size)             # each row's next position, on all 3 axes
        seen = torch.where(prompt_mask > 0, prompt_ids, -1).repeat_interleave(group_size, 0)
        return sample_completions(self.lm, cache, logits[:, -1], mask.repeat_interleave(group_size, 0), seen,
                                  self.stop_ids, self.tokenizer.pad_token_id, max_new_tokens,
                                  lambda step: (following + step).view(1, -1, 1).expand(3, -1, -1),
                                  greedy=greedy, generator=generator, all_finished=all_finished, **sampling)

    # ------------------------------------------------------------------ save / load

    def _saved(self, name):
        """Which weights a checkpoint holds: every one of the tiny model (built from a config); of a pretrained
        base (which reloads from its directory) the adapters and the merger when it trains."""
        return (self.config.base == TINY or "lora_" in name or name.startswith("ref_merger.")
                or (self.config.train_merger and ".visual.merger." in name))

    def save(self, path, state=None):
        """Weights (safetensors), config (JSON) and tokenizer into one directory, written atomically with a
        checksum manifest (checkpoint.write_dir). `state`: a full state dict gathered from a sharded model."""
        checkpoint.write_dir(path, lambda directory: self.write(directory, state))

    def write(self, directory, state=None):
        state = self.state_dict() if state is None else state
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in state.items() if self._saved(name)},
                  os.path.join(directory, WEIGHTS))
        reference = self.ref_lm is not None or (self.has_lora and "ref" in self.lm.peft_config)
        with open(os.path.join(directory, CONFIG), "w") as f:
            json.dump({"policy": FAMILIES[0], "model": asdict(self.config), "reference": reference}, f, indent=2)
        self.tokenizer.save_pretrained(os.path.join(directory, TOKENIZER))

    @classmethod
    def load(cls, path, **overrides):
        """Rebuild from `save`'s directory; overrides change config fields (e.g. dtype). Refuses, naming the
        file, a checkpoint whose checksums do not match, whose weights are not finite or do not fit."""
        checkpoint.verify(path)
        meta = checkpoint.read_json(os.path.join(path, CONFIG))
        try:
            config = QwenVLConfig.from_dict({**meta["model"], **overrides})
        except (ValueError, KeyError, TypeError) as err:
            raise checkpoint.CheckpointError(f"{os.path.join(path, CONFIG)}: not a model config ({err})") from None
        if config.base == TINY and not config.tokenizer:
            config.tokenizer = os.path.join(path, TOKENIZER)
        model = cls(config)
        model.config.tokenizer = meta["model"]["tokenizer"]
        if meta.get("reference"):
            model.snapshot_reference()
        checkpoint.load_weights(model, os.path.join(path, WEIGHTS))
        return model

    def save_pretrained(self, path):
        """This policy as a transformers model directory (adapters merged in; config.json, weights, tokenizer
        with its chat template, preprocessor_config.json): what `base=path` and transformers load."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        model = copy.deepcopy(self.lm)
        model = model.merge_and_unload() if self.has_lora else model
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        p = self.processing
        Qwen2VLImageProcessorPil(patch_size=p["patch"], merge_size=p["merge"], temporal_patch_size=p["temporal"],
                                 image_mean=list(p["mean"]), image_std=list(p["std"]),
                                 min_pixels=p["min_pixels"], max_pixels=p["max_pixels"]).save_pretrained(path)
