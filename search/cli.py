"""``python -m search.run``'s command line: flags and their validation, into ``SweepSettings``.

Flags are derived, not spelled out: the search-space flags from ``SearchSpace``'s fields, the fixed
training settings from ``TrainConfig``'s (``tumorseg.cli.add_dataclass_arguments``). Validation
raises ``ConfigError`` naming the flag; nothing here touches the disk except reading the files the
flags name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from tumorseg.cli import ArgumentParser, add_dataclass_arguments, parse_float_list, parse_int_list, parse_range
from tumorseg.config import TrainConfig, field_names
from tumorseg.data import DataOptions, add_data_arguments
from tumorseg.errors import ConfigError

from search.datapath import DATA_PATHS, OBJECT_STORE_MAX_BYTES
from search.rundir import FINAL_EPOCHS_FACTOR, RAY_LOG, SweepSettings
from search.space import OPTIONAL_NAMES, PARAM_NAMES, PARAMS, SearchSpace, define_by_run, fit_to_budget, read_space_file
from search.study import normalise
from search.tuner import RUNG_METRICS, SAMPLERS

# TrainConfig fields with a sweep-specific meaning, defined by hand below
SWEEP_OWNED_FIELDS = ("epochs", "seed", "num_workers")
# flags that may differ on --resume (they change how the driver runs, not what the sweep is);
# RESUMED_SETTINGS are the SweepSettings fields such a flag sets on the saved sweep
RESUMED_SETTINGS = ("dashboard", "dashboard_host", "dashboard_port", "ray_temp_dir", "no_retrain", "retrain_seeds",
                    "cache_dir", "verbose", "study_storage", "final_epochs", "data_path")
RESUMABLE_FLAGS = {"name", "storage", "resume", "address", *RESUMED_SETTINGS}
# tumorseg.data.add_data_arguments' flags (their values live in SweepSettings.data_options)
DATA_FLAGS = {"layout", "labels", "split", "split_seed", "group_by", "splits", "allow_unlabelled"}
SPACE_FLAG_TYPES = {"int_list": parse_int_list, "str_list": lambda v: [x for x in v.split(",") if x],
                    "float_list": parse_float_list,
                    "range": parse_range, "int_range": parse_range}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="search.run", description="Ray Tune + Optuna (TPE) + ASHA sweep, then retrain and test.")
    g = p.add_argument_group("run")
    g.add_argument("--data", type=Path, default=None, help="dataset folder, any layout (default: built-in synthetic set)")
    g.add_argument("--name", default=None, help="run name: outputs go to STORAGE/NAME (default: sweep-<time>)")
    g.add_argument("--storage", default="results", help="results root: a path or a URI (default: results/)")
    g.add_argument("--resume", action="store_true", help="continue the sweep --name (finished trials are kept)")
    g.add_argument("--debug", action="store_true", help="one trial in this process without Ray (tiny budget)")
    g.add_argument("--seed", type=int, default=0, help="seeds the searcher and the trials (default 0)")
    g.add_argument("--verbose", action="store_true",
                   help=f"show Ray's own output (status boxes, warnings, worker logs) here too, not only in NAME/{RAY_LOG}")
    g.add_argument("--cache-dir", default=None, help="array cache (default: $TUMORSEG_CACHE_DIR or ~/.cache/tumorseg)")
    g.add_argument("--mlflow", default=None, metavar="URI",
                   help="log every trial to MLflow: a folder (an SQLite store in it) or a tracking URI (pip install -e '.[mlflow]')")
    add_data_arguments(p)
    r = p.add_argument_group("resources")
    r.add_argument("--gpus", type=float, default=0, help="GPUs the search may use in total (logical GPUs where fewer exist)")
    r.add_argument("--gpus-per-trial", type=float, default=None, help="GPUs per trial; 0.5 packs two trials per GPU (default: 1 if --gpus)")
    r.add_argument("--cpus-per-trial", type=float, default=None,
                   help="CPUs per trial, also its torch threads (default: 1, or a GPU node's CPUs per GPU for GPU trials)")
    r.add_argument("--max-concurrent", type=int, default=0, help="at most this many trials at once (default: as resources allow)")
    r.add_argument("--address", default=None, help="attach to a running Ray cluster (auto | HOST:PORT) instead of starting one")
    r.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True, help="serve the Ray dashboard")
    r.add_argument("--dashboard-host", default="127.0.0.1", help="dashboard bind address (0.0.0.0 exposes it: keep token auth on)")
    r.add_argument("--dashboard-port", type=int, default=8265)
    r.add_argument("--ray-temp-dir", default=None, help="Ray's session/log folder (default: Ray's /tmp/ray)")
    r.add_argument("--data-path", choices=DATA_PATHS, default="auto",
                   help="how trials get the arrays: Ray's object store, or a memory-mapped copy per node of the "
                        f"--cache-dir cache (auto: the object store up to {OBJECT_STORE_MAX_BYTES / 2**30:g} GiB of arrays; "
                        "see search/datapath.py)")
    r.add_argument("--keep-checkpoints", action="store_true",
                   help="keep finished trials' checkpoints (default: deleted when a trial finishes; --resume never reads them)")
    r.add_argument("--reuse-actors", action=argparse.BooleanOptionalAction, default=True,
                   help="start the next trial in a finished trial's process (saves Python and torch start-up)")
    t = p.add_argument_group("search and scheduling")
    t.add_argument("--num-samples", type=int, default=16, help="trials to run (the seed recipe is the first)")
    t.add_argument("--epochs", type=int, default=TrainConfig().epochs, help="epoch budget of a trial (ASHA max_t)")
    t.add_argument("--final-epochs", type=int, default=None,
                   help=f"epoch budget of each final retrain run (default: {FINAL_EPOCHS_FACTOR} x --epochs: trials rank, the final training delivers)")
    t.add_argument("--grace-period", type=int, default=SweepSettings.grace_period,
                   help=f"ASHA: epochs before a trial may be stopped (default {SweepSettings.grace_period})")
    t.add_argument("--reduction-factor", type=float, default=SweepSettings.reduction_factor,
                   help=f"ASHA: keep 1/this of trials at each rung (default {SweepSettings.reduction_factor:g})")
    t.add_argument("--rung-metric", choices=RUNG_METRICS, default=SweepSettings.rung_metric,
                   help="ASHA compares trials at a rung by this epoch's validation Dice (val_dice, default: measured "
                        "best, README Benchmarks) or by the best so far (best_val_dice)")
    t.add_argument("--max-failures", type=int, default=2, help="retries of a crashing trial (from its checkpoint)")
    t.add_argument("--sampler", choices=SAMPLERS, default="tpe",
                   help="Optuna sampler: tpe (default), gp (Gaussian process, small budgets), random, qmc (Sobol)")
    t.add_argument("--study-storage", default=None, metavar="URL",
                   help="the Optuna study's database, any SQLAlchemy URL, e.g. postgresql://user@host/db "
                        "(default: sqlite:///STORAGE/NAME/study.db; the password is never saved)")
    t.add_argument("--retrain-seeds", type=int, default=1,
                   help="seeds for retraining the best config and the seed recipe; K > 1 ships an ensemble of K")
    t.add_argument("--no-retrain", action="store_true", help="stop after the sweep (run search.retrain later)")
    sp = p.add_argument_group("search space (see search/space.py)")
    sp.add_argument("--space", type=Path, default=None, help="JSON/YAML file of search-space overrides")
    sp.add_argument("--points", type=Path, default=None, help="JSON list of configurations to evaluate first, instead of the seed recipe")
    defaults = SearchSpace()
    for f in dataclasses.fields(SearchSpace):
        shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in getattr(defaults, f.name))
        sp.add_argument(f.metadata["flag"], dest=f.name, type=SPACE_FLAG_TYPES[f.metadata["kind"]], default=None,
                        help=f"{f.metadata['help']} (default {shown})")
    f = p.add_argument_group("fixed training settings (all trials; see tumorseg/config.py)")
    always_searched = [name for name in PARAM_NAMES if name not in OPTIONAL_NAMES]
    # --arch/--encoder/--batch-size/--aug-strength fix an optional dimension (= --archs X etc.)
    add_dataclass_arguments(f, TrainConfig, exclude=(*always_searched, *SWEEP_OWNED_FIELDS),
                            defaults=dict.fromkeys(OPTIONAL_NAMES))
    plural = {q.name: {g.name: g.metadata["flag"] for g in dataclasses.fields(SearchSpace)}[q.range_field] for q in PARAMS if q.optional}
    for action in p._actions:  # None means "not given"; say what the flag really does
        if action.dest in plural:
            action.help = action.help.replace("(default: %(default)s)", f"(= {plural[action.dest]} with one value)")
    f.add_argument("--num-workers", type=int, default=None, help="DataLoader workers per trial (default: trial CPUs - 1)")
    f.add_argument("--fixed", action="append", default=[], metavar="NAME=VALUE", help="set any TrainConfig field for all trials")
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The ``dest`` names of the flags ``argv`` actually gives (not left at their defaults)."""
    quiet = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:  # the same flags, every default suppressed
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                quiet.add_argument(*action.option_strings, action="store_true", **kwargs)
            else:
                quiet.add_argument(*action.option_strings, **kwargs)
    known, _ = quiet.parse_known_args(argv)
    return set(vars(known))


