"""generate(): grammar-constrained and sampled decoding, n_steps stopping, the end-of-sequence
fill, and its FLOPs (hooks == flops.generation_flops), on random-weight tiny models."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import data
import flops
from lora import apply_lora
from qwen_min import (
    KVCache,
    Qwen2Config,
    Qwen2ForCausalLM,
    SamplingOptions,
    count_flops,
    generate,
    load_model,
    load_tokenizer,
)
from qwen_min.fast import use_fast_paths
from qwen_min.generate import Sampler, greedy_generate, sample_tokens, stream_keys
from qwen_min.grammar import LLMTimeGrammar

PAD = data.PAD_ID
SEMICOLON = 26


@pytest.fixture(scope="module")
def model(tiny):
    return load_model(tiny[1])


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return load_tokenizer(tiny[1])


def series_prompts(tokenizer, n: int, decimals: int = 2, seed: int = 0):
    """Left-padded LLMTIME prompts (ending in ';') of n simulated series, 6–12 context steps."""
    trajectories, _ = data.simulate(n, 20, seed=seed)
    scaler = data.LLMTimeScaler.fit(trajectories, decimals)
    lengths = np.random.default_rng(seed).integers(6, 13, n)
    prompts = [data.tokenize(tokenizer, scaler.encode(s[:k]) + ";")
               for s, k in zip(trajectories, lengths)]
    return (*left_pad(prompts), scaler)


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded with id 0: the tiny model's vocabulary (512) has no <|endoftext|>."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = torch.tensor(p), 1
    return ids, mask


def row_of(ids, mask, i):
    """Prompt i alone, without its padding: (1, T_i)."""
    return ids[i : i + 1, mask[i].bool()]


class Steered(torch.nn.Module):
    """The tiny model with +100 on the logits of the tokens `bias(fed, step)` marks (R, V): its
    argmax is then one of them. Prefill the whole batch in one call (prefill_rows ≥ B)."""

    def __init__(self, model: Qwen2ForCausalLM, bias):
        super().__init__()
        self.model, self.cfg, self.lm_head, self.bias = model, model.cfg, model.lm_head, bias
        self.step = 0

    def forward(self, ids, mask=None, cache=None, last_only=False):
        self.step = 0 if ids.shape[1] > 1 else self.step + 1
        logits = self.model(ids, mask, cache, last_only)  # (R, 1, V)
        return logits + 100.0 * self.bias(ids[:, -1], self.step)[:, None]


# ----------------------------------------------------------------------------- greedy_generate


@pytest.mark.parametrize("fast", [True, False])
def test_generate_gives_the_tokens_of_the_readable_greedy_loop(model, fast):
    """generate, with all its extras off, against greedy_generate: a left-padded batch of 6
    prompts, prefilled whole and in parts of 4, with the fast paths in and out."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (9, 4, 13, 7, 2, 11)]
    ids, mask = left_pad(prompts)
    use_fast_paths(model, fast)
    try:
        want = greedy_generate(model, ids, mask, 12)
        for rows in (4, 6):
            tokens, _ = generate(model, ids, 12, mask, prefill_rows=rows, return_logits=False)
            assert tokens.tolist() == want.tolist()
    finally:
        use_fast_paths(model)
    assert want.shape == (6, 12) and len(set(want.flatten().tolist())) > 6  # not one token


def test_greedy_generate_docstring_example_runs(model):
    [example] = doctest.DocTestFinder().find(greedy_generate, globs={"torch": torch,
                                             "model": model, "greedy_generate": greedy_generate})
    result = doctest.DocTestRunner().run(example)
    assert (result.attempted, result.failed) == (3, 0)


# ----------------------------------------------------------------------------- grammar


def test_constrained_forecasts_of_30_series_all_parse(model, tokenizer):
    ids, mask, scaler = series_prompts(tokenizer, 30)
    g = LLMTimeGrammar.from_tokenizer(tokenizer, decimals=2)
    free, _ = generate(model, ids, g.max_new_tokens(4), mask, n_steps=4)
    tokens, logits = generate(model, ids, g.max_new_tokens(4), mask, grammar=g, n_steps=4,
                              prefill_rows=8)
    failed = [scaler.decode(tokenizer.decode(row), n_steps=4)[1] for row in free.tolist()]
    assert sum(failed) == 120  # the random model, free, writes no valid step at all...
    failed = [scaler.decode(tokenizer.decode(row), n_steps=4)[1] for row in tokens.tolist()]
    assert failed == [0] * 30  # ...and every one of the 120 steps parses under the grammar
    assert ((tokens == SEMICOLON).sum(1) == 4).all()
    assert logits.isfinite().all()  # the raw logits, not the masked ones


