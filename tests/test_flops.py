"""FLOP accounting: the model's hooks against flops.py's closed form (exactly, as integers),
torch's FlopCounterMode as an independent check of the matmuls, the plan, and the ledger."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import flops
import ledger
from lora import apply_lora, merge_lora
from qwen_min import KVCache, Qwen2Config, Qwen2ForCausalLM, count_flops, generate, use_fast_paths

CONFIGS = {
    # head_dim 8, 2 query heads per KV head
    "gqa": Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
    # one KV head for all six query heads
    "mqa": Qwen2Config(vocab_size=61, hidden_size=48, intermediate_size=40, num_hidden_layers=1,
                       num_attention_heads=6, num_key_value_heads=1),
    # plain multi-head attention, head_dim 12, untied LM head
    "mha": Qwen2Config(vocab_size=50, hidden_size=24, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False),
}  # fmt: skip
LORAS = {"none": (0, ()), "qv": (2, ("q_proj", "v_proj")), "all": (3, flops.PROJECTIONS)}


def build(cfg: Qwen2Config, rank: int = 0, targets=(), dropout: float = 0.0) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    if rank:
        apply_lora(model, rank, targets=targets, dropout=dropout)
    return model


def ids(cfg: Qwen2Config, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


def counted(fn, *args, **kwargs) -> dict[str, int]:
    with torch.no_grad(), count_flops() as c:
        fn(*args, **kwargs)
    return dict(c)


# ----------------------------------------------------------------------------- hooks == closed form


@pytest.mark.parametrize("lora", LORAS)
@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_hooks_equal_closed_form(name, lora):
    cfg, (rank, targets) = CONFIGS[name], LORAS[lora]
    model = build(cfg, rank, targets)
    for batch, length in [(1, 1), (1, 9), (3, 5), (2, 16)]:
        x = ids(cfg, batch, length)
        want = flops.forward_flops(cfg, batch, length, lora_rank=rank, lora_targets=targets)
        assert counted(model, x) == want, (batch, length)
        want = flops.forward_flops(
            cfg, batch, length, lora_rank=rank, lora_targets=targets, last_only=True
        )
        assert counted(model, x, last_only=True) == want, (batch, length)


@pytest.mark.parametrize("lora", LORAS)
@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_steps_equal_closed_form(name, lora):
    """A left-padded prefill, one-token decode steps and a 3-token chunk against the cache."""
    cfg, (rank, targets) = CONFIGS[name], LORAS[lora]
    model = build(cfg, rank, targets)
    batch, prompt = 3, 6
    cache = KVCache(cfg, batch, 16, torch.float32, "cpu")
    mask = torch.ones(batch, 16, dtype=torch.long)
    mask[1, :2] = 0  # padding is computed, so it is counted like any token
    kw = dict(lora_rank=rank, lora_targets=targets, last_only=True)
    got = counted(model, ids(cfg, batch, prompt), mask[:, :prompt], cache, last_only=True)
    assert got == flops.forward_flops(cfg, batch, prompt, **kw)
    for past, new in [(6, 1), (7, 1), (8, 3), (11, 1)]:
        x = ids(cfg, batch, new, seed=past)
        got = counted(model, x, mask[:, : past + new], cache, last_only=True)
        assert got == flops.forward_flops(cfg, batch, new, past=past, **kw), (past, new)
    assert cache.length == 12


@pytest.mark.parametrize("lora", LORAS)
@pytest.mark.parametrize("name", CONFIGS)
def test_loss_and_teacher_forced_pass_equal_closed_form(name, lora):
    cfg, (rank, targets) = CONFIGS[name], LORAS[lora]
    model = build(cfg, rank, targets)
    x = ids(cfg, 2, 11)
    labels = x.clone()
    labels[0, :4] = -100  # ignored rows are computed all the same
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    got = counted(model.loss, x, labels, mask)
    assert got == flops.forward_flops(cfg, 2, 11, lora_rank=rank, lora_targets=targets, loss=True)
    assert sum(got.values()) == flops.teacher_forced_flops(cfg, 2, 11, rank, targets)


@pytest.mark.parametrize("lora", LORAS)
@pytest.mark.parametrize("name", CONFIGS)
def test_generation_equals_closed_form(name, lora):
    cfg, (rank, targets) = CONFIGS[name], LORAS[lora]
    model = build(cfg, rank, targets)
    x = ids(cfg, 2, 7)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    for new_tokens in (1, 5):
        with count_flops() as c:
            tokens, _ = generate(model, x, new_tokens, attention_mask=mask)
        assert tokens.shape == (2, new_tokens)
        assert c.total == flops.generation_flops(cfg, 2, 7, new_tokens, rank, targets)


def test_training_forward_with_lora_dropout_equals_closed_form():
    cfg = CONFIGS["gqa"]
    model = build(cfg, 4, ("q_proj", "k_proj", "down_proj"), dropout=0.1).train()
    x = ids(cfg, 2, 8)
    with count_flops() as c:
        model.loss(x, x).backward()  # the backward pass is not counted: only 2× the forward
    targets = ("q_proj", "k_proj", "down_proj")
    kw = dict(lora_rank=4, lora_targets=targets, loss=True, lora_dropout=True)
    assert dict(c) == flops.forward_flops(cfg, 2, 8, **kw)
    assert c["down_proj.lora_dropout"] == cfg.num_hidden_layers * 2 * 8 * cfg.intermediate_size
    assert 3 * c.total == flops.train_step_flops(cfg, 2, 8, 4, targets, lora_dropout=True)


def test_merged_lora_costs_nothing_extra():
    cfg = CONFIGS["gqa"]
    model = build(cfg, 2, flops.PROJECTIONS)
    merge_lora(model)
    assert counted(model, ids(cfg, 2, 5)) == flops.forward_flops(cfg, 2, 5)


@pytest.mark.parametrize("name", ["gqa", "mqa"])
def test_mha_convention_is_what_an_mha_model_runs(name):
    """gqa="mha" = the same model with as many KV heads as query heads (K/V at d×d)."""
    cfg = CONFIGS[name]
    mha = replace(cfg, num_key_value_heads=cfg.num_attention_heads)
    model = build(mha, 2, ("q_proj", "v_proj"))
    kw = dict(lora_rank=2, lora_targets=("q_proj", "v_proj"), loss=True)
    want = flops.forward_flops(cfg, 2, 9, gqa="mha", **kw)
    assert counted(model.loss, ids(cfg, 2, 9), ids(cfg, 2, 9)) == want
    assert sum(want.values()) > sum(flops.forward_flops(cfg, 2, 9, **kw).values())


def test_hooks_do_not_depend_on_the_attention_kernel():
    cfg = CONFIGS["gqa"]
    model, x = build(cfg, 2, ("q_proj", "v_proj")), ids(cfg, 2, 9)
    plain = counted(model, x)
    use_fast_paths(model)
    assert counted(model, x) == plain


# ----------------------------------------------------------------------------- the table of rules

ROOT = Path(__file__).resolve().parents[1]


def hooks_in_model() -> list[tuple[str, str]]:
    """(function, rule comment) of every FLOP hook line of qwen_min/model.py, the function
    as `Class.method` or `function`."""
    where, hooks = {}, []
    for line in (ROOT / "qwen_min" / "model.py").read_text().splitlines():
        if m := re.match(r"(class|def|    def) (\w+)", line):
            kind, name = m.groups()
            where = {"class": {"class": name}, "def": {"def": name}}.get(kind, where)
            if kind == "    def":
                where = {"class": where.get("class"), "def": f"{where.get('class')}.{name}"}
        elif m := re.search(r"\badd_(?:matmul_)?flops\(.*#\s*(.+)$", line):
            hooks.append((where["def"], m.group(1)))
    return hooks


def rules_in_docs() -> list[tuple[str, str]]:
    """(hook, rule) of every row of docs/flops.md's table of rules."""
    text = (ROOT / "docs" / "flops.md").read_text()
    table = text[text.index("| counter | hook"):].split("\n\n")[0].splitlines()[2:]
    return [(cells[2].strip(" `"), cells[3].strip()) for cells in (r.split("|") for r in table)]