def check_resume_flags(given: set[str], new: tuple[SweepSettings, SearchSpace, dict], saved: tuple[SweepSettings, SearchSpace, dict]) -> None:
    """``--resume`` continues a sweep as it was created: refuse given flags that would change it.

    A flag repeated with the sweep's own value is fine (rerunning the same command with
    ``--resume`` works); the runtime flags in ``RESUMABLE_FLAGS`` may change.
    """
    (settings, space, base), (old_settings, old_space, old_base) = new, saved

    def differs(dest: str) -> bool:
        if dest in DATA_FLAGS:
            return DataOptions.from_dict(settings.data_options).to_dict() != DataOptions.from_dict(old_settings.data_options).to_dict()
        if dest in ("space", "debug"):
            return dest == "debug" or space.to_dict() != old_space.to_dict()
        if dest == "fixed":
            return any(base.get(k) != old_base.get(k) for k in base)
        if hasattr(old_settings, dest):
            return getattr(settings, dest) != getattr(old_settings, dest)
        if hasattr(old_space, dest):
            return getattr(space, dest) != getattr(old_space, dest)
        return base.get(dest) != old_base.get(dest)

    changed = sorted(dest for dest in given - RESUMABLE_FLAGS if differs(dest))
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise ConfigError(f"--resume continues the sweep as it was created, so {flags} cannot change "
                          f"(Ray Tune restores its trial count, searcher and scheduler as saved); "
                          f"only {', '.join('--' + n.replace('_', '-') for n in sorted(RESUMABLE_FLAGS - {'resume', 'name'}))} may")


