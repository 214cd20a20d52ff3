"""The sweep's Optuna study in a database: where it lives, how to open it, what a trial is recorded as.

Every sweep is a real Optuna study named after the sweep, in an ``optuna.storages.RDBStorage``:
by default the SQLite file ``<run folder>/study.db``; ``--study-storage URL`` takes any SQLAlchemy
URL (``postgresql://user@host/db`` for a server every node and laptop can reach). With a URI
``--storage`` (``s3://``, ``gs://``) the default SQLite file lives on the driver's local disk, in
``results/<name>/study.db`` under the driver's working folder, and is uploaded with the driver's
other files when the sweep ends (SQLite cannot be written on an object store).

The study mirrors the sweep (``search.studysearch`` writes it, from Tune's own events):

- every epoch's ``best_val_dice`` is an intermediate value (step = epoch);
- ``COMPLETED`` trials are COMPLETE with their best val Dice; ``STOPPED_EARLY`` (ASHA) trials are
  PRUNED (Optuna stores the last intermediate value as their value); ``FAILED`` (non-finite loss,
  out of memory) and ``ERROR`` (crashed ``max_failures + 1`` times) trials are FAIL;
- user attributes: Tune's trial id and name, node, checkpoint path (where the trial's last
  checkpoint was: a finished trial's are deleted unless ``--keep-checkpoints``, ``search.checkpoints``),
  start time, wall time, the trials.csv status word and the failure reason;
- ``--resume`` continues the same study; a trial a killed driver left RUNNING that the restored
  experiment does not hold (it was created after Tune's last snapshot) is marked FAIL with that reason.

Passwords are never written to disk: sweep.json and Tune's pickled searcher hold the URL without
its password (``redact``); the driver hands the full URL to the objects that connect
(``register_url``). This module imports no Ray (the report reads the study too).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from search.rundir import STUDY_DB
from tumorseg.errors import ConfigError

TUNE_ID_ATTR = "tune_trial_id"  # the user attribute that ties an Optuna trial to its Tune trial
STALE_REASON = ("left RUNNING by a driver that stopped before Tune saved this trial, so --resume could not "
                "continue it")
# trials.csv status -> Optuna state name (INTERRUPTED / RUNNING / PENDING stay RUNNING: --resume continues them)
STATES = {"COMPLETED": "COMPLETE", "STOPPED_EARLY": "PRUNED", "FAILED": "FAIL", "ERROR": "FAIL"}
# what each sampler learns from the trials ASHA stopped (recorded in sweep.json; Optuna 5.0.0's code)
PRUNED_TRIALS = {
    "tpe": ("PRUNED trials count toward TPE's start-up trials and enter its model ranked below every COMPLETE "
            "trial (among themselves: later epoch first, then higher value); they join the 'good' group only "
            "when there are fewer COMPLETE trials than that group needs, so mostly they teach TPE where not "
            "to sample. FAIL trials are ignored; RUNNING ones are the constant liar's placeholders."),
    "gp": ("GPSampler fits its Gaussian process to COMPLETE trials only: PRUNED trials are ignored, in the "
           "model and in the start-up count, so under ASHA it learns only from trials that ran every epoch."),
    "random": "RandomSampler ignores every result: pruned trials change nothing.",
    "qmc": "QMCSampler ignores every result (a fixed low-discrepancy sequence): pruned trials change nothing.",
}
_SHOWN_URLS: dict[str, str] = {}  # study name -> the full URL (with its password), for this process only


# ----------------------------------------------------------------------------- URLs


def default_url(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / STUDY_DB).resolve()}"


def sweep_url(settings) -> str:
    """The URL the sweep's study is opened with (``--study-storage``, else the run folder's SQLite file)."""
    return normalise(settings.study_storage) if settings.study_storage else default_url(settings.run_dir)


def normalise(url: str) -> str:
    """The URL as given, usable from any folder: a plain path is a SQLite file; a SQLite path is made absolute."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:" and not url.startswith("sqlite:////"):
        return f"sqlite:///{Path(url[len('sqlite:///'):]).expanduser().resolve()}"
    return url


