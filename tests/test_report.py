"""report.py: its tables equal the files they come from, missing runs show as missing, and the
page renders in a real headless Chromium with every image decoded and no console message.

One tiny sweep-like runs folder is built in-process (train.main / evaluate.main on conftest's
tiny random checkpoint, 1- and 2-step runs): of a 2 × 2 grid one run is made, one was cut off
before its evaluation and two never started; a final run whose forecasts get samples; an
untrained evaluation and one baseline.
"""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

import data
import evaluate
import flops
import ledger
import metrics as metrics_module
import report
import sweep
import train
from qwen_min.runtime import provenance

FAST = ["--dtype", "fp32", "--device", "cpu"]
RECORDED = {"git_commit": "0123abc", "git_dirty": True, "date": "2026-01-02T03:04:05+00:00"}
SHORT_EVAL = [*FAST, "--limit", "1", "--forecast-steps", "2", "--batch-size", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny) -> Path:
    """On the 512-token tiny checkpoint: LLMTIME's ids are all below 512, and windows of a
    whole series (999 tokens) need no padding token (151643), so it serves and costs little."""
    root = tmp_path_factory.mktemp("runs")
    _, model = tiny
    data.main(["--out", str(root / "lv.h5"), "--systems", "40", "--seed", "0"])
    common = ["--model", str(model), "--data", str(root / "lv.h5"), "--ledger",
              str(root / "ledger.jsonl")]
    shape = [*FAST, "--context-length", "999", "--stride", "999", "--batch-size", "2"]
    grid, final = root / "sweep" / "grid-r2-lr0.01", root / "sweep" / "final"
    assert train.main([*common, *shape, "--out", str(grid), "--rank", "2", "--lr", "0.01",
                       "--steps", "1"]) == 0
    assert train.main([*common, *shape, "--out", str(final), "--rank", "4", "--lr", "0.02",
                       "--steps", "2", "--eval-every", "1", "--eval-windows", "1"]) == 0
    for run in (grid, final):
        assert evaluate.main([*common, *SHORT_EVAL, "--adapter", str(run / "adapter"), "--out",
                              str(run / "eval")]) == 0
    assert evaluate.main([*common, *SHORT_EVAL, "--out", str(root / "eval-untrained")]) == 0
    # a grid run that was cut off before its evaluation: only its config.json
    cut = json.loads((grid / "config.json").read_text()) | {"rank": 4, "lr": 0.02}
    (root / "sweep" / "grid-r4-lr0.02").mkdir()
    (root / "sweep" / "grid-r4-lr0.02" / "config.json").write_text(json.dumps(cut))
    sweep.plot_heatmap(root / "sweep", [{"rank": 2, "lr": 0.01, "mse_scaled": None}], [2, 4],
                       [0.01, 0.02])
    # the layouts others are adding: a baseline evaluation, a sampled forecast, provenance
    # (from an evaluate.py that wrote no intervals)
    baseline = {k: v for k, v in metrics(root / "eval-untrained").items()
                if not k.endswith("_ci95")} | {"baseline": "last value", "mse_scaled": 0.0123456,
                                                "crps_scaled": 0.5}
    (root / "baselines" / "val" / "last-value").mkdir(parents=True)
    (root / "baselines" / "val" / "last-value" / "metrics.json").write_text(json.dumps(baseline))
    # the final adapter sampled too: 6 samples per series
    assert evaluate.main([*common, *SHORT_EVAL, "--adapter", str(final / "adapter"), "--samples",
                          "6", "--out", str(final / "eval-samples")]) == 0
    # a random model parses no step, so its errors are null: give the final run's horizons
    # numbers, as a trained one has, so that the table's columns are checked on values
    scored = metrics(final / "eval") | {"mse_scaled_by_horizon": [0.5, 0.25],
                                        "mae_scaled_by_horizon": [0.7, 0.35]}
    (final / "eval" / "metrics.json").write_text(json.dumps(scored))
    config = grid / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"provenance": RECORDED}))
    # and a run from before train.py recorded provenance: the report falls back to file time
    older = {k: v for k, v in json.loads((final / "config.json").read_text()).items()
             if k != "provenance"}
    (final / "config.json").write_text(json.dumps(older))
    assert report.main(["--runs", str(root)]) == 0
    return root


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def section(md: str, title: str) -> str:
    """The text of the report.md section whose heading starts with `title`."""
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", md, re.M | re.S)
    assert match, f"no section {title!r}"
    return match.group(1)


