"""generate(compiled_decode=True): the decode steps as one compiled graph (qwen_min.compiled.
CompiledDecodeStep) give the eager path's tokens, logits and FLOP ledger, key by key, for greedy,
grammar-constrained and sampled runs, on a tiny LoRA model (inductor on CPU)."""

from __future__ import annotations

import pytest
import torch

from lora import apply_lora
from qwen_min import Qwen2Config, Qwen2ForCausalLM, SamplingOptions, count_flops, generate
from qwen_min.grammar import LLMTimeGrammar

CFG = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
NEW = 14  # tokens per row: few (the compile is what costs on CPU), more than one step's 12


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    """Random weights larger than the default init (as tests/conftest.py): attention is then far
    from uniform, so a wrong mask or position moves the logits visibly. LoRA on q and v."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(CFG).eval()
    apply_lora(model, 2, targets=("q_proj", "v_proj"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3 if p.ndim == 2 else 0.1)
    return model


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 7 tokens, the second left-padded by 3."""
    ids = torch.randint(0, CFG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("kw", [
    dict(),
    dict(grammar=LLMTimeGrammar(1), n_steps=1),
    dict(grammar=LLMTimeGrammar(1), n_steps=1,
         sampling=SamplingOptions(3, top_p=0.9, seeds=torch.tensor([4, 5]))),
], ids=["greedy", "constrained", "sampled"])  # fmt: skip
def test_compiled_decode_gives_the_eager_tokens_logits_and_ledger(model, kw):
    ids, mask = prompts()
    runs = {}
    for compiled in (False, True):
        with count_flops() as c:
            tokens, logits = generate(model, ids, NEW, mask, compiled_decode=compiled, **kw)
        runs[compiled] = tokens, logits, c
    (tokens, logits, eager), (fast_tokens, fast_logits, fast) = runs[False], runs[True]
    # sampled: 3 rows per prompt; with n_steps, every row stops at its first ';' (the longest
    # step, "ddd.d,ddd.d;", is 12 tokens), before the NEW-th token
    assert tokens.shape[0] == 2 * (kw["sampling"].samples if "sampling" in kw else 1)
    assert (tokens.shape[1] < NEW) == ("n_steps" in kw)
    assert fast_tokens.tolist() == tokens.tolist()
    # measured: ≤ 7.8e-6 on logits up to 7.5 (fp32, inductor's kernels)
    torch.testing.assert_close(fast_logits, logits, atol=2e-5, rtol=0)
    assert dict(fast) == dict(eager)
    assert fast.matmul_outputs == eager.matmul_outputs
