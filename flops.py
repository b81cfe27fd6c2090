"""FLOP accounting for qwen-min: the closed form and the experiment plan (the ledger and the
budget check: ledger.py).

    python flops.py                      # breakdown, FLOPs per training step, the plan vs 1e17
    python flops.py --ledger runs/ledger.jsonl   # what the runs so far have used
    python flops.py --json               # the same, machine-readable

The model counts its own FLOPs as it runs (`with count_flops() as c: model(x)`, count_flops from
qwen_min; each rule is one line beside its op in qwen_min/model.py, derived once in
docs/flops.md's table). `forward_flops` below is the same rules in closed form, and
tests/test_flops.py proves the two agree to the FLOP across configs, batch sizes, lengths, LoRA,
prefill, KV-cache decode steps and generation; tests/test_flops_independent.py checks both
against totals worked out by hand.

Conventions beyond the single ops (the coursework's: add/sub/negate/multiply/divide 1,
exp/log/sqrt 10, an (m×n)(n×p) product m·p·(2n−1)):
  * GQA: the budget counts what runs. K/V projections are d → n_kv·hd (896 → 128) and RoPE
    rotates the n_kv key heads. The coursework allows "GQA costs the same as MHA" (K/V d → d,
    RoPE on all heads); `gqa="mha"` gives that figure, and the CLI prints both. Attention itself
    is the same in both: each of the n_heads query heads scores against its (shared) keys.
  * Causal attention is counted over the full T×S score matrix (S = cached + new positions),
    masked entries included. Padding tokens and −100 rows are counted: they are computed.
  * The loss runs the LM head on the B·(T−1) rows that predict a next token only.
  * Training step = 3 × forward (backward is exactly 2× forward), loss included.
  * Generation (qwen_min.generate) of N tokens = one prefill forward over the prompt with the
    LM head on the last position only, then N−1 one-token decode forwards against the KV cache.
    Sampled (N samples per prompt): the prefill once per prompt, the decode steps for every
    sample, plus the sampling arithmetic per token (`sampling_flops`, over the grammar's 13
    tokens when constrained). Grammar masks and argmax are selections: free.
  * A merged LoRA adapter is free: it is in the weight.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import ledger
from ledger import BUDGET
from qwen_min.grammar import LLMTimeGrammar
from qwen_min.model import Qwen2Config

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "v_proj")
GQA_CONVENTIONS = ("real", "mha")


# ----------------------------------------------------------------------------- closed form


def matmul(m: int, n: int, p: int) -> int:
    """(m×n)(n×p): m·p outputs, each n multiplies and n−1 adds."""
    return m * p * (2 * n - 1)


def projection_shapes(cfg: Qwen2Config, gqa: str = "real") -> dict[str, tuple[int, int, bool]]:
    """name → (d_in, d_out, has_bias) for the seven projections of a layer."""
    if gqa not in GQA_CONVENTIONS:
        raise ValueError(
            f"gqa must be 'real' (K/V at n_kv·head_dim) or 'mha' (K/V at d×d), got {gqa!r}"
        )
    d, f = cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim if gqa == "real" else q
    return {
        "q_proj": (d, q, True),
        "k_proj": (d, kv, True),
        "v_proj": (d, kv, True),
        "o_proj": (q, d, False),
        "gate_proj": (d, f, False),
        "up_proj": (d, f, False),
        "down_proj": (f, d, False),
    }


def forward_flops(
    cfg: Qwen2Config,
    batch: int,
    seq_len: int,
    *,
    past: int = 0,
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    gqa: str = "real",
    last_only: bool = False,
    loss: bool = False,
    lora_dropout: bool = False,
) -> dict[str, int]:
    """FLOPs of one forward pass, per operation (the names the model's hooks use).

    batch × seq_len new tokens attend to `past` cached ones plus themselves (a KV-cache step
    when past > 0). `last_only`: the LM head runs on the last position only (generation).
    `loss`: the pass of `Qwen2ForCausalLM.loss` (a full pass, no cache): the LM head on the
    B·(T−1) positions that predict a next token, then the cross-entropy.
    `lora_dropout`: LoRA dropout is active (training with dropout > 0).
    """
    for name, v, low in (
        ("batch", batch, 1),
        ("seq_len", seq_len, 1),
        ("past", past, 0),
        ("lora_rank", lora_rank, 0),
    ):
        if not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer ≥ {low}, got {v!r}")
    if loss and (past or last_only):
        raise ValueError(
            "loss=True is a full pass (Qwen2ForCausalLM.loss): past=0, last_only=False"
        )
    shapes = projection_shapes(cfg, gqa)
    unknown = set(lora_targets) - set(PROJECTIONS)
    if lora_rank and unknown:
        raise ValueError(
            f"lora_targets {sorted(unknown)} are not projections; choose from {PROJECTIONS}"
        )

    L, d, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    nh, hd, f = cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
    T, S, rows = seq_len, past + seq_len, batch * seq_len
    out: dict[str, int] = {}

    def add(name: str, n: int) -> None:
        out[name] = out.get(name, 0) + n

    def linear(name: str) -> None:  # one projection in each of the L layers
        d_in, d_out, bias = shapes[name]
        add(name, L * matmul(rows, d_in, d_out))
        if bias:
            add(name + ".bias", L * rows * d_out)
        if lora_rank and name in lora_targets:
            if lora_dropout:
                add(name + ".lora_dropout", L * rows * d_in)
            add(name + ".lora_A", L * matmul(rows, d_in, lora_rank))
            add(name + ".lora_B", L * matmul(rows, lora_rank, d_out))
            add(name + ".lora_scale", L * rows * d_out)
            add(name + ".lora_add", L * rows * d_out)

    add("rmsnorm", L * 2 * rows * (4 * d + 12))  # input_layernorm + post_attention_layernorm
    for name in ("q_proj", "k_proj", "v_proj"):
        linear(name)
    for d_out in (shapes["q_proj"][1], shapes["k_proj"][1]):  # RoPE on queries, then keys
        add("rope", L * rows * d_out * 3 + L * rows * d_out // 2)
    add("attn_scores", L * batch * nh * matmul(T, hd, S))
    add("attn_scale", L * batch * nh * T * S)
    add("attn_softmax", L * batch * nh * T * (12 * S - 1))
    add("attn_v", L * batch * nh * matmul(T, S, hd))
    linear("o_proj")
    linear("gate_proj")
    linear("up_proj")
    add("swiglu", L * 14 * rows * f)
    linear("down_proj")
    add("residual", L * 2 * rows * d)
    add("final_norm", rows * (4 * d + 12))  # on every position, also when last_only
    if loss:  # the head runs on the B·(T−1) rows that predict a next token, not the last
        loss_rows = batch * (T - 1)
        add("lm_head", matmul(loss_rows, d, V))
        add("loss", loss_rows * (11 * V + 10) + loss_rows)
    else:
        add("lm_head", matmul(batch if last_only else rows, d, V))
    return out


def matmul_subtotal(breakdown: dict[str, int]) -> int:
    """The matrix-product part of a breakdown (what torch's FlopCounterMode also sees)."""
    names = {*PROJECTIONS, "attn_scores", "attn_v", "lm_head"}
    return sum(v for k, v in breakdown.items() if k in names or k.endswith((".lora_A", ".lora_B")))


def train_step_flops(
    cfg: Qwen2Config,
    batch: int,
    seq_len: int,
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    gqa: str = "real",
    lora_dropout: bool = False,
) -> int:
    """One optimizer step: 3 × (forward + loss); backward counts exactly 2× forward."""
    return 3 * teacher_forced_flops(cfg, batch, seq_len, lora_rank, lora_targets, gqa, lora_dropout)


def teacher_forced_flops(
    cfg: Qwen2Config,
    batch: int,
    seq_len: int,
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    gqa: str = "real",
    lora_dropout: bool = False,
) -> int:
    """One forward with the loss, no backward (a validation / teacher-forced pass)."""
    fwd = forward_flops(
        cfg,
        batch,
        seq_len,
        lora_rank=lora_rank,
        lora_targets=lora_targets,
        gqa=gqa,
        loss=True,
        lora_dropout=lora_dropout,
    )
    return sum(fwd.values())


def generation_flops(
    cfg: Qwen2Config,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    gqa: str = "real",
    samples: int = 0,
    top_p: float = 1.0,
    sample_tokens: int | None = None,
) -> int:
    """`qwen_min.generate` running `new_tokens` steps: the prefill over the prompt for the
    `batch` prompts (once, also when sampling), then new_tokens − 1 decode steps for
    batch·max(samples, 1) rows, step i attending to prompt_len + i positions. With samples, each
    step also pays `sampling_flops` over `sample_tokens` candidates: under a grammar only its
    tokens are drawn from (len(LLMTimeGrammar.token_ids), 13 at decimals > 0), None = the
    whole vocabulary. The grammar mask and the greedy argmax are free."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be ≥ 1, got {new_tokens}")
    if samples < 0:
        raise ValueError(f"samples must be ≥ 0 (0 = greedy), got {samples}")
    rows = batch * max(samples, 1)
    kw = dict(lora_rank=lora_rank, lora_targets=lora_targets, gqa=gqa, last_only=True)
    total = sum(forward_flops(cfg, batch, prompt_len, **kw).values())
    for past in range(prompt_len, prompt_len + new_tokens - 1):
        total += sum(forward_flops(cfg, rows, 1, past=past, **kw).values())
    if samples:
        candidates = cfg.vocab_size if sample_tokens is None else sample_tokens
        total += new_tokens * sampling_flops(rows, candidates, top_p)
    return total


def sampling_flops(rows: int, vocab_size: int, top_p: float = 1.0) -> int:
    """Choosing one sampled token for each of `rows` rows from V = vocab_size candidate logits:
    z = (logits − their max) / temperature (V subtracts, V divides; the max compares only); with
    top_p < 1 the nucleus: softmax (12V − 1), cumsum (V − 1 adds) and the mass before each token
    (V subtracts); Gumbel-max: u from the hash (+ 0.5, × 2⁻²³), −log(−log u) (2 logs, 2
    negates): 24 per logit, then z + g (V adds)."""
    V = vocab_size
    per_row = 2 * V + 24 * V + V
    if top_p < 1.0:
        per_row += (12 * V - 1) + (V - 1) + V
    return rows * per_row


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Run:
    """One training run of the plan, and how often its adapter is evaluated."""

    stage: str
    steps: int
    seq_len: int
    rank: int
    lr: float | None = None  # None: chosen from the grid
    batch: int = 4
    evaluations: int = 1


def evaluation_flops(
    cfg: Qwen2Config,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    target_lens: list[int],
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    gqa: str = "real",
    samples: int = 0,
    top_p: float = 1.0,
    sample_tokens: int | None = None,
    grammar_tokens: int = 13,
) -> int:
    """One batch of evaluate.py: `batch` prompts left-padded to prompt_len, new_tokens generated
    (`samples` continuations each at `top_p`, 0 = greedy; under the grammar sampling draws from
    its `sample_tokens` tokens), then the true targets (target_lens
    tokens each) teacher-forced through the rewound KV cache, and the cross-entropies: over all
    V tokens, and over the grammar's `grammar_tokens` for NLL/D (13; 12 at 0 decimals)."""
    lora = dict(lora_rank=lora_rank, lora_targets=lora_targets, gqa=gqa)
    d, V = cfg.hidden_size, cfg.vocab_size

    def cross_entropy(rows: int, width: int = V) -> int:  # model.add_loss_flops: 11V + 10 a row,
        return rows * (11 * width + 10) + rows  # + the mean

    total = generation_flops(cfg, batch, prompt_len, new_tokens, **lora, samples=samples,
                             top_p=top_p, sample_tokens=sample_tokens)
    if samples:  # no logits kept: the prompt's last token runs again for its logits
        total += sum(forward_flops(cfg, batch, 1, past=prompt_len - 1, last_only=True,
                                   **lora).values())
    longest = max(target_lens)
    if longest > 1:  # hidden states of all but the last target token, after the prompt
        tf = forward_flops(cfg, batch, longest - 1, past=prompt_len, **lora)
        total += sum(tf.values()) - tf["lm_head"]
    for n in target_lens:
        total += matmul(n - 1, d, V)  # the head on this series' own n − 1 positions
        total += cross_entropy(n)  # teacher-forced CE over its n target tokens
        total += cross_entropy(n, grammar_tokens)  # and over the grammar's tokens (NLL/D)
        if not samples:
            total += cross_entropy(min(n, new_tokens))  # generation CE (greedy logits)
    return total


def evaluation_price(
    cfg: Qwen2Config,
    prompt_lens: Sequence[int],
    target_lens: Sequence[int],
    forecast_steps: int,
    decimals: int,
    batch_size: int,
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    gqa: str = "real",
    samples: int = 0,
    top_p: float = 1.0,
    constrained: bool = True,
) -> int:
    """What an evaluate.py run costs at most: the one price that evaluate.py reserves before
    it starts and that the plan counts per evaluation. The series (prompt and target lengths
    in tokens) go in batches of `batch_size` in order, each batch left-padded to its longest
    prompt (`evaluation_flops`), generating the grammar's longest `forecast_steps`-step
    forecast (`LLMTimeGrammar.max_new_tokens`, the length evaluate.py asks for; generation
    ends sooner once every row has its steps, so the ledger then records less). Sampling draws
    from the grammar's tokens, or from the whole vocabulary when not `constrained`."""
    grammar = LLMTimeGrammar(decimals)
    new_tokens = grammar.max_new_tokens(forecast_steps)
    sample_tokens = len(grammar.token_ids) if constrained else None
    price: dict[tuple, int] = {}  # the plan's series are all alike: each shape priced once
    total = 0
    for b in range(0, len(prompt_lens), batch_size):
        shape = (max(prompt_lens[b : b + batch_size]), tuple(target_lens[b : b + batch_size]))
        if shape not in price:
            price[shape] = evaluation_flops(cfg, len(shape[1]), shape[0], new_tokens,
                                            list(shape[1]), lora_rank, lora_targets, gqa,
                                            samples, top_p, sample_tokens,
                                            grammar_tokens=len(grammar.token_ids))
        total += price[shape]
    return total


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a plan, priced by `evaluation_price`. LLMTIME at 2 decimals: 70
    context steps of 10 tokens (the last ';' included) when every value is < 10, 10 forecast
    steps, targets of 10 tokens a step (the last ';' included: NLL/D scores it)."""

    series: int = 150
    prompt_len: int = 700
    forecast_steps: int = 10
    target_len: int = 100
    decimals: int = 2
    samples: int = 0
    top_p: float = 1.0

    @property
    def new_tokens(self) -> int:
        """The tokens generated per series at most: the grammar's longest forecast."""
        return LLMTimeGrammar(self.decimals).max_new_tokens(self.forecast_steps)


@dataclass(frozen=True)
class Plan:
    runs: tuple[Run, ...]
    evaluation: Evaluation = Evaluation()


def coursework_plan(
    ranks: Sequence[int] = (2, 4, 8),
    lrs: Sequence[float] = (1e-5, 5e-5, 1e-4),
    contexts: Sequence[int] = (128, 512, 768),
    grid_context: int = 512,
    grid_steps: int = 1000,
    context_steps: int = 1000,
    final_steps: int = 3000,
    batch: int = 4,
    evaluation: Evaluation = Evaluation(),
) -> Plan:
    """The coursework's plan: "baseline" evaluates the untrained model, a 500-step "trial" run,
    the rank × lr grid, the context study and the final run (what sweep.py runs).

    The context study and the final run use the grid's best rank and the best context, unknown
    in advance: the largest rank and the longest context bound them from above."""
    top = max(ranks)
    return Plan(
        runs=(
            Run("baseline", steps=0, seq_len=0, rank=0),
            Run("trial", steps=500, seq_len=512, rank=4, lr=1e-5, batch=batch),
            *(Run("grid", grid_steps, grid_context, r, lr, batch) for lr in lrs for r in ranks),
            *(Run("context", context_steps, ctx, top, batch=batch) for ctx in contexts),
            Run("final", final_steps, max(contexts), top, batch=batch),
        ),
        evaluation=evaluation,
    )


DEFAULT_PLAN = coursework_plan()  # the published plan: 1.09e17, it does not fit in 1e17


def plan_flops(
    plan: Plan = DEFAULT_PLAN,
    cfg: Qwen2Config | None = None,
    gqa: str = "real",
    budget: float = BUDGET,
    lora_targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
) -> dict:
    """Training + evaluation FLOPs of every run, the total, its share of the budget, and
    whether it fits. cfg defaults to Qwen2.5-0.5B."""
    cfg = cfg or Qwen2Config()
    ev = plan.evaluation
    per_eval: dict[int, int] = {}  # rank → FLOPs of one evaluation
    runs = []
    for run in plan.runs:
        train = (
            run.steps * train_step_flops(cfg, run.batch, run.seq_len, run.rank, lora_targets, gqa)
            if run.steps
            else 0
        )
        if run.rank not in per_eval:
            per_eval[run.rank] = evaluation_price(
                cfg, [ev.prompt_len] * ev.series, [ev.target_len] * ev.series,
                ev.forecast_steps, ev.decimals, ev.series, run.rank, lora_targets, gqa,
                ev.samples, ev.top_p
            )
        evaluation = run.evaluations * per_eval[run.rank]
        runs.append(asdict(run) | {"train_flops": train, "eval_flops": evaluation})
    train_total = sum(r["train_flops"] for r in runs)
    eval_total = sum(r["eval_flops"] for r in runs)
    total = train_total + eval_total
    return {
        "gqa": gqa,
        "runs": runs,
        "evaluation": asdict(ev) | {"new_tokens": ev.new_tokens},
        "train_flops": train_total,
        "eval_flops": eval_total,
        "total": total,
        "budget": budget,
        "share": total / budget,
        "fits": total <= budget,
    }


# shortened first: the grid is the widest stage, so a cut there frees the most per step lost,
# and it only ranks settings, which shorter runs still do; the final run is cut last
FIT_ORDER = ("grid", "context", "final")
FIT_SHARE = 0.98  # the margin: steps run twice after a crash (those after the last checkpoint)


def with_stage_steps(plan: Plan, stage: str, steps: int) -> Plan:
    """The plan with every run of `stage` cut to at most `steps` optimizer steps."""
    runs = tuple(
        replace(r, steps=min(r.steps, steps)) if r.stage == stage else r for r in plan.runs
    )
    return replace(plan, runs=runs)


def fit_plan(
    plan: Plan = DEFAULT_PLAN,
    cfg: Qwen2Config | None = None,
    budget: float = BUDGET,
    share: float = FIT_SHARE,
    quantum: int = 50,
    lora_targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
) -> tuple[Plan, list[str]]:
    """The plan shortened until its total from `plan_flops` (evaluations included, real GQA)
    is at most share·budget, and one line per change saying what and why ([]: it fits as is).

    Stages are cut in FIT_ORDER, each only as far as needed: its runs get a common length, a
    multiple of `quantum` steps, at least one quantum. Raises ValueError when the plan does
    not fit even then."""
    target = share * budget

    def total(p: Plan) -> int:
        return plan_flops(p, cfg, "real", budget, lora_targets)["total"]

    before, changes = total(plan), []
    for stage in FIT_ORDER:
        longest = max((r.steps for r in plan.runs if r.stage == stage), default=0)
        if total(plan) <= target or longest <= quantum:
            continue
        # the total grows with the steps: bisect for the most quanta that fit (at least one)
        lo, hi = 1, longest // quantum
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if total(with_stage_steps(plan, stage, mid * quantum)) <= target:
                lo = mid
            else:
                hi = mid - 1
        plan = with_stage_steps(plan, stage, lo * quantum)
        n = sum(r.stage == stage for r in plan.runs)
        changes.append(f"{stage}: {n} run(s) cut from {longest} to {lo * quantum} steps")
    after = total(plan)
    if after > target:
        raise ValueError(
            f"the plan needs {after:.3e} FLOPs even with the {', '.join(FIT_ORDER)} stages cut "
            f"to at most {quantum} steps, more than {share:.0%} of the {budget:.3g} budget; "
            "raise the budget or evaluate fewer series"
        )
    if changes:
        changes.insert(
            0,
            f"the plan totals {before:.3e} FLOPs (evaluations included) = {before / budget:.1%} "
            f"of the {budget:.3g} budget, over the {share:.0%} that leaves a margin; shortened in "
            f"the order {', '.join(FIT_ORDER)}:",
        )
        changes.append(f"fitted total {after:.3e} FLOPs = {after / budget:.1%} of the budget")
    return plan, changes


# ----------------------------------------------------------------------------- CLI


def report(batch: int, seq_len: int, lora_rank: int, ledger_path: str | None) -> dict:
    cfg = Qwen2Config()
    lora = dict(lora_rank=lora_rank, lora_targets=DEFAULT_TARGETS)
    forward = {
        g: forward_flops(cfg, batch, seq_len, gqa=g, loss=True, **lora) for g in GQA_CONVENTIONS
    }
    steps = {
        ctx: {
            g: train_step_flops(cfg, batch, ctx, lora_rank, DEFAULT_TARGETS, g)
            for g in GQA_CONVENTIONS
        }
        for ctx in (128, 512, 768)
    }
    out = {
        "model": "Qwen2.5-0.5B",
        "config": asdict(cfg),
        "batch": batch,
        "seq_len": seq_len,
        "lora_rank": lora_rank,
        "lora_targets": list(DEFAULT_TARGETS),
        "budget_convention": "real",
        "forward": forward,
        "forward_total": {g: sum(forward[g].values()) for g in GQA_CONVENTIONS},
        "train_step": {str(ctx): v for ctx, v in steps.items()},
        "plan": {g: plan_flops(DEFAULT_PLAN, cfg, g) for g in GQA_CONVENTIONS},
    }
    fitted, changes = fit_plan(DEFAULT_PLAN, cfg)
    out["fitted_plan"] = {g: plan_flops(fitted, cfg, g) for g in GQA_CONVENTIONS}
    out["fit_changes"] = changes
    if ledger_path is not None:
        records = ledger.read_ledger(ledger_path, reservations=True)
        charges = ledger.charges(records)
        used = sum(r["flops"] for r in charges)
        by_kind: dict[str, int] = {}
        for r in charges:
            by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + r["flops"]
        reserved = sum(ledger.held(records).values())  # runs in flight: not spent yet
        out["ledger"] = {
            "path": ledger_path,
            "records": len(charges),
            "by_kind": by_kind,
            "used": used,
            "reserved": reserved,
            "budget": BUDGET,
            "left": BUDGET - used - reserved,
            "share": used / BUDGET,
        }
    return out


def print_plan(title: str, plans: dict[str, dict], step_at_512: dict[str, int]) -> None:
    """One plan's table by stage, then its total under both GQA conventions."""
    plan = plans["real"]
    ev = plan["evaluation"]
    print(
        f"\n{title}, real GQA; each evaluation: {ev['series']} series × "
        f"{ev['prompt_len']}-token prefill + {ev['new_tokens']} generated tokens:"
    )
    print(
        f"{'stage':<10}{'runs':>5}{'steps':>7}{'context':>13}{'rank':>7}{'training':>12}"
        f"{'evaluation':>12}"
    )
    stages: dict[str, list[dict]] = {}
    for run in plan["runs"]:
        stages.setdefault(run["stage"], []).append(run)
    for stage, runs in stages.items():
        ctxs = "/".join(dict.fromkeys(str(x["seq_len"]) for x in runs))
        ranks = "/".join(dict.fromkeys(str(x["rank"]) for x in runs))
        print(
            f"{stage:<10}{len(runs):>5}{runs[0]['steps']:>7}{ctxs:>13}{ranks:>7}"
            f"{sum(x['train_flops'] for x in runs):>12.3e}"
            f"{sum(x['eval_flops'] for x in runs):>12.3e}"
        )
    for g, name in (("real", "real GQA"), ("mha", "as MHA")):
        p = plans[g]
        over = p["total"] - p["budget"]
        steps = over / step_at_512[g]
        verdict = "fits" if p["fits"] else (
            f"does NOT fit: over by {over:.3e} ≈ {steps:.0f} steps at 512"
        )
        print(
            f"total ({name}): {p['total']:.4e} = {100 * p['share']:.1f}% of the "
            f"{p['budget']:.0e} budget: {verdict}"
        )


def print_report(r: dict) -> None:
    real, mha = r["forward"]["real"], r["forward"]["mha"]
    tot_r, tot_m = r["forward_total"]["real"], r["forward_total"]["mha"]
    lora = (
        f", LoRA rank {r['lora_rank']} on {'+'.join(r['lora_targets'])}" if r["lora_rank"] else ""
    )
    print(
        f"One forward pass of Qwen2.5-0.5B, batch {r['batch']}, context {r['seq_len']}, with the "
        f"loss{lora}.\nK/V at their real width (what runs; the budget uses this) and as MHA "
        "(the coursework's allowance):\n"
    )
    print(f"{'operation':<22}{'real GQA':>14}{'%':>8}{'as MHA':>14}{'%':>8}")
    for name in mha:
        a = real.get(name, 0)
        print(
            f"{name:<22}{a:>14.4e}{100 * a / tot_r:>7.2f}%{mha[name]:>14.4e}"
            f"{100 * mha[name] / tot_m:>7.2f}%"
        )
    print(f"{'total':<22}{tot_r:>14.4e}{100:>7.2f}%{tot_m:>14.4e}{100:>7.2f}%\n")

    print(f"Training FLOPs per step (3 × forward with loss), batch {r['batch']}{lora}:")
    print(f"{'context':>8}{'real GQA':>14}{'as MHA':>14}")
    for ctx, v in r["train_step"].items():
        print(f"{ctx:>8}{v['real']:>14.4e}{v['mha']:>14.4e}")

    print_plan("Published plan (sweep.py --plan published)", r["plan"], r["train_step"]["512"])
    print_plan("Fitted plan (sweep.py --plan fit, what make sweep runs)", r["fitted_plan"],
               r["train_step"]["512"])
    print("\n".join("  " + line for line in r["fit_changes"]))
    if "ledger" in r:
        lg = r["ledger"]
        held = f", {lg['reserved']:.4e} reserved by runs in flight" if lg["reserved"] else ""
        print(
            f"\nLedger {lg['path']}: {lg['records']} records, {lg['used']:.4e} FLOPs used = "
            f"{100 * lg['share']:.2f}% of {lg['budget']:.0e}{held}; {lg['left']:.4e} left"
        )
        for kind, n in lg["by_kind"].items():
            print(f"  {kind:<10}{n:>14.4e}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA rank on q_proj+v_proj (0: none)")
    p.add_argument("--ledger", help="JSONL ledger to sum against the budget")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    try:
        r = report(args.batch, args.seq_len, args.lora_rank, args.ledger)
    except (ValueError, OSError) as e:
        raise SystemExit(f"flops.py: {e}") from None
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print_report(r)


if __name__ == "__main__":
    main()
