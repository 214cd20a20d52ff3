"""MLflow tracking of a sweep: ``--mlflow URI`` (the optional extra: ``pip install -e '.[mlflow]'``).

One parent run per sweep (named after it, its settings as params)
and one nested run per trial (its sampled parameters, per-epoch metrics with step = epoch, its
status). When the sweep ends the parent gets the final model, ``final/metrics.json``,
``report.html``, ``trials.csv``, ``best_config.json`` and ``sweep.json`` as artifacts and the best trial's and the retrain's test scores
as metrics.

Everything is logged by the driver (``search.callbacks.MLflowCallback`` calls ``TrialRuns``), so
trial nodes need neither MLflow nor a route to the tracking server. ``--resume`` reuses the parent
run recorded in ``sweep.json`` and each trial's run (found by its Tune trial id) and logs only
epochs not logged yet: no run and no metric step twice.

``URI``: a folder becomes ``sqlite:///FOLDER/mlflow.db`` with artifacts under ``FOLDER/artifacts``
(MLflow 3's file store, ``./mlruns``, is in maintenance mode and refused unless
``MLFLOW_ALLOW_FILE_STORE=true``; the SQLite store needs only SQLAlchemy and Alembic, which Optuna
brings, so ``mlflow-skinny`` suffices); anything with a scheme (``http://host:5000``,
``sqlite:///...``, ``postgresql://...``, ``file:...``) is used as given. The experiment is
``tumorseg`` unless ``MLFLOW_EXPERIMENT_NAME`` names another. This module imports neither Ray nor
MLflow until used.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

from tumorseg.errors import ConfigError

from search.rundir import FINAL_DIR, REPORT_HTML, SWEEP_JSON, TRIALS_CSV, read_sweep_json, write_json

INSTALL_HINT = "pip install -e '.[mlflow]'"
EXPERIMENT = "tumorseg"
SWEEP_KEY = "mlflow"  # sweep.json: {"uri", "experiment_id", "parent_run_id"}
TRIAL_ID_TAG = "tumorseg.trial_id"
STATUS_TAG = "tumorseg.status"  # the trials.csv status word (MLflow's own status is coarser)
REASON_TAG = "tumorseg.failure_reason"
EPOCH_METRICS = ("val_dice", "best_val_dice", "val_iou", "val_f1", "val_precision", "val_recall", "val_loss",
                 "train_loss", "lr", "train_images_per_s")
# trials.csv status -> MLflow run status (an ASHA stop is a normal end, as in Ray's MLflowLoggerCallback)
RUN_STATUS = {"COMPLETED": "FINISHED", "STOPPED_EARLY": "FINISHED", "FAILED": "FAILED", "ERROR": "FAILED",
              "INTERRUPTED": "KILLED"}
SWEEP_PARAMS = ("num_samples", "epochs", "grace_period", "reduction_factor", "rung_metric", "seed", "data", "gpus", "gpus_per_trial")
FINAL_ARTIFACTS = (f"{FINAL_DIR}/model.pt", f"{FINAL_DIR}/metrics.json", REPORT_HTML, TRIALS_CSV, "best_config.json", SWEEP_JSON)


def require_mlflow() -> None:
    """``--mlflow`` without MLflow installed: one line saying how to install it."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(f"--mlflow needs MLflow, which is not installed; install it with {INSTALL_HINT}") from None


def tracking_uri(target: str) -> tuple[str, str | None]:
    """``(tracking URI, artifact location for a new experiment)`` for ``--mlflow``'s value."""
    if "://" in target or target.startswith(("file:", "databricks")):
        return target, None
    folder = Path(target).expanduser().resolve()
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


