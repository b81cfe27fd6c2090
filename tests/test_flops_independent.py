"""FLOP counts derived by hand for one tiny config, checked against both the model's hooks and
flops.py's closed form. The two encode the same rules in code; these numbers are worked out
here from the rules alone (add/mul/div 1, exp/log/sqrt 10, (m×n)(n×p) = m·p·(2n−1)), so a
rule dropped or changed in both places at once still fails.

The config: d = 8, f = 12, V = 11, one layer, 2 query heads sharing 1 KV head, head_dim 4.
"""

from __future__ import annotations

import pytest
import torch

import flops
from lora import apply_lora
from qwen_min import KVCache, Qwen2Config, Qwen2ForCausalLM, count_flops, generate

CFG = Qwen2Config(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
LORA = dict(lora_rank=2, lora_targets=("q_proj", "v_proj"))

# LoRA rank 2 on q_proj (8 → 8) and v_proj (8 → 4), per input row:
LORA_ROW = {
    "q_proj.lora_A": 2 * 15,  # (1×8)(8×2): 2 outputs · (2·8 − 1)
    "q_proj.lora_B": 8 * 3,  # (1×2)(2×8): 8 outputs · (2·2 − 1)
    "q_proj.lora_scale": 8,  # · alpha/r, one per output
    "q_proj.lora_add": 8,  # + the base output
    "v_proj.lora_A": 2 * 15,
    "v_proj.lora_B": 4 * 3,
    "v_proj.lora_scale": 4,
    "v_proj.lora_add": 4,
}  # 120 per row

# One decode step: 1 new token (T = 1) against 3 cached ones (S = 4), LoRA, head on 1 row.
DECODE_STEP = {
    "rmsnorm": 2 * (4 * 8 + 12),  # two norms over d = 8: 4d + 12 each
    "q_proj": 8 * 15,  # (1×8)(8×8)
    "q_proj.bias": 8,
    "k_proj": 4 * 15,  # (1×8)(8×4): one KV head of 4
    "k_proj.bias": 4,
    "v_proj": 4 * 15,
    "v_proj.bias": 4,
    "rope": (8 * 3 + 4) + (4 * 3 + 2),  # q then k: 2 mul + 1 add each, a negate for half
    "attn_scores": 2 * 4 * 7,  # 2 heads · (1×4)(4×4): 4 scores · (2·4 − 1)
    "attn_scale": 2 * 4,  # one divide per score
    "attn_softmax": 2 * (12 * 4 - 1),  # per head: 4 exp (40) + 3 adds + 4 divides
    "attn_v": 2 * 4 * 7,  # 2 heads · (1×4)(4×4): 4 outputs · (2·4 − 1)
    "o_proj": 8 * 15,  # (1×8)(8×8)
    "gate_proj": 12 * 15,  # (1×8)(8×12)
    "up_proj": 12 * 15,
    "swiglu": 12 * 14,  # silu 13 (negate, exp, add, divide) + the ⊙ up
    "down_proj": 8 * 23,  # (1×12)(12×8)
    "residual": 2 * 8,
    "final_norm": 4 * 8 + 12,
    "lm_head": 11 * 15,  # (1×8)(8×11)
    **LORA_ROW,
}
DECODE_TOTAL = 1657 + 120  # the sum above, added up by hand: base 1657, LoRA 120

# The prefill before it: 3 tokens (T = S = 3), LoRA on 3 rows, the head on the last row only.
PREFILL_TOTAL = (
    3 * 88  # rmsnorm
    + 3 * (120 + 8) + 3 * (60 + 4) * 2  # q, k, v with biases
    + 3 * 28 + 3 * 14  # rope on q, k
    + 2 * 9 * 7 + 2 * 9 + 2 * 3 * (12 * 3 - 1) + 2 * 3 * 4 * 5  # scores, scale, softmax, ·v
    + 3 * 120 + 3 * 180 * 2 + 3 * 168 + 3 * 184 + 3 * 16  # o, gate, up, swiglu, down, residual
    + 3 * 44 + 165  # final norm on every position, the head on the last
    + 3 * 120  # LoRA
)  # = 4833


def build() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(CFG).eval()
    apply_lora(model, 2, targets=("q_proj", "v_proj"))
    return model


def test_lora_kv_cache_decode_step_and_last_position_head():
    model, cache = build(), KVCache(CFG, 1, 8, torch.float32, "cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        with count_flops() as prefill:
            model(ids[:, :3], cache=cache, last_only=True)
        with count_flops() as step:
            model(ids[:, 3:], cache=cache, last_only=True)
    assert prefill.total == PREFILL_TOTAL == 4833
    assert dict(step) == DECODE_STEP and step.total == DECODE_TOTAL == 1777
    assert flops.forward_flops(CFG, 1, 3, last_only=True, **LORA) == dict(prefill)
    assert flops.forward_flops(CFG, 1, 1, past=3, last_only=True, **LORA) == DECODE_STEP


def test_generation_is_prefill_plus_decode_steps():
    model = build()
    with count_flops() as c:
        generate(model, torch.tensor([[1, 2, 3]]), 2)
    assert c.total == PREFILL_TOTAL + DECODE_TOTAL == 6610
    assert flops.generation_flops(CFG, 1, 3, 2, **LORA) == 6610


@pytest.mark.parametrize("dropout", [False, True])
def test_training_loss_heads_only_the_predicting_positions(dropout):
    """model.loss on B = 2 rows of T = 3: the head and the cross-entropy run on the
    B·(T−1) = 4 positions that predict a next token, never on the last one."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(CFG).train()
    apply_lora(model, 2, targets=("q_proj", "v_proj"), dropout=0.1 if dropout else 0.0)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with count_flops() as c:
        model.loss(ids, ids)
    assert c["lm_head"] == 4 * 11 * 15  # 4 rows · (1×8)(8×11)
    assert c["loss"] == 4 * (11 * 11 + 10) + 4  # 11V + 10 per row, then the mean: 3 adds + 1
    lora = 6 * 120 + dropout * 6 * (8 + 8)  # 6 rows; dropout: one multiply per input, q and v
    assert sum(v for k, v in c.items() if ".lora" in k) == lora
    kw = dict(loss=True, lora_dropout=dropout, **LORA)
    assert flops.forward_flops(CFG, 2, 3, **kw) == dict(c)
    assert flops.train_step_flops(CFG, 2, 3, 2, ("q_proj", "v_proj"), lora_dropout=dropout) == (
        3 * c.total
    )
