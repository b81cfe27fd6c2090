"""Every speed shortcut in qwen_min against the plain computation it replaces.

  * the chunked loss (linear_cross_entropy) == cross_entropy over the full logits: value,
    gradients (LoRA, and a head that trains) and counted FLOPs;
  * an all-ones attention mask takes the mask-free causal path: same logits as the masked one;
  * grouped_attention (decoding, eager) == SDPA, and the fp32 KV cache under bf16 autocast;
  * a bf16 base with fp32 LoRA tensors trains under autocast;
  * generate's prefill in parts of a few rows == the whole batch at once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flops
from lora import apply_lora, lora_parameters
from qwen_min import KVCache, Qwen2Config, Qwen2ForCausalLM, count_flops, generate
from qwen_min.generate import cache_dtype
from qwen_min.model import attention_mask_4d, cross_entropy, grouped_attention, linear_cross_entropy

CFG = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def build(cfg: Qwen2Config = CFG, lora_rank: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    if lora_rank:
        apply_lora(model, lora_rank, targets=("q_proj", "v_proj"))
        with torch.no_grad():  # B = 0 at init would leave A without gradient
            for p in lora_parameters(model).values():
                p.normal_(0.0, 0.2)
    return model.train()


def batch(cfg: Qwen2Config = CFG, B: int = 3, T: int = 13):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, labels −100 there, as data.training_windows makes them
    labels = ids.masked_fill(mask == 0, -100)
    return ids, labels, mask


def plain_loss(model, ids, labels, mask):
    """The definition: full logits, shift by one, mean cross-entropy over labels ≠ −100."""
    return cross_entropy(model(ids, mask)[:, :-1], labels[:, 1:])


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_loss_equals_cross_entropy_with_lora():
    model = build(lora_rank=2)
    ids, labels, mask = batch()
    plain = plain_loss(model, ids, labels, mask)
    plain.backward()
    want = grads(model)
    model.zero_grad()
    fused = model.loss(ids, labels, mask)
    fused.backward()
    got = grads(model)
    assert set(got) == set(want) == set(lora_parameters(model))
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("chunk_rows", [1, 5, 256])
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_gradients_when_the_head_trains(chunk_rows, tied):
    """No LoRA, everything trains: the head's gradient (and through a tied head, the
    embedding's, which has a second path) equals the plain one."""
    cfg = Qwen2Config(**{**CFG.__dict__, "tie_word_embeddings": tied})
    model = build(cfg)
    ids, labels, mask = batch(cfg)
    plain_loss(model, ids, labels, mask).backward()
    want = grads(model)
    model.zero_grad()
    h = model.hidden_states(ids, mask)[:, :-1]
    linear_cross_entropy(h, model.lm_head, labels[:, 1:], chunk_rows).backward()
    got = grads(model)
    assert set(got) == set(want) and model.lm_head.weight.grad is not None
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_loss_counts_what_the_plain_loss_counts():
    model = build(lora_rank=2)
    ids, labels, mask = batch()
    with torch.no_grad(), count_flops() as plain:
        plain_loss(model, ids, labels, mask)
    with torch.no_grad(), count_flops() as fused:
        model.loss(ids, labels, mask)
    assert dict(fused) == dict(plain)
    want = flops.forward_flops(CFG, 3, 13, lora_rank=2, loss=True)
    assert dict(fused) == want


def test_chunked_loss_under_bf16_autocast_matches_plain():
    model = build(lora_rank=2)
    ids, labels, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = plain_loss(model, ids, labels, mask)
    plain.backward()
    want = grads(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model.loss(ids, labels, mask)
    fused.backward()
    got = grads(model)
    # the same bf16 products in both; only summation order differs
    assert fused.item() == pytest.approx(plain.item(), rel=1e-4)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-2, atol=1e-4, msg=name)


def test_chunked_loss_rejects_a_head_with_bias():
    head = torch.nn.Linear(4, 7)
    head.flop_name, head.in_features, head.out_features = "lm_head", 4, 7
    with pytest.raises(ValueError, match="supports a head without bias"):
        linear_cross_entropy(torch.zeros(2, 4), head, torch.zeros(2, dtype=torch.long))