def test_constrained_equals_unconstrained_when_the_model_follows_the_grammar(model, tokenizer):
    ids, mask, _ = series_prompts(tokenizer, 5, seed=1)
    g = LLMTimeGrammar.from_tokenizer(tokenizer, decimals=2)
    tables = g.tables(model.cfg.vocab_size)
    state = {}

    def grammar_bias(fed, step):  # the grammar's own allowed set after what was fed
        state["s"] = tables.start(len(fed)) if step == 0 else tables.advance(state["s"], fed)
        return tables.allowed[state["s"]].float()

    follows = Steered(model, grammar_bias)
    kw = dict(n_steps=3, prefill_rows=8)
    free, free_logits = generate(follows, ids, g.max_new_tokens(3), mask, **kw)
    held, held_logits = generate(follows, ids, g.max_new_tokens(3), mask, grammar=g, **kw)
    assert free.tolist() == held.tolist()
    assert torch.equal(free_logits, held_logits)  # raw logits: the mask never reaches them
    assert ((held == SEMICOLON).sum(1) == 3).all()


def test_constrained_batched_equals_unbatched(model, tokenizer):
    ids, mask, _ = series_prompts(tokenizer, 4, seed=2)
    g = LLMTimeGrammar(2)
    tokens, logits = generate(model, ids, g.max_new_tokens(3), mask, grammar=g, n_steps=3)
    for i in range(4):
        alone, alone_logits = generate(model, row_of(ids, mask, i), g.max_new_tokens(3),
                                       grammar=g, n_steps=3)
        n = alone.shape[1]
        assert tokens[i, :n].tolist() == alone[0].tolist()
        assert (tokens[i, n:] == PAD).all()
        # measured max difference 4.6e-6 on logits up to 5.3 (batch and padding change the
        # kernels' summation order)
        assert (logits[i, :n] - alone_logits[0]).abs().max() <= 2e-5


# ----------------------------------------------------------------------------- n_steps and eos


def scripted(tokenizer, texts: list[str]):
    """A bias that makes row r write texts[r] (then '0's), one character per step."""
    script = torch.tensor([data.tokenize(tokenizer, t.ljust(40, "0")) for t in texts])

    def bias(fed, step):
        return torch.nn.functional.one_hot(script[:, step], 512).float()  # (R, V)

    return bias


def test_n_steps_completes_values_of_10_and_more(model, tokenizer):
    texts = ["12.34,105.60;9.99,10.00;1.00,2.00;", "0.50,0.60;0.70,0.80;0.90,1.00;"]
    ids, mask, scaler = series_prompts(tokenizer, 2, seed=3)
    steered = Steered(model, scripted(tokenizer, texts))
    old_allowance = data.expected_token_count(3, 2)  # 10 tokens a step, as evaluate.py had
    cut, _ = generate(steered, ids, old_allowance, mask, prefill_rows=8)
    assert scaler.decode(tokenizer.decode(cut[0].tolist()), n_steps=3)[1] == 1  # the old bug
    for grammar in (None, LLMTimeGrammar(2)):
        tokens, _ = generate(steered, ids, LLMTimeGrammar(2).max_new_tokens(3), mask,
                             grammar=grammar, n_steps=3, prefill_rows=8)
        assert tokens.shape == (2, len(texts[0]))  # stops when the longest row is done
        assert tokenizer.decode(tokens[0].tolist()) == texts[0]
        assert tokenizer.decode(tokens[1, : len(texts[1])].tolist()) == texts[1]
        assert (tokens[1, len(texts[1]) :] == PAD).all()  # filled once finished
        values, bad = scaler.decode(tokenizer.decode(tokens[0].tolist()), n_steps=3)
        assert bad == 0 and values[0, 1] == pytest.approx(105.60 * scaler.alpha)


def test_rows_finishing_at_different_steps_are_filled_with_eos(model):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (9, 4, 13, 7)]
    ids, mask = left_pad(prompts)
    alone = [generate(model, row_of(ids, mask, i), 16)[0][0].tolist() for i in range(4)]
    # the eos: the token whose first use differs most across rows (one row may never use it)
    first = {t: [row.index(t) if t in row else 99 for row in alone] for row in alone for t in row}
    eos = max(first, key=lambda t: len(set(first[t])))
    ends = first[eos]
    assert len(set(ends)) >= 3, ends
    tokens, logits = generate(model, ids, 16, mask, eos_token_id=eos)
    assert tokens.shape[1] == min(max(ends) + 1, 16)
    for row, end, want in zip(tokens.tolist(), ends, alone):
        assert row[: end + 1] == want[: len(row[: end + 1])]  # unchanged up to its eos...
        assert row[end + 1 :] == [eos] * len(row[end + 1 :])  # ...then eos only


