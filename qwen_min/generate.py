"""Batched generation with the KV cache: greedy or sampled, free or held to the LLMTIME grammar.

`greedy_generate`, first, is the whole idea and reads alone: prefill the left-padded prompts
once, filling the cache, then one token per row and step against it. `generate` is the same
loop (tests/test_generate.py: the same tokens) with the extras, each in its own section below:
a grammar mask, rows that finish (eos, or their n_steps-th ';') and write eos from then on,
sampling (`SamplingOptions`; N rows per prompt), the prefill in row parts, the compiled
decode step, and the argument checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .compiled import CompiledDecodeStep
from .counting import add_flops
from .fast import OneRowMatmuls
from .grammar import QWEN2_SEMICOLON_ID, GrammarTables, LLMTimeGrammar
from .model import KVCache, Qwen2ForCausalLM


@torch.no_grad()
def greedy_generate(model: Qwen2ForCausalLM, ids: torch.Tensor, mask: torch.Tensor,
                    n: int) -> torch.Tensor:
    """n tokens (B, n) after each prompt of ids (B, T), each the most likely one, left-padded
    where mask (B, T) is 0. For two prompts, "1,0," (4 tokens) and "0," (2, after 2 pads):

    >>> ids = torch.tensor([[16, 11, 15, 11], [0, 0, 15, 11]])
    >>> mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    >>> greedy_generate(model, ids, mask, 3)  # a tiny random model's (tests/test_generate.py)
    tensor([[379, 379, 163],
            [295, 454, 218]])
    """
    B, T = ids.shape
    cache = KVCache(model.cfg, B, T + n, cache_dtype(model), ids.device)  # room for T + n
    mask = torch.cat([mask, mask.new_ones(B, n)], dim=1)  # (B, T + n): new tokens are real
    logits = model(ids, mask[:, :T], cache, last_only=True)  # prefill (B, 1, V); cache holds T
    tokens = [logits[:, -1].argmax(-1)]  # (B,)
    for i in range(1, n):  # feed token i − 1: it attends to the T + i positions up to itself
        logits = model(tokens[-1][:, None], mask[:, : T + i], cache, last_only=True)  # (B, 1, V)
        tokens.append(logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)  # (B, n)


QWEN2_EOS_ID = 151643  # <|endoftext|>, Qwen2's padding token (data.PAD_ID): the default fill


def cache_dtype(model: Qwen2ForCausalLM, device: torch.device | None = None) -> torch.dtype:
    """fp32 (fp64 for an fp64 model) on every device, under bf16 autocast too: bf16 keys and
    values are stored exactly, and on CPU fp32 attention is faster than bf16."""
    return torch.promote_types(model.lm_head.weight.dtype, torch.float32)


# ----------------------------------------------------------------------------- generate


def prefill(model: Qwen2ForCausalLM, input_ids: torch.Tensor, mask: torch.Tensor,
            cache: KVCache, prefill_rows: int) -> torch.Tensor:
    """The whole prompt into `cache`; (B, V) last-position logits. With prefill_rows < B,
    that many rows at a time (see "prefill in row parts"): the same work."""
    if prefill_rows < input_ids.shape[0]:
        return prefill_in_parts(model, input_ids, mask, cache, prefill_rows)
    return model(input_ids, mask, cache, last_only=True)[:, -1]  # (B, 1, V) → (B, V)


def decode_step(model: Qwen2ForCausalLM, last: torch.Tensor, mask: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
    """One token per row (R,) against the cache; mask (R, S) covers cache + this token → (R, V).
    At batch 1 on CPU the products take a faster kernel (fast.OneRowMatmuls)."""
    with OneRowMatmuls(len(last), last.device):
        logits = model(last[:, None], mask, cache, last_only=True)  # (R, 1) → (R, 1, V)
    return logits[:, -1]  # (R, V)


@torch.no_grad()
def generate(
    model: Qwen2ForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    cache: KVCache | None = None,
    prefill_rows: int | None = None,
    *,
    grammar: LLMTimeGrammar | None = None,
    n_steps: int | None = None,
    sampling: SamplingOptions | None = None,
    return_logits: bool = True,
    compiled_decode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode up to `max_new_tokens` tokens for a left-padded batch of B prompts.

    input_ids, attention_mask: (B, T), padding on the left with mask 0.
    sampling: None (or samples 0): greedy, R = B rows; else N = sampling.samples sampled
    continuations per prompt, R = B·N rows, row b·N + s = sample s of prompt b.
    grammar: only tokens that LLMTimeGrammar allows are chosen (a mask; the logits stay raw).
    n_steps: a row finishes with its n_steps-th ';'. eos_token_id: a row finishes when it writes
    it. A finished row writes eos_token_id (with n_steps and no eos: Qwen2's <|endoftext|>) from
    then on; the loop stops when every row has finished, or after max_new_tokens steps
    (pass grammar.max_new_tokens(n_steps): the longest forecast the grammar allows).
    Returns (tokens (R, n), logits (R, n, V) fp32 or None without `return_logits`), n ≤
    max_new_tokens the steps run; logits[:, i] is what tokens[:, i] was chosen from.
    `cache`: an empty KVCache of your own for the B prompts with room for T + max_new_tokens,
    to reuse afterwards: it then holds the prompts in positions [0, T) (evaluate.py rewinds it
    to T and runs the true continuation); samples decode in a cache of their own.
    prefill_rows: prompts per prefill call; default all B on CUDA (one batch), 4 elsewhere.
    compiled_decode: each decoding step as one compiled graph (see "compiled decoding").
    """
    B, T = input_ids.shape
    device = input_ids.device
    if prefill_rows is None:  # on CPU, a few rows at a time stay in the caches
        prefill_rows = B if device.type == "cuda" else 4
    check_arguments(B, max_new_tokens, prefill_rows, n_steps, sampling)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.new_ones(B, T + max_new_tokens)  # the new tokens are all real
    mask[:, :T] = attention_mask
    if cache is None:
        cache = KVCache(model.cfg, B, T + max_new_tokens, cache_dtype(model, device), device)
    elif cache.length != 0:
        raise ValueError(f"generate needs an empty KV cache, this one holds {cache.length}")

    step_logits = prefill(model, input_ids, mask[:, :T], cache, prefill_rows)  # (B, V)
    tables = grammar.tables(step_logits.shape[1], device) if grammar is not None else None
    choose = greedy
    if sampling is not None and sampling.samples:  # N rows per prompt from here on
        cache, mask, step_logits, choose = for_samples(sampling, model, cache, mask,
                                                       step_logits, tables)
    step = decoder(model, cache, mask, compiled_decode)
    R, V = step_logits.shape
    state = tables.start(R) if tables is not None else None
    fill = QWEN2_EOS_ID if eos_token_id is None else eos_token_id
    semicolon = grammar.semicolon_id if grammar is not None else QWEN2_SEMICOLON_ID
    tokens = input_ids.new_zeros(R, max_new_tokens)
    logits = torch.empty(R, max_new_tokens, V, device=device) if return_logits else None
    done = torch.zeros(R, dtype=torch.bool, device=device)
    steps_written = torch.zeros(R, dtype=torch.long, device=device)  # the ';' each row wrote
    fed = None

    for i in range(max_new_tokens):
        if i > 0:
            step_logits = step(fed, i)  # (R, V): decode_step, or its compiled equal
        raw = step_logits.float()
        if logits is not None:
            logits[:, i] = raw
        scores = tables.mask(raw, state) if tables is not None else raw
        next_token = choose(scores, i)  # (R,)
        if tables is not None:
            state = torch.where(done, state, tables.advance(state, next_token))
        tokens[:, i] = next_token.masked_fill(done, fill)
        # a finished row keeps feeding the token it finished with (the model's own, so in its
        # vocabulary even when the fill is not); its outputs are never used
        fed = next_token if fed is None else torch.where(done, fed, next_token)
        steps_written += next_token == semicolon
        done |= finished(next_token, steps_written, eos_token_id, n_steps)
        if (eos_token_id is not None or n_steps is not None) and bool(done.all()):
            break
    n = i + 1
    return tokens[:, :n], (logits[:, :n] if logits is not None else None)


