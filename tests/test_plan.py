"""The experiment plan: the published plan as it was, and the fit that makes `make sweep`
end within 98% of the budget (flops.coursework_plan, flops.fit_plan)."""

from __future__ import annotations

import json

import pytest

import flops
from qwen_min.model import Qwen2Config
from tools.checkpoints import TINY


def steps_by_stage(plan: flops.Plan) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in plan.runs:
        out.setdefault(r.stage, []).append(r.steps)
    return out


def test_published_plan_is_what_it_was():
    """The seed's plan, run by run, and its training FLOPs re-derived from the per-step cost."""
    published = [("baseline", 0, 0, 0, None), ("trial", 500, 512, 4, 1e-5)]
    published += [("grid", 1000, 512, r, lr) for lr in (1e-5, 5e-5, 1e-4) for r in (2, 4, 8)]
    published += [("context", 1000, ctx, 8, None) for ctx in (128, 512, 768)]
    published += [("final", 3000, 768, 8, None)]
    runs = flops.DEFAULT_PLAN.runs
    assert [(r.stage, r.steps, r.seq_len, r.rank, r.lr) for r in runs] == published
    assert {(r.batch, r.evaluations) for r in runs} == {(4, 1)}
    assert flops.DEFAULT_PLAN.evaluation == flops.Evaluation(150, 700, 10)
    assert flops.DEFAULT_PLAN.evaluation.new_tokens == 140  # the grammar's longest 10 steps
    cfg = Qwen2Config()
    step = lambda ctx, r: flops.train_step_flops(cfg, 4, ctx, r)  # noqa: E731
    train = 500 * step(512, 4) + 1000 * 3 * (step(512, 2) + step(512, 4) + step(512, 8))
    train += 1000 * (step(128, 8) + step(512, 8) + step(768, 8)) + 3000 * step(768, 8)
    result = flops.plan_flops(flops.DEFAULT_PLAN)
    assert result["train_flops"] == train
    assert result["total"] == train + result["eval_flops"]
    assert not result["fits"] and result["total"] > 1.09e17  # measured 1.0937e17


def test_fitted_plan_fits_and_shortens_only_the_grid():
    fitted, changes = flops.fit_plan(flops.DEFAULT_PLAN)
    total = flops.plan_flops(fitted)["total"]
    assert total <= 0.98 * flops.BUDGET  # measured 9.790e16
    grid = steps_by_stage(fitted)["grid"][0]  # measured 800 (evaluations priced at 1.20e14 each)
    assert 50 <= grid < 1000 and grid % 50 == 0
    assert steps_by_stage(fitted) == steps_by_stage(flops.DEFAULT_PLAN) | {"grid": [grid] * 9}
    # the longest grid that fits, in multiples of 50: 50 steps more would not
    longer = flops.with_stage_steps(flops.DEFAULT_PLAN, "grid", grid + 50)
    assert flops.plan_flops(longer)["total"] > 0.98 * flops.BUDGET
    assert changes[1:] == [
        f"grid: 9 run(s) cut from 1000 to {grid} steps",
        f"fitted total {total:.3e} FLOPs = {total / flops.BUDGET:.1%} of the budget",
    ]
    before = flops.plan_flops(flops.DEFAULT_PLAN)["total"]
    assert changes[0] == (
        f"the plan totals {before:.3e} FLOPs (evaluations included) = {before / 1e17:.1%} of the "
        "1e+17 budget, over the 98% that leaves a margin; shortened in the order grid, context, "
        "final:"
    )


def test_fit_moves_to_the_next_stage_only_when_the_grid_is_at_its_floor():
    """A budget that the grid alone cannot meet: the grid goes to one quantum, the context
    study is cut as far as needed, the final run is left alone."""
    plan = flops.coursework_plan(ranks=(2, 4), lrs=(1e-3,), contexts=(32, 64), grid_context=64,
                                 grid_steps=40, context_steps=40, final_steps=40, batch=2,
                                 evaluation=flops.Evaluation(3, 70, 2))
    at_floor = flops.with_stage_steps(plan, "grid", 10)
    without_context = flops.plan_flops(flops.with_stage_steps(at_floor, "context", 0), TINY)
    context_step = (flops.plan_flops(flops.with_stage_steps(at_floor, "context", 1), TINY)["total"]
                    - without_context["total"])
    # room for exactly 25 context steps (2 runs) at the 98% target
    budget = (without_context["total"] + 25 * context_step) / 0.98
    fitted, changes = flops.fit_plan(plan, TINY, budget, quantum=10)
    assert steps_by_stage(fitted) == steps_by_stage(plan) | {"grid": [10, 10], "context": [20, 20]}
    assert changes[1:3] == ["grid: 2 run(s) cut from 40 to 10 steps",
                            "context: 2 run(s) cut from 40 to 20 steps"]
    assert flops.plan_flops(fitted, TINY)["total"] <= 0.98 * budget


def test_a_plan_that_fits_is_unchanged_and_one_that_cannot_is_an_error():
    plan = flops.coursework_plan(grid_steps=100, context_steps=100, final_steps=100)
    assert flops.fit_plan(plan) == (plan, [])
    floor = plan
    for stage in ("grid", "context", "final"):
        floor = flops.with_stage_steps(floor, stage, 50)
    need = flops.plan_flops(floor)["total"]
    with pytest.raises(ValueError) as e:
        flops.fit_plan(plan, budget=1e15)
    assert str(e.value) == (
        f"the plan needs {need:.3e} FLOPs even with the grid, context, final stages cut to at "
        "most 50 steps, more than 98% of the 1e+15 budget; raise the budget or evaluate fewer "
        "series"
    )


def test_make_flops_prints_both_plans(capsys):
    flops.main([])
    out = capsys.readouterr().out
    published, fitted = (flops.plan_flops(p)["total"] for p in (flops.DEFAULT_PLAN,
                                                                  flops.fit_plan()[0]))
    assert "Published plan (sweep.py --plan published)" in out
    assert (f"total (real GQA): {published:.4e} = {100 * published / 1e17:.1f}% of the 1e+17 "
            "budget: does NOT fit") in out
    assert "Fitted plan (sweep.py --plan fit, what make sweep runs)" in out
    assert (f"total (real GQA): {fitted:.4e} = {100 * fitted / 1e17:.1f}% of the 1e+17 "
            "budget: fits") in out
    grid = steps_by_stage(flops.fit_plan()[0])["grid"][0]
    assert f"  grid: 9 run(s) cut from 1000 to {grid} steps" in out
    flops.main(["--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["fitted_plan"]["real"]["total"] == fitted
    assert r["plan"]["real"]["total"] == flops.plan_flops()["total"]