KEYS = {label: key for key, label in metrics_module.LABELS.items()}


def tables(text: str) -> list[list[dict]]:
    """Every Markdown table of `text` as a list of {header: cell} rows; a metric's readable
    header ("MSE (scaled)") is read back as its metrics.json key (mse_scaled)."""
    out, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---") and i > 0:
            headers = [KEYS.get(h.strip(), h.strip()) for h in lines[i - 1].strip("|").split("|")]
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(headers, (c.strip() for c in row.strip("|").split("|")))))
            out.append(rows)
    return out


def shown(v: float | None) -> float | str:
    """The value as the report shows it, read back: 4 significant digits, "—" for null."""
    return "—" if v is None else float(f"{v:.4g}")


def read(cell: str) -> float | str:
    """A cell's value, without the level ("at 81.8%") and the interval that may follow it."""
    value = cell.split(" [")[0].split(" at ")[0]
    return value if value == "—" else float(value)


def read_md(runs: Path) -> str:
    return (runs / "report" / "report.md").read_text()


def test_grid_table_equals_the_runs_metrics_and_config_and_shows_the_missing_run(runs):
    (grid,) = tables(section(read_md(runs), "3. The grid"))
    rows = {r["run"]: r for r in grid}
    assert list(rows) == ["grid-r2-lr0.01", "grid-r2-lr0.02", "grid-r4-lr0.01", "grid-r4-lr0.02"]
    made = rows["grid-r2-lr0.01"]
    folder = runs / "sweep" / "grid-r2-lr0.01"
    m = metrics(folder / "eval")
    cfg = json.loads((folder / "config.json").read_text())
    assert (int(made["rank"]), float(made["lr"]), int(made["context"]), int(made["steps"])) == (
        cfg["rank"], cfg["lr"], cfg["context_length"], cfg["steps"]) == (2, 0.01, 999, 1)
    for key in ("mse_scaled", "mae_scaled", "parse_failure_rate", "teacher_forced_ce",
                "generation_ce"):
        assert read(made[key]) == shown(m[key]), key
    assert int(made["n_series"]) == m["n_series"] == 1
    assert made["source"] == str(folder / "eval" / "metrics.json")
    for name in ("grid-r2-lr0.02", "grid-r4-lr0.01", "grid-r4-lr0.02"):
        row = rows[name]
        assert row["mse_scaled"] == row["n_series"] == "missing", name
        assert row["source"] == f"{runs / 'sweep' / name / 'eval' / 'metrics.json'} (not found)"
    assert [rows[n]["rank"] for n in rows] == ["2", "missing", "missing", "4"]


def test_untrained_and_baseline_rows_equal_their_metrics_json(runs):
    (table,) = tables(section(read_md(runs), "2. The untrained model"))
    assert [r["model"] for r in table] == ["untrained (val)", "last value (val)"]
    for row, folder in zip(table, (runs / "eval-untrained", runs / "baselines/val/last-value")):
        m = metrics(folder)
        assert row["source"] == str(folder / "metrics.json")
        for key in ("mse_scaled", "mae_scaled", "teacher_forced_ce", "parse_failure_rate"):
            assert read(row[key]) == shown(m[key]), key
    assert table[1]["mse_scaled"] == "0.01235"
    # crps_scaled: every evaluation has it now (a greedy forecast is one sample: CRPS = MAE)
    assert read(table[0]["crps_scaled"]) == shown(metrics(runs / "eval-untrained")["crps_scaled"])
    assert table[1]["crps_scaled"] == "0.5"


def test_final_run_tables_equal_metrics_jsonl_and_horizon_errors(runs):
    text = section(read_md(runs), "5. The final run")
    settings, val, evaluation, horizon = tables(text)
    records = [json.loads(x) for x in (runs / "sweep/final/metrics.jsonl").read_text().split("\n")
               if x]
    assert [(int(r["step"]), float(r["val_loss"])) for r in val] == [
        (x["step"], shown(x["val_loss"])) for x in records]
    assert len(val) == 2
    assert {r["setting"]: r["value"] for r in settings}["steps done"] == "2"
    m = metrics(runs / "sweep/final/eval")
    assert read(evaluation[0]["teacher_forced_ce"]) == shown(m["teacher_forced_ce"])
    assert [(read(r["mse_scaled"]), read(r["mae_scaled"])) for r in horizon] == [
        (shown(a), shown(b)) for a, b in zip(m["mse_scaled_by_horizon"],
                                             m["mae_scaled_by_horizon"])]
    assert [(r["mse_scaled"], r["mae_scaled"]) for r in horizon] == [("0.5", "0.7"),
                                                                      ("0.25", "0.35")]
    assert "![sampled forecast intervals" in text