def greedy(scores: torch.Tensor, step: int) -> torch.Tensor:
    """(R,) the most likely token of each row: a selection, 0 FLOPs."""
    return scores.argmax(-1)


def finished(next_token: torch.Tensor, steps_written: torch.Tensor, eos_token_id: int | None,
             n_steps: int | None) -> torch.Tensor:
    """(R,) rows that finish with this token: it is eos, or it completed their n_steps-th step
    (steps_written (R,) counts the ';' written so far, this token included)."""
    now = torch.zeros_like(next_token, dtype=torch.bool)
    if eos_token_id is not None:
        now |= next_token == eos_token_id
    if n_steps is not None:
        now |= steps_written >= n_steps
    return now


# ----------------------------------------------------------------------------- sampling
#
# Sampling draws its noise from an integer hash of (seed, sample, step, token) rather than from
# a torch generator: sample s of a prompt sees the same noise in any batch, on any device, so
# batched runs equal unbatched ones and seeded runs reproduce exactly.


@dataclass(frozen=True)
class SamplingOptions:
    """N = `samples` sampled continuations per prompt (0: greedy), from softmax(logits /
    temperature) cut to its top-p nucleus. seeds (B,) int64 fixes each prompt's samples;
    None draws them from torch's global generator (torch.manual_seed makes that reproducible)."""

    samples: int
    temperature: float = 1.0
    top_p: float = 1.0
    seeds: torch.Tensor | None = None


