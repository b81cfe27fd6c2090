"""Qwen2, the architecture of Qwen2.5-0.5B-Instruct, in one file and in the data's order:
config → Linear → RMSNorm → positions and mask → RoPE → attention → MLP → block → model, where
the forward pass ends; then the loss, the KV cache and LoRA. It matches transformers'
`Qwen2ForCausalLM` logit for logit; the module names are the checkpoint keys
(`model.layers.3.self_attn.q_proj.weight`).

Beside each operation, one line adds its FLOPs to the counter of
`qwen_min.counting.count_flops()`, if one is open; each rule is derived once, in docs/flops.md,
and flops.py is the same rules in closed form.

This file is the plain reference; qwen_min/fast.py holds faster equals of `attention` and of
the loss that load_model swaps in. docs/reading-guide.md runs one pass step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .counting import add_flops, add_matmul_flops

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Qwen2Config:
    """The fields of a Qwen2 config.json that the architecture needs (defaults: Qwen2.5-0.5B).
    qwen_min.loading.config_from_dict reads and checks a config.json into one."""

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


# ----------------------------------------------------------------------------- Linear


class Linear(nn.Linear):
    """y = x Wᵀ (+ b). Every matrix product of the model with a weight goes through here, so
    it is counted here, under the projection's name ("q_proj", "lm_head", ...)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, flop_name: str, device=None):
        super().__init__(d_in, d_out, bias=bias, device=device)
        self.flop_name = flop_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d_in, d_out = self.in_features, self.out_features
        rows = x.numel() // d_in
        add_matmul_flops(self.flop_name, 1, rows, d_in, d_out)  # m·p·(2n − 1)
        if self.bias is not None:
            add_flops(self.flop_name + ".bias", rows * d_out)  # 1 add per output
        return F.linear(x, self.weight, self.bias)


# ----------------------------------------------------------------------------- RMSNorm


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w; the normalisation in fp32, cast back, then · w (as
    transformers)."""

    def __init__(self, dim: int, eps: float, flop_name: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.flop_name = eps, flop_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        add_flops(self.flop_name, (x.numel() // d) * (4 * d + 12))  # 4d + 12 per row
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


# ----------------------------------------------------------------------------- positions and mask
#
# The caller's attention_mask (B, S) covers the S = past + T positions, the cached ones and the
# T new ones: 1 = a real token, 0 = padding (on the left); None = no padding. One function
# turns it into the model's positions and its one mask, for every case:
#
#   case                         attention_mask          query t (of T) sees key s (of S) if
#   prefill, no padding          None, S = T             s ≤ t                 (causal)
#   left padding                 0 on the left           s ≤ t and s is real
#   after cached keys            past + T columns        s ≤ past + t and s is real
#   decoding (T = 1)             past + 1 columns        every real key
#
# Every query also sees itself, so a padding query's row is not all −inf (a softmax of NaNs);
# its output is never used. A token's position is the number of real tokens before it, so
# every row starts at 0 at its first real token:
#
#   attention_mask [0, 0, 1, 1] → cumsum − 1 = [−1, −1, 0, 1] → clamp at 0 → [0, 0, 0, 1]
#
# With cached keys the cumsum runs over the cached and the new columns, and the new tokens
# take its last T values: mask [0, 1, 1 | 1] (past 3, T 1) → position [2].


def positions_and_mask(attention_mask: torch.Tensor | None, B: int, T: int, past: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids (B, T) of the T new tokens after `past` cached ones, and the mask
    (B, 1, T, S): True where query t may attend to key s (the 1 broadcasts over heads)."""
    if attention_mask is None:
        attention_mask = torch.ones(B, past + T, dtype=torch.long, device=device)
    S = attention_mask.shape[1]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
    q_pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1): the new tokens' columns
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos) & attention_mask.bool()[:, None, :]  # (B, T, S)
    return positions, (allowed | (k_pos == q_pos))[:, None]  # (B, 1, T, S)


# ----------------------------------------------------------------------------- RoPE