def test_all_ones_mask_gives_the_logits_of_the_masked_path():
    """Row 1 has no padding. Alone, with an all-ones mask, it takes the mask-free causal path;
    beside a padded row it goes through the explicit mask. Same logits."""
    model = build().eval()
    ids, _, mask = batch()
    with torch.no_grad():
        masked_path = model(ids[[1, 0]], mask[[1, 0]])[1]  # row 0 of `batch` is unpadded
        mask_free = model(ids[:1], torch.ones_like(ids[:1]))[0]
        no_mask = model(ids[:1])[0]
    assert torch.equal(mask_free, no_mask)
    assert (masked_path - mask_free).abs().max().item() <= 1e-5


@pytest.mark.parametrize("T, S", [(1, 9), (6, 6), (3, 10)])
@pytest.mark.parametrize("padded", [False, True])
def test_grouped_attention_equals_sdpa(T, S, padded):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, T, 8, generator=g)
    k, v = torch.randn(2, 3, S, 8, generator=g), torch.randn(2, 3, S, 8, generator=g)
    key_mask = torch.ones(2, S, dtype=torch.long)
    key_mask[1, :2] = 0 if padded else 1
    mask = attention_mask_4d(key_mask, T) if padded or T != S else None
    want = F.scaled_dot_product_attention(q, k, v, mask, is_causal=mask is None and T > 1,
                                          enable_gqa=True)  # fmt: skip
    got = grouped_attention(q, k, v, mask)
    assert (got - want).abs().max().item() <= 1e-6


def test_eager_attention_is_causal_without_a_mask():
    model = build().eval()
    ids = batch()[0][:1]
    with torch.no_grad():
        want = model(ids)
        model.set_attention("eager")
        got = model(ids)
    assert (got - want).abs().max().item() <= 1e-5


def test_fp32_kv_cache_decoding_under_bf16_autocast_matches_a_full_pass():
    """bf16 weights under autocast, as evaluate.py runs: the cache stores fp32, decoding
    attends in fp32; the logits agree with a full bf16 pass to bf16 precision."""
    model = build().eval().to(torch.bfloat16)
    ids, _, mask = batch(T=10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert cache_dtype(model) == torch.float32
        full = model(ids, mask).float()
        cache = KVCache(CFG, 3, 10, cache_dtype(model), "cpu")
        steps = [model(ids[:, :6], mask[:, :6], cache)]
        steps += [model(ids[:, t : t + 1], mask[:, : t + 1], cache) for t in range(6, 10)]
        tokens, logits = generate(model, ids[:, :6], 4, mask[:, :6])
    stepped = torch.cat(steps, 1).float()
    real = mask.bool()
    assert (stepped - full)[real].abs().max().item() <= 0.02 * full[real].abs().max().item()
    assert cache.k.dtype == torch.float32 and logits.dtype == torch.float32
    assert tokens[:, 0].tolist() == full[:, 5].argmax(-1).tolist()


def test_bf16_base_with_fp32_lora_trains_under_autocast():
    model = build().to(torch.bfloat16)
    apply_lora(model, 2, targets=("q_proj", "v_proj"))
    params = lora_parameters(model)
    assert all(p.dtype == torch.float32 for p in params.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    ids, labels, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(ids, labels, mask)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params.values())
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in params if n.endswith("lora_B")}  # B starts at 0: A waits
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in params)


def test_prefill_in_row_parts_equals_one_pass():
    """generate prefills a few rows at a time through KVCache.rows views: the same tokens,
    logits, cache contents and counted FLOPs as the whole batch at once."""
    model = build().eval()
    ids, _, mask = batch(B=5, T=9)
    runs = {}
    for rows in (2, 5):
        cache = KVCache(CFG, 5, 13, torch.float32, "cpu")
        with count_flops() as c:
            tokens, logits = generate(model, ids, 4, mask, cache=cache, prefill_rows=rows)
        runs[rows] = tokens, logits, cache, c.total
    (t2, l2, c2, f2), (t5, l5, c5, f5) = runs[2], runs[5]
    assert t2.tolist() == t5.tolist() and f2 == f5
    assert (l2 - l5).abs().max().item() <= 1e-5
    assert c2.length == c5.length == 12
    assert (c2.k - c5.k).abs().max().item() <= 1e-5 and c2.k.abs().sum() > 0