def test_the_table_of_rules_is_what_the_hooks_say():
    """docs/flops.md derives each rule once; every hook line in model.py carries that rule as
    its comment: the same (hook, rule) pairs, as many of each, on both sides."""
    hooks = hooks_in_model()
    assert len(hooks) == 16 and ("RMSNorm.forward", "4d + 12 per row") in hooks
    assert Counter(hooks) == Counter(rules_in_docs())


# ----------------------------------------------------------------------------- FlopCounterMode


@pytest.mark.parametrize("name", CONFIGS)
def test_matmuls_agree_with_torch_flop_counter(name):
    """FlopCounterMode counts 2·m·n·p per matmul and nothing else; ours is m·p·(2n−1), so
    ours + Σ m·p must equal it. Eager attention: on CPU the SDPA kernel is not counted."""
    cfg = CONFIGS[name]
    model = build(cfg, 2, ("q_proj", "v_proj", "down_proj"))
    use_fast_paths(model, False)
    cache = KVCache(cfg, 2, 12, torch.float32, "cpu")
    for x, past in [(ids(cfg, 2, 10), 0), (ids(cfg, 2, 1, seed=1), 10)]:
        with torch.no_grad(), FlopCounterMode(display=False) as torch_count, count_flops() as c:
            model(x, cache=cache)
        ours = flops.matmul_subtotal(dict(c))
        assert ours + c.matmul_outputs == torch_count.get_total_flops(), past
        assert ours < torch_count.get_total_flops()