def rope_cos_sin(cfg: Qwen2Config, position_ids: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
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
    add_flops("rope", x.numel() * 3 + x.numel() // 2)  # 3 per element + a negate for half
    x1, x2 = x.chunk(2, dim=-1)  # (B, heads, T, hd/2) each
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, heads, T, hd)
    return x * cos[:, None] + rotated * sin[:, None]


# ----------------------------------------------------------------------------- attention
#
# Grouped-query attention (GQA): Qwen2.5-0.5B has 14 query heads but only n_kv = 2 key/value
# heads. Each KV head serves n_rep = 7 consecutive query heads, so repeating each KV head
# 7 times gives every query head its own copy, and attention proceeds as multi-head:
#
#     query heads:  q0 q1 q2 q3 q4 q5 q6 | q7 q8 q9 q10 q11 q12 q13
#     KV heads:            k0, v0        |             k1, v1
#     repeated:     k0 k0 k0 k0 k0 k0 k0 | k1 k1 k1 k1  k1  k1  k1     (the same for v)
#
# (fast.py's grouped_attention gets the same result without copying K and V.)


def add_attention_flops(B: int, nh: int, T: int, S: int, hd: int) -> None:
    """Each of the B·nh query heads over its full T×S score block, masked entries included."""
    add_matmul_flops("attn_scores", B * nh, T, hd, S)  # q·kᵀ: (T×hd)(hd×S)
    add_flops("attn_scale", B * nh * T * S)  # / √hd: 1 per score
    add_flops("attn_softmax", B * nh * T * (12 * S - 1))  # 12S − 1 per row
    add_matmul_flops("attn_v", B * nh, T, S, hd)  # p·v: (T×S)(S×hd)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√hd, where mask is False: −inf)·v for every query head, in plain ops.
    q: (B, nh, T, hd); k, v: (B, n_kv, S, hd); mask: (B, 1, T, S) from positions_and_mask.
    The softmax runs in fp32, as in transformers."""
    n_rep = q.shape[1] // k.shape[1]  # 14 // 2 = 7
    k = k.repeat_interleave(n_rep, dim=1)  # (B, nh, S, hd): head h reads KV head h // n_rep
    v = v.repeat_interleave(n_rep, dim=1)  # (B, nh, S, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, nh, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, T, S): the same every head
    weights = scores.float().softmax(-1).to(v.dtype)  # (B, nh, T, S): each row sums to 1
    return weights @ v  # (B, nh, T, hd)


class Qwen2Attention(nn.Module):
    """q/k/v projections (with bias) → RoPE on q and k → KV cache → attention → o_proj."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        nh, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        # LoRA enters here: lora.apply_lora swaps q_proj, v_proj for LoRALinear (end of file)
        self.q_proj = Linear(d, nh * hd, bias=True, flop_name="q_proj")
        self.k_proj = Linear(d, n_kv * hd, bias=True, flop_name="k_proj")
        self.v_proj = Linear(d, n_kv * hd, bias=True, flop_name="v_proj")
        self.o_proj = Linear(nh * hd, d, bias=False, flop_name="o_proj")
        self.attend = attention  # qwen_min.fast swaps in faster equals

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        cfg, (B, T, _) = self.cfg, x.shape
        hd, nh, n_kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, n_kv, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, n_kv, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv, S, hd): the cached keys, then these T
        add_attention_flops(B, nh, T, k.shape[2], hd)  # by the formula, whichever attend runs
        # precision: under bf16 autocast an fp32 model's cos/sin promote q and k to fp32 while
        # v stays bf16, and a cache returns k and v in its own dtype: attention runs in v's
        with torch.autocast(x.device.type, enabled=False):
            out = self.attend(q.to(v.dtype), k.to(v.dtype), v, mask).to(q.dtype)  # (B, nh, T, hd)
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
        add_flops("swiglu", 14 * g.numel())  # 13 for silu + 1 for ⊙, per element
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
        add_flops("residual", 2 * x.numel())  # 1 add per element, twice
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) → final-normed hidden states (B, T, d); attention_mask (B, past + T)
        or None, as in "positions and mask"."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        positions, mask = positions_and_mask(attention_mask, B, T, past, input_ids.device)
        x = self.embed_tokens(input_ids)  # (B, T, d): a table lookup, 0 FLOPs
        cos, sin = rope_cos_sin(self.cfg, positions, x.dtype)  # (B, T, hd) each
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)  # layer i writes its T keys/values after past
        if cache is not None:
            cache.advance(T)  # where the cache advances: every layer has written these T
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    """`model(input_ids, attention_mask)` → logits (B, T, vocab); `model.loss(...)` to train."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, flop_name="lm_head")
        self.tie_weights()
        self.head_loss = linear_cross_entropy  # for `loss`; qwen_min.fast swaps in a chunked equal

    def tie_weights(self) -> None:  # one Parameter for the embedding and the LM head, no copy
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) for the last position only (generation)."""
        h = self.model(input_ids, attention_mask, cache)  # (B, T, d)
        return self.lm_head(h[:, -1:] if last_only else h)

    # ========================================================================================
    # The forward pass ends here: token ids → logits. What follows is the loss (training), the
    # KV cache's bookkeeping (generation) and LoRA (fine-tuning).
    # ========================================================================================

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """cross_entropy(h[:, :-1] Wᵀ, labels[:, 1:]): position t predicts label t + 1 (as in
        transformers), so the head never runs (and is not counted) on the last position; labels
        (B, T) are the input ids with −100 where no loss is taken."""
        h = self.model(input_ids, attention_mask)  # (B, T, d)
        return self.head_loss(h[:, :-1], self.lm_head, labels[:, 1:])  # (B, T−1) rows