# ----------------------------------------------------------------------------- validation


def space_from_args(args) -> tuple[SearchSpace, bool]:
    """The search space from ``--space`` and the range flags; and whether the warmup range was given."""
    values = read_space_file(args.space) if args.space else {}
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(SearchSpace) if getattr(args, f.name) is not None}
    for p in PARAMS:  # --batch-size 8 is --batch-sizes 8: one value, fixed
        if p.optional and getattr(args, p.name) is not None:
            one, many = "--" + p.name.replace("_", "-"), {f.name: f.metadata["flag"] for f in dataclasses.fields(SearchSpace)}[p.range_field]
            if p.range_field in flags:
                raise ConfigError(f"{one} fixes what {many} searches: give one of them")
            flags[p.range_field] = [getattr(args, p.name)]
    explicit_warmup = "warmup_epochs_range" in values or "warmup_epochs_range" in flags
    try:
        space = SearchSpace.from_dict(values, source=str(args.space)) if values else SearchSpace()
        return space.replace(**flags), explicit_warmup
    except ConfigError as err:  # name the flag the user gave, else the file the value came from
        name, _, rest = str(err).partition(":")
        flag = {f.name: f.metadata["flag"] for f in dataclasses.fields(SearchSpace)}.get(name)
        if flag and name in flags:
            raise ConfigError(f"{flag}:{rest}") from None
        raise ConfigError(f"--space {args.space}: {err}" if args.space and name in values else str(err)) from None


