"""
Rollouts (Algorithm 1 lines 6 and 8): sample G responses per prompt and score them with the
policy's own token log-probs.

For B prompts: encode each video once, sample all B x G responses in one batched, KV-cached
generate, then one teacher-forced pass (no grad) gives the per-token log-probs under the
sampling policy, the per-token entropy and the sequence log-prob
    l_i = log pi(o_i | q) = sum_t log pi(o_i,t | o_i,<t, q)                 (Algorithm 1 line 8)
from which GRPO_rank predicts the policy's ranking of the group (line 9).

`completion_logprobs` is the one function that scores completions, for the policy being trained
(with grad), the rollout policy (no grad) and the reference adapter (`reference=True`). Every score
is of the distribution the responses were sampled from: the logits divided by the temperature (as
TRL does), so the ratio, l_i and the entropy describe what was sampled. (top_p's truncation is not
scored, also as in TRL.)
"""
import contextlib
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer


@dataclass
class Rollout:
    samples: list            # B dataset rows
    group_size: int          # G
    features: torch.Tensor   # the policy's encode_video features of the B videos, encoded once
    prompt_ids: torch.Tensor     # (B, P) left-padded
    prompt_mask: torch.Tensor    # (B, P)
    completion_ids: torch.Tensor   # (B*G, L) right-padded after EOS; rows b*G .. b*G+G-1 are prompt b's
    completion_mask: torch.Tensor  # (B*G, L) 1 on generated tokens up to and including EOS
    loss_mask: torch.Tensor        # (B*G, L) completion_mask, minus truncated rows if masked
    truncated: torch.Tensor        # (B*G,) bool: no EOS within max_new_tokens
    old_logp: torch.Tensor         # (B*G, L) token log-probs under the sampling policy
    entropy: torch.Tensor          # (B*G, L) token entropies under the sampling policy
    seq_logp: torch.Tensor         # (B, G) l_i, Algorithm 1 line 8
    responses: list                # B lists of G decoded strings
    temperature: float = 1.0       # the sampling temperature: every log-prob is of logits / temperature


def sample_token(logits, temperature=1.0, top_p=1.0, greedy=False, generator=None, top_k=0, repetition_penalty=1.0,
                 seen=None):
    """(N, vocab) float logits -> (N,) token ids: greedy, or temperature + top-k + nucleus (top-p)
    sampling. repetition_penalty (HF's): the logit of every token in seen (N, S) (ids, -1 = none) is
    divided by it where positive and multiplied where negative, before anything else."""
    if repetition_penalty != 1.0 and seen is not None and seen.numel():
        hit = torch.zeros_like(logits).scatter_add(1, seen.clamp(min=0), (seen >= 0).to(logits.dtype)) > 0
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(hit, penalised, logits)
    if greedy or temperature == 0:
        return logits.argmax(-1)
    if top_k > 0:
        logits = logits.masked_fill(logits < logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:], float("-inf"))
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p    # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def token_logprobs(logits, token_ids, with_entropy=False, chunk_tokens=1024, temperature=1.0):
    """log pi(token) as logit - logsumexp of logits / temperature (0: greedy, scored at 1), in float32,
    `chunk_tokens` positions at a time, so that no float32 copy of the whole (N, L, vocab) logits is
    ever materialised: the peak extra memory is a few chunk_tokens x vocab floats, whatever N and L are.
    logits: (N, L, vocab), token_ids: (N, L) -> logp (N, L) [, entropy (N, L)]."""
    flat_logits, flat_ids = logits.reshape(-1, logits.shape[-1]), token_ids.reshape(-1)
    logps, entropies, scale = [], [], temperature if temperature > 0 else 1.0
    for start in range(0, flat_ids.shape[0], chunk_tokens):
        chunk = flat_logits[start:start + chunk_tokens].float()
        chunk = chunk / scale if scale != 1.0 else chunk
        log_norm = torch.logsumexp(chunk, -1)
        chosen = chunk.gather(-1, flat_ids[start:start + chunk_tokens].unsqueeze(-1)).squeeze(-1)
        logps.append(chosen - log_norm)
        if with_entropy:   # H = logsumexp(z) - sum_v p_v z_v
            entropies.append(log_norm - (torch.softmax(chunk, -1) * chunk).sum(-1))
    logp = torch.cat(logps).view(token_ids.shape)
    return (logp, torch.cat(entropies).view(token_ids.shape)) if with_entropy else logp


