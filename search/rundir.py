"""The run folder's format: what ``search.run`` writes under ``STORAGE/NAME`` and every later stage reads.

    sweep.json         settings, search space, fixed trial config, sampler, command, versions
    trials.csv         one row per trial (``search.trials``)
    study.db           the Optuna study, SQLite (``search.study``; not written with --study-storage URL)
    best_config.json   the best trial's parameters and full TrainConfig
    tune/              Ray Tune's experiment folder, one ``trial_NNN_<id>/`` per trial; a finished
                       trial's folder holds ``end.json`` (``write_trial_end``): its last result
    data_summary.txt   dataset, splits, trivial baselines (``python -m tumorseg.data`` in three lines)
    splits.json        the valid/test carve by case, when the data had none (reused by resume and retrain)
    final/             the final stage (``search.retrain``), below
    report.html        the report (``search.report``)
    ray.log            Ray's and Optuna's own log lines (the terminal shows ``search.live``'s view)

The final stage writes ``final/`` (``search.retrain``; ``tumorseg.postprocess`` reads the shipped model):

    final/<recipe>/<key>/seed<k>/   one retrain run (recipe: best | seed_recipe; key: ``run_key``, a hash of
                                    its TrainConfig without the seed and of the data fingerprint; k = 0..K-1)
    final/model/member<k>.pt        the shipped model: the K runs of the shipped recipe's current key
    final/postprocess.json          its post-processing, chosen on validation (``tumorseg.postprocess``)
    final/metrics.json              test metrics per seed, of the ensemble without and with post-processing,
                                    and of the trivial baselines, per recipe
    final/model.pt                  the shipped recipe's member with the best validation Dice (one file)
    final/predictions.png, overlay_{best,median,worst}.png, test_per_image.csv   the shipped predictions

Runs under another key (an earlier best configuration, budget or dataset) are never read.

``results/README.md`` documents each file for users. This module also holds the one trial-naming
rule (``trial_name``: ``trial_000`` is the first trial, the seed recipe). It imports no Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorseg.data import SPLITS_JSON  # the carve, the same file name as in a tumorseg.train --out
from tumorseg.errors import UserError
from tumorseg.postprocess import FINAL_DIR, FINAL_MODEL_DIR, POSTPROCESS_JSON  # noqa: F401 - the run folder's names

from search.space import SearchSpace
from search.storage import is_uri

SWEEP_JSON = "sweep.json"
TRIALS_CSV = "trials.csv"
BEST_CONFIG_JSON = "best_config.json"
DATA_SUMMARY_TXT = "data_summary.txt"  # the three dataset lines the sweep printed at start
TUNE_DIR = "tune"  # Ray's experiment folder inside the run folder
FINAL_EPOCHS_FACTOR = 3  # --final-epochs default: this many times --epochs (README: "The final stage")
REPORT_HTML = "report.html"
RAY_LOG = "ray.log"  # Ray's and Optuna's own log (the terminal shows the live view)
STUDY_DB = "study.db"  # the Optuna study (SQLite) unless --study-storage names a database
TRIAL_END_JSON = "end.json"  # in a finished trial's folder under tune/: its last result (write_trial_end)
DRIVER_FILES = (SWEEP_JSON, TRIALS_CSV, BEST_CONFIG_JSON, SPLITS_JSON, DATA_SUMMARY_TXT, FINAL_DIR, STUDY_DB)  # what --resume downloads from a URI


@dataclass
class SweepSettings:
    """How the sweep runs (the space and the trial config are stored beside it in sweep.json)."""

    name: str
    storage: str = "results"
    data: str | None = None
    data_options: dict | None = None  # tumorseg.data.DataOptions.to_dict()
    gpus: float = 0
    gpus_per_trial: float = 0
    cpus_per_trial: float | None = None  # None: derived from the cluster's nodes once Ray is up
    num_samples: int = 16
    max_concurrent: int = 0  # 0: as many as the resources allow
    epochs: int = 20
    # ASHA's defaults, chosen by `python -m search.bench --asha-yield` (README, Benchmarks): with these the
    # best was within 0.01 of the full budget's in 5 of 5 seeds at 2.13x fewer epochs (median)
    grace_period: int = 1
    reduction_factor: float = 2
    rung_metric: str = "val_dice"  # search.tuner.RUNG_METRICS: what ASHA compares at a rung
    max_failures: int = 2
    seed: int = 0
    retrain_seeds: int = 1
    final_epochs: int | None = None  # the retrain's budget; None: FINAL_EPOCHS_FACTOR x epochs
    address: str | None = None
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    ray_temp_dir: str | None = None
    cache_dir: str | None = None
    points: list[dict] | None = None  # evaluated first; None: the seed recipe
    reuse_actors: bool = True  # run the next trial in a finished trial's warm process (no re-imports)
    keep_checkpoints: bool = False  # False: a trial's checkpoints are deleted when it finishes (search.checkpoints)
    data_path: str = "auto"  # object-store | node-cache | auto (search.datapath)
    no_retrain: bool = False
    verbose: bool = False  # Ray's own output on the terminal too (always in RAY_LOG)
    sampler: str = "tpe"  # search.tuner.SAMPLERS
    study_storage: str | None = None  # the study's database URL; None: STUDY_DB in the run folder
    mlflow: str | None = None  # --mlflow: a folder or tracking URI (search.tracking); None: no MLflow

    @property
    def run_dir(self) -> Path:
        """The local folder of the driver's files (for a URI storage: ``results/<name>``)."""
        if is_uri(self.storage):
            return Path("results").resolve() / self.name
        return Path(self.storage).expanduser().resolve() / self.name

    def retrain_epochs(self) -> int:
        """The final stage's epoch budget (``--final-epochs``)."""
        return self.final_epochs or FINAL_EPOCHS_FACTOR * self.epochs

    @property
    def ray_root(self) -> str:
        """Where Ray writes ``tune/`` (results and checkpoints of every node)."""
        if is_uri(self.storage):
            return f"{self.storage.rstrip('/')}/{self.name}"
        return str(self.run_dir)

    @property
    def tune_path(self) -> str:
        return f"{self.ray_root}/{TUNE_DIR}"

    def resolve_data_dir(self) -> Path:
        """The dataset folder: ``--data``, or the built-in synthetic set (written on first use)."""
        from tumorseg.train import resolve_data_dir

        return resolve_data_dir(Path(self.data) if self.data else None, Path(self.cache_dir) if self.cache_dir else None)

    def open_dataset(self, write_splits: bool = True):
        """The sweep's dataset, split as it was first split: the run folder's ``splits.json``
        is reused when present, and written the first time the splits are carved."""
        from tumorseg.data import DataOptions, open_dataset

        options = DataOptions.from_dict(self.data_options)
        splits_json = self.run_dir / SPLITS_JSON
        if splits_json.is_file():
            options = dataclasses.replace(options, splits_file=splits_json)
        dataset = open_dataset(self.resolve_data_dir(), options)
        if dataset.carved and write_splits:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dataset.write_splits(splits_json)
        return dataset


