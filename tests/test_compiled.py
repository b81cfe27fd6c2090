"""The compiled fast paths (qwen_min/compiled.py) against the eager reference, on CPU:

  * the compiled training step (forward, loss, backward, Adam in one fullgraph graph) gives
    train.py's eager `train_step` losses, LoRA tensors, Adam state and ledger FLOPs, and a new
    learning rate every step does not recompile it;
  * its loss pieces: chunked cross-entropy == cross-entropy over the full logits;
  * the compiled decoding step over a fixed-size KV cache gives `generate`'s greedy tokens.

Inductor compiles each graph once per module (module-scoped fixtures): that is most of the
time these tests take.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flops
import train
from lora import apply_lora, lora_parameters
from qwen_min import KVCache, Qwen2Config, Qwen2ForCausalLM, generate
from qwen_min.compiled import CompiledDecodeStep, CompiledTrainStep, chunked_cross_entropy
from qwen_min.generate import cache_dtype

CFG = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
B, L, RANK, TARGETS = 2, 12, 2, ("q_proj", "v_proj")
LRS = [3e-3, 1e-3, 2e-3]  # a new learning rate every step: it must not recompile


def lora_model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(CFG)
    apply_lora(model, RANK, targets=TARGETS)
    with torch.no_grad():  # B = 0 at init would leave A without gradient on the first step
        for p in lora_parameters(model).values():
            p.normal_(0.0, 0.2)
    return model.train()


def batches() -> list[dict]:
    """Left-padded windows as data.training_windows makes them, a different row each step."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(len(LRS)):
        ids = torch.randint(0, CFG.vocab_size, (B, L), generator=g)
        mask = torch.ones_like(ids)
        mask[i % B, : 3 + i] = 0
        out.append({"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100),
                    "attention_mask": mask})
    return out


def run(step_fn) -> tuple[list[float], list[int]]:
    losses, counted = [], []
    for batch, lr in zip(batches(), LRS):
        loss, n = step_fn(batch, lr)
        losses.append(loss)
        counted.append(n)
    return losses, counted


@pytest.fixture(scope="module")
def trained():
    """The same model, data and learning rates, trained eagerly and compiled."""
    eager = lora_model()
    eager_opt = torch.optim.Adam(list(lora_parameters(eager).values()), lr=LRS[0])
    eager_run = run(lambda b, lr: train.train_step(eager, eager_opt, b, lr, "cpu", torch.float32))

    fast = lora_model()
    fast_opt = torch.optim.Adam(list(lora_parameters(fast).values()), lr=LRS[0])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = CompiledTrainStep(fast, fast_opt, B, L, "cpu", torch.float32)
    fast_run = run(step)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return dict(eager=(eager, eager_opt, *eager_run), fast=(fast, fast_opt, *fast_run),
                graphs=graphs, step=step)


def test_compiled_step_losses_equal_eager(trained):
    eager_losses, fast_losses = trained["eager"][2], trained["fast"][2]
    assert len(fast_losses) == 3
    # measured: largest difference 3.8e-6 on a loss of 28.3, 1.3e-7 relative (fp32, inductor's
    # kernels sum in another order)
    assert fast_losses == pytest.approx(eager_losses, rel=1e-6)
    assert fast_losses[0] != fast_losses[2]  # the steps did train on different batches


def test_compiled_step_lora_tensors_and_adam_state_equal_eager(trained):
    eager, eager_opt = trained["eager"][:2]
    fast, fast_opt = trained["fast"][:2]
    before = lora_parameters(lora_model())
    for name, p in lora_parameters(fast).items():
        ref = lora_parameters(eager)[name]
        # measured: ≤ 8.9e-8 after 3 steps that moved every tensor by ≥ 5.8e-3
        torch.testing.assert_close(p, ref, atol=1e-6, rtol=0)
        assert (p - before[name]).abs().max() > 1e-3  # Adam did move it
    eager_state, fast_state = eager_opt.state_dict()["state"], fast_opt.state_dict()["state"]
    assert sorted(fast_state) == sorted(eager_state) == list(range(4 * CFG.num_hidden_layers))
    for i, ref in eager_state.items():
        assert float(fast_state[i]["step"]) == float(ref["step"]) == 3.0
        # measured: ≤ 3.0e-8 (first moments) and ≤ 9.3e-10 (second moments, up to 1.6e-3)
        torch.testing.assert_close(fast_state[i]["exp_avg"], ref["exp_avg"], atol=3e-7, rtol=0)
        torch.testing.assert_close(fast_state[i]["exp_avg_sq"], ref["exp_avg_sq"], atol=1e-8,
                                   rtol=0)
    assert fast_opt.param_groups[0]["lr"] == LRS[-1]  # what a saved state_dict records


