"""Greedy, batched generation with the KV cache."""

from __future__ import annotations

import torch

from .model import KVCache, Qwen2ForCausalLM


def cache_dtype(model: Qwen2ForCausalLM, device: torch.device | None = None) -> torch.dtype:
    """fp32 (fp64 for an fp64 model) on every device, under bf16 autocast too: the bf16 keys
    and values are stored exactly, and each decoding step's attention reads them in fp32
    (qwen_min.model.grouped_attention): more precise, and on CPU faster than bf16."""
    return torch.promote_types(model.lm_head.weight.dtype, torch.float32)


@torch.no_grad()
def generate(
    model: Qwen2ForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    cache: KVCache | None = None,
    prefill_rows: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of `max_new_tokens` tokens for a left-padded batch.

    input_ids, attention_mask: (B, T), padding on the left with mask 0.
    Returns (tokens (B, N), logits (B, N, V) in fp32): logits[:, i] is the distribution that
    tokens[:, i] was taken from. N = max_new_tokens, unless `eos_token_id` is given and every
    row has produced it (rows that finished earlier are filled with eos from then on).
    `cache`: an empty KVCache of your own with room for T + N positions, to reuse afterwards
    (evaluate.py rewinds it to the prompt and runs the true continuation through it).
    The prompt runs `prefill_rows` rows at a time: the same work, but on CPU the activations
    of a few rows stay in cache (a batch of 32 prefills ~15% faster in rows of 4).
    """
    if max_new_tokens < 1 or prefill_rows < 1:
        raise ValueError(f"max_new_tokens and prefill_rows must be ≥ 1, got {max_new_tokens} "
                         f"and {prefill_rows}")
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.new_ones(B, T + max_new_tokens)
    mask[:, :T] = attention_mask
    if cache is None:
        cache = KVCache(model.cfg, B, T + max_new_tokens, cache_dtype(model, device), device)
    elif cache.length != 0:
        raise ValueError(f"generate needs an empty KV cache, this one holds {cache.length}")
    tokens = input_ids.new_zeros(B, max_new_tokens)
    logits = torch.empty(B, max_new_tokens, model.cfg.vocab_size, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    for i in range(max_new_tokens):
        if i == 0:  # prefill: the whole prompt, logits of its last position only
            rows = [slice(r, r + prefill_rows) for r in range(0, B, prefill_rows)]
            step_logits = torch.cat(
                [model(input_ids[r], mask[r, :T], cache.rows(r), last_only=True) for r in rows]
            )[:, -1]  # (B, V)
            cache.length = T
        else:  # decode: one token against the cache
            last = tokens[:, i - 1 : i]  # (B, 1)
            step_logits = model(last, mask[:, : T + i], cache, last_only=True)[:, -1]
        logits[:, i] = step_logits.float()
        next_token = step_logits.argmax(-1)  # (B,)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(done, eos_token_id)
            done |= next_token == eos_token_id
        tokens[:, i] = next_token
        if eos_token_id is not None and bool(done.all()):
            break
    return tokens[:, : i + 1], logits[:, : i + 1]