def test_data_section_shows_alpha_and_the_encoded_series_token_count(runs):
    text = section(read_md(runs), "1. Data")
    meta = json.loads((runs / "sweep/final/adapter/qwen_min.json").read_text())
    assert float(re.search(r"α = (\S+) ", text).group(1)) == float(f"{meta['scaler']['alpha']:.6g}")
    trajectories, _ = data.load_trajectories(runs / "lv.h5")
    scaler = data.LLMTimeScaler.from_dict(meta["scaler"])
    first = int(data.split_indices(len(trajectories))["train"][0])
    assert f"Token count of that series: {len(scaler.encode(trajectories[first]))} " in text
    assert scaler.encode(trajectories[first][:5]) + ";…" in text


def test_ledger_table_and_total_equal_the_ledger(runs):
    text = section(read_md(runs), "6. FLOPs")
    records = ledger.read_ledger(runs / "ledger.jsonl")
    table = tables(text)[-1]
    assert [(r["kind"], r["name"], float(r["flops"])) for r in table] == [
        (x["kind"], x["name"], float(f"{x['flops']:.4e}")) for x in records]
    used = sum(x["flops"] for x in records)
    assert f"Counted in the ledger: {used:.4e} FLOPs in {len(records)} records = " \
           f"{100 * used / 1e17:.4g}% of the 1e+17 budget" in text


def test_missing_pieces_are_shown_as_missing(runs):
    md = read_md(runs)
    context = section(md, "4. The context")
    assert f"**Missing:** context runs ({runs / 'sweep'}/context-*)" in context
    assert "Missing" not in section(md, "3. The grid")  # its heatmap is there


def test_runs_table_gives_recorded_provenance_else_file_time(runs):
    (table,) = tables(section(read_md(runs), "Runs in this report"))
    rows = {r["folder"]: r for r in table}
    recorded = rows[str(runs / "sweep" / "grid-r2-lr0.01")]
    assert (recorded["date"], recorded["git commit"]) == (
        "2026-01-02T03:04:05+00:00", "0123abc (uncommitted changes)")
    other = rows[str(runs / "sweep" / "final")]
    assert other["git commit"] == "commit not recorded" and other["date"].endswith("(file time)")
    assert len(table) == 7  # 2 training runs, their 3 evaluations, the untrained one, a baseline


def test_a_runs_folder_that_does_not_exist_is_a_one_line_error(tmp_path, capsys):
    assert report.main(["--runs", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == (
        f"error: --runs {tmp_path / 'nope'}: no such folder; point it at a runs folder (runs, "
        "runs/demo) or make one first (make demo, make train)\n")


def test_make_baselines_context_mean_is_not_a_context_run(tmp_path):
    """make baselines writes runs/baselines/SPLIT/context-mean: an evaluation, not a sweep."""
    folder = tmp_path / "baselines" / "val" / "context-mean"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"n_series": 3}))
    assert report.find_runs(tmp_path, tmp_path / "report").sweeps == []
    (tmp_path / "context-128").mkdir()
    assert report.context_names(tmp_path) == ["context-128"]
    assert report.context_names(folder.parent) == []


def test_provenance_names_the_checked_out_commit_and_the_time_now():
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()
    p = provenance()
    assert p["git_commit"] == head and isinstance(p["git_dirty"], bool)
    age = datetime.now(timezone.utc) - datetime.fromisoformat(p["date"])
    assert 0 <= age.total_seconds() < 60


# after load, each image's decoded width (0: the browser could not decode it). Synchronous on
# purpose: --dump-dom writes the page right after the load event. A page of ours has no script
# of its own: this one is added to a copy.
CHECKER = """<script>window.addEventListener("load", () => {
  document.body.setAttribute("data-widths",
    JSON.stringify([...document.images].map(i => i.complete ? i.naturalWidth : 0)));
  document.body.setAttribute("data-tables", JSON.stringify([...document.querySelectorAll(
    "table")].map(t => [t.getBoundingClientRect().right, document.documentElement.clientWidth])));
});</script>"""