def for_samples(sampling: SamplingOptions, model: Qwen2ForCausalLM, cache: KVCache,
                mask: torch.Tensor, step_logits: torch.Tensor, tables: GrammarTables | None):
    """The decoding state of B prompts repeated as B·N rows (row b·N + s = sample s of prompt
    b): their own cache, mask and first logits, and the Sampler's `choose`."""
    n, B = sampling.samples, step_logits.shape[0]
    seeds = sampling.seeds if sampling.seeds is not None else torch.randint(0, 2**31 - 1, (B,))
    token_ids = tables.token_ids if tables is not None else None
    sampler = Sampler.for_prompts(seeds.to(step_logits.device), n, token_ids,
                                  sampling.temperature, sampling.top_p)
    return (expand_cache(cache, model, n), mask.repeat_interleave(n, 0),
            step_logits.repeat_interleave(n, 0), sampler.choose)


def expand_cache(cache: KVCache, model: Qwen2ForCausalLM, n: int) -> KVCache:
    """A new cache of B·n rows (row b·n + s = prompt b) holding `cache`'s filled positions:
    the prompt's keys and values are copied, not recomputed."""
    k = cache.k[:, :, :, : cache.length]  # (layers, B, n_kv, T, hd)
    rows, room = k.shape[1] * n, cache.k.shape[3]
    out = KVCache(model.cfg, rows, room, cache.k.dtype, cache.k.device)
    out.k[:, :, :, : cache.length] = k.repeat_interleave(n, dim=1)  # (layers, B·n, n_kv, T, hd)
    out.v[:, :, :, : cache.length] = cache.v[:, :, :, : cache.length].repeat_interleave(n, dim=1)
    out.advance(cache.length)
    return out