# ----------------------------------------------------------------------------- the loss


def add_loss_flops(rows: int, V: int) -> None:
    add_flops("loss", rows * (11 * V + 10) + rows)  # 11V + 10 per row, + rows for the mean


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of −log softmax(logits)[target] over targets ≠ −100; logits (..., V), in fp32."""
    V, rows = logits.shape[-1], logits.numel() // logits.shape[-1]
    add_loss_flops(rows, V)
    logits, targets = logits.reshape(rows, V).float(), targets.reshape(rows)
    return F.cross_entropy(logits, targets, ignore_index=-100)


def linear_cross_entropy(h: torch.Tensor, head: Linear, targets: torch.Tensor) -> torch.Tensor:
    """The loss's definition: cross_entropy(h Wᵀ, targets), h (..., d) through the LM head."""
    return cross_entropy(head(h), targets)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys and values, (layers, B, n_kv, max_len, hd); the first `length`
    positions are filled. In a pass each layer writes its T new positions after them
    (`update`); then Qwen2Model.forward advances `length` by T, once."""

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
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv, S, hd) each

    def advance(self, n: int) -> None:  # the n positions every layer has just written
        self.length += n

    def rewind(self, length: int) -> None:  # keep the first `length`; the next write follows
        if not 0 <= length <= self.length:
            raise ValueError(f"KV cache rewind to {length}: expected 0 ≤ length ≤ {self.length}")
        self.length = length


# ----------------------------------------------------------------------------- LoRA


class LoRALinear(Linear):
    """LoRA (Hu et al. 2021): y = base(x) + (alpha/r) · x Aᵀ Bᵀ, A: (r, d_in), B: (d_out, r).

    What `lora.apply_lora` puts in place of q_proj and v_proj (by default): the base layer's
    weight and bias (the same Parameters, under their checkpoint keys) and the two small
    matrices `lora_A`, `lora_B`, in fp32 whatever the base dtype. A starts kaiming-uniform
    (a=√5), B at zero (PEFT's init): a fresh adapter changes nothing. `merge()` folds
    ΔW = (alpha/r)·B·A into W₀ (in fp32) for inference; `unmerge()` puts back the W₀ it set
    aside ((W₀ + ΔW) − ΔW is not bit-exactly W₀)."""

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float = 0.0):
        d_in, d_out = base.in_features, base.out_features
        super().__init__(d_in, d_out, base.bias is not None, base.flop_name, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the base layer's: shared, not copied
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        fp32 = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, **fp32))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, **fp32))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged, self.base_weight = False, None  # base_weight: W₀, kept while merged
        self.train(base.training)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_weight = self.weight.detach().clone()
            dtype = torch.promote_types(self.weight.dtype, torch.float32)  # fp32, fp64 for fp64
            delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling  # (d_out, d_in)
            self.weight.copy_((self.weight.to(dtype) + delta).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_(self.base_weight)
            self.merged, self.base_weight = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # base(x) = x W₀ᵀ + b, counted by Linear
        if self.merged:
            return y
        name, rows = self.flop_name + ".lora", x.numel() // self.in_features
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            add_flops(name + "_dropout", rows * self.in_features)  # 1 multiply per input
        add_matmul_flops(name + "_A", 1, rows, self.in_features, self.rank)  # m·p·(2n − 1)
        h = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        add_matmul_flops(name + "_B", 1, rows, self.rank, self.out_features)  # m·p·(2n − 1)
        h = F.linear(h, self.lora_B.to(x.dtype))  # (..., d_out)
        add_flops(name + "_scale", rows * self.out_features)  # · alpha/r: 1 per output
        add_flops(name + "_add", rows * self.out_features)  # + base(x): 1 per output
        return y + h * self.scaling
