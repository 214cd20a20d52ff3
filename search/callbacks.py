"""Ray Tune callbacks of the sweep.

``TrialsTableCallback`` rewrites ``trials.csv`` (at most every few seconds) when trials start,
report, finish or fail, straight from Tune's own trial objects, so the table is right for finished,
interrupted and still-running sweeps, and the report never has to unpickle Ray's state. Rows of an earlier run of
the same sweep (``--resume``) are merged by trial id.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from ray.tune import Callback

from search.rundir import TRIALS_CSV
from search.trials import FINISHED, read_table, trial_row, write_table

WRITE_COST_SHARE = 0.05  # trials.csv: rewritten no more often than its writes take ~5 % of the driver's time


class TrialsTableCallback(Callback):
    """Keeps ``run_dir/trials.csv`` current from Tune's trial objects.

    Cost per event is constant: a trial event marks that trial's row stale, and Tune's loop
    (``on_step_end``) writes the table at most every ``min_interval_s`` (or every 20 times the last
    write's duration, so a 2,000-row table costs at most ~5 % of the driver's time), recomputing
    only the stale rows; the end of the experiment writes it at once.
    """

    def __init__(self, run_dir: Path, max_epochs: int, min_interval_s: float = 2.0):
        self.run_dir = Path(run_dir)
        self.max_epochs = max_epochs
        self.min_interval_s = min_interval_s
        self._interval_s = min_interval_s
        self._starts: dict[str, float] = {}
        self._last_write = 0.0
        self._previous: dict[str, dict] = {}
        self._live: set[str] = set()  # started in this run and not finished: INTERRUPTED if the run stops now
        self._ended: set[str] = set()  # finished in this run (Tune may not have marked them TERMINATED yet)
        self._rows: dict[str, dict] = {}  # trial id -> its row as last computed
        self._stale: set[str] = set()  # trials with an event since their row was computed
        previous = read_table(self.run_dir)
        if previous is not None:  # a resumed sweep: keep what the earlier run recorded
            self._previous = {row["trial_id"]: row for row in previous.to_dict("records")}
            self._starts = {k: v["start_ts"] for k, v in self._previous.items() if pd.notna(v["start_ts"])}

    def __getstate__(self):  # pickled once, in tuner.pkl (for --resume): only what __setstate__ reads
        return {"run_dir": self.run_dir, "max_epochs": self.max_epochs, "min_interval_s": self.min_interval_s}

    def __setstate__(self, state):
        self.__init__(state["run_dir"], state["max_epochs"], state["min_interval_s"])

    def _row(self, trial, stopping: bool) -> dict:
        interrupted = stopping and trial.trial_id in self._live and trial.status in ("RUNNING", "TERMINATED")
        tune_status = "TERMINATED" if trial.trial_id in self._ended and trial.status == "RUNNING" else None
        return trial_row(trial, self.max_epochs, self._starts.get(trial.trial_id), tune_status=tune_status,
                         interrupted=interrupted)

    def _write(self, trials, force: bool = False, stopping: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_write < self._interval_s:
            return
        started = time.perf_counter()
        for trial in trials:
            if stopping or trial.trial_id in self._stale or trial.trial_id not in self._rows:
                self._rows[trial.trial_id] = self._row(trial, stopping)
        self._stale.clear()
        # rows of an earlier run of this sweep: finished ones stay; unfinished ones only if Tune
        # restored that trial (one created just before the driver died may not have been saved)
        rows = {tid: row for tid, row in self._previous.items() if row.get("status") in FINISHED}
        for tid, row in self._rows.items():
            old = rows.get(tid)
            if old is not None and old.get("status") in FINISHED and row["status"] not in FINISHED:
                continue  # a finished trial from before a resume that Tune has not reloaded yet
            rows[tid] = row
        write_table(list(rows.values()), self.run_dir / TRIALS_CSV)
        self._last_write = time.time()
        self._interval_s = max(self.min_interval_s, (time.perf_counter() - started) / WRITE_COST_SHARE)

    def _changed(self, trials, trial) -> None:
        # written from on_step_end, once Tune has applied the event (it calls on_trial_result
        # before it updates trial.last_result)
        self._stale.add(trial.trial_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._starts.setdefault(trial.trial_id, time.time())
        self._live.add(trial.trial_id)
        self._ended.discard(trial.trial_id)
        self._changed(trials, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._changed(trials, trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._live.discard(trial.trial_id)
        self._ended.add(trial.trial_id)
        self._changed(trials, trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._changed(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._live.discard(trial.trial_id)
        self._changed(trials, trial)

    def on_step_end(self, iteration, trials, **info):
        if self._stale:  # rows that changed since the last write (e.g. the newest results)
            self._write(trials)

    def on_experiment_end(self, trials, **info):
        self._write(trials, force=True, stopping=True)


class LiveViewCallback(Callback):
    """The terminal's view of the sweep (``search.live``): a line per trial event, a header line per finish.

    Replaces Tune's status boxes (``RunConfig(verbose=0)``); ``print_fn`` is where lines go.
    """

    def __init__(self, run_dir: Path, total_trials: int, max_epochs: int, slots: int, print_fn=print):
        from search.live import SweepProgress

        self.run_dir = Path(run_dir)
        self.max_epochs = max_epochs
        self.print_fn = print_fn
        self._args = (run_dir, total_trials, max_epochs, slots)
        self.progress = SweepProgress(total_trials, slots)
        self._live: set[str] = set()
        previous = read_table(self.run_dir)
        if previous is not None:  # a resumed sweep: count what the earlier run finished
            self.progress.done_at_start = set(previous.loc[previous["status"].isin(FINISHED), "trial_id"].astype(str))

    def __getstate__(self):  # Tune pickles callbacks with the experiment (and restores them on --resume)
        return {"args": self._args}

    def __setstate__(self, state):
        self.__init__(*state["args"])

    def _show(self, trial, status: str | None = None, tune_status: str | None = None, interrupted: bool = False,
              header: bool = False, result: dict | None = None) -> None:
        from search.live import trial_line

        row = trial_row(trial, self.max_epochs, None, tune_status=tune_status, interrupted=interrupted, result=result)
        if trial.trial_id in self._live and row["status"] in FINISHED | {"INTERRUPTED"}:
            self._live.discard(trial.trial_id)
        self.progress.update(trial.trial_id, str(trial), row)
        self.print_fn(trial_line(str(trial), status or row["status"], row, self.max_epochs))
        if header:
            self.print_fn(self.progress.header())

    def on_trial_start(self, iteration, trials, trial, **info):
        from search.live import start_line

        self._live.add(trial.trial_id)
        self.progress.update(trial.trial_id, str(trial), {"status": "RUNNING", "best_val_dice": None})
        self.print_fn(start_line(str(trial), trial.config or {}))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("epoch", 0) > 0:  # an epoch's result, not the trial's start-up report
            self._show(trial, result=result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._show(trial, tune_status="TERMINATED", header=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.print_fn(f"{trial} crashed (attempt {trial.num_failures}): Tune retries it; "
                      f"details in {getattr(trial, 'path', '')}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trial, tune_status="ERROR", header=True)

    def on_experiment_end(self, trials, **info):
        stopped = [trial for trial in trials if trial.trial_id in self._live]
        for trial in stopped:
            self._show(trial, interrupted=True)
        if stopped:
            self.print_fn(self.progress.header())


class MLflowCallback(Callback):
    """Every trial as an MLflow run nested under the sweep's parent run (``search.tracking``).

    Runs in the driver; a logging failure (e.g. the tracking server went away) is one warning line
    and the sweep goes on without it.
    """

    def __init__(self, info: dict, max_epochs: int):
        from search.tracking import TrialRuns

        self._args = (info, max_epochs)
        self.max_epochs = max_epochs
        self.runs = TrialRuns(info)
        self._live: set[str] = set()
        self._broken = False

    def __getstate__(self):  # Tune pickles callbacks with the experiment (and restores them on --resume)
        return {"args": self._args}

    def __setstate__(self, state):
        self.__init__(*state["args"])

    def _safely(self, fn, *args) -> None:
        if self._broken:
            return
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - tracking must never stop the sweep
            self._broken = True
            import sys

            from search.tracking import first_line

            print(f"warning: MLflow logging stopped ({first_line(err)}); the sweep goes on, trials.csv has every result",
                  file=sys.stderr)

    def _end(self, trial, **row_args) -> None:
        row = trial_row(trial, self.max_epochs, None, **row_args)
        self._live.discard(trial.trial_id)
        self._safely(self.runs.end, trial.trial_id, row["status"], row.get("failure_reason") or "")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._live.add(trial.trial_id)
        self._safely(self.runs.start, trial.trial_id, str(trial), dict(trial.config or {}))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._safely(self.runs.epoch, trial.trial_id, str(trial), dict(trial.config or {}), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, tune_status="TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, tune_status="ERROR")

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            if trial.trial_id in self._live:
                self._end(trial, interrupted=True)
