"""Qwen2, the architecture of Qwen2.5-0.5B-Instruct, in one file and in reading order:

    config → FLOP hooks and Linear → RMSNorm → RoPE → masks → attention → MLP → block
    → model → LM head and loss → KV cache → LoRA

It matches transformers' `Qwen2ForCausalLM` (modeling_qwen2.py) logit for logit: the module
names below are the checkpoint keys (`model.layers.3.self_attn.q_proj.weight`, ...), so a
Hugging Face safetensors file loads with no key map (see qwen_min/loading.py).

Two things ride along with the architecture:
  * FLOP hooks: every operation adds its cost, by the coursework's rules, to the active
    `count_flops()` counter, with the rule written next to the op. Costs: add/sub/neg/mul/div 1,
    exp/log/sqrt 10, and an (m×n)(n×p) matrix product m·p·(2n−1). flops.py is the closed form
    of the same rules, and tests/test_flops.py proves the two agree exactly.
  * LoRA (`LoRALinear`, last in the file): `lora.apply_lora` swaps it in for q_proj and v_proj.

docs/reading-guide.md traces one forward pass through this file with Qwen2.5-0.5B's shapes.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused_loss import ChunkedLinearCrossEntropy

# ----------------------------------------------------------------------------- config


class ConfigError(ValueError):
    """config.json asks for something this implementation does not do."""


@dataclass(frozen=True)
class Qwen2Config:
    """The fields of a Qwen2 config.json that the architecture needs (defaults: Qwen2.5-0.5B)."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    torch_dtype: str = "bfloat16"

    @property
    def head_dim(self) -> int:  # 896 / 14 = 64
        return self.hidden_size // self.num_attention_heads

    @property
    def n_rep(self) -> int:  # query heads that share one KV head: 14 / 2 = 7
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> Qwen2Config:
        """Read both config.json forms: the official one (top-level `rope_theta`,
        `torch_dtype`) and transformers ≥ 5 (`rope_parameters`, `dtype`, `layer_types`)."""

        def reject(field: str, why: str):
            raise ConfigError(f"{source}: {field}: {why}; qwen-min implements plain Qwen2 only")

        if d.get("model_type") != "qwen2":
            reject("model_type", f"expected 'qwen2', got {d.get('model_type')!r}")
        if d.get("use_sliding_window"):
            reject("use_sliding_window", "sliding-window attention is not supported")
        if any(t != "full_attention" for t in d.get("layer_types") or []):
            reject("layer_types", f"expected only 'full_attention', got {d['layer_types']}")
        if d.get("hidden_act", "silu") != "silu":
            reject("hidden_act", f"expected 'silu', got {d['hidden_act']!r}")
        if d.get("attention_dropout", 0.0):
            reject("attention_dropout", f"expected 0.0, got {d['attention_dropout']}")
        rope = dict(d.get("rope_parameters") or {})
        rope.update(d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            reject("rope_scaling", f"rope type {rope_type!r} is not implemented (only 'default')")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        kw["torch_dtype"] = d.get("dtype") or d.get("torch_dtype") or "float32"
        cfg = cls(**kw)
        if cfg.hidden_size % cfg.num_attention_heads or cfg.n_rep * cfg.num_key_value_heads != (
            cfg.num_attention_heads
        ):
            reject("num_attention_heads", "must divide hidden_size and be a multiple of KV heads")
        if d.get("head_dim") not in (None, cfg.head_dim):
            reject("head_dim", f"expected hidden_size/num_attention_heads = {cfg.head_dim}")
        return cfg


# ----------------------------------------------------------------------------- FLOP hooks


class FlopCounter(Counter):
    """FLOPs per operation name, plus Σ m·p over the matrix products (the exact difference
    between our m·p·(2n−1) and the 2·m·n·p of torch.utils.flop_counter)."""

    matmul_outputs: int = 0

    @property
    def total(self) -> int:
        return sum(self.values())


_counter: FlopCounter | None = None


@contextmanager
def count_flops() -> Iterator[FlopCounter]:
    """`with count_flops() as c: model(x)` → c["q_proj"], c.total, ... (forward pass only)."""
    global _counter
    outer, _counter = _counter, FlopCounter()
    try:
        yield _counter
    finally:
        _counter = outer


@contextmanager
def paused_counting() -> Iterator[FlopCounter | None]:
    """Set the active counter (or None) aside, and yield it: for code whose FLOPs are counted
    outside the hooks, e.g. a compiled graph (qwen_min/compiled.py), where dynamo would trace
    the hooks' updates of the counter and recompile at every call."""
    global _counter
    outer, _counter = _counter, None
    try:
        yield outer
    finally:
        _counter = outer


def add_flops(name: str, n: int) -> None:
    """The hook. With no counter active it is one global read: nothing measurable."""
    if _counter is not None:
        _counter[name] += int(n)


def add_matmul_flops(name: str, batch: int, m: int, n: int, p: int) -> None:
    # `batch` independent (m×n)(n×p) products: m·p dot products of n multiplies and n−1 adds
    if _counter is not None:
        _counter[name] += batch * m * p * (2 * n - 1)
        _counter.matmul_outputs += batch * m * p


class Linear(nn.Linear):
    """y = x Wᵀ (+ b). Every matrix product of the model with a weight goes through here, so
    it is counted here, under the projection's name ("q_proj", "lm_head", ...)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, flop_name: str):
        super().__init__(d_in, d_out, bias=bias)
        self.flop_name = flop_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        # (rows×d_in)(d_in×d_out): rows·d_out·(2·d_in − 1)
        add_matmul_flops(self.flop_name, 1, rows, self.in_features, self.out_features)
        if self.bias is not None:
            add_flops(self.flop_name + ".bias", rows * self.out_features)  # one add per output
        return F.linear(x, self.weight, self.bias)


# ----------------------------------------------------------------------------- RMSNorm


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w, computed in fp32 and cast back (as transformers)."""

    def __init__(self, dim: int, eps: float, flop_name: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.flop_name = eps, flop_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        # per row: d squares + (d−1) adds + 1 divide (mean) + 1 add (eps) + 10 sqrt + 1 inverse
        #          + d multiplies (x · 1/rms) + d multiplies (· w)  =  4d + 12
        add_flops(self.flop_name, (x.numel() // d) * (4 * d + 12))
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


# ----------------------------------------------------------------------------- RoPE


def rope_cos_sin(
    cfg: Qwen2Config, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, T, head_dim) for rotary position embedding, built in fp32.

    Pair i of a head rotates by angle pos · θ^(−2i/head_dim). Qwen uses the "rotate-half"
    layout: dimension i is paired with i + head_dim/2, not with its neighbour:

        x = [x1 | x2]  →  [x1·cos − x2·sin | x2·cos + x1·sin]  =  x·cos + [−x2 | x1]·sin

    Computing the tables is free by the coursework's rules; applying them is counted.
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = position_ids.float()[..., None] * inv_freq.to(position_ids.device)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, hd); cos/sin: (B, T, hd)."""
    # per element: 2 multiplies + 1 add; the rotate-half negates hd/2 of every hd
    add_flops("rope", x.numel() * 3 + x.numel() // 2)
    x1, x2 = x.chunk(2, dim=-1)  # (B, heads, T, hd/2) each
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, heads, T, hd)
    return x * cos[:, None] + rotated * sin[:, None]


# ----------------------------------------------------------------------------- masks
#
# The one place that defines masks. "mask" has three forms in this file:
#
#   1. attention_mask (B, S), from the caller: 1 = real token, 0 = padding (on the left), over
#      the S = cached + new positions. A batch without padding is passed as None: the model
#      never inspects the values to find that out, because a branch on tensor data breaks
#      torch.compile's graph (the caller decides, with `padding_mask_or_none`), and None lets
#      SDPA run its faster causal kernel.
#   2. mask (B, 1, T, S), boolean, built by `attention_mask_4d`: True where query t may attend
#      to key s. The 1 broadcasts over heads.
#   3. mask None inside the attention: causal with no padding, which is either a prefill
#      (T = S, query t sees keys 0..t) or one new query per row (T = 1, it sees every key).
#
# Positions come from form 1 too: a left-padded row's first real token is position 0.


def padding_mask_or_none(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """For callers, outside the model: None when no position is padding (form 1's None)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask


def attention_mask_4d(key_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Form 1 (B, S) → form 2 (B, 1, T, S), for the last T of the S positions as queries.

    Query i may see key j if j is at or before it and j is a real token. Every query also sees
    itself, so a padding query's row is not all −inf (a softmax of NaNs); its output is never
    used."""
    S = key_mask.shape[1]
    q_pos = torch.arange(S - T, S, device=key_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos) & key_mask.bool()[:, None, :]  # (B, T, S)
    return (allowed | (k_pos == q_pos))[:, None]  # (B, 1, T, S)


def positions_and_mask(
    attention_mask: torch.Tensor | None, B: int, T: int, past: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids (B, T) of the T new tokens after `past` cached ones, and the attention's
    mask: form 3 (None) where it suffices, else form 2."""
    if attention_mask is None:
        if past == 0 or T == 1:
            return torch.arange(past, past + T, device=device).expand(B, T), None
        # T > 1 new queries after cached keys: SDPA's is_causal would align the triangle at the
        # top left (query 0 ↔ key 0), so the causal pattern must be spelled out
        attention_mask = torch.ones(B, past + T, dtype=torch.long, device=device)
    # the position of a token = how many real tokens precede it
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
    return positions, attention_mask_4d(attention_mask, T)


# ----------------------------------------------------------------------------- attention
#
# Grouped-query attention (GQA): Qwen2.5-0.5B has 14 query heads but only 2 key/value heads.
# Each KV head serves 7 consecutive query heads:
#
#     query heads:  q0 q1 q2 q3 q4 q5 q6 | q7 q8 q9 q10 q11 q12 q13
#     KV heads:            k0, v0        |             k1, v1
#
# So the queries (B, 14, T, hd) regroup as (B, 2, 7·T, hd): group g stacks the T query rows
# of its 7 heads into one matrix, which multiplies k_g as it is; K and V are never copied.


def add_attention_flops(B: int, nh: int, T: int, S: int, hd: int) -> None:
    """Each of the B·nh query heads, over its full T×S score block (causally masked entries
    are computed too; the mask only selects, at no cost):
        scores   q·kᵀ      (T×hd)(hd×S)                      T·S·(2hd − 1)
        scale    / √hd     one divide per score              T·S
        softmax  per row of S scores: S exp (10 each) + (S−1) adds + S divides = 12S − 1
                 (subtracting the row max first is a numerical device: not counted)
        output   p·v       (T×S)(S×hd)                       T·hd·(2S − 1)"""
    add_matmul_flops("attn_scores", B * nh, T, hd, S)
    add_flops("attn_scale", B * nh * T * S)
    add_flops("attn_softmax", B * nh * T * (12 * S - 1))
    add_matmul_flops("attn_v", B * nh, T, S, hd)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q·kᵀ/√hd, masked)·v in plain ops: the reference, and the decoding path.

    q: (B, nh, T, hd); k, v: (B, n_kv, S, hd); mask: form 2 or 3 (see "masks" above).
    Runs in the precision of k and v: the KV cache's fp32 when decoding under bf16 autocast."""
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    rep = nh // nkv
    if mask is None and T > 1:  # form 3, a prefill: query t sees keys 0..t
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()[None, None]  # (1,1,T,S)
    with torch.autocast(q.device.type, enabled=False):  # autocast would round k, v to bf16
        qg = q.reshape(B, nkv, rep * T, hd).to(k.dtype)  # (B, n_kv, rep·T, hd): the regrouping
        scores = (qg @ k.transpose(-1, -2)) / math.sqrt(hd)  # (B, n_kv, rep·T, S)
        scores = scores.view(B, nkv, rep, T, S)  # (B, n_kv, rep, T, S)
        if mask is not None:  # mask[:, :, None]: (B, 1, 1, T, S), the same for every head
            scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        weights = scores.float().softmax(-1).to(v.dtype).view(B, nkv, rep * T, S)
        out = weights @ v  # (B, n_kv, rep·T, hd)
    return out.view(B, nh, T, hd).to(q.dtype)  # (B, nh, T, hd)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """The fast path for T > 1 (prefill, training): `attention` through torch's fused kernel,
    equal to it by tests/test_fast_paths.py. It computes in q's dtype, so an fp32 KV cache is
    cast down first. (With T = 1 and no mask, is_causal would hide all keys but the first.)"""
    k, v = k.to(q.dtype), v.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, mask, is_causal=mask is None, enable_gqa=True)


class Qwen2Attention(nn.Module):
    """q/k/v projections (with bias) → RoPE on q and k → KV cache → attention → o_proj."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        # LoRA enters here: lora.apply_lora replaces q_proj and v_proj (its default targets) by
        # LoRALinear (end of this file), which keeps this weight and adds (alpha/r)·x·Aᵀ·Bᵀ.
        # k_proj/v_proj run at their real width d → n_kv·hd (896 → 128) and are counted so
        self.q_proj = Linear(d, cfg.num_attention_heads * hd, bias=True, flop_name="q_proj")
        self.k_proj = Linear(d, cfg.num_key_value_heads * hd, bias=True, flop_name="k_proj")
        self.v_proj = Linear(d, cfg.num_key_value_heads * hd, bias=True, flop_name="v_proj")
        self.o_proj = Linear(cfg.num_attention_heads * hd, d, bias=False, flop_name="o_proj")
        self.use_sdpa = True  # False: `attention` for every T (FlopCounterMode sees its matmuls)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        cfg, (B, T, _) = self.cfg, x.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hd): the cached keys, then these T
        add_attention_flops(B, nh, T, k.shape[2], hd)
        if self.use_sdpa and T > 1:
            out = sdpa_attention(q, k, v, mask)
        else:  # one query per head (decoding): on CPU the plain ops beat SDPA's kernel
            out = attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, nh * hd))  # (B, T, d)


# ----------------------------------------------------------------------------- MLP


class Qwen2MLP(nn.Module):
    """SwiGLU: down( silu(gate(x)) ⊙ up(x) ), silu(z) = z · sigmoid(z) = z / (1 + e^(−z))."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, bias=False, flop_name="gate_proj")
        self.up_proj = Linear(d, f, bias=False, flop_name="up_proj")
        self.down_proj = Linear(f, d, bias=False, flop_name="down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)  # (B, T, f) each
        add_flops("swiglu", 14 * g.numel())  # silu: negate, exp (10), add, divide; then ⊙ u
        return self.down_proj(F.silu(g) * u)


# ----------------------------------------------------------------------------- block


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "rmsnorm")
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "rmsnorm")
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer: int) -> torch.Tensor:
        add_flops("residual", 2 * x.numel())  # the two residual adds below
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


# ----------------------------------------------------------------------------- model


class Qwen2Model(nn.Module):
    """Token ids → embedding → the decoder layers → final RMSNorm."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "final_norm")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) → final-normed hidden states (B, T, d).

        attention_mask: form 1 (see "masks"), over the cached tokens plus these T; None for a
        batch without padding. No branch here looks at tensor values (torch.compile)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        positions, mask = positions_and_mask(attention_mask, B, T, past, input_ids.device)
        x = self.embed_tokens(input_ids)  # (B, T, d): a table lookup, no arithmetic to count
        cos, sin = rope_cos_sin(self.cfg, positions, x.dtype)  # (B, T, hd) each
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        return self.norm(x)


# ----------------------------------------------------------------------------- head and loss


class Qwen2ForCausalLM(nn.Module):
    """`model(input_ids, attention_mask)` → logits (B, T, vocab); `model.loss(...)` to train."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, flop_name="lm_head")
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share one Parameter between the embedding and the LM head (no copy)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attention(self, impl: str) -> None:
        """'sdpa' (fast, default) or 'eager' (`attention` always, for torch's FlopCounterMode)."""
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"attention impl must be 'sdpa' or 'eager', got {impl!r}")
        for layer in self.model.layers:
            layer.self_attn.use_sdpa = impl == "sdpa"

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, d), before the head (see Qwen2Model.forward)."""
        return self.model(input_ids, attention_mask, cache)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) for the last position only (generation)."""
        h = self.model(input_ids, attention_mask, cache)
        return self.lm_head(h[:, -1:] if last_only else h)

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy; labels (B, T) are the input ids with −100 where no loss
        is taken. Position t predicts label t+1, as in transformers: the last position predicts
        nothing, so the head never runs (and is not counted) there.
        attention_mask: None for a batch without padding (see "masks")."""
        h = self.model(input_ids, attention_mask)  # (B, T, d)
        return linear_cross_entropy(h[:, :-1], self.lm_head, labels[:, 1:])  # (B, T−1) rows


def add_loss_flops(rows: int, V: int) -> None:
    # per row: V exp (10 each) + V−1 adds + 1 log (10) + 1 subtract (log Σ − logit_target);
    # every row is computed, ignored ones too. The mean: rows−1 adds + 1 divide.
    add_flops("loss", rows * (11 * V + 10) + rows)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of −log softmax(logits)[target] over targets ≠ −100; logits (..., V)."""
    V, rows = logits.shape[-1], logits.numel() // logits.shape[-1]
    add_loss_flops(rows, V)
    logits, targets = logits.reshape(rows, V).float(), targets.reshape(rows)
    return F.cross_entropy(logits, targets, ignore_index=-100)


def linear_cross_entropy(
    h: torch.Tensor, head: Linear, targets: torch.Tensor, chunk_rows: int = 256
) -> torch.Tensor:
    """cross_entropy(head(h), targets) without ever holding all the logits; h (..., d).

    Why: a training batch of 4 × 512 positions has 2048 × 151,936 logits, 1.2 GB in fp32, and
    the plain path makes several such tensors per step (bf16 output, fp32 copy, log-softmax,
    its gradient) and keeps some for the backward pass. Here `chunk_rows` rows at a time go
    through the head and the softmax, and each chunk's gradient with respect to h,
    ((softmax − onehot) / n) · W, is computed at once in the forward pass: only that
    (rows, d) tensor waits for backward. The head is frozen under LoRA; if its weight does
    train, its gradient ((softmax − onehot) / n)ᵀ · h is accumulated the same way.
    Same loss, gradients and counted FLOPs as the plain path (tests/test_fast_paths.py)."""
    if head.bias is not None:
        raise ValueError("linear_cross_entropy supports a head without bias (as Qwen2's)")
    d, V = head.in_features, head.out_features
    rows = h.numel() // d
    add_matmul_flops(head.flop_name, 1, rows, d, V)  # rows·V·(2d − 1), as Linear counts it
    add_loss_flops(rows, V)
    h, targets = h.reshape(rows, d), targets.reshape(rows)  # (rows, d), (rows,)
    return ChunkedLinearCrossEntropy.apply(h, head.weight, targets, chunk_rows)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys and values, (layers, B, n_kv, max_len, hd); `length` slots are filled.

    Each forward pass writes its T new positions in every layer (`update`); the last layer's
    write advances `length`. `rewind(n)` forgets everything after the first n positions.
    generate() keeps the cache in fp32 even under bf16 autocast (generate.cache_dtype): bf16
    values are stored exactly, and each decoding step's attention then runs in fp32."""

    def __init__(self, cfg: Qwen2Config, batch: int, max_len: int, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's (B, n_kv, T, hd) keys/values; return all of them so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} positions, {end} were asked for")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv, S, hd)
        if layer == self.k.shape[0] - 1:  # every layer holds the T new positions now
            self.length = end
        return keys, values

    def rewind(self, length: int) -> None:
        """Keep the first `length` positions; the next write goes after them."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KV cache rewind to {length}: expected 0 ≤ length ≤ {self.length}")
        self.length = length

    def rows(self, rows: slice) -> KVCache:
        """A view of some batch rows, with its own `length`: what it writes lands here, and
        this cache's `length` stays as it is."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, rows], self.v[:, rows]
        return view


# ----------------------------------------------------------------------------- LoRA


class LoRALinear(Linear):
    """LoRA (Hu et al. 2021): y = x W₀ᵀ + b + (alpha/r) · x Aᵀ Bᵀ, A: (r, d_in), B: (d_out, r).

    What `lora.apply_lora` puts in place of a projection (q_proj and v_proj by default; see
    Qwen2Attention). W₀ and b keep their checkpoint keys; `lora_A`/`lora_B` are the only new
    tensors. A starts kaiming-uniform(a=√5) and B at zero (PEFT's init), so a fresh adapter
    changes nothing. `merge()` folds ΔW = (alpha/r)·B·A into W₀ (in fp32) for fast inference;
    `unmerge()` puts back the W₀ that merge set aside, because (W₀ + ΔW) − ΔW is not bit-exactly
    W₀ in floating point. A and B are created in fp32 whatever the base dtype, so they can train
    in bf16 models.
    """

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float = 0.0):
        # nn.Module's init, not Linear's: Linear's would allocate and randomly fill a new
        # weight, where this layer shares the base layer's Parameters
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.flop_name = base.flop_name
        self.weight, self.bias = base.weight, base.bias  # the same Parameters, not copies
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        fp32 = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **fp32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **fp32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("unmerged_weight", None, persistent=False)  # W₀ while merged
        self.train(base.training)

    @property
    def merged(self) -> bool:
        return self.unmerged_weight is not None

    def delta_weight(self) -> torch.Tensor:  # (d_out, d_in), in fp32 or wider (fp64 models)
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.unmerged_weight = self.weight.detach().clone()
            delta = self.delta_weight()
            self.weight.copy_((self.weight.to(delta.dtype) + delta).to(self.weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_(self.unmerged_weight)
            self.unmerged_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # x W₀ᵀ + b, counted by Linear
        if self.merged:
            return y
        dropout = self.training and isinstance(self.lora_dropout, nn.Dropout)
        self.add_update_flops(x.numel() // self.in_features, dropout)
        h = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        h = F.linear(h, self.lora_B.to(x.dtype))  # (..., d_out)
        return y + h * self.scaling

    def add_update_flops(self, rows: int, dropout: bool) -> None:
        """The update's cost for `rows` input rows, under "<projection>.lora_*"."""
        name, r = self.flop_name + ".lora", self.rank
        d_in, d_out = self.in_features, self.out_features
        if dropout:
            add_flops(name + "_dropout", rows * d_in)  # multiply by the scaled keep-mask
        add_matmul_flops(name + "_A", 1, rows, d_in, r)  # (rows×d_in)(d_in×r)
        add_matmul_flops(name + "_B", 1, rows, r, d_out)  # (rows×r)(r×d_out)
        add_flops(name + "_scale", rows * d_out)  # · alpha/r
        add_flops(name + "_add", rows * d_out)  # + the base output