def test_index_html_embeds_every_figure_byte_for_byte(runs):
    page = (runs / "report" / "index.html").read_text()
    embedded = [base64.b64decode(x) for x in re.findall(r'src="data:image/png;base64,([^"]*)"',
                                                          page)]
    sources = re.findall(r"^Source: (\S+\.png)$", read_md(runs), re.M)
    assert len(sources) == 6  # heatmap, loss, trajectories, intervals, calibration, horizon
    assert embedded == [Path(x).read_bytes() for x in sources]


@pytest.mark.skipif(report.find_browser() is None, reason="no Chromium installed")
def test_index_html_renders_in_headless_chromium_with_every_image_decoded(runs, tmp_path):
    page = (runs / "report" / "index.html").read_text()
    # self-contained: every src/href is an embedded data URI
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert links and all(x.startswith("data:image/png;base64,") for x in links)
    probe = tmp_path / "index.html"
    probe.write_text(page.replace("</body>", CHECKER + "</body>"))
    done = report.headless(report.find_browser(), probe, "--dump-dom", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=10000")
    found = re.search(r'data-widths="([^"]*)"', done.stdout)
    assert found, f"no result from Chromium (exit {done.returncode}): {done.stderr[-500:]}"
    widths = json.loads(html.unescape(found[1]))
    assert len(widths) == read_md(runs).count("\n![") == 6
    assert min(widths) > 0, widths
    # no table runs past the page (at the default window, 800 px wide)
    tables = json.loads(html.unescape(re.search(r'data-tables="([^"]*)"', done.stdout)[1]))
    assert len(tables) == page.count("<table>") and all(r <= w for r, w in tables), tables
    assert [x for x in done.stderr.splitlines() if ":CONSOLE" in x] == []


def test_grid_and_context_runs_come_from_sweep_json(tmp_path):
    """sweep.json as sweep.py writes it (lists): every planned run is named, started or not."""
    (tmp_path / "grid-r4-lr0.01").mkdir()
    (tmp_path / "sweep.json").write_text(json.dumps(
        {"ranks": [2, 4], "lrs": [0.001, 0.01], "contexts": [64, 128]}))
    assert report.grid_names(tmp_path) == ["grid-r2-lr0.001", "grid-r2-lr0.01",
                                           "grid-r4-lr0.001", "grid-r4-lr0.01"]
    assert report.context_names(tmp_path) == ["context-64", "context-128"]


def same(cell: str, value) -> bool:
    """A table cell equals its source value as the report prints it (4 significant digits,
    e-notation for counts ≥ 10⁶, an interval after the value where the source has one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return cell == ("—" if value is None else str(value))
    if isinstance(value, int) and abs(value) < 1_000_000:
        return int(cell) == value
    return read(cell) == (float(f"{value:.4e}") if isinstance(value, int) else shown(value))


def interval_of(cell: str) -> list[float] | None:
    found = re.search(r" \[(\S+), (\S+)\]$", cell)
    return [float(found[1]), float(found[2])] if found else None


def test_settings_and_results_tables_equal_their_source_records(runs):
    """Every cell of the final run's settings table equals config.json (the stop reason:
    its `stopped` record) or metrics.jsonl's last record; every metric cell of the evaluation
    tables (value and bootstrap interval) equals that evaluation's metrics.json. The final
    adapter's sampled evaluation is tabulated beside the greedy one, with CRPS and coverage."""
    md = read_md(runs)
    settings, _, evaluation, _ = tables(section(md, "5. The final run"))
    final = runs / "sweep" / "final"
    cfg = json.loads((final / "config.json").read_text())
    last = [json.loads(x) for x in (final / "metrics.jsonl").read_text().splitlines() if x][-1]
    got = {r["setting"]: r["value"] for r in settings}
    for k in ("model", "rank", "alpha", "targets", "lr", "schedule", "context_length",
              "batch_size", "steps"):
        assert same(got[k], cfg[k]), k
    assert got["stopped"] == "completed: reached --steps 2"
    assert got["stopped"] == f"{cfg['stopped']['reason']}: {cfg['stopped']['why']}"
    assert same(got["steps done"], last["step"]) and same(got["last train loss"], last["loss"])
    assert same(got["FLOPs counted"], last["flops"])
    (headline,) = tables(section(md, "2. The untrained model"))
    checked = 0
    for rows, folders in ((evaluation, (final / "eval", final / "eval-samples")),
                          (headline[:1], (runs / "eval-untrained",))):
        assert [r["source"] for r in rows] == [str(f / "metrics.json") for f in folders]
        for row, folder in zip(rows, folders):
            m = metrics(folder)
            for key in set(report.METRIC_KEYS) & set(row):
                assert same(row[key].split(" [")[0] if m[key] is not None else row[key],
                            m[key]), (folder, key)
                if key == "coverage" and m[key] is not None:
                    assert row[key].split(" [")[0].endswith(
                        f" at {100 * m['coverage_level']:.1f}%"), row[key]
                ci = m.get(f"{key}_ci95")
                assert interval_of(row[key]) == (ci and [float(f"{x:.3g}") for x in ci]), key
                checked += 1
    sampled = evaluation[1]
    assert sampled["decoding"] == "grammar-constrained, 6 samples"
    assert {"crps_scaled", "coverage", "nll_per_dim_scaled"} <= set(sampled)
    # 6 samples: the interval nearest 90% is the 1st–6th, level 5/7
    assert re.fullmatch(r"\S+ at 71\.4% \[\S+, \S+\]", sampled["coverage"]), sampled["coverage"]
    assert checked >= 30


