"""The trials table (``trials.csv``): one row per trial, kept current while the sweep runs.

``search.callbacks.TrialsTableCallback`` writes it from Tune's own trial objects (``trial_row``);
this module reads and ranks it without importing Ray, so the retrain and the report can.

Statuses (the same words in trials.csv, the live view, the report and the README):
``COMPLETED`` (ran every epoch), ``STOPPED_EARLY`` (ASHA stopped it), ``FAILED`` (non-finite loss
or out of memory: recorded with its reason, not retried), ``ERROR`` (crashed ``max_failures + 1``
times), ``INTERRUPTED`` (running when the sweep was stopped, e.g. by Ctrl-C; ``--resume`` continues
it), and Tune's ``RUNNING`` / ``PENDING`` / ``PAUSED``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from tumorseg.config import TrainConfig

from search.rundir import BEST_CONFIG_JSON, TRIALS_CSV, trial_index, write_json
from search.space import OPTIONAL_NAMES, PARAM_NAMES, applicable_params

PARAM_COLUMNS = list(PARAM_NAMES)
# what a trial costs: parameters (millions), GFLOPs of one image's forward pass at its resize, and
# its last epoch's training throughput (images/s; depends on the hardware it ran on)
COST_COLUMNS = ["params_m", "gflops", "train_images_per_s"]
COLUMNS = [
    "trial_index", "trial_id", *PARAM_COLUMNS, "best_val_dice", "last_val_dice", "epochs_run", "status",
    "failure_reason", "num_failures", "node_id", "gpu_ids", "start_ts", "end_ts", "wall_time_s", "trial_dir",
    *COST_COLUMNS,
]
FINISHED = {"COMPLETED", "STOPPED_EARLY", "FAILED", "ERROR"}


def trial_status(tune_status: str, last_result: dict, max_epochs: int, interrupted: bool = False) -> str:
    """Our status word from Tune's; ``interrupted``: the trial was still live when the sweep stopped.

    Tune marks the trials it stops at the end of an interrupted experiment ``TERMINATED``, like
    the ones ASHA stopped, so only the caller (which saw the trial finish or not) can tell them apart.
    """
    if tune_status == "ERROR":
        return "ERROR"
    if last_result.get("failure_reason"):
        return "FAILED"
    if interrupted:
        return "INTERRUPTED"
    if tune_status == "TERMINATED":
        return "COMPLETED" if last_result.get("epoch", 0) >= max_epochs else "STOPPED_EARLY"
    return tune_status


def _error_line(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()] if path else []
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def trial_row(trial, max_epochs: int, first_start: float | None, *, tune_status: str | None = None,
              interrupted: bool = False, result: dict | None = None) -> dict:
    """One table row from a Tune trial; ``tune_status`` overrides ``trial.status`` (Tune calls
    ``on_trial_complete`` before it marks the trial ``TERMINATED``) and ``result`` its last result
    (Tune calls ``on_trial_result`` before it updates ``trial.last_result``)."""
    result = result if result is not None else (trial.last_result or {})
    config = trial.config or {}
    status = trial_status(tune_status or trial.status, result, max_epochs, interrupted)
    best = result.get("best_val_dice")
    reason = result.get("failure_reason") or (_error_line(trial) if status == "ERROR" else "")
    start = first_start or result.get("trial_start_ts")
    end = result.get("timestamp")
    return {
        "trial_index": trial_index(str(trial)),
        "trial_id": trial.trial_id,
        **{name: config.get(name) for name in PARAM_COLUMNS},
        "best_val_dice": best,
        "last_val_dice": result.get("val_dice"),
        "epochs_run": result.get("epoch", 0),
        "status": status,
        "failure_reason": reason,
        "num_failures": getattr(trial, "num_failures", 0),
        "node_id": result.get("node_id", ""),
        "gpu_ids": result.get("gpu_ids", ""),
        "start_ts": start,
        "end_ts": end,
        "wall_time_s": (end - start) if start and end else result.get("time_total_s"),
        "trial_dir": os.path.basename(str(getattr(trial, "path", "") or "")),
        **{name: result.get(name) for name in COST_COLUMNS},
    }


def write_table(rows: list[dict], path: Path) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS).sort_values("trial_index", kind="stable").reset_index(drop=True)
    # an optional dimension the sweep does not search has no column (its value is in the base config)
    table = table.drop(columns=[n for n in OPTIONAL_NAMES if table[n].isna().all()])
    tmp = Path(path).with_suffix(".csv.tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)  # readers never see a half-written table
    return table


def read_table(run_dir: Path) -> pd.DataFrame | None:
    path = Path(run_dir) / TRIALS_CSV
    if not path.is_file():
        return None
    # ids stay strings: Tune's 8-hex-digit trial ids are all digits now and then ("24503672")
    text_columns = ("trial_id", "failure_reason", "gpu_ids", "node_id", "trial_dir")
    return pd.read_csv(path, keep_default_na=True, dtype=dict.fromkeys(text_columns, str))


def scored_trials(table: pd.DataFrame | None) -> pd.DataFrame:
    """Trials that reported a validation score and did not fail, in trial order."""
    if table is None or table.empty:
        return pd.DataFrame(columns=COLUMNS)
    ok = table[~table["status"].isin(["FAILED", "ERROR"]) & table["best_val_dice"].notna() & (table["epochs_run"] > 0)]
    return ok.sort_values("trial_index")


def best_trial(table: pd.DataFrame | None):
    """The row with the highest best val Dice among the scored trials (ties: the earlier trial)."""
    usable = scored_trials(table)
    if usable.empty:
        return None
    return usable.sort_values(["best_val_dice", "trial_index"], ascending=[False, True], kind="stable").iloc[0]


def write_best_config(run_dir: Path, base: dict) -> dict | None:
    """``best_config.json`` from the trials table (None, and no file, when no trial scored)."""
    row = best_trial(read_table(run_dir))
    if row is None:
        return None
    params = applicable_params(row.to_dict())
    best = {
        "trial_id": row["trial_id"],
        "trial_index": int(row["trial_index"]),
        "best_val_dice": float(row["best_val_dice"]),
        "params": params,
        "config": TrainConfig.from_dict({**base, **params}).to_dict(),
    }
    write_json(Path(run_dir) / BEST_CONFIG_JSON, best)
    return best


def model_label(row, base: dict | None = None) -> str:
    """``arch-encoder`` of a trial (from its row when searched, else from the base config)."""
    base = base or {}
    get = lambda name, default: row.get(name) if isinstance(row.get(name), str) else base.get(name, default)  # noqa: E731
    return f"{get('arch', 'Unet')}-{get('encoder', 'resnet18')}"


def pareto_front(table: pd.DataFrame | None, cost: str = "gflops") -> pd.DataFrame:
    """The scored trials no other beats on both best val Dice (higher) and ``cost`` (lower), by cost."""
    usable = scored_trials(table)
    if usable.empty or cost not in usable or usable[cost].isna().all():
        return usable.iloc[0:0]
    usable = usable[usable[cost].notna()].sort_values([cost, "best_val_dice"], ascending=[True, False], kind="stable")
    keep, best = [], -1.0
    for index, dice in usable["best_val_dice"].items():
        if dice > best:  # better than everything cheaper
            keep.append(index)
            best = dice
    return usable.loc[keep]
