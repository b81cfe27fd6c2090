"""docs/reading-guide.md cannot drift: every number and shape it quotes is computed here.

The guide traces `model(ids)` for ids [[15, 11, 16]] through Qwen2.5-0.5B. The same pass runs
here through the plain path, in bf16 with uninitialised weights (the values do not matter:
shapes and FLOP counts depend on the shapes only), with every op's shapes recorded; then LoRA
(rank 8, q_proj and v_proj) is applied for the LoRA numbers.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import flops
import qwen_min.model as qm
from lora import apply_lora
from qwen_min import Qwen2Config, Qwen2ForCausalLM, count_flops
from qwen_min.loading import no_embedding_init

GUIDE = (Path(__file__).resolve().parent.parent / "docs" / "reading-guide.md").read_text()


class Shapes(TorchFunctionMode):
    """The shape of every tensor that a torch function returns, and of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[int, ...]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in [*(out if isinstance(out, tuple) else [out]), *args]:
            if isinstance(t, torch.Tensor):
                self.seen.add(tuple(t.shape))
        return out


@cache
def traced() -> dict:
    cfg = Qwen2Config()
    with torch.device("meta"), no_embedding_init():
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu").tie_weights()  # 1 GB, not filled
    ids = torch.tensor([[15, 11, 16]])
    attention_calls, counted = [], qm.add_attention_flops
    qm.add_attention_flops = lambda *a: attention_calls.append(a) or counted(*a)
    try:
        with torch.no_grad(), Shapes() as shapes, count_flops() as c:
            model(ids)
    finally:
        qm.add_attention_flops = counted
    trainable = apply_lora(model, rank=8)
    with torch.no_grad(), Shapes() as lora_shapes:
        model(ids)
    params = {tuple(p.shape) for p in model.parameters()}
    return dict(cfg=cfg, counted=c, shapes=shapes.seen | lora_shapes.seen | params,
                trainable=trainable, attention_call=attention_calls[0])


def test_the_guide_quotes_exactly_the_computed_numbers():
    t = traced()
    cfg, c = t["cfg"], t["counted"]
    closed = flops.forward_flops(cfg, 1, 3)  # the command the guide prints
    assert dict(c) == closed  # the hooks of the traced pass agree with the closed form
    d, V = cfg.hidden_size, cfg.vocab_size
    want = {c.total, c["q_proj"], c["lm_head"], t["trainable"], V, 2 * d - 1}
    assert want == {2_969_045_556, 115_540_992, 816_352_128, 540_672, 151_936, 1_791}
    quoted = {int(n.replace(",", "")) for n in re.findall(r"\d{1,3}(?:,\d{3})+", GUIDE)}
    assert quoted == want
    assert c["q_proj"] == cfg.num_hidden_layers * 3 * d * (2 * d - 1)  # the guide's derivation
    assert c["lm_head"] == 3 * V * (2 * d - 1)


def test_the_guide_quotes_only_shapes_of_the_pass():
    t = traced()
    # every "(a, b, ...)" of integers, but the dimensions of .transpose(1, 2) and the call below
    quoted = {tuple(int(x) for x in m.split(", ")) for m in
              re.findall(r"(?<!transpose)(?<!add_attention_flops)\((\d+(?:, \d+)+)\)", GUIDE)}
    assert len(quoted) >= 15  # the table's shapes, and LoRA's
    assert quoted - t["shapes"] == set()
    B, nh, T, S, hd = t["attention_call"]
    assert f"`add_attention_flops({B}, {nh}, {T}, {S}, {hd})`" in GUIDE
    # the attention's inner shapes, which the guide shows step by step
    assert {(1, 2, 21, 64), (1, 2, 21, 3), (1, 2, 7, 3, 3), (1, 1, 3, 3)} <= quoted


def test_the_guide_quotes_the_config():
    cfg = Qwen2Config()
    line = (f"d = `hidden_size` {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
            f"{cfg.num_attention_heads} query heads and {cfg.num_key_value_heads} key/value heads "
            f"of `head_dim` {cfg.hidden_size} / {cfg.num_attention_heads} = {cfg.head_dim}, "
            f"MLP width f = {cfg.intermediate_size}")  # fmt: skip
    assert line in " ".join(GUIDE.split())
    assert cfg.rope_theta == 10**6 and "θ = 10⁶" in GUIDE