def test_interval_figures_come_only_from_sampled_evaluations(runs):
    text = section(read_md(runs), "5. The final run")
    final = runs / "sweep" / "final"
    assert (f"Greedy forecasts: no samples in {final / 'eval' / 'forecasts.npz'}, so no "
            "intervals.") in text
    assert f"![sampled forecast intervals from {final / 'eval-samples' / 'forecasts.npz'}]" in text
    assert (f"![calibration of the samples in {final / 'eval-samples' / 'metrics.json'}, beside "
            "the baselines of its split]") in text
    assert text.count("![sampled forecast intervals") == 1
    assert report.interval_figure(final / "eval" / "forecasts.npz", runs) is None


def test_best_ranks_as_the_sweep_does(tmp_path):
    """Filled MSE decides (a run failing half its steps has a low MSE over the steps that
    parsed, and a high filled one); a run where nothing parsed comes last."""
    rows = [(["fails-half"], tmp_path / "a", {"mse_scaled": 0.01, "mse_scaled_filled": 0.9,
                                               "teacher_forced_ce": 1.0}),
            (["steady"], tmp_path / "b", {"mse_scaled": 0.2, "mse_scaled_filled": 0.2,
                                          "teacher_forced_ce": 2.0}),
            (["nothing-parsed"], tmp_path / "c", {"mse_scaled": None, "mse_scaled_filled": None,
                                                  "teacher_forced_ce": 0.1})]
    assert report.best_line(rows, "grid") == (
        f"Best of the grid (lowest validation filled MSE, scaled, as sweep.py ranks): steady, "
        f"0.2 ({tmp_path / 'b'}).")
    assert sweep.best([m for _, _, m in rows]) is rows[1][2]


def write_eval(folder: Path, errors: np.ndarray, indices: list[int], split: str = "val") -> Path:
    """A minimal evaluation: metrics.json and forecasts.npz whose forecasts miss a zero truth by
    `errors` (N, steps, 2)."""
    folder.mkdir(parents=True)
    truths = np.zeros(errors.shape)
    scores, totals = metrics_module.score(metrics_module.Samples(errors[:, None]), truths,
                                          truths[:, 0], alpha=1.0)
    (folder / "metrics.json").write_text(json.dumps(
        scores | {"split": split, "n_series": len(errors), "teacher_forced_ce": None}))
    np.savez(folder / "forecasts.npz", indices=np.array(indices), truths=truths,
             **metrics_module.totals_arrays(totals))
    return folder / "metrics.json"


