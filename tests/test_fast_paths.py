"""Every speed shortcut in qwen_min against the plain computation it replaces.

  * the chunked loss (fast.chunked_linear_cross_entropy) == cross_entropy over the full logits:
    value, gradients (LoRA, and a head that trains) and counted FLOPs (less the head rows it
    skips);
  * the one mask function: positions and masks for each case of its table;
  * no mask == an explicit all-ones mask == the row inside a padded batch;
  * the plain `attention` (reference, decoding) == SDPA (fast.sdpa_attention), and the fp32 KV
    cache under bf16 autocast;
  * a bf16 base with fp32 LoRA tensors trains under autocast;
  * generate's prefill in parts of a few rows == the whole batch at once;
  * the training forward has no graph break for torch.compile; the KV cache keeps its length.

Each bound is set from the difference measured on this machine (written beside it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flops
from lora import apply_lora, lora_parameters
from qwen_min import KVCache, Qwen2Config, Qwen2ForCausalLM, count_flops, generate
from qwen_min.fast import chunked_linear_cross_entropy, sdpa_attention, use_fast_paths
from qwen_min.generate import cache_dtype
from qwen_min.model import attention, cross_entropy, positions_and_mask

CFG = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def build(cfg: Qwen2Config = CFG, lora_rank: int = 0) -> Qwen2ForCausalLM:
    """A model with the fast paths in, as load_model returns it."""
    torch.manual_seed(0)
    model = use_fast_paths(Qwen2ForCausalLM(cfg))
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


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| over max |want|: one scale per tensor, so tiny entries do not dominate."""
    return ((got - want).abs().max() / want.abs().max()).item()


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
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)  # measured: equal
    for name in want:  # measured: ≤ 3.2e-7 (summation order)
        assert relative_error(got[name], want[name]) <= 1e-6, name


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
    h = model.model(ids, mask)[:, :-1]
    chunked_linear_cross_entropy(h, model.lm_head, labels[:, 1:], chunk_rows).backward()
    got = grads(model)
    assert set(got) == set(want) and model.lm_head.weight.grad is not None
    for name in want:  # measured: ≤ 1.2e-7 absolute
        assert (got[name] - want[name]).abs().max().item() <= 4e-7, name


def test_chunked_loss_counts_what_the_plain_loss_counts_less_the_last_positions():
    """The plain form runs the head on every position; the chunked loss skips the B = 3 last
    positions (they predict nothing): 3 rows · V 101 · (2d − 1) 63 = 19,089 FLOPs fewer."""
    model = build(lora_rank=2)
    ids, labels, mask = batch()
    with torch.no_grad(), count_flops() as plain:
        plain_loss(model, ids, labels, mask)
    with torch.no_grad(), count_flops() as fused:
        model.loss(ids, labels, mask)
    assert plain["lm_head"] - fused["lm_head"] == 3 * 101 * 63
    assert {k: v for k, v in fused.items() if k != "lm_head"} == {
        k: v for k, v in plain.items() if k != "lm_head"
    }
    assert dict(fused) == flops.forward_flops(CFG, 3, 13, lora_rank=2, loss=True)


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
    # the same bf16 products in both; only summation order could differ. Measured: the loss
    # and every gradient equal (difference 0.0); a 1e-4 bound catches a 1% error anywhere
    assert fused.item() == pytest.approx(plain.item(), rel=1e-4)
    for name in want:
        assert relative_error(got[name], want[name]) <= 1e-4, name


def test_chunked_loss_rejects_a_head_with_bias():
    head = torch.nn.Linear(4, 7)
    head.flop_name, head.in_features, head.out_features = "lm_head", 4, 7
    with pytest.raises(ValueError, match="supports a head without bias"):
        chunked_linear_cross_entropy(torch.zeros(2, 4), head, torch.zeros(2, dtype=torch.long))


def test_no_mask_equals_an_explicit_mask():
    """Row 0 of `batch` has no padding: with no mask, with an all-ones mask, and beside a
    padded row, the same logits."""
    model = build().eval()
    ids, _, mask = batch()
    with torch.no_grad():
        no_mask = model(ids[:1])[0]
        all_ones = model(ids[:1], torch.ones_like(ids[:1]))[0]
        beside_padding = model(ids[[1, 0]], mask[[1, 0]])[1]
    assert no_mask.abs().max().item() > 30  # logits up to ~40: one fp32 step there is 3.8e-6
    assert (all_ones - no_mask).abs().max().item() <= 4e-6  # measured: 0.0
    assert (beside_padding - no_mask).abs().max().item() <= 4e-6  # measured: 0.0


