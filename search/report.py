"""The sweep report: one self-contained HTML file (plotly.js inlined, nothing fetched).

    python -m search.report RUN_DIR        # writes RUN_DIR/report.html

    python -m search.report RUN_DIR --study-storage URL   # a study whose URL needs its password

Built only from the run's own plain files (``sweep.json``, ``trials.csv``, each trial's
``result.json`` lines, ``final/metrics.json`` and its PNGs) and its Optuna study (``study.db`` or
``--study-storage``), read through Optuna: nothing in the results folder is unpickled or executed.
Works on finished, interrupted and still-running sweeps; sections whose inputs do not exist yet
say so. A run folder made before sweeps kept their study (no ``study.db``) gets no importances
or Optuna plots, with a note that says why; everything else is shown.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pandas as pd

from tumorseg.cli import ArgumentParser, exit_on_user_error
from tumorseg.errors import UserError

from search.report_final import final_table_html, postprocess_html
from search.rundir import BEST_CONFIG_JSON, DATA_SUMMARY_TXT, FINAL_DIR, REPORT_HTML, TUNE_DIR, read_sweep_json
from search.study import load_run_study
from search.trials import model_label, pareto_front, read_table, scored_trials

MIN_TRIALS_FOR_IMPORTANCE = 10  # below this the importances are shown with a warning
FANOVA_FULL_DEPTH_TRIALS, FANOVA_MAX_DEPTH = 500, 8  # above 500 trials, fANOVA's trees stop at depth 8
TABLE_ROWS = 100  # the report's trial table: the best 100 (all of them are in trials.csv)
MANY_TRIALS = 100  # above this, plots draw trials as a few traces, not one each
PARALLEL_TRIALS = 300  # the parallel-coordinates plot shows at most the best 300
STATUS_COLOURS = {
    "COMPLETED": "#2ca02c", "STOPPED_EARLY": "#1f77b4", "FAILED": "#d62728", "ERROR": "#7f0000",
    "RUNNING": "#ff7f0e", "PENDING": "#999999", "PAUSED": "#bcbd22",
}
STUDY_STATE_WORDS = {"PRUNED": "PRUNED (stopped by ASHA)", "FAIL": "FAIL (failed or crashed)", "RUNNING": "RUNNING",
                     "WAITING": "WAITING (queued points)"}


# ----------------------------------------------------------------------------- inputs


def load_curves(run_dir: Path, table: pd.DataFrame | None) -> dict[str, dict[str, list]]:
    """Per trial id, its reported epochs and val Dice (``{"epoch": [...], "val_dice": [...]}``, by
    epoch, the last report of an epoch kept) from Tune's ``result.json`` lines (plain JSON)."""
    curves = {}
    if table is None:
        return curves
    for trial_id, trial_dir in zip(table["trial_id"], table["trial_dir"]):
        path = Path(run_dir) / TUNE_DIR / str(trial_dir) / "result.json"
        if not path.is_file():
            continue
        by_epoch = {}
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            if "val_dice" in record and "epoch" in record and not record.get("failure_reason"):
                by_epoch[record["epoch"]] = record["val_dice"]
        if by_epoch:
            epochs = sorted(by_epoch)
            curves[trial_id] = {"epoch": epochs, "val_dice": [by_epoch[e] for e in epochs]}
    return curves


