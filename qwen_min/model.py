"""Qwen2 (Qwen2.5-0.5B-Instruct) in one file: config → FLOP hooks → Linear/LoRA → RMSNorm →
RoPE → attention → MLP → block → model (+ loss) → KV cache.

It matches transformers' `Qwen2ForCausalLM` (modeling_qwen2.py) logit for logit: the module
names below are the checkpoint keys (`model.layers.3.self_attn.q_proj.weight`, ...), so a
Hugging Face safetensors file loads with no key map (see qwen_min/loading.py).

Two things live inside the model code on purpose:
  * LoRA (`LoRALinear`): a low-rank update on any projection, in PEFT's layout.
  * FLOP hooks: every operation adds its cost, by the coursework's rules, to the active
    `count_flops()` counter, with the rule written next to the op. Costs: add/sub/neg/mul/div 1,
    exp/log/sqrt 10, and an (m×n)(n×p) matrix product m·p·(2n−1). flops.py is the closed form
    of the same rules, and tests/test_flops.py proves the two agree exactly.
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


def add_flops(name: str, n: int) -> None:
    """The hook. With no counter active it is one global read: nothing measurable."""
    if _counter is not None:
        _counter[name] += int(n)


def add_matmul_flops(name: str, batch: int, m: int, n: int, p: int) -> None:
    # `batch` independent (m×n)(n×p) products: m·p dot products of n multiplies and n−1 adds
    if _counter is not None:
        _counter[name] += batch * m * p * (2 * n - 1)
        _counter.matmul_outputs += batch * m * p


# ----------------------------------------------------------------------------- linear + LoRA


class Linear(nn.Linear):
    """y = x Wᵀ (+ b). Every matmul of the model goes through here, so it is counted here."""

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


class LoRALinear(Linear):
    """LoRA (Hu et al. 2021): y = x W₀ᵀ + b + (alpha/r) · x Aᵀ Bᵀ, A: (r, d_in), B: (d_out, r).

    W₀ and b keep their checkpoint keys; `lora_A`/`lora_B` are the only new tensors. A starts
    kaiming-uniform(a=√5) and B at zero (PEFT's init), so a fresh adapter changes nothing.
    `merge()` folds ΔW = (alpha/r)·B·A into W₀ (in fp32) for fast inference; `unmerge()` puts
    back the W₀ that merge set aside, because (W₀ + ΔW) − ΔW is not bit-exactly W₀ in floating
    point. A and B are created in fp32 whatever the base dtype, so they can train in bf16 models.
    """

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float = 0.0):
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
        y = super().forward(x)
        if self.merged:
            return y
        rows, name = x.numel() // self.in_features, self.flop_name + ".lora"
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            add_flops(name + "_dropout", rows * self.in_features)  # multiply by the scaled mask
        h = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        add_matmul_flops(name + "_A", 1, rows, self.in_features, self.rank)  # rows·r·(2·d_in − 1)
        h = F.linear(h, self.lora_B.to(x.dtype))  # (..., d_out)
        add_matmul_flops(name + "_B", 1, rows, self.rank, self.out_features)  # rows·d_out·(2r − 1)
        add_flops(name + "_scale", rows * self.out_features)  # · alpha/r
        add_flops(name + "_add", rows * self.out_features)  # + to the base output
        return y + h * self.scaling


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


# ----------------------------------------------------------------------------- attention


def grouped_attention(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ / √hd + mask) · v in explicit ops, in the precision of k and v.

    q: (B, nh, T, hd); k, v: (B, n_kv, S, hd); mask: (B, 1, T, S) boolean, or None (causal).
    The n_rep query heads of a KV head are stacked into one matrix, so K and V are used as
    they are, never repeated. For one query per head (each decoding step) this is several
    times faster on CPU than SDPA's kernel, and it reads the fp32 KV cache in fp32."""
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    rep = nh // nkv
    if mask is None and T > 1:  # a prefill (S = T): causal
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()[None, None]
    with torch.autocast(q.device.type, enabled=False):  # autocast would round k, v to bf16
        qg = q.reshape(B, nkv, rep * T, hd).to(k.dtype)  # (B, n_kv, rep·T, hd)
        scores = (qg @ k.transpose(-1, -2)) / math.sqrt(hd)  # (B, n_kv, rep·T, S)
        scores = scores.view(B, nkv, rep, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # (B, 1, 1, T, S)
        p = scores.float().softmax(-1).to(v.dtype).view(B, nkv, rep * T, S)
        return (p @ v).view(B, nh, T, hd).to(q.dtype)  # (B, n_kv, rep·T, hd) → (B, nh, T, hd)



class Qwen2Attention(nn.Module):
    """Grouped-query attention: 14 query heads share 2 key/value heads (7 each).

        q heads:  q0 q1 … q6 | q7 q8 … q13        softmax(q kᵀ / √hd + mask) · v
        kv heads:     k0/v0  |     k1/v1          q/k/v carry a bias, o_proj does not.
    """

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(d, cfg.num_attention_heads * hd, bias=True, flop_name="q_proj")
        self.k_proj = Linear(d, cfg.num_key_value_heads * hd, bias=True, flop_name="k_proj")
        self.v_proj = Linear(d, cfg.num_key_value_heads * hd, bias=True, flop_name="v_proj")
        self.o_proj = Linear(cfg.num_attention_heads * hd, d, bias=False, flop_name="o_proj")
        self.eager = False  # True: explicit matmul/softmax (torch's FlopCounterMode can see it)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        cfg, (B, T, _) = self.cfg, x.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        # k_proj/v_proj count at the width that runs (d → n_kv·hd); flops.py also gives the
        # coursework's "GQA costs the same as MHA" figure (d → d)
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hd), S = cached + T
        S = k.shape[2]
        # every query head scores its own T×S block, the full square even where causal masks it;
        # the mask selects (−inf where not allowed) and does no arithmetic
        add_matmul_flops("attn_scores", B * nh, T, hd, S)  # (T×hd)(hd×S) per head
        add_flops("attn_scale", B * nh * T * S)  # one divide by the constant √hd per score
        # per row of S scores: S exp (10 each) + (S−1) adds + S divides = 12S − 1; subtracting
        # the row max first (for stability) does not change the function and is not counted
        add_flops("attn_softmax", B * nh * T * (12 * S - 1))
        add_matmul_flops("attn_v", B * nh, T, S, hd)  # (T×S)(S×hd) per head
        if self.eager or T == 1:  # one query per head (decoding): explicit ops are faster
            out = grouped_attention(q, k, v, mask)
        else:  # SDPA computes in q's dtype; the KV cache keeps fp32 (see KVCache)
            k, v = k.to(q.dtype), v.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, mask, is_causal=mask is None,
                                                 enable_gqa=True)  # fmt: skip
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
        add_flops("silu", g.numel() * 13)  # per element: negate 1, exp 10, add 1, divide 1
        add_flops("swiglu_mul", g.numel())  # silu(g) ⊙ u
        return self.down_proj(F.silu(g) * u)


