"""Every table and figure of the coursework in one page: report.md and a self-contained index.html.

    python report.py --runs runs                  # → runs/report/report.md and index.html
    python report.py --runs runs/demo             # the demo's runs (make demo)
    python report.py --runs runs/demo --screenshot docs/report.png

Reads whatever a runs folder holds (one training run, a full sweep, the demo) and lays it out in
the coursework's order: the data and its encoding; the untrained model beside the baselines; the
grid; the context study; the final run; the FLOP accounting. Every number names the file it was
read from, every run its date and git commit (its recorded provenance, else the file's
modification time and "commit not recorded"), and a piece that is not there is shown as
missing. index.html embeds its images as data URIs: it opens from disk or as a mail attachment.

How runs are found: a training run is a folder with metrics.jsonl; an evaluation is a folder
with metrics.json (a baseline when its "baseline" names one, the untrained model when it has no
adapter); a sweep is a folder with summary.csv or grid-*/context-* runs; the final run is the
sweep's final/, else a run named final, else the only (or newest) training run.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import data
import flops
import ledger
import metrics
from qwen_min import CheckpointError, runtime
from qwen_min.loading import DEFAULT_MODEL, ConfigError, load_config
from qwen_min.model import Qwen2Config
from qwen_min.runtime import atomic_write_bytes, atomic_write_text, os_error_line, provenance
from sweep import choose_plan, evaluation_size

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# metrics.json keys in table order; the optional ones (newer evaluate.py) get a column when a
# row has them, and rows without them say "n/a"
METRIC_KEYS = ("n_series", "mse_scaled", "mae_scaled", "mse_scaled_filled", "crps_scaled",
               "nll_per_dim_scaled", "coverage", "parse_failure_rate",
               "teacher_forced_ce", "generation_ce", "decoding", "samples")
ALWAYS_SHOWN = {"n_series", "mse_scaled", "mae_scaled", "parse_failure_rate"}
MISSING = "missing"


class ReportError(Exception):
    """An input the report cannot read: the message names the file and what to do."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", default="runs", help="the runs folder to report on")
    p.add_argument("--out", help="output folder (default: RUNS/report)")
    p.add_argument("--screenshot", metavar="PNG", help="also save a picture of the page")
    p.add_argument("--browser", help="Chromium executable for --screenshot (default: on PATH)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the page


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    source: str = ""  # the file every number came from; "" when a column names it per row


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Page:
    """The report as blocks, rendered twice: to Markdown and to HTML."""

    blocks: list = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def missing(self, text: str) -> None:
        self.blocks.append(("missing", text))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def figure(self, path: Path, caption: str) -> None:
        if path.exists():
            self.blocks.append(("figure", Figure(path, caption)))
        else:
            self.missing(f"{caption}: {path} not found")


def fmt(v) -> str:
    """Numbers as the tables show them: 4 significant digits, large counts in e-notation."""
    if v is None:
        return "—"  # the evaluation wrote null: nothing parsed
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:.4e}" if abs(v) >= 1_000_000 else str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def to_markdown(page: Page, out: Path, title: str) -> str:
    lines = [f"# {title}", ""]
    for kind, item in page.blocks:
        if kind == "h2":
            lines += [f"## {item}", ""]
        elif kind == "p":
            lines += [item, ""]
        elif kind == "missing":
            lines += [f"**Missing:** {item}", ""]
        elif kind == "code":
            lines += ["```", item, "```", ""]
        elif kind == "table":
            cell = lambda s: s.replace("|", "\\|")  # noqa: E731
            lines.append("| " + " | ".join(map(cell, item.headers)) + " |")
            lines.append("|---" * len(item.headers) + "|")
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in item.rows]
            lines += [f"\nSource: {item.source}" if item.source else "", ""]
        elif kind == "figure":
            rel = os.path.relpath(item.path, out)
            lines += [f"![{item.caption}]({rel})", "", f"Source: {item.path}", ""]
    return "\n".join(lines)


