"""Decoding at batch 1 on CPU skips oneDNN (fast.OneRowMatmuls around generate.decode_step):
the switch is on for one row only, put back afterwards, and the logits are oneDNN's.

The speed it buys is measured by the benchmark (`make bench ONLY=decode`), not here."""

from __future__ import annotations

import sys
from contextlib import nullcontext

import pytest
import torch

from qwen_min import KVCache, Qwen2Config, Qwen2ForCausalLM
from qwen_min.fast import OneRowMatmuls, use_fast_paths
from qwen_min.generate import cache_dtype, decode_step, prefill

# products of more than 16³ multiply-adds: below that torch skips oneDNN at any setting
CFG = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def test_the_switch_is_on_for_one_row_on_cpu_and_put_back():
    cpu = torch.device("cpu")
    seen = {}
    for rows in (1, 2):
        with OneRowMatmuls(rows, cpu):
            seen[rows] = torch.backends.mkldnn.enabled
    assert seen == {1: False, 2: True} and torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError, match="^inside$"), OneRowMatmuls(1, cpu):
        raise RuntimeError("inside")
    assert torch.backends.mkldnn.enabled


def decode_once(model: Qwen2ForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
    """The logits of one decode_step after a prefill of ids[:, :-1], and whether oneDNN was
    on during each forward pass of the model (the prefill, then the step)."""
    B, T = ids.shape
    flags = []
    hook = model.register_forward_hook(lambda *_: flags.append(torch.backends.mkldnn.enabled))
    cache = KVCache(model.cfg, B, T, cache_dtype(model), "cpu")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        prefill(model, ids[:, :-1], mask[:, :-1], cache, prefill_rows=B)
        logits = decode_step(model, ids[:, -1], mask, cache)
    hook.remove()
    return logits, flags


def test_decode_step_at_batch_1_skips_onednn_and_gives_its_logits(monkeypatch):
    """bf16 weights, as a chat decodes: only the one-row step runs without oneDNN; its
    logits are oneDNN's, up to the rounding of the products' sums."""
    torch.manual_seed(0)
    model = use_fast_paths(Qwen2ForCausalLM(CFG)).eval().to(torch.bfloat16)
    ids = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    fast, flags = decode_once(model, ids[:1])
    assert flags == [True, False]
    _, flags = decode_once(model, ids)  # two rows: oneDNN throughout
    assert flags == [True, True]
    generate_module = sys.modules["qwen_min.generate"]  # qwen_min.generate is the function
    monkeypatch.setattr(generate_module, "OneRowMatmuls", lambda rows, device: nullcontext())
    want, flags = decode_once(model, ids[:1])
    assert flags == [True, True]
    # measured: 0.0 (logits up to 117, where one bf16 step is 0.5)
    assert want.abs().max().item() > 50
    assert (fast.float() - want.float()).abs().max().item() <= 0.5