def read_points(path: Path, space: SearchSpace) -> list[dict]:
    """``--points FILE``: a JSON list of parameter dicts, each a valid point of ``space``."""
    import optuna

    try:
        points = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--points: cannot read {path} as JSON ({err})") from None
    if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
        raise ConfigError(f"--points: {path} must hold a non-empty JSON list of objects")
    for i, point in enumerate(points):
        trial = optuna.trial.FixedTrial(point)
        try:
            define_by_run(space)(trial)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"--points: {path} entry {i} is not a point of the search space ({err})") from None
        extra = set(point) - set(trial.params)
        if extra:
            raise ConfigError(f"--points: {path} entry {i} has parameters the space does not sample: {', '.join(sorted(extra))}")
    return points


def parse_fixed(items: list[str]) -> dict[str, Any]:
    """``--fixed batch_size=8`` -> ``{"batch_size": 8}`` (typed like the TrainConfig field)."""
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    fixed = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in types:
            raise ConfigError(f"--fixed {item!r}: expected NAME=VALUE with NAME one of {', '.join(field_names())}")
        kind = types[name]
        try:
            value = (raw.lower() in ("1", "true", "yes")) if kind in ("bool", bool) else (
                int(raw) if kind in ("int", int) else float(raw) if kind in ("float", float) else raw
            )
        except ValueError:
            raise ConfigError(f"--fixed {item!r}: {raw!r} is not a valid {kind}") from None
        fixed[name] = value
    return fixed


def _positive(flag: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value:g}")


def check_counts(args) -> float:
    """Validate the numeric flags; returns ``--gpus-per-trial`` with its default applied."""
    for flag, allow_zero in (("gpus", True), ("num_samples", False), ("epochs", False), ("grace_period", False),
                             ("max_failures", True), ("max_concurrent", True), ("retrain_seeds", False)):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag), allow_zero)
    if args.reduction_factor <= 1:
        raise ConfigError(f"--reduction-factor must be > 1, got {args.reduction_factor:g}")
    gpus_per_trial = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if args.gpus > 0 else 0.0)
    _positive("--gpus-per-trial", gpus_per_trial, allow_zero=True)
    if gpus_per_trial > args.gpus:
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g} is more than --gpus {args.gpus:g}")
    if gpus_per_trial > 1 and gpus_per_trial != int(gpus_per_trial):
        raise ConfigError(f"--gpus-per-trial above 1 must be a whole number, got {gpus_per_trial:g}")
    if args.gpus > 0 and gpus_per_trial == 0:
        raise ConfigError("--gpus-per-trial 0 with --gpus > 0 would leave the GPUs idle")
    if args.grace_period > args.epochs and not args.debug:  # no ASHA in debug mode
        raise ConfigError(f"--epochs {args.epochs} is smaller than the ASHA --grace-period {args.grace_period}")
    for flag in ("cpus_per_trial", "num_workers", "final_epochs"):
        if getattr(args, flag) is not None:
            _positive("--" + flag.replace("_", "-"), getattr(args, flag), allow_zero=flag == "num_workers")
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        raise ConfigError(f"--name {args.name!r}: use a plain folder name")
    if args.debug and args.resume:
        raise ConfigError("--debug runs one trial in this process without Ray; it cannot --resume a sweep")
    if args.data is not None and not Path(args.data).is_dir():
        raise ConfigError(f"--data: folder not found: {args.data}")
    return gpus_per_trial