def complete_trials(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def best_trials_study(study, k: int):
    """``study`` itself, or an in-memory study of its ``k`` best COMPLETE trials when it has more."""
    import optuna

    complete = complete_trials(study)
    if len(complete) <= k:
        return study
    best = optuna.create_study(direction="maximize")
    best.add_trials(sorted(complete, key=lambda t: -t.value)[:k])
    return best


def common_params(study) -> list[str]:
    """Parameters every COMPLETE trial of ``study`` has (conditional ones drop out unless always sampled)."""
    names = [set(t.params) for t in complete_trials(study)]
    return sorted(set.intersection(*names)) if names else []


def importances(study) -> dict[str, dict[str, float]]:
    """fANOVA (seeded) and PED-ANOVA importances of the parameters every COMPLETE trial has
    (Optuna's evaluators read COMPLETE trials only)."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    params = common_params(study)
    out = {}
    # fANOVA's forest grows with the trials: 166 s at 2,000 trials on 2 cores, 14 s with trees of depth
    # <= 8 (the same ranking); Optuna's defaults up to FANOVA_FULL_DEPTH_TRIALS
    depth = {} if len(complete_trials(study)) <= FANOVA_FULL_DEPTH_TRIALS else {"max_depth": FANOVA_MAX_DEPTH}
    evaluators = {"fANOVA": FanovaImportanceEvaluator(seed=0, **depth), "PED-ANOVA": PedAnovaImportanceEvaluator()}
    for name, evaluator in evaluators.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out[name] = optuna.importance.get_param_importances(study, evaluator=evaluator, params=params)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                out[name] = {"error": str(err)}
    return out


# ----------------------------------------------------------------------------- figures


def _fig_html(fig) -> str:
    fig.update_layout(template="plotly_white", margin=dict(l=50, r=20, t=50, b=40), width=None, autosize=True)
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"responsive": True, "displaylogo": False})


def importance_figure(values: dict[str, dict[str, float]]):
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, scores in values.items():
        if "error" in scores:
            continue
        params = list(scores)
        fig.add_bar(name=name, y=params, x=[scores[p] for p in params], orientation="h")
    fig.update_layout(barmode="group", title="Parameter importance for validation Dice", xaxis_title="importance (normalised)", height=380)
    return fig


def cost_section_html(table: pd.DataFrame | None, base: dict) -> str:
    """Dice against cost: each scored trial's best val Dice over its GFLOPs per image (marker size:
    parameters), coloured by arch-encoder, with the Pareto front; is a bigger model worth it?"""
    import plotly.graph_objects as go

    scored = scored_trials(table)
    if scored.empty or "gflops" not in scored or scored["gflops"].isna().all():
        return "<p class='warn'>No trial has recorded its cost yet (params, GFLOPs, images/s).</p>"
    scored = scored.assign(model=[model_label(row, base) for row in scored.to_dict("records")])
    fig = go.Figure()
    for label, group in scored.groupby("model", sort=True):
        fig.add_scatter(
            x=group["gflops"], y=group["best_val_dice"], mode="markers", name=label,
            marker=dict(size=[8 + 2 * math.sqrt(max(v, 0)) for v in group["params_m"].fillna(0)], opacity=0.8),
            customdata=group[["trial_index", "params_m", "train_images_per_s"]].to_numpy(),
            hovertemplate=("trial %{customdata[0]}<br>%{x:.2f} GFLOPs, %{customdata[1]:.1f} M params<br>"
                           "%{customdata[2]:.0f} train images/s<br>best val Dice %{y:.4f}<extra>" + html.escape(label) + "</extra>"),
        )
    front = pareto_front(scored)
    fig.add_scatter(x=front["gflops"], y=front["best_val_dice"], mode="lines", line=dict(color="#444", dash="dot", shape="hv"),
                    name="Pareto front", hoverinfo="skip")
    fig.update_layout(title="Validation Dice against cost (marker size: parameters)", xaxis_title="GFLOPs per image at the trial's resize",
                      yaxis_title="best val Dice", height=420)
    rows = "".join(f"<tr><td>{int(r.trial_index)}</td><td>{html.escape(r.model)}</td><td>{r.best_val_dice:.4f}</td><td>{r.gflops:.2f}</td>"
                   f"<td>{r.params_m:.1f}</td><td>{_fmt(r.train_images_per_s, 0)}</td></tr>"
                   for r in front.assign(model=[model_label(x, base) for x in front.to_dict("records")]).itertuples())
    return (_fig_html(fig) + "<p>Pareto front: no other trial has both a higher Dice and fewer GFLOPs. Images/s depend on "
            "the node a trial ran on; GFLOPs and parameters do not.</p><table class='kv'><tr><th>trial</th><th>model</th>"
            f"<th>best val Dice</th><th>GFLOPs</th><th>M params</th><th>train images/s</th></tr>{rows}</table>")


def legible_slices(fig, num_trials: int):
    """Optuna's slice plot with an integer trial colour scale (0..N-1) and one label per decade on log axes."""
    for trace in fig.data:
        marker = getattr(trace, "marker", None)
        if marker is not None and marker.color is not None and not isinstance(marker.color, str):
            marker.cmin, marker.cmax = 0, max(1, num_trials - 1)
            if marker.colorbar is not None:
                marker.colorbar.update(title="trial", dtick=max(1, (num_trials - 1) // 8 + 1), tickformat="d")
    fig.for_each_xaxis(lambda axis: axis.update(dtick=1, tickformat=".0e") if axis.type == "log" else None)
    return fig


def _joined(curves: list[dict], key: str) -> list:
    """Several curves as one trace's coordinates: ``None`` between curves breaks the line."""
    out = []
    for curve in curves:
        out += [*curve[key], None]
    return out


def learning_curves_figure(curves: dict[str, dict[str, list]], table: pd.DataFrame, max_epochs: int):
    """Validation Dice per epoch, one colour per status. Up to MANY_TRIALS trials a trace each; above,
    one trace per status (thin, translucent) with the 10 best trials drawn on top, so 2,000 trials
    stay one legible figure."""
    import plotly.graph_objects as go

    fig = go.Figure()
    rows = [row for row in table.sort_values("trial_index").itertuples() if row.trial_id in curves]
    many = len(rows) > MANY_TRIALS
    top = {r.trial_id for r in sorted(rows, key=lambda r: -(r.best_val_dice if r.best_val_dice == r.best_val_dice else -1))[:10]}
    groups = [[row] for row in rows] if not many else \
        [[row for row in rows if row.status == status] for status in dict.fromkeys(row.status for row in rows)]
    if many:
        groups += [[row] for row in rows if row.trial_id in top]
    shown = set()
    for group in groups:
        highlighted = many and len(group) == 1 and group[0].trial_id in top
        status = group[0].status
        colour = STATUS_COLOURS.get(status, "#444")
        label = f"trial {group[0].trial_index} (top 10)" if highlighted else status
        data = [{**curves[row.trial_id], "trial": [row.trial_index] * len(curves[row.trial_id]["epoch"])} for row in group]
        fig.add_scatter(
            x=_joined(data, "epoch"), y=_joined(data, "val_dice"), customdata=_joined(data, "trial"),
            mode="lines+markers" if not many or highlighted else "lines", connectgaps=False,
            line=dict(color=colour, width=2.5 if highlighted else 1.5 if not many else 0.7),
            opacity=1.0 if highlighted or not many else 0.35, marker=dict(size=4),
            name=label, legendgroup=label, showlegend=label not in shown,
            hovertemplate=f"trial %{{customdata}}<br>epoch %{{x}}<br>val Dice %{{y:.4f}}<extra>{status}</extra>",
        )
        shown.add(label)
    stopped = [row for row in rows if row.status == "STOPPED_EARLY"]
    if stopped:
        last = [(curves[r.trial_id]["epoch"][-1], curves[r.trial_id]["val_dice"][-1]) for r in stopped]
        fig.add_scatter(x=[e for e, _ in last], y=[d for _, d in last], mode="markers", name="stopped by ASHA", hoverinfo="skip",
                        marker=dict(symbol="x", size=10 if not many else 5, color=STATUS_COLOURS["STOPPED_EARLY"]))
    fig.update_layout(title="Learning curves: validation Dice per epoch (x: where ASHA stopped a trial)",
                      xaxis=dict(title="epoch", range=[0.5, max_epochs + 0.5], dtick=1 if max_epochs <= 30 else None),
                      yaxis_title="val Dice (native resolution)", height=420)
    return fig


def assign_slots(table: pd.DataFrame) -> pd.Series:
    """A slot per trial: node + GPU ids where known, else the first free lane on its node."""
    slots = pd.Series("", index=table.index, dtype=object)
    lanes: dict[str, list[float]] = {}
    for idx, row in table.sort_values("start_ts").iterrows():
        node = str(row.get("node_id") or "node")[:8]
        gpus = row.get("gpu_ids")
        if isinstance(gpus, str) and gpus not in ("", "nan"):
            slots[idx] = f"{node} gpu {gpus}"
            continue
        ends = lanes.setdefault(node, [])
        lane = next((i for i, end in enumerate(ends) if end <= row["start_ts"]), len(ends))
        if lane == len(ends):
            ends.append(row["end_ts"])
        else:
            ends[lane] = row["end_ts"]
        slots[idx] = f"{node} lane {lane}"
    return slots


def timeline(table: pd.DataFrame, slots_available: int | None = None) -> tuple[object, float | None]:
    """Gantt chart of trials per slot over wall-clock time, and the slot utilisation in %."""
    import plotly.graph_objects as go

    timed = table.dropna(subset=["start_ts", "end_ts"]).copy()
    if timed.empty:
        return None, None
    timed["slot"] = assign_slots(timed)
    t0 = timed["start_ts"].min()
    span = timed["end_ts"].max() - t0
    slots = slots_available or timed["slot"].nunique()
    busy = (timed["end_ts"] - timed["start_ts"]).clip(lower=0).sum()
    utilisation = 100.0 * busy / (slots * span) if span > 0 else None
    fig = go.Figure()
    labelled = len(timed) <= MANY_TRIALS  # "t12" inside each bar; unreadable with thousands
    for status, group in timed.sort_values("trial_index").groupby("status", sort=False):
        fig.add_bar(
            y=group["slot"], x=group["end_ts"] - group["start_ts"], base=group["start_ts"] - t0, orientation="h",
            marker_color=STATUS_COLOURS.get(status, "#444"), name=status, customdata=group["trial_index"],
            text=[f"t{i}" for i in group["trial_index"]] if labelled else None, textposition="inside",
            hovertemplate=f"trial %{{customdata}} ({status})<br>start %{{base:.0f}} s, %{{x:.0f}} s long<extra>%{{y}}</extra>",
        )
    title = "Resource timeline: trials per slot"
    if utilisation is not None:
        title += f" (slot utilisation {utilisation:.0f}% over {span:.0f} s, {slots} slots)"
    fig.update_layout(title=title, barmode="overlay", xaxis_title="seconds since the first trial started", height=140 + min(40, max(12, 1600 // timed["slot"].nunique())) * timed["slot"].nunique())
    return fig, utilisation


# ----------------------------------------------------------------------------- HTML pieces


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return html.escape(str(value))


def docstring_html(text: str) -> str:
    """A module docstring as HTML text: paragraphs, ``- `` bullet lists, ````code```` and ``**bold**``."""
    import re

    def inline(part: str) -> str:
        part = html.escape(" ".join(part.split()))
        part = re.sub(r"``(.+?)``", r"<code>\1</code>", part)
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", part)

    blocks = []
    for paragraph in text.strip().split("\n\n"):
        if paragraph.lstrip().startswith("- "):
            items = re.split(r"\n\s*- ", "\n" + paragraph.strip())[1:]
            blocks.append("<ul>" + "".join(f"<li>{inline(item)}</li>" for item in items) + "</ul>")
        else:
            blocks.append(f"<p>{inline(paragraph)}</p>")
    return "\n".join(blocks)


def headline_html(final: dict | None, best: dict | None) -> str:
    from tumorseg import metrics as metrics_module

    parts = ["<h2>1. Headline</h2>"]
    if best:
        params = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in best["params"].items())
        parts.append(
            f"<p>Best trial <b>{best['trial_index']}</b> ({html.escape(best['trial_id'])}), validation Dice "
            f"<b>{best['best_val_dice']:.4f}</b> during the sweep.</p><table class='kv'>{params}</table>"
        )
    else:
        parts.append("<p class='warn'>No best configuration: no trial finished an epoch without failing.</p>")
    if not final:
        parts.append("<p class='warn'>No final model yet (the sweep is running, was interrupted, or ran with "
                     "--no-retrain): run <code>python -m search.retrain RUN_DIR</code>.</p>")
    else:
        dataset = final.get("dataset")
        if dataset:
            parts.append(f"<p>Data: <b>{html.escape(dataset['name'])}</b> ({html.escape(dataset['layout'])}, "
                         f"{dataset['channels']} channel(s), fingerprint <code>{html.escape(dataset['fingerprint'])}</code>) "
                         f"at <code>{html.escape(dataset['path'])}</code>; splits "
                         + ", ".join(f"{k} {v}" for k, v in dataset["split_sizes"].items())
                         + (" (valid/test carved by case: splits.json)" if dataset["splits_from"] != "data" else "") + ".</p>")
        parts.append(final_table_html(final) + postprocess_html(final))
        for note in final.get("notes", []):
            parts.append(f"<p class='note'>Note: {html.escape(note)}</p>")
    parts.append("<details><summary>Metric definitions</summary>" + docstring_html(metrics_module.__doc__)
                 + "</details>")
    return "\n".join(parts)


def sortable_table_html(table: pd.DataFrame) -> str:
    note = ""
    if len(table) > TABLE_ROWS:  # a readable page: the best ones here, every trial in trials.csv
        table = table.sort_values(["best_val_dice", "trial_index"], ascending=[False, True], na_position="last").head(TABLE_ROWS)
        note = f" The {TABLE_ROWS} trials with the best validation Dice; every trial is in <code>trials.csv</code>."
    shown = table.drop(columns=["trial_dir", "start_ts", "end_ts"], errors="ignore").copy()
    shown["node_id"] = shown["node_id"].astype(str).str[:8]
    lead = [c for c in ("trial_index", "status", "best_val_dice", "epochs_run") if c in shown.columns]
    shown = shown[lead + [c for c in shown.columns if c not in lead]]  # what a reader looks for first, on screen
    body = shown.to_html(index=False, classes="grid sortable", na_rep="", float_format=lambda v: f"{v:.4g}", table_id="trials", escape=True)
    return f"<p>Click a column header to sort.{note}</p>" + body


SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.style.cursor = 'pointer';
  th.addEventListener('click', function () {
    var tbody = th.closest('table').tBodies[0], rows = Array.from(tbody.rows);
    var asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
    rows.sort(function (a, b) {
      var x = a.cells[col].textContent, y = b.cells[col].textContent, nx = parseFloat(x), ny = parseFloat(y);
      var cmp = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? cmp : -cmp;
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
  });
});
"""

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table.grid { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
table.grid th, table.grid td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
table.grid th { background: #f4f4f4; }
table.kv th { text-align: left; padding-right: 1em; } table.kv td { font-family: monospace; }
.warn { color: #a33; font-weight: 600; } .note { color: #555; font-style: italic; }
.overlays { display: flex; gap: 1em; flex-wrap: wrap; } .overlays figure { margin: 0; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.scroll { overflow-x: auto; }
"""


def _image_html(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}</figcaption></figure>"


# ----------------------------------------------------------------------------- the report


def build_report(run_dir: Path, study_url: str | None = None) -> Path:
    """Write ``run_dir/report.html`` and return its path (``study_url``: where the study is, if not
    where sweep.json says)."""
    import optuna.visualization as ov
    from plotly.offline import get_plotlyjs

    run_dir = Path(run_dir)
    sweep = read_sweep_json(run_dir)
    max_epochs = int(sweep["settings"]["epochs"])
    table = read_table(run_dir)
    final_path = run_dir / FINAL_DIR / "metrics.json"
    final = json.loads(final_path.read_text()) if final_path.is_file() else None
    best_path = run_dir / BEST_CONFIG_JSON
    best = json.loads(best_path.read_text()) if best_path.is_file() else None
    n_trials = 0 if table is None else len(table)
    sections = [headline_html(final, best)]
    data_summary = run_dir / DATA_SUMMARY_TXT
    if data_summary.is_file():
        sections.append("<h3>Data</h3><pre>" + html.escape(data_summary.read_text()) + "</pre>")

    # 2-3: importance, history, parallel coordinates, slices (Optuna on the sweep's own study)
    sections.append("<h2>2. Parameter importance</h2>")
    study, why_not = load_run_study(run_dir, sweep, study_url)
    complete = complete_trials(study) if study is not None else []
    if study is None:
        sections.append(f"<p class='warn'>No Optuna study: {html.escape(why_not)}.</p>")
    elif len(complete) < 2:
        sections.append(f"<p class='warn'>Not enough complete trials for importances ({len(complete)} of {n_trials} "
                        "ran every epoch; Optuna's evaluators leave out pruned and failed trials).</p>")
    else:
        values = importances(study)
        caveat = "" if len(complete) >= MIN_TRIALS_FOR_IMPORTANCE else (
            f" <span class='warn'>Only {len(complete)} trials: too few to trust these importances "
            f"(want at least {MIN_TRIALS_FOR_IMPORTANCE}).</span>")
        others = Counter(t.state.name for t in study.get_trials(deepcopy=False) if t.state.name != "COMPLETE")
        left_out = ", ".join(f"{n} {STUDY_STATE_WORDS.get(state, state)}" for state, n in sorted(others.items()))
        sections.append(
            f"<p>Computed by Optuna's fANOVA and PED-ANOVA evaluators on the sweep's study over its "
            f"<b>{len(complete)}</b> COMPLETE trials (those that ran every epoch; value: best validation Dice). "
            f"Optuna leaves out the others ({left_out or 'none'}); the learning curves below show every trial. "
            f"Conditional parameters are excluded because not every trial has them."
            + (f" Above {FANOVA_FULL_DEPTH_TRIALS} trials fANOVA's trees stop at depth {FANOVA_MAX_DEPTH} (its cost grows "
               "with the trials)." if len(complete) > FANOVA_FULL_DEPTH_TRIALS else "") + f"{caveat}</p>")
        if any("error" not in v for v in values.values()):
            sections.append(_fig_html(importance_figure(values)))
        for name, scores in values.items():
            if "error" in scores:
                sections.append(f"<p class='warn'>{name}: {html.escape(scores['error'])}</p>")
            else:
                sections.append(f"<p>{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + "</p>")
    if complete:
        sections.append("<h2>3. The sweep at a glance</h2><p>Optuna's plots of the study's COMPLETE trials.</p>")
        sections.append(_fig_html(ov.plot_optimization_history(study, target_name="best val Dice")))
        if len(complete) > PARALLEL_TRIALS:  # thousands of lines are one dark band: the best ones show the pattern
            sections.append(f"<p>Parallel coordinates: the {PARALLEL_TRIALS} trials with the best validation Dice.</p>")
        sections.append(_fig_html(ov.plot_parallel_coordinate(best_trials_study(study, PARALLEL_TRIALS), target_name="best val Dice")))
        sections.append("<p>Slice plots: each conditional parameter shows only the trials that sampled it.</p>")
        numbers = len(study.get_trials(deepcopy=False))  # the slices' colour scale: trial numbers 0..N-1
        sections.append(_fig_html(legible_slices(ov.plot_slice(study, target_name="best val Dice"), numbers)))

    # 4: learning curves
    sections.append("<h2>4. Learning curves</h2>")
    curves = load_curves(run_dir, table)
    if curves:
        sections.append(_fig_html(learning_curves_figure(curves, table, max_epochs)))
    else:
        sections.append("<p class='warn'>No trial has reported an epoch yet.</p>")

    sections.append("<h3>Dice against cost</h3>" + cost_section_html(table, sweep.get("base_config", {})))

    # 5: resource timeline
    sections.append("<h2>5. Resource timeline</h2>")
    fig, utilisation = timeline(table) if table is not None and not table.empty else (None, None)
    if fig is None:
        sections.append("<p class='warn'>No trial timings yet.</p>")
    else:
        sections.append(f"<p>Overall slot utilisation: <b>{utilisation:.1f}%</b> (trial-seconds / (slots x sweep span)); "
                        "gaps are idle slots, long bars are stragglers.</p>" if utilisation is not None else "")
        sections.append(_fig_html(fig))

    # 6: predictions
    sections.append("<h2>6. Predictions of the final model (test split)</h2>")
    overlays = [(run_dir / FINAL_DIR / f"overlay_{name}.png", f"{name} test image by Dice") for name in ("best", "median", "worst")]
    if all(path.is_file() for path, _ in overlays):
        sections.append("<p>The shipped model's post-processed test predictions at native resolution. Green: true tumour "
                        "outline; red: predicted outline.</p><div class='overlays'>"
                        + "".join(_image_html(p, c) for p, c in overlays) + "</div>")
    else:
        sections.append("<p class='warn'>No final model yet: the overlays appear after <code>search.retrain</code>.</p>")

    # 7: all trials, the command, the versions
    sections.append("<h2>7. All trials</h2>")
    if table is None or table.empty:
        sections.append("<p class='warn'>No trials recorded yet.</p>")
    else:
        failed = table[table["status"].isin(["FAILED", "ERROR"])]
        if len(failed) == len(table):
            sections.append(f"<p class='warn'>Every trial failed ({len(table)}): see the reasons below.</p>")
        sections.append("<div class='scroll'>" + sortable_table_html(table) + "</div>")
    versions = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in sweep.get("versions", {}).items())
    sections.append(f"<h3>Command</h3><pre>{html.escape(sweep.get('command', '?'))}</pre>"
                    f"<h3>Package versions</h3><table class='kv'>{versions}</table>")

    status = "finished" if final else "in progress or interrupted"
    counts = "" if table is None else ", ".join(f"{v} {k.lower()}" for k, v in table["status"].value_counts().items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tumorseg sweep {html.escape(run_dir.name)}</title>
<style>{CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body>
<h1>Sweep <code>{html.escape(run_dir.name)}</code></h1>
<p>{n_trials} trials ({html.escape(counts) or 'none yet'}), up to {max_epochs} epochs each; sweep {status}.
Report written {time.strftime('%Y-%m-%d %H:%M:%S')} from {html.escape(str(run_dir))}.</p>
{''.join(sections)}
<script type="text/javascript">{SORT_JS}</script>
</body></html>"""
    out = run_dir / REPORT_HTML
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def main(argv=None) -> None:
    p = ArgumentParser(prog="search.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--study-storage", default=None, metavar="URL",
                   help="the study's database URL with its password (default: the one in sweep.json)")
    args = p.parse_args(argv)
    with exit_on_user_error("search.report"):
        if not args.run_dir.is_dir():
            raise UserError(f"run folder not found: {args.run_dir}")
        print(build_report(args.run_dir, args.study_storage))  # without sweep.json: read_sweep_json's one-line error


if __name__ == "__main__":
    sys.exit(main())