def client(uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its table-creation lines on first use
    return MlflowClient(tracking_uri=uri)


def first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


# ----------------------------------------------------------------------------- the sweep's parent run


def open_sweep_run(settings, base: dict) -> dict:
    """The sweep's parent run: the one ``sweep.json`` records (set running again), else a new one.
    Returns ``{"uri", "experiment_id", "parent_run_id"}``; ``record_sweep_run`` writes it into sweep.json.

    Called after the data, storage and cluster checks and before the run folder is claimed, so a
    store that cannot be reached or written is a ``ConfigError`` naming ``--mlflow`` that leaves the
    name free.
    """
    info = sweep_run(settings.run_dir) if (settings.run_dir / SWEEP_JSON).is_file() else None
    try:
        with _fail_fast():
            if info is not None:
                client(info["uri"]).update_run(info["parent_run_id"], status="RUNNING")
                return info
            return _create_sweep_run(settings, base)
    except Exception as err:  # noqa: BLE001 - whatever the store says, in one line
        raise ConfigError(f"--mlflow {settings.mlflow}: cannot log there ({first_line(err)})") from None


@contextlib.contextmanager
def _fail_fast():
    """While the sweep's run is opened, a server that does not answer fails in seconds rather than
    after MLflow's default retries (about 4 minutes); trials are then logged with the defaults,
    which ride out a short outage. Values the user set in the environment are kept."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    added = [name for name in quick if name not in os.environ]
    os.environ.update({name: quick[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def record_sweep_run(run_dir: Path, info: dict) -> None:
    """Keep the parent run's id in ``sweep.json`` (``--resume`` reuses it)."""
    payload = read_sweep_json(run_dir)
    if payload.get(SWEEP_KEY) != info:
        write_json(Path(run_dir) / SWEEP_JSON, {**payload, SWEEP_KEY: info})


def _create_sweep_run(settings, base: dict) -> dict:
    from mlflow.entities import Param

    uri, artifacts = tracking_uri(settings.mlflow)
    if artifacts is not None:
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow = client(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    experiment = mlflow.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(name, artifact_location=artifacts)
    run = mlflow.create_run(experiment_id, run_name=settings.name,
                            tags={"tumorseg.sweep": settings.name, "tumorseg.run_dir": str(settings.run_dir)})
    run_id = run.info.run_id
    values = {**{k: getattr(settings, k) for k in SWEEP_PARAMS}, **{f"trial.{k}": v for k, v in base.items()}}
    mlflow.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in values.items()])
    return {"uri": uri, "experiment_id": experiment_id, "parent_run_id": run_id}


def sweep_run(run_dir: Path) -> dict | None:
    """The parent run recorded in ``run_dir/sweep.json`` (None: the sweep has no MLflow run)."""
    return read_sweep_json(run_dir).get(SWEEP_KEY)


def close_sweep_run(run_dir: Path, finished: bool) -> None:
    """End the parent run: the final artifacts and scores when ``finished``, else marked KILLED.

    A failure here is one warning line: the sweep's results are on disk either way.
    """
    info = sweep_run(run_dir)
    if info is None:
        return
    try:
        mlflow = client(info["uri"])
        run_id = info["parent_run_id"]
        _reconcile_trials(mlflow, info, Path(run_dir))
        if finished:
            for name in FINAL_ARTIFACTS:
                path = Path(run_dir) / name
                if path.is_file():
                    mlflow.log_artifact(run_id, str(path), artifact_path=str(Path(name).parent) if "/" in name else None)
            _log_scores(mlflow, run_id, Path(run_dir))
        mlflow.set_terminated(run_id, status="FINISHED" if finished else "KILLED")
    except Exception as err:  # noqa: BLE001
        print(f"warning: MLflow: could not close the sweep's run ({first_line(err)})", file=sys.stderr)


def _reconcile_trials(mlflow, info: dict, run_dir: Path) -> None:
    """Make the trial runs agree with trials.csv after a killed driver: a run left RUNNING whose trial
    has finished gets that status; a run of a trial trials.csv does not hold (started just before
    the driver died, not in Tune's saved state, so ``--resume`` ran it again under a new id) is
    deleted (MLflow's soft delete), so each trial has one run."""
    import pandas as pd

    path = run_dir / TRIALS_CSV
    if not path.is_file():
        return
    table = pd.read_csv(path, dtype={"trial_id": str}).set_index("trial_id")
    children = mlflow.search_runs([info["experiment_id"]], f"tags.mlflow.parentRunId = '{info['parent_run_id']}'",
                                  max_results=50000)
    for run in children:
        trial_id, run_id = run.data.tags.get(TRIAL_ID_TAG), run.info.run_id
        if trial_id not in table.index:
            close_trial_run(mlflow, run_id, "DISCARDED", "Tune lost this trial when the driver died; --resume ran it again")
            mlflow.delete_run(run_id)
        elif run.info.status == "RUNNING" and table.loc[trial_id, "status"] in RUN_STATUS:
            reason = table.loc[trial_id, "failure_reason"]
            close_trial_run(mlflow, run_id, table.loc[trial_id, "status"], reason if isinstance(reason, str) else "")