def base_config(args) -> dict[str, Any]:
    """The fixed part of every trial's TrainConfig (validated now, not in every trial).

    ``num_workers`` stays out when not given: it follows the trial's CPUs, known once Ray is up.
    """
    fixed = parse_fixed(args.fixed)
    searched = set(PARAM_NAMES) & set(fixed)
    if searched:
        raise ConfigError(f"--fixed {', '.join(sorted(searched))}: searched parameter(s); narrow the space instead (e.g. --lr-range)")
    owned = {name for name in field_names() if name not in PARAM_NAMES and name not in SWEEP_OWNED_FIELDS}
    base = {name: getattr(args, name) for name in owned}
    base.update(epochs=args.epochs, seed=args.seed)
    if args.num_workers is not None:
        base["num_workers"] = args.num_workers
    base.update(fixed)
    TrainConfig.from_dict(base)
    return base


def data_options(args) -> DataOptions:
    """The data flags; a ``--splits`` file by absolute path (resume and retrain may run elsewhere)."""
    options = DataOptions.from_args(args)
    if options.splits_file is not None:
        options = dataclasses.replace(options, splits_file=Path(options.splits_file).resolve())
    return options


def settings_from_args(args) -> tuple[SweepSettings, SearchSpace, dict, list[str]]:
    """Validate every flag: ``(settings, space, base config, notes)``; ``ConfigError`` names the first bad flag."""
    gpus_per_trial = check_counts(args)
    space, explicit_warmup = space_from_args(args)
    space, notes = fit_to_budget(space, args.epochs, None if args.debug else args.grace_period, explicit_warmup)
    settings = SweepSettings(
        name=args.name or time.strftime("sweep-%Y%m%d-%H%M%S"),
        storage=args.storage,
        data=str(Path(args.data).resolve()) if args.data else None,
        data_options=data_options(args).to_dict(),
        gpus=args.gpus,
        gpus_per_trial=gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        epochs=args.epochs,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        rung_metric=args.rung_metric,
        max_failures=args.max_failures,
        seed=args.seed,
        retrain_seeds=args.retrain_seeds,
        final_epochs=args.final_epochs,
        address=args.address or os.environ.get("RAY_ADDRESS") or None,
        dashboard=args.dashboard,
        dashboard_host=args.dashboard_host,
        dashboard_port=args.dashboard_port,
        ray_temp_dir=args.ray_temp_dir,
        cache_dir=args.cache_dir,
        points=read_points(args.points, space) if args.points else None,
        reuse_actors=args.reuse_actors,
        keep_checkpoints=args.keep_checkpoints,
        data_path=args.data_path,
        no_retrain=args.no_retrain,
        verbose=args.verbose,
        sampler=args.sampler,
        study_storage=normalise(args.study_storage) if args.study_storage else None,
        mlflow=args.mlflow,
    )
    if args.mlflow:
        from search.tracking import require_mlflow

        require_mlflow()
    check_models(space)
    base = {**base_config(args), **space.fixed_params()}
    TrainConfig.from_dict(base)
    for batch in space.batch_sizes:
        if gpus_per_trial > 1 and batch % int(gpus_per_trial):
            raise ConfigError(f"--batch-size {batch} must be a multiple of --gpus-per-trial {gpus_per_trial:g} "
                              "(each data-parallel worker gets an equal slice of the global batch)")
    return settings, space, base, notes


def check_models(space: SearchSpace) -> None:
    """Every arch and encoder name known to smp, every pair buildable, every size a multiple of its stride."""
    from tumorseg.model import check_arch, check_encoder, check_model

    for arch in space.archs:
        check_arch(arch, "--archs" if len(space.archs) > 1 else "--arch")
    for encoder in space.encoders:
        check_encoder(encoder, "--encoders" if len(space.encoders) > 1 else "--encoder")
    for arch in space.archs:
        for encoder in space.encoders:
            check_model(arch, encoder, space.resize_choices, flag="--resize-choices")