def completion_logprobs(policy, batch, reference=False, with_entropy=False):
    """Token log-probs of the batch's completions: (B*G, L) [, entropy (B*G, L)].
    The caller chooses grad (training pass) or no grad (rollout and reference passes)."""
    logits = policy.completion_logits(batch.features, batch.prompt_ids, batch.prompt_mask,
                                      batch.completion_ids, batch.completion_mask,
                                      group_size=batch.group_size, reference=reference)
    return token_logprobs(logits, batch.completion_ids, with_entropy, temperature=batch.temperature)


# ----------------------------------------------------------------------------- the shared [video, prompt] prefix

def positions(mask):
    """Position ids that skip left padding: (N, L) mask -> (N, L) long."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prefill(lm, embeds, mask, group_size, prefix_positions=None):
    """The [visual, prompt] prefix run once per prompt, its KV cache then repeated for the G completions (the
    same numbers as G runs of it). embeds: (B, P', D), mask: (B, P'); prefix_positions: (B, P') or (3, B, P')
    for M-RoPE, default `positions(mask)` -> (cache, last logits (B*G, 1, vocab))."""
    out = lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1, use_cache=True,
             position_ids=positions(mask) if prefix_positions is None else prefix_positions)
    out.cache.batch_repeat_interleave(group_size)
    return out.cache, out.logits.repeat_interleave(group_size, 0)


def sample_completions(lm, cache, logits, mask, seen, stop_ids, pad_id, max_new_tokens=8, step_positions=None,
                       greedy=False, generator=None, all_finished=None, **sampling):
    """The KV-cached decoding loop after the prefill, for all N = B*G rows at once. cache, logits: prefill's
    (logits (N, vocab): the first token's); mask: (N, P') of the prefix; seen: (N, S) token ids for the
    repetition penalty (-1: none); stop_ids: the ids that end a row; step_positions(step) -> the new token's
    position ids (default: `positions` of the mask; a policy with M-RoPE passes its own); sampling:
    sample_token's temperature, top_p, top_k, repetition_penalty; all_finished: done (N,) bool -> stop?
    (default: every row has stopped; sharded processes pass configurator.all_finished, agreed by all).
    -> completion_ids (N, L) (pad after a stop), completion_mask (N, L) (1 up to and including the stop),
    truncated (N,) bool (no stop within max_new_tokens)."""
    all_finished = all_finished or (lambda done: bool(done.all()))
    stops = torch.tensor(sorted(set(stop_ids)), device=logits.device)
    tokens, keep, done = [], [], torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
    for step in range(max_new_tokens):
        next_token = sample_token(logits.float(), greedy=greedy, generator=generator, seen=seen, **sampling)
        next_token = torch.where(done, torch.full_like(next_token, pad_id), next_token)
        keep.append(~done)
        tokens.append(next_token)
        done, seen = done | torch.isin(next_token, stops), torch.cat([seen, next_token.unsqueeze(1)], 1)
        if all_finished(done):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = lm(input_ids=next_token.unsqueeze(1), attention_mask=mask, cache=cache, use_cache=True,
                 position_ids=positions(mask)[:, -1:] if step_positions is None else step_positions(step))
        cache, logits = out.cache, out.logits[:, -1]
    return torch.stack(tokens, 1), torch.stack(keep, 1).long(), ~done


class RecordOnceLayer(DynamicLayer):
    """The prefix pass's cache layer. Under gradient checkpointing a decoder layer runs twice, in the forward
    and again in the backward's replay; a plain cache would append the replay's keys to the forward's. Here
    the first call records its keys and values and every call gets back exactly what it passed: the replay
    computes what the forward did."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
        return key_states, value_states


class PrefixLayer(DynamicLayer):
    """The completions' cache layer: the recorded prefix keys and values, repeated for the G completions of each
    prompt (gradients flow back through the repeat), read and never extended, so a replay sees the same prefix."""

    def __init__(self, keys, values):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)


@contextlib.contextmanager
def checkpointed_with_cache(lm):
    """Let checkpointed decoder layers keep the cache passed to them (transformers drops it, because a replay
    would extend a plain cache twice; the two layers above replay safely)."""
    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