def test_compiled_step_ledger_flops_equal_eager_and_closed_form(trained):
    eager_flops, fast_flops = trained["eager"][3], trained["fast"][3]
    closed = flops.train_step_flops(CFG, B, L, RANK, TARGETS)
    assert fast_flops == eager_flops == [closed] * 3


def test_new_learning_rate_does_not_recompile(trained):
    assert trained["graphs"] == 1


def test_compiled_step_rejects_another_batch_shape(trained):
    batch = {k: v[:, :-1] for k, v in batches()[0].items()}
    with pytest.raises(ValueError, match=r"^CompiledTrainStep was built for batches of \(2, 12\), "
                                         r"got \(2, 11\)$"):
        trained["step"](batch, 1e-3)


def test_compiled_step_needs_plain_adam():
    model = lora_model()
    opt = torch.optim.Adam(list(lora_parameters(model).values()), weight_decay=0.1)
    with pytest.raises(ValueError, match=r"^CompiledTrainStep runs plain Adam in one parameter "
                                         r"group; this optimizer has 1 groups and "
                                         r"\{'weight_decay': 0.1\}$"):
        CompiledTrainStep(model, opt, B, L, "cpu", torch.float32)


def test_chunked_cross_entropy_equals_full_logits():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(23, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g)
    t = torch.randint(0, 40, (23,), generator=g)
    t[[0, 5, 17]] = -100
    chunked = chunked_cross_entropy(h, w, t, chunk_rows=7)  # 4 chunks, the last of 2 rows
    (grad_chunked,) = torch.autograd.grad(chunked, h)
    full = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    (grad_full,) = torch.autograd.grad(full, h)
    # measured: 0 and 0 here (fp32); the bounds allow sums in another order
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_chunked, grad_full, atol=1e-7, rtol=0)


def test_compiled_decode_step_gives_generate_tokens():
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(CFG).eval()
    with torch.no_grad():  # larger weights than the default init (as tests/conftest.py): the
        for name, p in model.named_parameters():  # attention then moves the tokens visibly
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3 if p.ndim == 2 else 0.1)
    ids = torch.randint(0, CFG.vocab_size, (3, 9))
    prompt_mask = torch.ones_like(ids)
    prompt_mask[0, :4] = 0  # left padding
    n_new = 6
    ref_tokens, ref_logits = generate(model, ids, n_new, prompt_mask)

    T = ids.shape[1]
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(3, n_new)], dim=1)  # (B, T + n_new)
    cache = KVCache(CFG, 3, T + n_new, cache_dtype(model), ids.device)
    step = CompiledDecodeStep(model, cache)
    with torch.no_grad():
        token = model(ids, prompt_mask, cache, last_only=True)[:, -1].argmax(-1)  # prefill
        tokens, logits = [token], []
        for _ in range(n_new - 1):
            logits.append(step(token[:, None], mask))  # (B, V)
            token = logits[-1].argmax(-1)  # (B,)
            tokens.append(token)
    assert torch.stack(tokens, 1).tolist() == ref_tokens.tolist()
    # measured: ≤ 5.4e-6 on logits up to 6.5 (fp32, inductor's kernels)
    torch.testing.assert_close(torch.stack(logits, 1), ref_logits[:, 1:], atol=2e-5, rtol=0)
    assert cache.length == T + n_new - 1