# ----------------------------------------------------------------------------- block


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "rmsnorm")
        self.self_attn = Qwen2Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "rmsnorm")
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer: int) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        out = h + self.mlp(self.post_attention_layernorm(h))
        add_flops("residual", 2 * x.numel())  # two residual adds
        return out


# ----------------------------------------------------------------------------- model


def attention_mask_4d(key_mask: torch.Tensor, T: int) -> torch.Tensor:
    """(B, S) 1 = real token / 0 = padding  →  boolean (B, 1, T, S) for the last T queries.

    Query i may see key j if j is at or before it and j is a real token. Every query also sees
    itself, so left-padding rows are not all −inf (their outputs are never used)."""
    S = key_mask.shape[1]
    q_pos = torch.arange(S - T, S, device=key_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos) & key_mask.bool()[:, None, :]  # (B, T, S)
    return (allowed | (k_pos == q_pos))[:, None]  # (B, 1, T, S)


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "final_norm")


class Qwen2ForCausalLM(nn.Module):
    """`model(input_ids, attention_mask)` → logits (B, T, vocab)."""

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
        """'sdpa' (fast, default) or 'eager' (explicit ops, for torch's FlopCounterMode)."""
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"attention impl must be 'sdpa' or 'eager', got {impl!r}")
        for layer in self.model.layers:
            layer.self_attn.eager = impl == "eager"

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) → final-normed hidden states (B, T, d).

        attention_mask (B, S) covers the cached tokens plus these T (S = cached + T); positions
        come from it, so a left-padded prompt starts at position 0 at its first real token."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the same as no mask, and SDPA runs faster without
        if attention_mask is None:
            positions = torch.arange(past, S, device=input_ids.device).expand(B, T)
            # one query sees every key, and a prefill is plain causal (SDPA's is_causal); only
            # T > 1 new tokens after cached ones need a mask (is_causal aligns it top-left)
            mask = None if past == 0 or T == 1 else attention_mask_4d(input_ids.new_ones(B, S), T)
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
            mask = attention_mask_4d(attention_mask, T)
        add_flops("embedding", 0)  # a table lookup: data movement, no arithmetic
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        cos, sin = rope_cos_sin(self.cfg, positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) for the last position only (generation)."""
        h = self.hidden_states(input_ids, attention_mask, cache)
        return self.lm_head(h[:, -1:] if last_only else h)

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy; labels (B, T) are the input ids with −100 where no loss
        is taken (padding). Position t predicts label t+1, as in transformers."""
        h = self.hidden_states(input_ids, attention_mask)  # (B, T, d)
        # = cross_entropy(self.lm_head(h)[:, :-1], labels[:, 1:]), without the (B, T, V) logits;
        # that form also runs the head on the last position (which predicts nothing), and
        # flops.py counts it so: count those B rows here too
        B, d, V = h.shape[0], self.cfg.hidden_size, self.cfg.vocab_size
        add_matmul_flops(self.lm_head.flop_name, 1, B, d, V)
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
    Same loss, gradients and counted FLOPs as the plain path (tests/test_model.py)."""
    if head.bias is not None:
        raise ValueError("linear_cross_entropy supports a head without bias (as Qwen2's)")
    d, V = head.in_features, head.out_features
    rows = h.numel() // d
    add_matmul_flops(head.flop_name, 1, rows, d, V)  # rows·V·(2d − 1), as Linear counts it
    add_loss_flops(rows, V)
    h, targets = h.reshape(rows, d), targets.reshape(rows)
    return ChunkedLinearCrossEntropy.apply(h, head.weight, targets, chunk_rows)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys and values, (layers, B, n_kv, max_len, hd); `length` slots are filled.

    generate() keeps them in fp32 even under bf16 autocast (generate.cache_dtype): bf16 values
    are stored exactly, and each decoding step's attention then runs in fp32."""

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
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv, S, hd)

    def rows(self, rows: slice) -> KVCache:
        """A view of some batch rows, with its own `length`: what it writes lands here."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, rows], self.v[:, rows]
        return view