def with_driver(url: str) -> str:
    """``postgresql://`` with the driver installed here: psycopg2 (the ``[postgres]`` extra) when
    psycopg, SQLAlchemy 2's default, is not installed."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _parse(url: str, flag: str = "--study-storage"):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigError(f"{flag} {url}: not a database URL (e.g. sqlite:///path/study.db or "
                          "postgresql://user@host/db)") from None


def redact(url: str) -> str:
    """``url`` without its password (what sweep.json, messages and pickles hold)."""
    parsed = _parse(url)
    return parsed._replace(password=None).render_as_string(hide_password=False) if parsed.password else url


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with every database URL's password removed."""
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        try:
            out.append(f"{flag}{eq}{redact(value)}" if "://" in value else arg)
        except ConfigError:
            out.append(arg)
    return out


def register_url(study_name: str, url: str) -> None:
    """The full URL of ``study_name``'s storage for this process (the driver calls this; objects that
    were pickled with the redacted URL connect with it)."""
    _SHOWN_URLS[study_name] = url


def connect_url(study_name: str, redacted: str) -> str:
    return _SHOWN_URLS.get(study_name, redacted)


# ----------------------------------------------------------------------------- opening


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def open_storage(url: str, flag: str = "--study-storage", hint: str = "", write: bool = True):
    """An ``RDBStorage`` for ``url`` (tables created if missing); ``ConfigError`` in one line when the
    database cannot be reached, authenticated or (``write``) written."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    parsed = _parse(url, flag)
    shown = redact(url)
    engine_kwargs: dict = {"pool_pre_ping": True}  # a server may drop idle connections during a long sweep
    backend = parsed.get_backend_name()
    if write and backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).expanduser().parent
        try:  # SQLite reports only "unable to open database file": name the folder and the reason
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".{STUDY_DB}-write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"{flag} {shown}: cannot write to the folder {folder} ({err.strerror or err})") from None
    if backend == "sqlite":
        # a reader (optuna-dashboard, the report) briefly locks the file: the driver waits for it instead of
        # failing after SQLite's 5 s (no WAL mode: the run folder may be on NFS, where WAL does not work)
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif backend == "postgresql" and _parse(with_driver(url)).get_driver_name() == "psycopg2":
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails, not hangs
    try:
        return optuna.storages.RDBStorage(with_driver(url), engine_kwargs=engine_kwargs)
    except ImportError:
        extra = " (pip install -e '.[postgres]')" if backend == "postgresql" else ""
        raise ConfigError(f"{flag} {shown}: no database driver for {parsed.drivername} is installed{extra}") from None
    except (SQLAlchemyError, RuntimeError) as err:
        raise ConfigError(f"{flag} {shown}: cannot open the study database ({_first_line(err)}){hint}") from None


def check_study(url: str, study_name: str, resume: bool) -> None:
    """Before any trial: the database opens, and holds a study ``study_name`` exactly when resuming."""
    shown = redact(url)
    hint = ("; sweep.json keeps the URL without its password: give --study-storage with it again, "
            "or set PGPASSWORD" if resume else "")
    storage = open_storage(url, hint=hint if _parse(url).password is None else "")
    try:
        names = {study.study_name for study in storage.get_all_studies()}
    finally:
        storage.remove_session()
        storage.engine.dispose()
    if not resume and study_name in names:
        raise ConfigError(f"--study-storage {shown} already holds a study named {study_name!r} (another sweep's): "
                          f"continue that sweep with --name {study_name} --resume, or choose another --name")
    if resume and study_name not in names:
        raise ConfigError(f"--resume: {shown} holds no study named {study_name!r}; give the sweep's "
                          "--study-storage (its URL is in sweep.json under study.storage)")


def study_record(settings, url: str) -> dict:
    """sweep.json's ``study``: where the study is and how it mirrors the sweep."""
    return {
        "storage": redact(url),
        "study_name": settings.name,
        "direction": "maximize best_val_dice",
        "intermediate_values": "best_val_dice after each epoch (step = epoch)",
        "states": "COMPLETED -> COMPLETE; STOPPED_EARLY (ASHA) -> PRUNED, valued at its last epoch; "
                  "FAILED, ERROR -> FAIL; running or interrupted -> RUNNING (--resume continues it)",
        "pruned_trials": PRUNED_TRIALS[settings.sampler],
        "dashboard": f"optuna-dashboard {with_driver(redact(url))} --host 127.0.0.1",
    }