# ----------------------------------------------------------------------------- Qwen2.5-0.5B


def independent_forward(cfg: Qwen2Config, batch: int, T: int) -> tuple[int, int]:
    """(forward + loss, lm_head) for a full pass, from the model's actual weight shapes
    (a Linear (in→out) costs 2·in·out − out per token, + out for a bias) and the attention
    and element-wise terms regrouped per token and per head. The loss pass runs the head on
    the B·(T−1) predicting positions: the `batch` last positions' head rows come off."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(cfg)
    tokens = batch * T
    d, f, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    nh, nkv, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    linear = sum(
        tokens * (2 * m.weight.numel() - m.out_features + (m.bias is not None) * m.out_features)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )
    attention = L * batch * nh * ((4 * hd + 12) * T * T - (hd + 1) * T)
    per_token = L * (8 * d + 24 + (nh + nkv) * hd * 7 // 2 + 14 * f + 2 * d) + 4 * d + 12
    loss = batch * (T - 1) * (11 * V + 11)
    head_per_row = 2 * d * V - V
    return linear - batch * head_per_row + attention + tokens * per_token + loss, (
        tokens * head_per_row
    )


def test_qwen25_05b_training_step_magnitude():
    """The issue expects ~6.4–6.8e12 FLOPs per step at batch 4, context 512, LM head ~25%."""
    cfg = Qwen2Config()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim) == (896, 4864, 64)
    real, lm_head = independent_forward(cfg, 4, 512)
    as_mha, _ = independent_forward(replace(cfg, num_key_value_heads=14), 4, 512)
    assert flops.train_step_flops(cfg, 4, 512) == 3 * real
    assert flops.train_step_flops(cfg, 4, 512, gqa="mha") == 3 * as_mha
    assert flops.forward_flops(cfg, 4, 512)["lm_head"] == lm_head
    print(f"0.5B step, batch 4, ctx 512: real GQA {3 * real:.4e}, as MHA {3 * as_mha:.4e}")
    # K/V at 896→896 instead of 896→128 add 2·24·(2·896·768) per token: MHA ~6.78e12, the
    # real width ~6.37e12, 0.4% under the issue's lower end
    assert 6.4e12 <= 3 * as_mha <= 6.8e12
    assert 6.3e12 <= 3 * real <= 6.4e12
    assert 0.25 <= lm_head / real <= 0.27 and 0.24 <= lm_head / as_mha <= 0.25


# ----------------------------------------------------------------------------- the plan


def test_plan_equals_running_it():
    """A small plan's FLOPs = its steps and evaluations actually run through the hooks."""
    cfg = CONFIGS["gqa"]
    plan = flops.Plan(
        runs=(flops.Run("a", steps=2, seq_len=8, rank=2, batch=3, evaluations=2),),
        # at 0 decimals one step is at most "999,999;": 8 tokens generated
        evaluation=flops.Evaluation(series=5, prompt_len=6, forecast_steps=1, decimals=0),
    )
    model = build(cfg, 2, flops.DEFAULT_TARGETS)
    x = ids(cfg, 3, 8)
    forward = sum(counted(model.loss, x, x).values())
    with count_flops() as c:
        generate(model, ids(cfg, 1, 6), 8)
    result = flops.plan_flops(plan, cfg, budget=1e9)
    assert result["train_flops"] == 2 * 3 * forward
    # an evaluation is the generation plus the teacher-forced pass and both cross-entropies
    # (evaluate.py's ledger equals evaluation_flops: tests/test_evaluate.py)
    # NLL/D's grammar cross-entropy at 0 decimals runs over the 12 tokens without '.'
    # (target_len: the default 100, 10 tokens a step, the last value's ';' included)
    evaluation = flops.evaluation_flops(cfg, 1, 6, 8, [100], 2, flops.DEFAULT_TARGETS,
                                        grammar_tokens=12)
    assert evaluation > c.total
    assert result["eval_flops"] == 2 * 5 * evaluation
    assert result["total"] == 6 * forward + 10 * evaluation
    assert result["fits"] == (result["total"] <= 1e9)