# ----------------------------------------------------------------------------- sweep.json


def holds_sweep(run_dir: Path) -> bool:
    """Whether ``run_dir`` is claimed by a sweep (its name cannot be reused without --resume)."""
    return (Path(run_dir) / SWEEP_JSON).exists() or (Path(run_dir) / TUNE_DIR).exists()


def write_sweep_json(run_dir: Path, settings: SweepSettings, space: SearchSpace, base: dict, *,
                     notes: list[str], sampler: dict, argv: list[str], study: dict | None = None) -> None:
    """``study``: where the Optuna study is and how it mirrors the sweep (passwords already removed)."""
    recorded = dataclasses.asdict(settings)
    if study is not None and settings.study_storage is not None:
        recorded["study_storage"] = study["storage"]  # never the password (the caller redacts argv too)
    payload = {
        "settings": recorded,
        "space": space.to_dict(),
        "base_config": base,
        "seed_point_notes": notes,
        "sampler": sampler,
        **({"study": study} if study is not None else {}),
        "command": "python -m search.run " + " ".join(shlex.quote(a) for a in argv),
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(Path(run_dir) / SWEEP_JSON, payload)


def read_sweep_json(run_dir: Path) -> dict:
    path = Path(run_dir) / SWEEP_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: is {run_dir} a search.run output folder?") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def load_sweep(run_dir: Path) -> tuple[SweepSettings, SearchSpace, dict, dict]:
    """``(settings, space, base config, the whole sweep.json)`` of the sweep in ``run_dir``."""
    payload = read_sweep_json(run_dir)
    known = {f.name for f in dataclasses.fields(SweepSettings)}
    saved = {"rung_metric": "best_val_dice", **payload["settings"]}  # sweeps from before --rung-metric
    settings = SweepSettings(**{k: v for k, v in saved.items() if k in known})
    if not is_uri(settings.storage):
        settings.storage = str(Path(run_dir).resolve().parent)  # the folder may have moved
    settings.name = Path(run_dir).resolve().name
    return settings, SearchSpace.from_dict(payload["space"]), payload["base_config"], payload


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["tumorseg", "torch", "torchvision", "segmentation-models-pytorch", "albumentations", "ray", "optuna",
             "accelerate", "pandas", "plotly", "numpy"]
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ----------------------------------------------------------------------------- best_config.json


def read_best_params(run_dir: Path) -> dict | None:
    path = Path(run_dir) / BEST_CONFIG_JSON
    return json.loads(path.read_text())["params"] if path.is_file() else None


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)  # readers never see half a file