# wide tables (15 metric columns with intervals) wrap inside their cells rather than run past
# the page: headers break after '_' (<wbr>), cells at spaces, paths anywhere
STYLE = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0;font-size:12px}td,th{border:1px solid #ccc;
padding:2px 5px;text-align:right;overflow-wrap:anywhere}th{background:#f3f3f3}
td:first-child{text-align:left}
img{max-width:100%}.missing{color:#a00;font-weight:600}.source{color:#666;font-size:12px}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto}"""


def to_html(page: Page, title: str) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{e(title)}</h1>"]
    for kind, item in page.blocks:
        if kind == "h2":
            parts.append(f"<h2>{e(item)}</h2>")
        elif kind == "p":
            parts.append(f"<p>{e(item)}</p>")
        elif kind == "missing":
            parts.append(f'<p class="missing">Missing: {e(item)}</p>')
        elif kind == "code":
            parts.append(f"<pre>{e(item)}</pre>")
        elif kind == "table":
            head = "".join(f"<th>{e(h).replace('_', '_<wbr>')}</th>" for h in item.headers)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                           for row in item.rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
            if item.source:
                parts.append(f'<p class="source">Source: {e(item.source)}</p>')
        elif kind == "figure":
            png = base64.b64encode(item.path.read_bytes()).decode()
            parts.append(f'<figure><img alt="{e(item.caption)}" src="data:image/png;base64,'
                         f'{png}"><figcaption class="source">{e(item.caption)} (source: '
                         f"{e(str(item.path))})</figcaption></figure>")
    return "\n".join(parts + ["</body></html>", ""])


# ----------------------------------------------------------------------------- reading runs


def read_json(path: Path) -> dict:
    try:
        return runtime.read_json(path)
    except ValueError as e:
        raise ReportError(str(e)) from None


def read_jsonl(path: Path) -> list[dict]:
    """metrics.jsonl as train.py reads it: a last line cut short by a kill is skipped."""
    try:
        return runtime.read_jsonl(path)
    except UnicodeDecodeError as e:
        raise ReportError(f"{path}: not readable JSON lines ({e}); repair or remove it") from None


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """forecasts.npz's arrays; ReportError when the file is cut short or corrupt."""
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ReportError(f"{path}: not a readable .npz file ({e}); it is truncated or corrupt: "
                          "run evaluate.py for that folder again, or remove the folder") from None


def stamp(path: Path) -> tuple[str, str]:
    """(date, commit) of the file's recorded provenance, else its mtime and 'not recorded'."""
    record = read_json(path).get("provenance") if path.exists() else None
    if isinstance(record, dict) and record.get("date"):
        commit = record.get("git_commit") or "commit not recorded"
        dirty = " (uncommitted changes)" if record.get("git_dirty") else ""
        return record["date"], commit + dirty
    if not path.exists():
        return MISSING, MISSING
    mtime = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    return mtime.isoformat(timespec="seconds") + " (file time)", "commit not recorded"


@dataclass
class Runs:
    """What a runs folder holds, found by the files each kind of folder has."""

    root: Path
    train: list[Path]  # folders with metrics.jsonl
    evals: dict[Path, dict]  # folder → its metrics.json
    sweeps: list[Path]  # the report shows the first
    ledgers: list[Path]  # the report counts the first: root/ledger.jsonl when there is one

    @property
    def sweep(self) -> Path | None:
        return self.sweeps[0] if self.sweeps else None

    @property
    def ledger(self) -> Path | None:
        return self.ledgers[0] if self.ledgers else None


def find_runs(root: Path, out: Path) -> Runs:
    def visible(p: Path) -> bool:
        return out.resolve() not in p.resolve().parents and not any(
            s.startswith(".") for s in p.relative_to(root).parts)

    train = sorted(p.parent for p in root.rglob("metrics.jsonl") if visible(p))
    evals = {p.parent: read_json(p) for p in sorted(root.rglob("metrics.json")) if visible(p)}
    evals = {d: m for d, m in evals.items() if "n_series" in m}
    sweeps = sorted({p.parent for p in root.rglob("summary.csv") if visible(p)}
                    | {p.parent for p in [*train, *evals] if is_sweep_run(p.name)})
    ledgers = sorted((p for p in root.rglob("ledger.jsonl") if visible(p)),
                     key=lambda p: (p != root / "ledger.jsonl", p))
    return Runs(root, train, evals, sweeps, ledgers)


def evals_of(runs: Runs, run: Path) -> list[Path]:
    """Every evaluation of a training run's adapter: run/eval first, then those whose adapter
    is run's (a sampled one beside the greedy one, another split)."""
    mine = [folder for folder, m in runs.evals.items() if folder != run / "eval"
            and m.get("adapter") and Path(m["adapter"]).parent.resolve() == run.resolve()]
    return ([run / "eval"] if run / "eval" in runs.evals else []) + mine


def eval_of(runs: Runs, run: Path) -> Path | None:
    """The evaluation of a training run's adapter: run/eval, else the first whose adapter is
    run's."""
    return next(iter(evals_of(runs, run)), None)


def final_run(runs: Runs) -> tuple[Path | None, str]:
    """(the final training run, the rule that picked it)."""
    if runs.sweep and (runs.sweep / "final" / "metrics.jsonl").exists():
        return runs.sweep / "final", "the sweep's final run"
    named = [r for r in runs.train if r.name == "final"]
    if named:
        return named[0], "the run named final"
    others = [r for r in runs.train if not re.match(r"(grid|context)-", r.name)]
    if len(others) == 1:
        return others[0], "the only training run outside the sweep"
    if others:
        newest = max(others, key=lambda r: (r / "metrics.jsonl").stat().st_mtime)
        return newest, f"the newest of {len(others)} training runs"
    return None, ""


Row = tuple[list[str], Path, "dict | None"]  # labels, metrics.json path, its content


def metric_cell(m: dict, key: str) -> str:
    """The value (coverage with its level), then its bootstrap 95% interval when metrics.json
    has one; n/a if absent."""
    if key not in m:
        return "n/a"
    return fmt(m[key]) + metrics.shown_level(m, key) + metrics.shown_interval(m.get(f"{key}_ci95"))


def metrics_table(label_headers: list[str], rows: list[Row], paired_with_best: bool = False
                  ) -> Table:
    """One row per evaluation: its labels, the metrics it has, and its metrics.json path; with
    paired_with_best, each row's filled MSE minus the best's of its split (versus_best)."""
    present = [m for _, _, m in rows if m]
    keys = [k for k in METRIC_KEYS if k in ALWAYS_SHOWN or any(k in m for m in present)]
    versus = versus_best(rows) if paired_with_best else {}
    extra = ["filled MSE − best (paired 95%; * excludes 0; wins)"] if paired_with_best else []
    body = []
    for labels, source, m in rows:
        if m is None:
            cells = [MISSING] * (len(keys) + len(extra)) + [f"{source} (not found)"]
        else:
            cells = [metric_cell(m, k) for k in keys] + [versus.get(source, "n/a")
                                                         for _ in extra] + [str(source)]
        body.append(labels + cells)
    return Table(label_headers + [metrics.LABELS[k] for k in keys] + extra + ["source"], body)


def versus_best(rows: list[Row]) -> dict[Path, str]:
    """Per metrics.json path: its filled MSE minus that of the best run of its split (ranked by
    metrics.best, as sweep.py ranks), with the paired-bootstrap 95% interval over the series
    both forecast and the share of series each wins, from their forecasts.npz; "best" for the
    best itself. Runs on other series, or without per-series totals, are left out."""
    out = {}
    for split in {m.get("split") for _, _, m in rows if m}:
        found = {src: m for _, src, m in rows if m and m.get("split") == split}
        top = metrics.best(list(found.values()))
        ref = next(src for src, m in found.items() if m is top)
        try:
            reference = metrics.load_series(ref.parent / "forecasts.npz")
        except metrics.TotalsError:
            continue
        out[ref] = "best"
        for src in found.keys() - {ref}:
            try:
                other = metrics.load_series(src.parent / "forecasts.npz")
            except metrics.TotalsError:
                out[src] = "n/a (no per-series totals)"
                continue
            if not metrics.same_series(other, reference):
                out[src] = "other series"
                continue
            d = metrics.paired(other[2], reference[2], metrics.BOOTSTRAP_RESAMPLES)
            out[src] = metrics.shown_difference(d.get("mse_scaled_filled"))
    return out


def best_line(rows: list[Row], what: str) -> str | None:
    """The best run as sweep.py picks it (metrics.best: lowest filled MSE, runs where nothing
    parsed last)."""
    found = [(labels, src, m) for labels, src, m in rows if m]
    if not found:
        return None
    top = metrics.best([m for _, _, m in found])
    labels, src, m = next(r for r in found if r[2] is top)
    return (f"Best of the {what} (lowest validation filled MSE, scaled, as sweep.py ranks): "
            f"{labels[0]}, {fmt(metrics.rank_score(m))} ({src}).")


# ----------------------------------------------------------------------------- sections


def section_runs(page: Page, runs: Runs) -> None:
    page.heading("Runs in this report")
    rows = []
    for run in runs.train:
        rows.append([str(run), "training", *stamp(run / "config.json"), str(run / "config.json")])
    for folder, m in runs.evals.items():
        kind = "baseline" if m.get("baseline") else "evaluation"
        rows.append([str(folder), kind, *stamp(folder / "metrics.json"),
                     str(folder / "metrics.json")])
    if rows:
        page.table(Table(["folder", "kind", "date", "git commit", "source"], rows))
    else:
        page.missing(f"no training run (metrics.jsonl) or evaluation (metrics.json) in {runs.root}")


def section_data(page: Page, runs: Runs, final: Path | None) -> None:
    page.heading("1. Data and the LLMTIME encoding")
    run = final or (runs.train[0] if runs.train else None)  # every run fits the same α
    if run is None or not (run / "adapter" / "qwen_min.json").exists():
        page.missing(f"a training run's adapter/qwen_min.json (α and decimals) in {runs.root}")
        return
    meta_path = run / "adapter" / "qwen_min.json"
    try:
        scaler = data.LLMTimeScaler.from_dict(read_json(meta_path).get("scaler", {}))
    except data.DataError as e:
        raise ReportError(f"{meta_path}: {e}") from None
    page.text(f"α = {scaler.alpha:.6g} (max of the training split / {10 - 10.0**-scaler.decimals:g}"
              f"), {scaler.decimals} decimals (source: {meta_path}).")
    cfg = read_json(run / "config.json") if (run / "config.json").exists() else {}
    data_path = Path(cfg.get("data", ""))
    if not data_path.is_file():
        page.missing(f"the data file {data_path} named in {run / 'config.json'}, for one "
                     "encoded example and the token count")
        return
    try:
        trajectories, _ = data.load_trajectories(data_path)
    except data.DataError as e:
        raise ReportError(str(e)) from None
    index = int(data.split_indices(len(trajectories), cfg.get("split_seed", 42))["train"][0])
    text = scaler.encode(trajectories[index])
    steps = text.split(";")
    page.text(f"{data_path}: {trajectories.shape[0]} systems of {trajectories.shape[1]} time "
              f"steps (prey, predator). Training series {index}, encoded (first 5 of "
              f"{len(steps)} steps):")
    page.code(";".join(steps[:5]) + ";…")
    page.text(f"Token count of that series: {len(text)} (one Qwen2 token per digit and "
              "separator, which data.tokenize checks); a series whose scaled values are all "
              f"below 10 has {data.expected_token_count(len(steps), scaler.decimals)} "
              f"(source: {data_path}).")


def section_baselines(page: Page, runs: Runs, out: Path) -> None:
    page.heading("2. The untrained model beside the baselines")
    rows = [([f"untrained ({m.get('split', '?')})"], d / "metrics.json", m)
            for d, m in runs.evals.items() if not m.get("adapter") and not m.get("baseline")]
    if not rows:
        page.missing(f"an evaluation of the untrained model (evaluate.py without --adapter) in "
                     f"{runs.root}")
    baselines = [([f"{m['baseline']} ({m.get('split', '?')})"], d / "metrics.json", m)
                 for d, m in runs.evals.items() if m.get("baseline")]
    if not baselines:
        page.missing(f"baseline evaluations ({runs.root}/baselines/{{val,test}}/<name>/"
                     "metrics.json)")
    if rows or baselines:
        page.table(metrics_table(["model"], rows + baselines, paired_with_best=True))
        page.text("Each value's interval: the 95% bootstrap interval over the series (evaluate.py "
                  "--bootstrap). Every score of a row comes from one predictive distribution: "
                  "the model's samples (greedy: one sample), a baseline's Gaussian around its "
                  "forecast with σ from its backtest on the contexts. NLL/D: the negative "
                  "log-likelihood per value (scaled units), the mass on the truth's LLMTIME bin "
                  "/ its width, never below −decimals·ln 10. Coverage: of the central interval "
                  "whose exact level (shown) is nearest 90%.")
        calibration = calibration_figure(distinct_labels(rows + baselines),
                                         out / "calibration-baselines.png")
        if calibration:
            page.figure(calibration, "calibration of the baselines and sampled runs above")


def sweep_config(sweep: Path) -> dict:
    """The sweep's own record of its grid (sweep.json, when sweep.py writes one)."""
    return read_json(sweep / "sweep.json") if (sweep / "sweep.json").exists() else {}


def stage_rows(runs: Runs, names: list[str]) -> list[tuple[list[str], Path, dict | None]]:
    """Rows for sweep runs by folder name: settings from config.json, metrics from eval/."""
    rows = []
    for name in names:
        run = runs.sweep / name
        cfg = read_json(run / "config.json") if (run / "config.json").exists() else {}
        labels = [name] + [fmt(cfg[k]) if k in cfg else MISSING
                           for k in ("rank", "lr", "context_length", "steps")]
        folder = eval_of(runs, run)
        metrics_path = (folder or run / "eval") / "metrics.json"
        rows.append((labels, metrics_path, runs.evals.get(folder) if folder else None))
    return rows


SETTING_HEADERS = ["run", "rank", "lr", "context", "steps"]


def listed(value: str | list) -> list[str]:
    """A sweep.json list: sweep.py writes lists; a comma-separated string (as typed) also reads."""
    return [str(x).strip() for x in (value.split(",") if isinstance(value, str) else value)]


def grid_names(sweep: Path) -> list[str]:
    """Every rank × lr pair of the grid (sweep.json's, else the folders'), then stray folders."""
    cfg = sweep_config(sweep)
    found = {m.groups() for p in sweep.iterdir()
             if (m := re.fullmatch(r"grid-r(\d+)-lr(.+)", p.name))}
    ranks = listed(cfg["ranks"]) if "ranks" in cfg else sorted({r for r, _ in found}, key=int)
    lrs = ([f"{float(x):g}" for x in listed(cfg["lrs"])] if "lrs" in cfg
           else sorted({lr for _, lr in found}, key=float))
    names = [f"grid-r{r}-lr{lr}" for r, lr in itertools.product(ranks, lrs)]
    return names + sorted({f"grid-r{r}-lr{lr}" for r, lr in found} - set(names))


def is_sweep_run(name: str) -> bool:
    """sweep.py's run names; make baselines' context-mean is an evaluation, not a context run."""
    return re.fullmatch(r"grid-r\d+-lr.+|context-\d+", name) is not None


def context_names(sweep: Path) -> list[str]:
    cfg = sweep_config(sweep)
    found = {p.name for p in sweep.glob("context-*") if p.is_dir() and is_sweep_run(p.name)}
    expected = [f"context-{c}" for c in listed(cfg["contexts"])] if "contexts" in cfg else []
    return expected + sorted(found - set(expected), key=lambda n: int(n.split("-")[1]))


def section_stage(page: Page, runs: Runs, title: str, stage: str, pattern: str) -> None:
    """The grid or the context study: one row per run that should be there, found or not."""
    page.heading(title)
    if runs.sweep is None:
        page.missing(f"a sweep (sweep.py --out …) in {runs.root}")
        return
    names = (grid_names if stage == "grid" else context_names)(runs.sweep)
    if not names:
        page.missing(f"{stage} runs ({runs.sweep}/{pattern})")
    else:
        rows = stage_rows(runs, names)
        page.table(metrics_table(SETTING_HEADERS, rows))
        if line := best_line(rows, stage):
            page.text(line)
    if stage == "grid":
        page.figure(runs.sweep / "grid_heatmap.png", "validation MSE over the grid")
    if runs.sweeps[1:]:
        page.text(f"Not shown, other sweeps in {runs.root}: "
                  + ", ".join(map(str, runs.sweeps[1:])) + ".")


def training_table(run: Path) -> Table:
    cfg = read_json(run / "config.json") if (run / "config.json").exists() else {}
    records = read_jsonl(run / "metrics.jsonl")
    last = records[-1] if records else {}
    rows = [[k, fmt(cfg.get(k, MISSING))] for k in
            ("model", "rank", "alpha", "targets", "lr", "schedule", "context_length",
             "batch_size", "steps")]
    stopped = cfg.get("stopped")  # train.py's record of why the run ended
    if isinstance(stopped, dict):
        rows.append(["stopped", f"{stopped.get('reason', MISSING)}: {stopped.get('why', '')}"])
    rows += [["steps done", fmt(last.get("step", 0))], ["last train loss", fmt(last.get("loss"))],
             ["FLOPs counted", fmt(last.get("flops"))]]
    return Table(["setting", "value"], rows, f"{run / 'config.json'}, {run / 'metrics.jsonl'}")


def interval_figure(npz_path: Path, out: Path, index: int = 0) -> Path | None:
    """Median and 50%/90% intervals of the sampled forecasts (forecasts.npz `samples`, shape
    (N, S, H, 2)) for the first series, beside the truth; None for greedy forecasts (S = 1)."""
    forecasts = read_npz(npz_path)
    if "samples" not in forecasts or forecasts["samples"].shape[1] < 2:
        return None
    samples, truths = forecasts["samples"], forecasts["truths"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(3, len(samples))
    fig, axes = plt.subplots(n, 2, figsize=(10, 2.4 * n), squeeze=False)
    h = np.arange(1, samples.shape[2] + 1)
    for i, v in itertools.product(range(n), range(2)):
        ax, s = axes[i, v], samples[i, :, :, v]  # (S, H): samples of one variable
        q5, q25, q50, q75, q95 = np.nanpercentile(s, [5, 25, 50, 75, 95], axis=0)
        ax.fill_between(h, q5, q95, alpha=0.2, color="C0", label="90% interval")
        ax.fill_between(h, q25, q75, alpha=0.4, color="C0", label="50% interval")
        ax.plot(h, q50, "C0.-", label="median")
        ax.plot(h, truths[i, :, v], "k:", label="truth")
        ax.set_title(f"series {i}: {('prey', 'predator')[v]}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel("forecast horizon (time steps)")
    return save_figure(fig, out / f"forecast_intervals-{index}.png")


def save_figure(fig, path: Path, rect: tuple[float, ...] = (0, 0, 1, 1)) -> Path:
    """The figure as a PNG at `path`; rect: the part of the figure the axes may fill (the rest
    holds a figure legend)."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def distinct_labels(rows: list[tuple[list[str], Path, dict]]) -> dict[str, dict]:
    """A table's rows as label → metrics.json for a figure: a label that an earlier row has
    (two untrained runs of one split, sampled at two temperatures) gets its run's folder."""
    runs = {}
    for labels, path, m in rows:
        runs[labels[0] if labels[0] not in runs else f"{labels[0]}, {path.parent}"] = m
    return runs


def calibration_figure(runs: dict[str, dict], png: Path) -> Path | None:
    """The PIT histograms (flat when calibrated) and the coverage curves (observed coverage
    against each interval's exact level: on the diagonal when calibrated) of every forecaster
    in `runs` (label → metrics.json) that has them; None when none has."""
    runs = {label: m for label, m in runs.items()
            if m.get("pit_histogram") and (m.get("coverage_curve") or {}).get("levels")}
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    right.plot([0, 1], [0, 1], "k:", label="calibrated")
    for i, (label, m) in enumerate(runs.items()):
        histogram, curve = m["pit_histogram"], m["coverage_curve"]
        bins = len(histogram)
        left.stairs(histogram, np.linspace(0, 1, bins + 1), color=f"C{i}", lw=1.5, label=label)
        right.plot(curve["levels"], [np.nan if c is None else c for c in curve["coverage"]],
                   f"C{i}o-", ms=3, label=label)
    left.axhline(1 / bins, color="k", ls=":")
    left.set(xlabel="PIT (the forecast CDF at the truth)", ylabel="share of cells",
             title="PIT histogram")
    right.set(xlabel="exact level of the central interval", ylabel="observed coverage",
              title="coverage curve", xlim=(0, 1), ylim=(0, 1))
    # one legend for both panels, below them, where it hides no curve
    fig.legend(*right.get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=3)
    legend_rows = -(-(len(runs) + 1) // 3)
    return save_figure(fig, png, rect=(0, 0.02 + 0.05 * legend_rows, 1, 1))


def section_final(page: Page, runs: Runs, final: Path | None, rule: str, out: Path) -> None:
    page.heading("5. The final run")
    if final is None:
        page.missing(f"a final run (the sweep's final/, a run named final, or a training run "
                     f"outside the sweep) in {runs.root}")
        return
    page.text(f"{final}: {rule}.")
    page.table(training_table(final))
    records = read_jsonl(final / "metrics.jsonl")
    val = [[fmt(r["step"]), fmt(r["val_loss"])] for r in records if "val_loss" in r]
    if val:
        page.table(Table(["step", "val_loss"], val, str(final / "metrics.jsonl")))
    else:
        page.missing(f"validation points in {final / 'metrics.jsonl'} (train.py --eval-every)")
    page.figure(final / "loss.png", "training loss with validation points")
    events = sorted(final.rglob("events.out.tfevents.*"))
    if events:
        page.text(f"TensorBoard: {len(events)} event file(s); tensorboard --logdir {final}")
    folders = evals_of(runs, final)
    if not folders:
        page.missing(f"an evaluation of {final / 'adapter'} (evaluate.py --adapter)")
        return
    page.table(metrics_table(["split"], [([runs.evals[f].get("split", "?")], f / "metrics.json",
                                          runs.evals[f]) for f in folders],
                             paired_with_best=len(folders) > 1))
    folder = folders[0]
    m, source = runs.evals[folder], folder / "metrics.json"
    page.figure(folder / "trajectories.png", "forecasts against the truth")
    for index, f in enumerate(folders):
        if not (f / "forecasts.npz").exists():
            continue
        picture = interval_figure(f / "forecasts.npz", out, index)
        if picture is None:
            page.text(f"Greedy forecasts: no samples in {f / 'forecasts.npz'}, so no intervals.")
            continue
        page.figure(picture, f"sampled forecast intervals from {f / 'forecasts.npz'}")
        split = runs.evals[f].get("split")
        beside = {f"{m['baseline']} (baseline)": m for m in runs.evals.values()
                  if m.get("baseline") and m.get("split") == split}
        calibration = calibration_figure({str(f): runs.evals[f]} | beside,
                                         out / f"calibration-{index}.png")
        if calibration:
            page.figure(calibration, f"calibration of the samples in {f / 'metrics.json'}, "
                        "beside the baselines of its split")
    by_h = [[str(h + 1)] + [fmt(m[k][h]) if k in m else MISSING
                            for k in ("mse_scaled_by_horizon", "mae_scaled_by_horizon")]
            for h in range(len(m.get("mse_scaled_by_horizon", [])))]
    page.table(Table(["horizon", "MSE (scaled)", "MAE (scaled)"], by_h, str(source)))
    page.figure(folder / "horizon.png", "error by forecast horizon")


def sweep_plan(runs: Runs, closed_form: dict) -> tuple[dict, str]:
    """(flops.plan_flops of the plan the sweep ran, which plan that is). With a sweep.json: its
    --plan (fit or published) rebuilt by sweep.choose_plan from its flags, data file and model,
    priced against its own --flops-budget; without one, sweep.py's default: the coursework plan
    fitted to the 1e17 budget (flops.report's)."""
    recorded = sweep_config(runs.sweep) if runs.sweep else {}
    if not recorded:
        return closed_form["fitted_plan"]["real"], "sweep.py's default, fitted to the budget"
    where = runs.sweep / "sweep.json"
    args = argparse.Namespace(**recorded)
    try:
        model = Qwen2Config() if args.model == DEFAULT_MODEL else load_config(Path(args.model))
        plan, _ = choose_plan(args, model, evaluation_size(args))
    except (AttributeError, CheckpointError, ConfigError, data.DataError, ValueError) as e:
        raise ReportError(f"{where}: cannot rebuild the sweep's plan ({e}); restore the files it "
                          "names (its --model and --data) or remove it") from None
    return (flops.plan_flops(plan, model, budget=args.flops_budget),
            f"--plan {args.plan}, as {where} records it")


def section_flops(page: Page, runs: Runs, final: Path | None) -> None:
    page.heading("6. FLOPs")
    cfg = read_json(final / "config.json") if final and (final / "config.json").exists() else {}
    batch, ctx = cfg.get("batch_size", 4), cfg.get("context_length", 512)
    rank = cfg.get("rank", 4)
    settings = f"{final / 'config.json'}" if cfg else "flops.py's defaults (no final run)"
    r = flops.report(batch, ctx, rank, None)
    page.text(f"Closed form (flops.py) for Qwen2.5-0.5B, batch {batch}, context {ctx}, LoRA rank "
              f"{rank} on {'+'.join(r['lora_targets'])}; settings from {settings}.")
    real, mha, total = r["forward"]["real"], r["forward"]["mha"], r["forward_total"]["real"]
    rows = [[op, fmt(real.get(op, 0)), f"{100 * real.get(op, 0) / total:.2f}%", fmt(mha[op])]
            for op in mha]
    rows.append(["total", fmt(total), "100.00%", fmt(r["forward_total"]["mha"])])
    page.table(Table(["operation", "real GQA", "share", "as MHA"], rows, "flops.forward_flops"))
    steps = [[c, fmt(v["real"]), fmt(v["mha"])] for c, v in r["train_step"].items()]
    page.table(Table(["context", "FLOPs per training step", "as MHA"], steps,
                     "flops.train_step_flops"))
    plan, which = sweep_plan(runs, r)
    page.table(Table(["stage", "steps", "context", "rank", "lr", "training", "evaluation"],
                     [[p["stage"], fmt(p["steps"]), fmt(p["seq_len"]), fmt(p["rank"]),
                       fmt(p["lr"]) if p["lr"] else "from the grid" if p["steps"] else "—",
                       fmt(p["train_flops"]), fmt(p["eval_flops"])] for p in plan["runs"]],
                     "flops.plan_flops"))
    page.text(f"The plan ({which}): {fmt(plan['total'])} FLOPs = {100 * plan['share']:.1f}% of "
              f"the {plan['budget']:.3g} budget ({'fits' if plan['fits'] else 'does NOT fit'}; "
              "source: flops.plan_flops).")
    if runs.ledger is None:
        page.missing(f"the FLOP ledger ({runs.root}/ledger.jsonl)")
        return
    try:  # the charges; reservations of runs in flight are not spent FLOPs
        every = ledger.read_ledger(runs.ledger, reservations=True)
    except ledger.LedgerError as e:
        raise ReportError(str(e)) from None
    records = ledger.charges(every)
    rows = [[x["kind"], x["name"], fmt(x["flops"]),
             "–".join(map(str, x["steps"])) if "steps" in x else "", x.get("timestamp", "")]
            for x in records]
    page.table(Table(["kind", "name", "flops", "steps", "timestamp"], rows, str(runs.ledger)))
    if runs.ledgers[1:]:
        page.text("Not counted here, other ledgers: " + ", ".join(map(str, runs.ledgers[1:])))
    used = sum(x["flops"] for x in records)
    page.text(f"Counted in the ledger: {fmt(used)} FLOPs in {len(records)} records = "
              f"{100 * used / plan['budget']:.4g}% of the {plan['budget']:.3g} budget "
              f"(source: {runs.ledger}).")
    if reserved := sum(ledger.held(every).values()):
        page.text(f"Reserved by runs in flight, not counted above: {fmt(reserved)} FLOPs.")


def build(root: Path, out: Path) -> tuple[str, str]:
    """(report.md, index.html) for the runs under root; generated figures go to out."""
    runs = find_runs(root, out)
    final, rule = final_run(runs)
    page = Page()
    made = provenance()
    commit = made["git_commit"] or "commit not recorded"
    page.text(f"Built {made['date']} from {root} by report.py at git commit {commit}"
              + (" (uncommitted changes)" if made["git_dirty"] else "") + ".")
    section_runs(page, runs)
    section_data(page, runs, final)
    section_baselines(page, runs, out)
    section_stage(page, runs, "3. The grid: LoRA rank × learning rate", "grid", "grid-r*-lr*")
    section_stage(page, runs, "4. The context study", "context", "context-*")
    section_final(page, runs, final, rule, out)
    section_flops(page, runs, final)
    title = f"qwen-min report: {root}"
    return to_markdown(page, out, title), to_html(page, title)


# ----------------------------------------------------------------------------- browser


def find_browser(name: str | None = None) -> str | None:
    """A Chromium executable: `name` when given, else the first of BROWSERS on PATH."""
    if name:
        return shutil.which(name)
    return next((p for b in BROWSERS if (p := shutil.which(b))), None)


def headless(browser: str, page: Path, *flags: str, timeout: float = 120
             ) -> subprocess.CompletedProcess:
    """Run headless Chromium on a local page (no sandbox: it may run as root in containers)."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", *flags, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def screenshot(browser: str, page: Path, png: Path, size: str = "1200,2400") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        done = headless(browser, page, f"--screenshot={shot}", f"--window-size={size}")
        if not shot.exists():
            raise ReportError(f"--screenshot: {browser} wrote no picture (exit code "
                              f"{done.returncode}); run it by hand to see why")
        atomic_write_bytes(png, shot.read_bytes())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.runs)
    out = Path(args.out) if args.out else root / "report"
    if not root.is_dir():
        print(f"error: --runs {root}: no such folder; point it at a runs folder (runs, "
              "runs/demo) or make one first (make demo, make train)", file=sys.stderr)
        return 2
    browser = find_browser(args.browser) if args.screenshot else None
    if args.screenshot and browser is None:
        print(f"error: --screenshot needs Chromium: {args.browser or ' or '.join(BROWSERS)} is "
              "not on PATH; install it (apt-get install chromium) or pass --browser PATH",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        md, page = build(root, out)
        atomic_write_text(out / "report.md", md)
        atomic_write_text(out / "index.html", page)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk: every file is written atomically, none is left half
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'report.md'} ({len(md.encode()) / 1024:.0f} KiB) and "
          f"{out / 'index.html'} ({len(page.encode()) / 1024:.0f} KiB) in "
          f"{time.perf_counter() - t0:.1f} s")
    if args.screenshot:
        try:
            screenshot(browser, out / "index.html", Path(args.screenshot))
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