def shared_prefix_logits(lm, embeds, mask, completion_ids, completion_mask, group_size, prefix_positions=None,
                         completion_positions=None):
    """Logits predicting each completion token, the prefix run once per prompt: the prefill records its keys
    and values, the G completions of each prompt attend to them repeated (gradients flow through the repeat),
    with or without gradient checkpointing. The same numbers as the full pass of each row.
    embeds: (B, P', D) and mask: (B, P') of the [visual, prompt] prefix; completion_*: (B*G, L) -> (B*G, L, vocab).
    prefix_positions (B, P') and completion_positions (B*G, L), or (3, ...) for M-RoPE: the default counts the
    unpadded tokens (`positions`); a policy with positions of its own (Qwen2.5-VL) passes them."""
    with checkpointed_with_cache(lm):
        recorded = Cache(layer_class_to_replicate=RecordOnceLayer)
        first = lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1, cache=recorded, use_cache=False,
                   position_ids=positions(mask) if prefix_positions is None else prefix_positions
                   ).logits.repeat_interleave(group_size, 0)                                    # predicts token 0
        if completion_ids.shape[1] == 1:
            return first
        cache = Cache(layers=[PrefixLayer(layer.keys.repeat_interleave(group_size, 0),
                                          layer.values.repeat_interleave(group_size, 0)) for layer in recorded.layers])
        full_mask = torch.cat([mask.repeat_interleave(group_size, 0), completion_mask.to(mask.dtype)], 1)
        rest_positions = (positions(full_mask)[:, mask.shape[1]:-1] if completion_positions is None
                          else completion_positions[..., :-1])
        rest = lm(input_ids=completion_ids[:, :-1], attention_mask=full_mask[:, :-1], position_ids=rest_positions,
                  cache=cache, use_cache=False)
    return torch.cat([first, rest.logits], 1)


def tie_identical(seq_logp, completion_ids, completion_mask):
    """Identical responses in a group must get the same l_i (so the same predicted rank and the
    same advantage); batched float arithmetic need not guarantee it bit for bit, so copy the
    first occurrence's value. seq_logp: (B, G); completion_*: (B*G, L) -> (B, G)."""
    tied = seq_logp.clone()
    batch, group_size = seq_logp.shape
    ids = (completion_ids * completion_mask).view(batch, group_size, -1).tolist()
    for b in range(batch):
        first = {}
        for i, seq in enumerate(ids[b]):
            j = first.setdefault(tuple(seq), i)
            tied[b, i] = tied[b, j]
    return tied


@torch.no_grad()
def rollout(policy, samples, frames, group_size, max_new_tokens=8, mask_truncated_completions=False, generator=None,
            all_finished=None, **sampling):
    """Sample G responses for each of B prompts (Algorithm 1 line 6) and score them (line 8).
    samples: B dataset rows; frames: uint8 (B, T, H, W, 3) -> Rollout. sampling: temperature, top_p,
    top_k, repetition_penalty (sample_token); all_finished: see VideoLM.generate."""
    temperature = sampling.get("temperature", 1.0)
    was_training = policy.training
    policy.eval()                                     # no dropout while sampling and scoring
    features = policy.encode_video(frames, seconds=[s.get("seconds") for s in samples])   # once per prompt
    prompt_ids, prompt_mask = policy.encode_prompts(samples)
    completion_ids, completion_mask, truncated = policy.generate(
        features, prompt_ids, prompt_mask, group_size=group_size, max_new_tokens=max_new_tokens,
        generator=generator, all_finished=all_finished, **sampling)
    loss_mask = completion_mask.clone()
    if mask_truncated_completions:                    # a cut-off answer is not evidence either way
        loss_mask[truncated] = 0
    logits = policy.completion_logits(features, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                      group_size=group_size)
    old_logp, entropy = token_logprobs(logits, completion_ids, with_entropy=True, temperature=temperature)
    seq_logp = (old_logp * completion_mask).sum(-1).view(len(samples), group_size)
    texts = policy.decode(completion_ids, completion_mask)
    policy.train(was_training)
    return Rollout(samples, group_size, features, prompt_ids, prompt_mask, completion_ids, completion_mask,
                   loss_mask, truncated, old_logp, entropy, tie_identical(seq_logp, completion_ids, completion_mask),
                   [texts[b * group_size:(b + 1) * group_size] for b in range(len(samples))], temperature)