MASK32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of 32-bit values held in int64 (xorshift-multiply rounds, as in Chris
    Wellons' lowbias32). The multipliers are < 2³¹, so no int64 product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & MASK32
    return x ^ (x >> 16)


def stream_keys(seeds: torch.Tensor, sample: torch.Tensor, step: int) -> torch.Tensor:
    """(R,) keys of the noise streams: a function of (seed, sample, step) only."""
    key = mix32(mix32(seeds & MASK32) ^ ((seeds >> 32) & MASK32))
    return mix32(mix32(key ^ sample) ^ step)


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(R, C) fp32 Gumbel(0, 1) noise, −log(−log u), u from the hash of (key, token id): a
    token's noise is the same whichever other tokens are drawn from."""
    bits = mix32(mix32(keys[:, None] ^ token_ids))  # (R, C), 32 random bits each
    # per element: + 0.5 and × 2⁻²³ (2), log (10), negate (1), log (10), negate (1) = 24.
    # 23 bits keep u in (0, 1) exactly in fp32: never 0 or 1, so both logs are finite
    add_flops("sample_noise", 24 * bits.numel())
    u = ((bits >> 9).float() + 0.5) * 2.0**-23
    return -torch.log(-torch.log(u))


def nucleus(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """z (R, V) with −inf outside each row's top-p nucleus: the most likely tokens whose mass
    before them is < top_p (so the most likely token always stays)."""
    R, V = z.shape
    # softmax: V exp (10 each) + V−1 adds + V divides = 12V − 1 per row (as in attention);
    # cumsum V − 1 adds, then V subtracts for the mass before each token; sorting compares only
    add_flops("sample_top_p", R * (12 * V - 1) + R * (V - 1) + R * V)
    probs = z.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)  # (R, V) each
    drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to token order
    return z.masked_fill(drop, float("-inf"))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (R, V) with −inf below each row's k-th largest (ties with it stay, as in
    transformers' TopKLogitsWarper); k ≤ 0 or ≥ V keeps every token. Compares only: 0 FLOPs."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = scores.topk(k, dim=-1).values[:, -1:]  # (R, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019), as in transformers: the logit of every token in
    `seen` (R, n) ids (prompt and output so far; repeats count once) is divided by `penalty`
    when positive, multiplied when negative, so > 1 makes repeating less likely."""
    if penalty == 1.0:
        return scores
    add_flops("sample_repetition_penalty", seen.numel())  # one multiply or divide per seen id
    logit = scores.gather(-1, seen)  # (R, n)
    logit = torch.where(logit < 0, logit * penalty, logit / penalty)
    return scores.scatter(-1, seen, logit)


def sample_tokens(scores: torch.Tensor, keys: torch.Tensor, token_ids: torch.Tensor,
                  temperature: float, top_p: float) -> torch.Tensor:
    """Gumbel-max: argmax(z + g), g ~ Gumbel(0, 1), draws from softmax(z), z = scores / T.

    scores (R, C) are the logits of the tokens `token_ids` (C,); returns (R,) token ids."""
    R, V = scores.shape
    add_flops("sample_temperature", 2 * R * V)  # minus the row's max, then divide: 2 per logit
    # why the shift: scores / 1e-45 overflows fp32 to ±inf, and an argmax among tied infinities
    # can return a token the grammar forbids. Shifted, a row's softmax is the same, its largest
    # score is exactly 0 at any T (T → 0 draws greedy's token, T → ∞ uniformly among the allowed
    # ones); T is held in the dtype's finite normal range (in fp32 1e-46 is 0 and 1e45 is inf)
    finite = torch.finfo(scores.dtype)
    z = (scores - scores.amax(-1, keepdim=True)) / min(max(temperature, finite.tiny), finite.max)
    if top_p < 1.0:
        z = nucleus(z, top_p)
    g = gumbel_noise(keys, token_ids)
    add_flops("sample_gumbel_add", R * V)  # z + g; the argmax compares only
    return token_ids[(z + g).argmax(-1)]


@dataclass(frozen=True)
class Sampler:
    """Where each of the R = B·N rows draws from: sample `sample[r]` of seed `seeds[r]`, over
    `token_ids` only (C,): under a grammar its 13 tokens, the others have probability 0 anyway;
    the same draws as over all V tokens (tests/test_generate.py), at a 10⁴th of the work."""

    seeds: torch.Tensor  # (R,) int64: the prompt's seed, N times
    sample: torch.Tensor  # (R,) int64: 0 … N−1, for each prompt
    token_ids: torch.Tensor | None  # (C,) the only tokens that can be drawn; None: all V
    temperature: float
    top_p: float

    @classmethod
    def for_prompts(cls, seeds: torch.Tensor, n: int, token_ids: torch.Tensor | None,
                    temperature: float, top_p: float) -> Sampler:
        """n samples of each prompt; seeds (B,), one per prompt, on the device of token_ids."""
        device = seeds.device if token_ids is None else token_ids.device
        return cls(seeds.to(device=device, dtype=torch.long).repeat_interleave(n),
                   torch.arange(n, device=device).repeat(len(seeds)), token_ids, temperature,
                   top_p)

    def choose(self, scores: torch.Tensor, step: int) -> torch.Tensor:
        """(R,) tokens drawn from scores (R, V) at decoding step `step`."""
        keys, ids = stream_keys(self.seeds, self.sample, step), self.token_ids
        if ids is None:
            ids = torch.arange(scores.shape[1], device=scores.device)
        else:
            scores = scores[:, ids]  # (R, V) → (R, C)
        return sample_tokens(scores, keys, ids, self.temperature, self.top_p)


# ----------------------------------------------------------------------------- prefill in row parts


def prefill_in_parts(model: Qwen2ForCausalLM, input_ids: torch.Tensor, mask: torch.Tensor,
                     cache: KVCache, rows: int) -> torch.Tensor:
    """prefill, `rows` rows at a time. Why parts: the same work, but on CPU the activations of
    a few rows stay in cache (a batch of 32 prefills ~15% faster in parts of 4)."""
    B, T = input_ids.shape
    parts = [slice(r, r + rows) for r in range(0, B, rows)]
    logits = torch.cat(
        [model(input_ids[r], mask[r], CacheRows(cache, r), last_only=True) for r in parts]
    )[:, -1]  # (B, 1, V) → (B, V)
    cache.advance(T)  # the parts wrote the T positions of their rows: the cache holds them all
    return logits


class CacheRows:
    """Batch rows `rows` of a KVCache, for a forward pass over those rows only: what it writes
    lands in the cache, its `length` is the cache's, and its `advance` does nothing, so that
    `prefill_in_parts` advances the cache once, after the last part."""

    update = KVCache.update  # writes after `length` into this view's k and v

    def __init__(self, cache: KVCache, rows: slice):
        self.cache, self.k, self.v = cache, cache.k[:, rows], cache.v[:, rows]

    @property
    def length(self) -> int:
        return self.cache.length

    def advance(self, n: int) -> None:
        pass


# ----------------------------------------------------------------------------- compiled decoding


def decoder(model: Qwen2ForCausalLM, cache: KVCache, mask: torch.Tensor,
            compiled: bool) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`step(fed (R,), i)` → (R, V), the logits of decoding step i ≥ 1 after the prefill of T =
    cache.length tokens; mask (R, T + max_new_tokens). Eager: decode_step.

    Compiled: one CompiledDecodeStep over the whole cache (qwen_min.compiled; CUDA graphs on
    CUDA), the same tokens and the same FLOP count; its mask covers every cache slot (those
    after T + max_new_tokens: 0, unused). Its first call compiles (≈ 25 s for a tiny model on
    CPU; a second shape once more, as dynamic, then no more): worth it on a GPU."""
    T = cache.length
    if not compiled:
        return lambda fed, i: decode_step(model, fed, mask[:, : T + i], cache)
    step = CompiledDecodeStep(model, cache)
    slots = mask.new_zeros(mask.shape[0], cache.k.shape[3])  # (R, room)
    slots[:, : mask.shape[1]] = mask
    return lambda fed, i: step(fed[:, None], slots)


# ----------------------------------------------------------------------------- argument checks


def check_arguments(B: int, max_new_tokens: int, prefill_rows: int, n_steps: int | None,
                    sampling: SamplingOptions | None) -> None:
    """A ValueError that names the argument, what was expected and what it got."""
    if max_new_tokens < 1 or prefill_rows < 1:
        raise ValueError(f"max_new_tokens and prefill_rows must be ≥ 1, got {max_new_tokens} "
                         f"and {prefill_rows}")
    if n_steps is not None and n_steps < 1:
        raise ValueError(f"n_steps must be ≥ 1 (or None), got {n_steps}")
    if sampling is None:
        return
    samples, seeds = sampling.samples, sampling.seeds
    if samples < 0:
        raise ValueError(f"samples must be ≥ 0 (0 = greedy), got {samples}")
    if samples and not sampling.temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {sampling.temperature}")
    if samples and not 0 < sampling.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}")
    if seeds is not None and tuple(seeds.shape) != (B,):
        raise ValueError(f"seeds must have shape ({B},), one per prompt, got "
                         f"{tuple(seeds.shape)}")