def test_headline_marks_differences_whose_interval_excludes_zero(tmp_path):
    """Run b misses by run a's error + 1 everywhere: a is best, b's filled MSE is higher on
    every series (interval above 0, marked *), a run on other series is not paired."""
    rng = np.random.default_rng(0)
    small = rng.normal(0.0, 0.3, (12, 2, 2))
    a = write_eval(tmp_path / "a", small, list(range(12)))
    b = write_eval(tmp_path / "b", np.abs(small) + 1.0, list(range(12)))
    c = write_eval(tmp_path / "c", small, list(range(1, 13)))
    rows = [([n], p, json.loads(p.read_text())) for n, p in (("a", a), ("b", b), ("c", c))]
    table = report.metrics_table(["model"], rows, paired_with_best=True)
    versus = {r[0]: r[-2] for r in table.rows}
    assert versus["a"] == "best" and versus["c"] == "other series"
    assert re.fullmatch(r"\+\S+ \[\+\S+, \+\S+\]\*; wins 0% / 100%", versus["b"]), versus["b"]
    same_errors = write_eval(tmp_path / "d", small, list(range(12)))
    d = report.versus_best(rows[:1] + [(["d"], same_errors, json.loads(same_errors.read_text()))])
    assert d[same_errors] == "+0 [+0, +0]; wins 0% / 0%"  # identical runs: no difference


def test_baselines_show_coverage_and_calibration_like_sampled_runs(tmp_path):
    """Two real baseline evaluations: each row's coverage is its Gaussian's at the exact level
    90.0%, with the readable headers, and section 2 draws their calibration (PIT histogram and
    coverage curve)."""
    data.main(["--out", str(tmp_path / "lv.h5"), "--systems", "40", "--seed", "0"])
    root = tmp_path / "runs"
    for name in ("persistence", "linear"):
        assert evaluate.main(["--data", str(tmp_path / "lv.h5"), "--baseline", name, "--limit",
                              "4", "--forecast-steps", "3", "--plot-series", "0", "--out",
                              str(root / "baselines" / "val" / name), "--ledger",
                              str(root / "ledger.jsonl")]) == 0
    assert report.main(["--runs", str(root)]) == 0
    text = section(read_md(root), "2. The untrained model")
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    assert "| MSE (scaled) |" in header and "| coverage (its level) |" in header
    (table,) = tables(text)
    assert [row["model"] for row in table] == ["linear (val)", "persistence (val)"]
    for row in table:
        m = metrics(root / "baselines" / "val" / row["model"].split()[0])
        assert m["coverage_curve"]["levels"] == pytest.approx(metrics_module.GAUSSIAN_LEVELS)
        assert len(m["pit_histogram"]) == metrics_module.PIT_BINS
        assert read(row["coverage"]) == shown(m["coverage"])
        assert row["coverage"].split(" [")[0].endswith(" at 90.0%"), row["coverage"]
        assert read(row["crps_scaled"]) != read(row["mae_scaled"])
    assert "![calibration of the baselines and sampled runs above](calibration-baselines.png)" in (
        text)


def test_flop_section_shows_the_plan_the_sweep_ran(tiny, tmp_path):
    """sweep.json's --plan fit at its own --flops-budget (1e15), rebuilt as sweep.py builds
    it, not the published plan against 1e17."""
    _, model = tiny
    data.main(["--out", str(tmp_path / "lv.h5"), "--systems", "40", "--seed", "0"])
    args = sweep.parse_args(["--model", str(model), "--data", str(tmp_path / "lv.h5"),
                             "--flops-budget", "1e15", "--out", str(tmp_path / "sweep")])
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(vars(args)))
    runs = report.Runs(tmp_path, [], {}, [tmp_path / "sweep"], [])
    plan, which = report.sweep_plan(runs, flops.report(4, 512, 4, None))
    cfg = report.load_config(model)
    expected = flops.plan_flops(sweep.choose_plan(args, cfg, sweep.evaluation_size(args))[0],
                                cfg, budget=1e15)
    assert plan == expected and plan["budget"] == 1e15 and plan["fits"]
    assert which == f"--plan fit, as {tmp_path / 'sweep' / 'sweep.json'} records it"


def test_two_runs_with_one_label_both_reach_the_figure(tmp_path):
    a, b = {"n": 1}, {"n": 2}
    rows = [(["untrained (val)"], tmp_path / "t1" / "metrics.json", a),
            (["untrained (val)"], tmp_path / "t2" / "metrics.json", b)]
    assert report.distinct_labels(rows) == {"untrained (val)": a,
                                            f"untrained (val), {tmp_path / 't2'}": b}