# ----------------------------------------------------------------------------- sampling


def test_seeded_sampling_reproduces_and_batched_equals_unbatched(model, tokenizer):
    ids, mask, _ = series_prompts(tokenizer, 3, seed=4)
    g = LLMTimeGrammar(2)
    seeds = torch.tensor([7, 123456789012, -3])
    kw = dict(grammar=g, n_steps=2)

    def sampling(seeds):
        return SamplingOptions(4, temperature=1.3, top_p=0.9, seeds=seeds)

    tokens, _ = generate(model, ids, g.max_new_tokens(2), mask, sampling=sampling(seeds), **kw)
    again, _ = generate(model, ids, g.max_new_tokens(2), mask, sampling=sampling(seeds), **kw)
    assert tokens.shape[0] == 12 and tokens.tolist() == again.tolist()
    other, _ = generate(model, ids, g.max_new_tokens(2), mask, sampling=sampling(seeds + 1), **kw)
    assert other.tolist() != tokens.tolist()
    assert len({tuple(r) for r in tokens.tolist()}) > 6  # samples of one prompt differ
    for b in range(3):
        alone, _ = generate(model, row_of(ids, mask, b), g.max_new_tokens(2),
                            sampling=sampling(seeds[b : b + 1]), **kw)
        n = alone.shape[1]
        assert tokens[4 * b : 4 * b + 4, :n].tolist() == alone.tolist()  # rows b·N + s


def test_drawing_from_the_grammar_tokens_only_equals_drawing_from_all():
    g = LLMTimeGrammar(2)
    tables = g.tables(512)
    state = torch.randint(0, len(g.state_names), (64,), generator=torch.Generator().manual_seed(0))
    scores = tables.mask(torch.randn(64, 512, generator=torch.Generator().manual_seed(1)), state)
    for top_p in (1.0, 0.7):
        every = Sampler.for_prompts(torch.tensor([3, 4]), 32, None, 0.8, top_p)
        grammar_only = Sampler.for_prompts(torch.tensor([3, 4]), 32, tables.token_ids, 0.8, top_p)
        want = every.choose(scores, 5)
        assert grammar_only.choose(scores, 5).tolist() == want.tolist()
        assert len(set(want.tolist())) >= 8  # many different draws were compared


def test_samples_at_temperature_near_zero_equal_greedy(model, tokenizer):
    ids, mask, _ = series_prompts(tokenizer, 3, seed=5)
    g = LLMTimeGrammar(2)
    greedy, _ = generate(model, ids, 30, mask, grammar=g)
    for top_p in (1.0, 0.5):
        cold = SamplingOptions(2, temperature=1e-5, top_p=top_p, seeds=torch.tensor([1, 2, 3]))
        cold, _ = generate(model, ids, 30, mask, grammar=g, sampling=cold)
        assert cold.tolist() == greedy.repeat_interleave(2, 0).tolist()
    warm = SamplingOptions(2, temperature=1.0, seeds=torch.tensor([1, 2, 3]))
    warm, _ = generate(model, ids, 30, mask, grammar=g, sampling=warm)
    assert warm.tolist() != greedy.repeat_interleave(2, 0).tolist()


@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_extreme_temperatures_keep_to_the_grammar(top_p):
    """At T = 1e-45 logits / T overflows fp32 (and 1e-46 rounds to 0), at T = 1e45 the
    temperature itself does; every draw must still be a token the grammar allows in its row's
    state, and the cold draws greedy's. The logits reach ±30 and some rows are all negative:
    there, scores / 1e-45 puts every token at −inf, and the argmax of a row of −inf was the
    first token, allowed or not."""
    g = LLMTimeGrammar(2)
    tables = g.tables(512)
    state = torch.randint(0, len(g.state_names), (64,), generator=torch.Generator().manual_seed(0))
    logits = 10 * torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    logits[::2] = -logits[::2].abs()  # every second row all negative
    scores = tables.mask(logits, state)
    greedy = scores.argmax(-1)
    for temperature in (1e-46, 1e-45, 1e45):
        for ids in (tables.token_ids, None):  # the grammar's 13 tokens, or all 512
            sampler = Sampler.for_prompts(torch.tensor([3, 4]), 32, ids, temperature, top_p)
            drawn = sampler.choose(scores, 5)
            assert tables.allowed[state, drawn].all()
            if temperature < 1:
                assert drawn.tolist() == greedy.tolist()
            else:  # T = 1e45: every allowed token about equally likely, not only the first
                assert len(set(drawn.tolist())) >= 8 and drawn.tolist() != greedy.tolist()


