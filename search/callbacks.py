"""Ray Tune callbacks of the sweep.

``TrialsTableCallback`` rewrites ``trials.csv`` whenever a trial starts, reports, finishes or
fails, straight from Tune's own trial objects, so the table is right for finished, interrupted and
still-running sweeps, and the report never has to unpickle Ray's state. Rows of an earlier run of
the same sweep (``--resume``) are merged by trial id.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from ray.tune import Callback

from search.rundir import TRIALS_CSV
from search.trials import FINISHED, read_table, trial_row, write_table


class TrialsTableCallback(Callback):
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