def run_url(run_dir: Path, sweep: dict) -> str | None:
    """The study URL of the run in ``run_dir`` (None: a run made before studies were stored).
    The default SQLite file is found in the folder itself, wherever it was moved."""
    study = sweep.get("study")
    if not study:
        return None
    if sweep.get("settings", {}).get("study_storage") is None:
        return default_url(run_dir)
    return connect_url(study["study_name"], study["storage"])


def load_run_study(run_dir: Path, sweep: dict, url: str | None = None):
    """``(study, None)`` or ``(None, why not)`` for the report; never raises for a missing study."""
    import optuna

    url = url or run_url(run_dir, sweep)
    if url is None:
        return None, (f"this run folder has no {STUDY_DB} (it was made before sweeps kept their Optuna study): "
                      "importances and Optuna's plots need it; trials.csv and the learning curves below are complete")
    if url.startswith("sqlite:///") and not Path(_parse(url).database).is_file():
        return None, f"the study database {_parse(url).database} does not exist (yet)"
    name = sweep["study"]["study_name"]
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url, write=False)), None
    except (ConfigError, KeyError) as err:
        return None, f"cannot load the study {name!r} from {redact(url)} ({err})"


# ----------------------------------------------------------------------------- recording trials


def find_trial(study, tune_trial_id: str, states=None):
    """The frozen Optuna trial tagged with ``tune_trial_id`` (None if there is none)."""
    for trial in study.get_trials(deepcopy=False, states=states):
        if trial.user_attrs.get(TUNE_ID_ATTR) == tune_trial_id:
            return trial
    return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def record_epoch(storage, trial_id: int, epoch, value) -> None:
    """One epoch's value as an intermediate value (step = epoch); a rerun epoch overwrites the same step."""
    if _finite(value) and isinstance(epoch, (int, float)) and epoch > 0:
        storage.set_trial_intermediate_value(trial_id, int(epoch), float(value))


def record_attrs(storage, trial_id: int, attrs: dict) -> None:
    """User attributes of a running trial (empty and non-finite values are left out)."""
    for key, value in attrs.items():
        value = value.item() if hasattr(value, "item") else value  # numpy scalars from pandas rows
        if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
            continue
        storage.set_trial_user_attr(trial_id, key, value)


def record_end(study, storage, trial_id: int, row: dict, checkpoint_path: str | None = None) -> str | None:
    """Finish the Optuna trial as its trials.csv ``row`` says; returns the state told (None: left RUNNING)."""
    import optuna

    state_name = STATES.get(row["status"])
    if state_name is None:
        return None
    value = row.get("best_val_dice")
    reason = row.get("failure_reason") or ""
    if state_name == "COMPLETE" and not _finite(value):
        state_name, reason = "FAIL", reason or f"best_val_dice is not a finite number ({value})"
    if state_name == "PRUNED":  # the epoch ASHA stopped it at (Tune does not show that result to the searcher)
        record_epoch(storage, trial_id, row.get("epochs_run"), value)
    attrs = {"status": row["status"], "epochs_run": row.get("epochs_run"), "node_id": row.get("node_id"),
             "wall_time_s": row.get("wall_time_s"), "checkpoint_path": checkpoint_path, "failure_reason": reason}
    record_attrs(storage, trial_id, attrs)
    state = optuna.trial.TrialState[state_name]
    number = storage.get_trial_number_from_id(trial_id)
    study.tell(number, float(value) if state_name == "COMPLETE" else None, state=state, skip_if_finished=True)
    return state_name


def fail_stale_trials(study, storage, tune_ids: set[str]) -> list[int]:
    """Mark FAIL the RUNNING trials whose Tune trial is not in ``tune_ids`` (the experiment's); their numbers."""
    import optuna

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get(TUNE_ID_ATTR) in tune_ids:
            continue
        record_attrs(storage, trial._trial_id, {"failure_reason": STALE_REASON})
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        failed.append(trial.number)
    return failed


def trials_frame(study):
    """The study's trials as a table (one row per trial: number, state, value, params, user attributes)."""
    import pandas as pd

    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append({"number": trial.number, "state": trial.state.name, "value": trial.value, **trial.params,
                     **{f"attr_{k}": v for k, v in trial.user_attrs.items()},
                     "intermediate_values": dict(trial.intermediate_values)})
    return pd.DataFrame(rows)