def test_gumbel_max_draws_from_the_tempered_nucleus():
    scores = torch.tensor([[2.0, 1.0, 0.5, -1.0, float("-inf")]]).expand(40_000, 5)
    keys = stream_keys(torch.full((40_000,), 42), torch.arange(40_000), 0)
    ids = torch.arange(5)
    freq = torch.bincount(sample_tokens(scores, keys, ids, 2.0, 1.0), minlength=5) / 40_000
    want = torch.softmax(scores[0] / 2.0, -1)  # [0.434, 0.263, 0.205, 0.097, 0]
    assert (freq - want).abs().max() <= 0.005  # measured 7.5e-4 (4e4 draws: σ ≤ 0.0025)
    freq = torch.bincount(sample_tokens(scores, keys, ids, 2.0, 0.6), minlength=5) / 40_000
    kept = want[:2] / want[:2].sum()  # mass before token 2 is 0.698 ≥ 0.6: dropped
    assert freq[2:].tolist() == [0, 0, 0]
    assert (freq[:2] - kept).abs().max() <= 0.005  # measured 1.3e-3


# ----------------------------------------------------------------------------- FLOPs and input


CFG = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("samples, top_p, grammar", [
    (0, 1.0, LLMTimeGrammar(1)), (3, 1.0, LLMTimeGrammar(1)), (3, 0.8, LLMTimeGrammar(0)),
    (3, 0.8, None), (3, 1.0, None)])  # fmt: skip
def test_hooks_equal_closed_form_greedy_constrained_and_sampled(samples, top_p, grammar):
    model = _lora_model()
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with count_flops() as c:
        sampling = SamplingOptions(samples, top_p=top_p, seeds=torch.tensor([4, 5]))
        tokens, _ = generate(model, ids, 24, mask, grammar=grammar, n_steps=1, sampling=sampling)
    n = tokens.shape[1]  # the steps run: with the grammar, rows stop at their first ';'
    assert tokens.shape[0] == 2 * max(samples, 1) and (n < 24) == (grammar is not None)
    candidates = len(grammar.token_ids) if grammar is not None else None  # 13, 12 at 0 decimals
    assert c.total == flops.generation_flops(CFG, 2, 7, n, 2, ("q_proj", "v_proj"),
                                             samples=samples, top_p=top_p,
                                             sample_tokens=candidates)
    # the prefill runs once for the 2 prompts: the LM head sees 2 rows, then 2·N per step
    assert c["lm_head"] == (2 + 2 * max(samples, 1) * (n - 1)) * 97 * (2 * 32 - 1)


def _lora_model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(CFG).eval()
    apply_lora(model, 2, targets=("q_proj", "v_proj"))
    return model


@pytest.mark.parametrize("kw, message", [
    (dict(sampling=SamplingOptions(-1)), "samples must be ≥ 0 (0 = greedy), got -1"),
    (dict(sampling=SamplingOptions(2, temperature=0.0)),
     "temperature must be > 0 when sampling, got 0.0"),
    (dict(sampling=SamplingOptions(2, top_p=0.0)), "top_p must be in (0, 1], got 0.0"),
    (dict(sampling=SamplingOptions(2, seeds=torch.tensor([1, 2]))),
     "seeds must have shape (1,), one per prompt, got (2,)"),
    (dict(n_steps=0), "n_steps must be ≥ 1 (or None), got 0"),
])  # fmt: skip
def test_bad_arguments_say_what_was_expected(kw, message):
    model = _lora_model()
    with pytest.raises(ValueError) as e:
        generate(model, torch.tensor([[1, 2, 3]]), 4, **kw)
    assert str(e.value) == message


def test_sampled_run_leaves_the_prompt_in_the_callers_cache():
    model = _lora_model()
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    greedy_cache = KVCache(CFG, 2, 6 + 5, torch.float32, "cpu")
    sampled_cache = KVCache(CFG, 2, 6 + 5, torch.float32, "cpu")
    generate(model, ids, 5, cache=greedy_cache)
    tokens, logits = generate(model, ids, 5, cache=sampled_cache, return_logits=False,
                              sampling=SamplingOptions(3, seeds=torch.tensor([1, 2])))
    assert tokens.shape == (6, 5) and logits is None
    assert sampled_cache.length == 6  # the prompt, ready for evaluate.py's teacher-forced pass
    assert torch.equal(sampled_cache.k[:, :, :, :6], greedy_cache.k[:, :, :, :6])
    assert torch.equal(sampled_cache.v[:, :, :, :6], greedy_cache.v[:, :, :, :6])
    assert not sampled_cache.k[:, :, :, 6:].any()  # the samples decoded in a cache of their own