def test_default_plan_stages():
    runs = flops.DEFAULT_PLAN.runs
    assert [r.stage for r in runs].count("grid") == 9
    assert {(r.lr, r.rank) for r in runs if r.stage == "grid"} == {
        (lr, r) for lr in (1e-5, 5e-5, 1e-4) for r in (2, 4, 8)
    }
    assert [r.seq_len for r in runs if r.stage == "context"] == [128, 512, 768]
    assert sum(r.steps for r in runs) == 500 + 9000 + 3000 + 3000
    assert {r.batch for r in runs} == {4}


def test_cli_json_matches_the_closed_form(tmp_path, capsys):
    path = tmp_path / "ledger.jsonl"
    ledger.append_ledger(path, {"kind": "train", "name": "r1", "flops": 123})
    flops.main(["--json", "--ledger", str(path), "--lora-rank", "0"])
    out = json.loads(capsys.readouterr().out)
    cfg = Qwen2Config()
    assert out["forward_total"]["real"] == sum(flops.forward_flops(cfg, 4, 512, loss=True).values())
    assert out["train_step"]["768"]["mha"] == flops.train_step_flops(cfg, 4, 768, gqa="mha")
    plan = out["plan"]["real"]
    assert plan["total"] == plan["train_flops"] + plan["eval_flops"]
    assert plan["fits"] == (plan["total"] <= 1e17)
    assert out["ledger"]["used"] == 123 and out["ledger"]["by_kind"] == {"train": 123}


def test_cli_table(capsys):
    flops.main([])
    out = capsys.readouterr().out
    lm_head = flops.forward_flops(Qwen2Config(), 4, 512, lora_rank=4, loss=True)["lm_head"]
    assert re.search(rf"^lm_head\s+{re.escape(f'{lm_head:.4e}')}\s+26\.\d\d%", out, re.M)
    assert "Training FLOPs per step" in out and "total (as MHA)" in out
