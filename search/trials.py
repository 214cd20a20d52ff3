"""The trials table (``trials.csv``): one row per trial, kept current while the sweep runs.

``TrialsTableCallback`` is a Ray Tune callback that rewrites ``trials.csv`` whenever a trial
starts, reports, finishes or fails, straight from Tune's own trial objects, so the table is
right for finished, interrupted and still-running sweeps, and the report never has to unpickle
Ray's state. Rows of an earlier run of the same sweep (``--resume``) are merged by trial id.

Statuses: ``COMPLETED`` (ran every epoch), ``STOPPED_EARLY`` (ASHA stopped it), ``FAILED``
(non-finite loss or out of memory: recorded with its reason, not retried), ``ERROR`` (crashed
``max_failures + 1`` times), and Tune's ``RUNNING`` / ``PENDING`` / ``PAUSED``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pandas as pd

from search.space import LOSS_PARAMS, PARAM_NAMES
from search.trainable import trial_index

PARAM_COLUMNS = list(PARAM_NAMES)
COLUMNS = [
    "trial_index", "trial_id", *PARAM_COLUMNS, "best_val_dice", "last_val_dice", "epochs_run", "status",
    "failure_reason", "num_failures", "node_id", "gpu_ids", "start_ts", "end_ts", "wall_time_s", "trial_dir",
]
FINISHED = {"COMPLETED", "STOPPED_EARLY", "FAILED", "ERROR"}
TRIALS_CSV = "trials.csv"


def trial_status(tune_status: str, last_result: dict, max_epochs: int) -> str:
    if tune_status == "ERROR":
        return "ERROR"
    if last_result.get("failure_reason"):
        return "FAILED"
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


def trial_row(trial, max_epochs: int, first_start: float | None) -> dict:
    result = trial.last_result or {}
    config = trial.config or {}
    status = trial_status(trial.status, result, max_epochs)
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
    }


def write_table(rows: list[dict], path: Path) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS).sort_values("trial_index", kind="stable").reset_index(drop=True)
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


def applicable_params(row) -> dict:
    """The parameters that this trial's loss type actually sampled (conditional ones dropped)."""
    params = {}
    for name in PARAM_COLUMNS:
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if name in ("dice_weight", "bce_weight", "focal_weight", "focal_gamma") and name not in LOSS_PARAMS.get(row.get("loss_type"), ()):
            continue
        params[name] = value.item() if hasattr(value, "item") else value
    for name in ("resize_px", "warmup_epochs"):
        if name in params:
            params[name] = int(params[name])
    return params


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


def _tune_callback_base():
    from ray.tune import Callback

    return Callback


class TrialsTableCallback(_tune_callback_base()):
    """Keeps ``run_dir/trials.csv`` current from Tune's trial objects."""

    def __init__(self, run_dir: Path, max_epochs: int, min_interval_s: float = 2.0):
        self.run_dir = Path(run_dir)
        self.max_epochs = max_epochs
        self.min_interval_s = min_interval_s
        self._starts: dict[str, float] = {}
        self._last_write = 0.0
        self._previous: dict[str, dict] = {}
        previous = read_table(self.run_dir)
        if previous is not None:  # a resumed sweep: keep what the earlier run recorded
            self._previous = {row["trial_id"]: row for row in previous.to_dict("records")}
            self._starts = {k: v["start_ts"] for k, v in self._previous.items() if pd.notna(v["start_ts"])}

    def __getstate__(self):  # Tune pickles callbacks with the experiment; keep it small
        state = dict(self.__dict__)
        state["_previous"] = {}
        return state

    def __setstate__(self, state):
        self.__init__(state["run_dir"], state["max_epochs"], state["min_interval_s"])

    def _write(self, trials, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_write < self.min_interval_s:
            return
        self._last_write = now
        # rows of an earlier run of this sweep: finished ones stay; unfinished ones only if Tune
        # restored that trial (one created just before the driver died may not have been saved)
        rows = {tid: row for tid, row in self._previous.items() if row.get("status") in FINISHED}
        for trial in trials:
            row = trial_row(trial, self.max_epochs, self._starts.get(trial.trial_id))
            old = rows.get(trial.trial_id)
            if old is not None and old.get("status") in FINISHED and row["status"] not in FINISHED:
                continue  # a finished trial from before a resume that Tune has not reloaded yet
            rows[trial.trial_id] = row
        write_table(list(rows.values()), self.run_dir / TRIALS_CSV)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._starts.setdefault(trial.trial_id, time.time())
        self._write(trials, force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._write(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(trials, force=True)

    def on_experiment_end(self, trials, **info):
        self._write(trials, force=True)