def write_trial_end(filesystem, trial_path: str, result: dict) -> None:
    """Record that a trial has finished: its last result as ``TRIAL_END_JSON`` in its folder, once.

    ``filesystem`` is the storage's pyarrow filesystem (a local folder or ``s3://``); one small file
    per trial, written when the trial ends, so the record costs the same at 20 trials or 2,000. A
    ``--resume`` trusts it over Tune's experiment snapshot, which is written only now and then
    (``search.checkpoints.RecordTrialEnds``). A record already there is kept (a trial kept finished
    by a resume ends again).
    """
    from pyarrow.fs import FileType

    path = f"{trial_path.rstrip('/')}/{TRIAL_END_JSON}"
    if filesystem.get_file_info(path).type == FileType.File:
        return
    filesystem.create_dir(trial_path, recursive=True)  # a trial that failed in its first epoch may have none yet
    payload = json.dumps(result, default=_plain).encode()
    if filesystem.type_name != "local":  # an object store's PUT is atomic already
        with filesystem.open_output_stream(path) as stream:
            stream.write(payload)
        return
    with filesystem.open_output_stream(path + ".tmp") as stream:
        stream.write(payload)
    filesystem.move(path + ".tmp", path)  # readers never see half a file


def _plain(value):
    """A value JSON cannot write as itself: a numpy scalar as its number, anything else as its text."""
    return value.item() if hasattr(value, "item") else str(value)


def read_trial_end(filesystem, trial_path: str) -> dict | None:
    """A trial's recorded last result (None: not recorded finished). A storage that cannot be read
    raises: "not finished" would train the trial again."""
    try:
        with filesystem.open_input_stream(f"{trial_path.rstrip('/')}/{TRIAL_END_JSON}") as stream:
            return json.loads(stream.readall())
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------- retrain runs


def run_key(config: dict, fingerprint: str) -> str:
    """What a retrain run is keyed by: a short hash of its TrainConfig without the seed and of the
    data fingerprint (seeds 0..K-1 of one recipe share a key; any other change makes a new one)."""
    what = {"config": {k: v for k, v in config.items() if k != "seed"}, "data": fingerprint}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- trial names


def trial_name(trial: Any) -> str:
    """``trial_000`` for the first trial (the seed recipe): Tune's experiment tag starts with its 1-based order."""
    return f"trial_{int(trial.experiment_tag.split('_', 1)[0]) - 1:03d}"


def trial_dirname(trial: Any) -> str:
    """A trial's folder under ``tune/``: its name and Tune's trial id."""
    return dir_for(trial_name(trial), trial.trial_id)


def dir_for(name: str, trial_id: str) -> str:
    return f"{name}_{trial_id}"


def trial_index(name: str) -> int | None:
    """The trial's order from its name (``trial_003`` -> 3)."""
    try:
        return int(str(name).split("_")[1])
    except (IndexError, ValueError):
        return None