def test_one_mask_function_for_every_case():
    """The table and the worked example in model.py's "positions and mask" section."""
    cpu = torch.device("cpu")
    positions, mask = positions_and_mask(None, 1, 3, 0, cpu)  # prefill, no padding: causal
    assert positions.tolist() == [[0, 1, 2]]
    assert mask.int().tolist() == [[[[1, 0, 0], [1, 1, 0], [1, 1, 1]]]]
    positions, mask = positions_and_mask(torch.tensor([[0, 0, 1, 1]]), 1, 4, 0, cpu)
    assert positions.tolist() == [[0, 0, 0, 1]]  # left padding; padding queries see themselves
    assert mask.int().tolist() == [[[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]]]
    positions, mask = positions_and_mask(torch.tensor([[0, 1, 1, 1]]), 1, 1, 3, cpu)
    assert positions.tolist() == [[2]] and mask.int().tolist() == [[[[0, 1, 1, 1]]]]  # decoding
    positions, mask = positions_and_mask(None, 2, 2, 3, cpu)  # two new queries after 3 cached
    assert positions.tolist() == [[3, 4]] * 2 and mask.shape == (2, 1, 2, 5)
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("T, S", [(1, 9), (6, 6), (3, 10)])
@pytest.mark.parametrize("padded", [False, True])
def test_plain_attention_equals_sdpa(T, S, padded):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, T, 8, generator=g)
    k, v = torch.randn(2, 3, S, 8, generator=g), torch.randn(2, 3, S, 8, generator=g)
    key_mask = torch.ones(2, S, dtype=torch.long)
    key_mask[1, :2] = 0 if padded else 1
    mask = positions_and_mask(key_mask, 2, T, S - T, torch.device("cpu"))[1]
    want = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
    assert (attention(q, k, v, mask) - want).abs().max().item() <= 5e-7  # measured: ≤ 2.4e-7
    assert torch.equal(sdpa_attention(q, k, v, mask), want if T > 1 else attention(q, k, v, mask))


@pytest.mark.parametrize("padded", [False, True])
def test_eager_attention_gives_the_logits_of_sdpa(padded):
    """The whole model through `attention` (plain) and through `sdpa_attention` (fast):
    unpadded and left-padded."""
    model = build().eval()
    ids, _, mask = batch()
    mask = mask if padded else None
    with torch.no_grad():
        want = model(ids, mask)
        use_fast_paths(model, False)
        got = model(ids, mask)
    real = torch.ones_like(ids).bool() if mask is None else mask.bool()
    assert (got - want)[real].abs().max().item() <= 1.5e-5  # measured: 3.8e-6, 7.6e-6 padded


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
    assert full[real].abs().max().item() < 64  # where one bf16 step is 0.25
    assert (stepped - full)[real].abs().max().item() <= 0.5  # measured: 0.25, one bf16 step
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
    """generate prefills a few rows at a time through CacheRows views: the same tokens,
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
    assert (l2 - l5).abs().max().item() <= 8e-6  # measured: 3.8e-6 (logits up to ~40)
    assert c2.length == c5.length == 12
    assert (c2.k - c5.k).abs().max().item() <= 1e-6 and c2.k.abs().sum() > 0  # measured: 0.0


@pytest.mark.parametrize("padded", [False, True])
def test_training_forward_has_no_graph_break(padded):
    """torch.compile can take model.loss whole: no branch on tensor values in the model (the
    caller passes None for a batch without padding) and none in the chunked loss."""
    model = build(lora_rank=2)
    ids, labels, mask = batch()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.loss)(ids, labels, mask if padded else None)
    assert [str(b.reason) for b in explained.break_reasons] == []
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_kv_cache_advances_its_own_length_and_rewinds():
    model = build().eval()
    ids = batch()[0]
    cache = KVCache(CFG, 3, 16, torch.float32, "cpu")
    with torch.no_grad():
        model(ids[:, :5], cache=cache)
        assert cache.length == 5
        model(ids[:, 5:6], cache=cache)
        assert cache.length == 6
        cache.rewind(5)
        again = model(ids[:, 5:6], cache=cache)
        full = model(ids[:, :6])
    assert cache.length == 6
    assert (again[:, 0] - full[:, 5]).abs().max().item() <= 4e-6  # measured: 1.9e-6
    with pytest.raises(ValueError) as e:
        cache.rewind(7)
    assert str(e.value) == "KV cache rewind to 7: expected 0 ≤ length ≤ 6"