def close_trial_run(mlflow, run_id: str, status: str, reason: str = "") -> None:
    """End a trial's run with the trials.csv ``status`` word (and the failure reason)."""
    mlflow.set_tag(run_id, STATUS_TAG, status)
    if reason:
        mlflow.set_tag(run_id, REASON_TAG, str(reason)[:5000])
    mlflow.set_terminated(run_id, status=RUN_STATUS.get(status, "KILLED"))


def _log_scores(mlflow, run_id: str, run_dir: Path) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {}
    best = Path(run_dir) / "best_config.json"
    if best.is_file():
        values["best_val_dice"] = json.loads(best.read_text()).get("best_val_dice")
    final = Path(run_dir) / FINAL_DIR / "metrics.json"
    if final.is_file():
        summary = json.loads(final.read_text())
        for recipe in ("best", "seed_recipe"):
            for key, stats in summary.get(recipe, {}).get("test", {}).items():
                values[f"test_{key}_{recipe}"] = stats["mean"]
    metrics = [Metric(k, float(v), now, 0) for k, v in values.items() if _finite(v)]
    if metrics:
        mlflow.log_batch(run_id, metrics=metrics)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- the trials' runs


class TrialRuns:
    """One MLflow run per trial, nested under the sweep's parent run (no Ray here: the callback adapts).

    Idempotent across ``--resume``: a trial's run is found again by its Tune trial id, and an
    epoch at or below the last one logged for it is not logged again.
    """

    def __init__(self, info: dict):
        self.info = info
        self._client = None
        self._runs: dict[str, str] | None = None  # Tune trial id -> MLflow run id
        self._last_epoch: dict[str, int] = {}

    @property
    def client(self):
        if self._client is None:
            self._client = client(self.info["uri"])
        return self._client

    def existing(self) -> dict[str, str]:
        """``{Tune trial id: MLflow run id}`` of the runs already under the sweep's run."""
        parent = self.info["parent_run_id"]
        runs = self.client.search_runs([self.info["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                       max_results=50000)
        return {r.data.tags[TRIAL_ID_TAG]: r.info.run_id for r in runs if TRIAL_ID_TAG in r.data.tags}

    def run_id(self, trial_id: str) -> str | None:
        if self._runs is None:
            self._runs = self.existing()
        return self._runs.get(trial_id)

    def start(self, trial_id: str, name: str, params: dict) -> str:
        """The trial's run, created with its parameters on first start, set running again on a later one."""
        from mlflow.entities import Param

        run_id = self.run_id(trial_id)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, STATUS_TAG, "RUNNING")
            return run_id
        run = self.client.create_run(self.info["experiment_id"], run_name=name, tags={
            "mlflow.parentRunId": self.info["parent_run_id"], TRIAL_ID_TAG: trial_id, STATUS_TAG: "RUNNING"})
        run_id = self._runs[trial_id] = run.info.run_id
        self._last_epoch[run_id] = 0
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items() if v is not None])
        return run_id

    def last_epoch(self, run_id: str) -> int:
        if run_id not in self._last_epoch:
            history = self.client.get_metric_history(run_id, "val_dice")
            self._last_epoch[run_id] = max((m.step for m in history), default=0)
        return self._last_epoch[run_id]

    def epoch(self, trial_id: str, name: str, params: dict, result: dict) -> None:
        """Log one epoch's metrics (step = epoch), unless that epoch is already logged."""
        from mlflow.entities import Metric

        epoch = int(result.get("epoch") or 0)
        run_id = self.run_id(trial_id) or self.start(trial_id, name, params)
        if epoch <= 0 or epoch <= self.last_epoch(run_id) or result.get("failure_reason"):
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, epoch) for k in EPOCH_METRICS if _finite(result.get(k))]
        self.client.log_batch(run_id, metrics=metrics)
        self._last_epoch[run_id] = epoch

    def end(self, trial_id: str, status: str, reason: str = "") -> None:
        """Close the trial's run with the trials.csv ``status`` word (and the failure reason)."""
        run_id = self.run_id(trial_id)
        if run_id is not None:
            close_trial_run(self.client, run_id, status, reason)
