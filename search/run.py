"""The sweep: Ray Tune + Optuna (TPE) + ASHA over UNet-ResNet18 trainings, then retrain and test.

    python -m search.run --gpus 4                      # a local Ray cluster on this box
    python -m search.run --address auto --gpus 16      # an existing Ray cluster
    python -m search.run --debug                       # one trial in-process, no Ray at all
    python -m search.run --name NAME --resume          # continue an interrupted sweep

Outputs go to ``--storage/--name`` (see ``results/README.md``). The seed recipe is trial 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorseg.cli import ArgumentParser, exit_on_user_error, parse_int_list, parse_range
from tumorseg.config import TrainConfig, field_names
from tumorseg.errors import ConfigError, UserError

from search.space import PARAM_NAMES, SearchSpace, define_by_run, seed_point
from search.storage import check_visible_from_all_nodes, check_writable, is_uri

SWEEP_JSON = "sweep.json"
# What ASHA compares at its rungs and what TPE learns from: the best native-resolution validation
# Dice a trial has reached so far. One epoch's Dice is noisy early on; the running best is what
# the trial would be selected by, and it is the score trials.csv and the report rank.
METRIC = "best_val_dice"
TUNE_DIR = "tune"  # Ray's experiment folder inside the run folder


@dataclass
class SweepSettings:
    """How the sweep runs (the space and the trial config are stored beside it)."""

    name: str
    storage: str = "results"
    data: str | None = None
    gpus: float = 0
    gpus_per_trial: float = 0
    cpus_per_trial: float = 1
    num_samples: int = 16
    max_concurrent: int = 0  # 0: as many as the resources allow
    epochs: int = 20
    grace_period: int = 2
    reduction_factor: float = 3
    max_failures: int = 2
    seed: int = 0
    retrain_seeds: int = 1
    address: str | None = None
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    ray_temp_dir: str | None = None
    cache_dir: str | None = None
    points: list[dict] | None = None  # evaluated first; None: the seed recipe
    reuse_actors: bool = True  # run the next trial in a finished trial's warm process (no re-imports)

    @property
    def run_dir(self) -> Path:
        """The local folder of the driver's files (for a URI storage: ``results/<name>``)."""
        if is_uri(self.storage):
            return Path("results").resolve() / self.name
        return Path(self.storage).expanduser().resolve() / self.name

    @property
    def ray_root(self) -> str:
        """Where Ray writes ``tune/`` (results and checkpoints of every node)."""
        if is_uri(self.storage):
            return f"{self.storage.rstrip('/')}/{self.name}"
        return str(self.run_dir)

    def slots(self, cpus: float | None = None) -> int:
        """Trials that can run at once: by GPUs, else by ``cpus`` (default: this machine's)."""
        if self.gpus_per_trial > 0:
            return max(1, int(self.gpus // self.gpus_per_trial + 1e-9))
        return max(1, int((cpus or os.cpu_count() or 1) // max(self.cpus_per_trial, 1e-9)))


def build_parser() -> ArgumentParser:
    d = TrainConfig()
    s = SearchSpace()
    p = ArgumentParser(prog="search.run", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("run")
    g.add_argument("--data", type=Path, default=None, help="Kaggle-layout dataset (default: built-in synthetic set)")
    g.add_argument("--name", default=None, help="run name: outputs go to STORAGE/NAME (default: sweep-<time>)")
    g.add_argument("--storage", default="results", help="results root (default: results/)")
    g.add_argument("--resume", action="store_true", help="continue the sweep --name (finished trials are kept)")
    g.add_argument("--debug", action="store_true", help="one trial in this process without Ray (tiny budget)")
    g.add_argument("--seed", type=int, default=0, help="seeds the searcher and the trials")
    g.add_argument("--cache-dir", default=None, help="array cache (default: $TUMORSEG_CACHE_DIR or ~/.cache/tumorseg)")
    r = p.add_argument_group("resources")
    r.add_argument("--gpus", type=float, default=0, help="GPUs the search may use in total (logical GPUs where fewer exist)")
    r.add_argument("--gpus-per-trial", type=float, default=None, help="GPUs per trial; 0.5 packs two trials per GPU (default: 1 if --gpus)")
    r.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs per trial, also its torch threads (default: CPUs / slots)")
    r.add_argument("--max-concurrent", type=int, default=0, help="at most this many trials at once (default: as resources allow)")
    r.add_argument("--address", default=None, help="attach to a running Ray cluster (auto | HOST:PORT) instead of starting one")
    r.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True, help="serve the Ray dashboard")
    r.add_argument("--dashboard-host", default="127.0.0.1", help="dashboard bind address (0.0.0.0 exposes it: keep token auth on)")
    r.add_argument("--dashboard-port", type=int, default=8265)
    r.add_argument("--ray-temp-dir", default=None, help="Ray's session/log folder (default: Ray's /tmp/ray)")
    r.add_argument("--reuse-actors", action=argparse.BooleanOptionalAction, default=True,
                   help="start the next trial in a finished trial's process (saves Python and torch start-up)")
    t = p.add_argument_group("search and scheduling")
    t.add_argument("--num-samples", type=int, default=16, help="trials to run (the seed recipe is the first)")
    t.add_argument("--epochs", type=int, default=d.epochs, help="epoch budget of a trial (ASHA max_t) and of the retrain")
    t.add_argument("--grace-period", type=int, default=2, help="ASHA: epochs before a trial may be stopped")
    t.add_argument("--reduction-factor", type=float, default=3, help="ASHA: keep 1/this of trials at each rung")
    t.add_argument("--max-failures", type=int, default=2, help="retries of a crashing trial (from its checkpoint)")
    t.add_argument("--retrain-seeds", type=int, default=1, help="seeds for retraining the best config and the seed recipe")
    t.add_argument("--no-retrain", action="store_true", help="stop after the sweep (run search.retrain later)")
    sp = p.add_argument_group("search space (names: see search/space.py)")
    sp.add_argument("--space", type=Path, default=None, help="JSON/YAML file of search-space overrides")
    sp.add_argument("--points", type=Path, default=None, help="JSON list of configurations to evaluate first, instead of the seed recipe")
    sp.add_argument("--resize-choices", type=parse_int_list, default=None, help=f"e.g. 96,128 (default {','.join(map(str, s.resize_choices))})")
    sp.add_argument("--loss-types", type=lambda v: [x for x in v.split(",") if x], default=None, help="subset of dice,dice_bce,dice_focal")
    sp.add_argument("--lr-range", type=parse_range, default=None, help=f"LOW,HIGH (default {s.lr_range[0]:g},{s.lr_range[1]:g})")
    sp.add_argument("--weight-range", type=parse_range, default=None, help="loss weights LOW,HIGH (default 0.25,2)")
    sp.add_argument("--focal-gamma-range", type=parse_range, default=None, help="LOW,HIGH (default 1,3)")
    sp.add_argument("--warmup-epochs-range", type=parse_range, default=None, help="LOW,HIGH (default 0,5)")
    sp.add_argument("--weight-decay-range", type=parse_range, default=None, help="LOW,HIGH (default 1e-5,0.1)")
    f = p.add_argument_group("fixed training settings (all trials)")
    f.add_argument("--encoder-weights", default=d.encoder_weights, help="imagenet | none | path to a weights file")
    f.add_argument("--batch-size", type=int, default=d.batch_size)
    f.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision)
    f.add_argument("--compile", action="store_true", help="torch.compile each trial's model")
    f.add_argument("--num-workers", type=int, default=None, help="DataLoader workers per trial (default: trial CPUs - 1)")
    f.add_argument("--fixed", action="append", default=[], metavar="NAME=VALUE", help="set any TrainConfig field for all trials")
    return p


# ----------------------------------------------------------------------------- validation


def space_from_args(args) -> SearchSpace:
    space = SearchSpace.from_file(args.space) if args.space else SearchSpace()
    flags = {
        "resize_choices": args.resize_choices,
        "loss_types": args.loss_types,
        "lr_range": args.lr_range,
        "weight_range": args.weight_range,
        "focal_gamma_range": args.focal_gamma_range,
        "warmup_epochs_range": args.warmup_epochs_range,
        "weight_decay_range": args.weight_decay_range,
    }
    changes = {k: v for k, v in flags.items() if v is not None}
    if "warmup_epochs_range" in changes:
        low, high = changes["warmup_epochs_range"]
        changes["warmup_epochs_range"] = (int(low), int(high))
    try:
        return space.replace(**changes)
    except ConfigError as err:
        raise ConfigError(f"--{str(err).split(':')[0].replace('_', '-')}:{str(err).split(':', 1)[1]}") from None


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


def settings_from_args(args) -> tuple[SweepSettings, SearchSpace, dict]:
    """Validate every flag; raise ``ConfigError`` naming the first bad one."""
    def positive(flag: str, value, allow_zero=False):
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value:g}")

    positive("--gpus", args.gpus, allow_zero=True)
    positive("--num-samples", args.num_samples)
    positive("--epochs", args.epochs)
    positive("--grace-period", args.grace_period)
    positive("--max-failures", args.max_failures, allow_zero=True)
    positive("--max-concurrent", args.max_concurrent, allow_zero=True)
    positive("--retrain-seeds", args.retrain_seeds)
    positive("--batch-size", args.batch_size)
    if args.reduction_factor <= 1:
        raise ConfigError(f"--reduction-factor must be > 1, got {args.reduction_factor:g}")
    gpus_per_trial = args.gpus_per_trial if args.gpus_per_trial is not None else (1.0 if args.gpus > 0 else 0.0)
    positive("--gpus-per-trial", gpus_per_trial, allow_zero=True)
    if gpus_per_trial > args.gpus:
        raise ConfigError(f"--gpus-per-trial {gpus_per_trial:g} is more than --gpus {args.gpus:g}")
    if gpus_per_trial > 1 and gpus_per_trial != int(gpus_per_trial):
        raise ConfigError(f"--gpus-per-trial above 1 must be a whole number, got {gpus_per_trial:g}")
    if args.gpus > 0 and gpus_per_trial == 0:
        raise ConfigError("--gpus-per-trial 0 with --gpus > 0 would leave the GPUs idle")
    if args.grace_period > args.epochs and not args.debug:  # no ASHA in debug mode
        raise ConfigError(f"--epochs {args.epochs} is smaller than the ASHA --grace-period {args.grace_period}")
    if args.cpus_per_trial is not None:
        positive("--cpus-per-trial", args.cpus_per_trial)
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        raise ConfigError(f"--name {args.name!r}: use a plain folder name")
    if args.data is not None and not Path(args.data).is_dir():
        raise ConfigError(f"--data: folder not found: {args.data}")
    space = space_from_args(args)
    points = read_points(args.points, space) if args.points else None
    fixed = parse_fixed(args.fixed)
    settings = SweepSettings(
        name=args.name or time.strftime("sweep-%Y%m%d-%H%M%S"),
        storage=args.storage,
        data=str(Path(args.data).resolve()) if args.data else None,
        gpus=args.gpus,
        gpus_per_trial=gpus_per_trial,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        epochs=args.epochs,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        max_failures=args.max_failures,
        seed=args.seed,
        retrain_seeds=args.retrain_seeds,
        address=args.address or os.environ.get("RAY_ADDRESS") or None,
        dashboard=args.dashboard,
        dashboard_host=args.dashboard_host,
        dashboard_port=args.dashboard_port,
        ray_temp_dir=args.ray_temp_dir,
        cache_dir=args.cache_dir,
        points=points,
        reuse_actors=args.reuse_actors,
    )
    if args.cpus_per_trial is not None:
        settings.cpus_per_trial = args.cpus_per_trial
    elif gpus_per_trial > 0:
        settings.cpus_per_trial = max(1, (os.cpu_count() or 1) // settings.slots())
    base = {
        "epochs": args.epochs,
        "encoder_weights": args.encoder_weights,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "compile": args.compile,
        "seed": args.seed,
        "num_workers": args.num_workers if args.num_workers is not None else max(0, int(settings.cpus_per_trial) - 1),
        **fixed,
    }
    searched = set(PARAM_NAMES) & set(fixed)
    if searched:
        raise ConfigError(f"--fixed {', '.join(sorted(searched))}: searched parameter(s); narrow the space instead (e.g. --lr-range)")
    TrainConfig.from_dict(base)  # validates the fixed part now, not in every trial
    if args.num_workers is not None:
        positive("--num-workers", args.num_workers, allow_zero=True)
    return settings, space, base


# ----------------------------------------------------------------------------- run folder


def write_sweep_json(run_dir: Path, settings: SweepSettings, space: SearchSpace, base: dict, notes: list[str], argv: list[str]) -> None:
    payload = {
        "settings": dataclasses.asdict(settings),
        "space": space.to_dict(),
        "base_config": base,
        "seed_point_notes": notes,
        "command": "python -m search.run " + " ".join(shlex.quote(a) for a in argv),
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (run_dir / SWEEP_JSON).write_text(json.dumps(payload, indent=2))


def read_sweep_json(run_dir: Path) -> dict:
    path = Path(run_dir) / SWEEP_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: is {run_dir} a search.run output folder?") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def load_sweep(run_dir: Path) -> tuple[SweepSettings, SearchSpace, dict, dict]:
    payload = read_sweep_json(run_dir)
    settings = SweepSettings(**payload["settings"])
    if not is_uri(settings.storage):
        settings.storage = str(Path(run_dir).resolve().parent)  # the folder may have moved
    settings.name = Path(run_dir).resolve().name
    return settings, SearchSpace.from_dict(payload["space"]), payload["base_config"], payload


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["tumorseg", "torch", "torchvision", "segmentation-models-pytorch", "albumentations", "ray", "optuna", "accelerate", "pandas", "plotly", "numpy"]
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def resolve_data(settings: SweepSettings) -> Path:
    from tumorseg.train import resolve_data_dir

    synthetic_root = Path(settings.cache_dir) if settings.cache_dir else None
    return resolve_data_dir(Path(settings.data) if settings.data else None, synthetic_root)


# ----------------------------------------------------------------------------- debug mode


def run_debug(settings: SweepSettings, space: SearchSpace, base: dict, explicit_epochs: bool) -> None:
    """One trial, in this process, through ``run_trial``, with no Ray import at all."""
    from search.trainable import load_search_data, run_trial
    from tumorseg.model import load_encoder_state

    params, notes = seed_point(space)
    for note in notes:
        print(f"note: {note}")
    base = {**base, "epochs": base["epochs"] if explicit_epochs else 2, "num_workers": 0}
    print(f"debug: one trial in-process, no Ray: {params} for {base['epochs']} epoch(s)")
    data_dir = resolve_data(settings)
    encoder_state = load_encoder_state(base["encoder_weights"])
    data = load_search_data(data_dir, [params["resize_px"]], settings.cache_dir)

    def report(metrics: dict, checkpoint_fn) -> None:
        keys = ("epoch", "val_dice", "val_loss", "best_val_dice", "failure_reason")
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k in keys}
        print("report:", shown, "(new best: Tune would checkpoint here)" if checkpoint_fn else "")

    run_trial(params, base=base, data=data, report=report, encoder_state=encoder_state, extra={"trial_index": 0}, log=print, progress=True)


# ----------------------------------------------------------------------------- the sweep


def ray_token_file() -> Path:
    """Where Ray keeps the dashboard/cluster auth token (``RAY_AUTH_TOKEN_PATH`` overrides)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))


def use_auth_token(settings: SweepSettings) -> None:
    """Attaching to a cluster: send Ray's auth token whenever one is at hand.

    A driver only sends it with RAY_AUTH_MODE=token, which Ray reads when it is imported, so this
    runs before anything imports Ray; clusters started with `ray start` require it.
    """
    if settings.address and (os.environ.get("RAY_AUTH_TOKEN") or ray_token_file().is_file()):
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def start_ray(settings: SweepSettings) -> None:
    import ray

    if ray.is_initialized():
        return
    if settings.address:
        ray.init(address=settings.address, log_to_driver=True)
        print(f"attached to the Ray cluster at {settings.address}: {ray.cluster_resources()}")
        return
    visible = _cuda_device_count()
    if settings.gpus > visible:
        print(
            f"warning: --gpus {settings.gpus:g} but this machine sees {visible} CUDA device(s): the local Ray cluster "
            f"gets {settings.gpus:g} logical GPU(s) so scheduling works as on a GPU box, and trials "
            f"{'without a real device ' if visible else ''}train on the CPU",
            file=sys.stderr,
        )
    context = ray.init(
        address="local",  # always a new local cluster, never one a `ray start` left running
        num_cpus=os.cpu_count(),
        num_gpus=settings.gpus,
        include_dashboard=settings.dashboard,
        dashboard_host=settings.dashboard_host,
        dashboard_port=settings.dashboard_port,
        _temp_dir=str(Path(settings.ray_temp_dir).resolve()) if settings.ray_temp_dir else None,
        configure_logging=True,
        logging_level="WARNING",
    )
    if settings.dashboard and context.dashboard_url:
        print_dashboard_help(context.dashboard_url, settings.dashboard_host)


def print_dashboard_help(url: str, host: str) -> None:
    port = url.rsplit(":", 1)[-1]
    print(f"Ray dashboard: http://{url}  (bound to {host})")
    if os.environ.get("RAY_AUTH_MODE", "token") != "disabled":
        print(f"  sign in with Ray's token: `ray get-auth-token` (stored in {ray_token_file()})")
    print(f"  from another machine: ssh -N -L {port}:127.0.0.1:{port} {os.environ.get('USER', 'user')}@<this host>, then open http://localhost:{port}")


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def check_resources(settings: SweepSettings) -> None:
    """Refuse a trial shape the cluster can never run (Ray would wait for it forever)."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0), total.get("GPU", 0)
    if settings.cpus_per_trial > cpus:
        raise ConfigError(f"--cpus-per-trial {settings.cpus_per_trial:g}: the Ray cluster has only {cpus:g} CPUs")
    if settings.gpus_per_trial > gpus:
        raise ConfigError(f"--gpus-per-trial {settings.gpus_per_trial:g}: the Ray cluster has only {gpus:g} GPUs")
    if settings.gpus_per_trial > 1 and settings.cpus_per_trial < settings.gpus_per_trial:
        raise ConfigError(f"--cpus-per-trial {settings.cpus_per_trial:g}: a trial of {settings.gpus_per_trial:g} "
                          f"workers needs at least one CPU per worker")


def trial_name(trial) -> str:
    """``trial_000`` for the first trial (the seed recipe): Tune's experiment tag starts with 1-based order."""
    return f"trial_{int(trial.experiment_tag.split('_', 1)[0]) - 1:03d}"


def trial_dirname(trial) -> str:
    return f"{trial_name(trial)}_{trial.trial_id}"


def make_tuner(settings: SweepSettings, space: SearchSpace, base: dict, data, encoder_state, restore: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from search.trainable import COORDINATOR_CPUS, tune_trainable
    from search.trials import TrialsTableCallback

    import ray

    workers = int(settings.gpus_per_trial) if settings.gpus_per_trial > 1 else 1
    # data-parallel trials: the Tune trial only waits on its TorchTrainer, whose workers hold the
    # GPUs and CPUs; Ray needs a non-empty request, so the coordinator takes a token share of CPU
    resources = {"cpu": COORDINATOR_CPUS} if workers > 1 else {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    trainable = tune.with_resources(
        tune.with_parameters(
            tune_trainable, base=base, data_ref={"ref": ray.put(data)}, encoder_state=encoder_state,
            threads=settings.cpus_per_trial, workers=workers, backend="gloo" if _cuda_device_count() == 0 else None,
            storage=f"{settings.ray_root}/{TUNE_DIR}",
        ),
        resources,
    )
    if restore:
        return tune.Tuner.restore(f"{settings.ray_root}/{TUNE_DIR}", trainable=trainable, resume_unfinished=True, resume_errored=False)

    points = settings.points or [seed_point(space)[0]]
    searcher = OptunaSearch(
        space=define_by_run(space), metric=METRIC, mode="max", points_to_evaluate=points, seed=settings.seed
    )
    # the cap: --max-concurrent, else what --gpus allows, else the (attached) cluster's CPUs
    slots = settings.slots(cpus=ray.cluster_resources().get("CPU"))
    searcher = ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent or slots)
    scheduler = ASHAScheduler(
        time_attr="epoch",
        metric=METRIC,
        mode="max",
        max_t=settings.epochs,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=settings.num_samples,
            reuse_actors=settings.reuse_actors,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=settings.ray_root,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[TrialsTableCallback(settings.run_dir, settings.epochs)],
            verbose=1,
        ),
    )


def run_sweep(settings: SweepSettings, space: SearchSpace, base: dict, restore: bool) -> bool:
    """Run (or continue) the Tune experiment; True when every trial finished."""
    use_auth_token(settings)
    from search.trainable import load_search_data
    from search.trials import FINISHED, read_table
    from tumorseg.model import load_encoder_state

    data_dir = resolve_data(settings)
    encoder_state = load_encoder_state(base["encoder_weights"])  # once, shipped to every trial
    t0 = time.perf_counter()
    data = load_search_data(data_dir, space.resize_choices, settings.cache_dir)
    print(f"data for sizes {sorted(data)} ready in {time.perf_counter() - t0:.1f}s")
    start_ray(settings)
    check_resources(settings)
    if not is_uri(settings.storage):
        check_visible_from_all_nodes(settings.run_dir)
    tuner = make_tuner(settings, space, base, data, encoder_state, restore)
    interrupted = False
    try:
        tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # Tune installs its own SIGINT handler for a graceful stop and leaves it in place; give
        # Ctrl-C back to Python so the retrain stage can be interrupted (and resumed) too
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # The retrain runs in this process: free the idle trial processes (reused actors) and their
        # memory now, so they neither compete with it nor log their shutdown into its output.
        # On an attached cluster this only disconnects the driver.
        import ray

        ray.shutdown()
    if is_uri(settings.storage):  # learning curves for the report
        from search.storage import download_trial_results

        download_trial_results(f"{settings.ray_root}/{TUNE_DIR}", settings.run_dir / TUNE_DIR)
    table = read_table(settings.run_dir)
    done = table is not None and len(table) >= settings.num_samples and table["status"].isin(FINISHED).all()
    return done and not interrupted


def write_best_config(run_dir: Path, base: dict) -> dict | None:
    from search.trials import applicable_params, best_trial, read_table

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
    (run_dir / "best_config.json").write_text(json.dumps(best, indent=2))
    return best


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        _main(args, argv)
    except KeyboardInterrupt:
        name = f" --name {args.name}" if args.name else ""
        print(f"\ninterrupted: finished work is on disk; continue with python -m search.run{name} --storage {args.storage} --resume",
              file=sys.stderr)
        raise SystemExit(130) from None


def _main(args, argv: list[str]) -> None:
    with exit_on_user_error("search.run"):
        settings, space, base = settings_from_args(args)
        if args.debug:
            run_debug(settings, space, base, explicit_epochs="--epochs" in argv)
            return
        run_dir = settings.run_dir
        if args.resume and is_uri(settings.storage) and not (run_dir / SWEEP_JSON).is_file():
            from search.storage import download

            download(settings.ray_root, run_dir, only=(SWEEP_JSON, "trials.csv", "best_config.json", "final"))
        if args.resume:
            if not (run_dir / SWEEP_JSON).is_file():
                raise ConfigError(f"--resume: no sweep named {settings.name!r} under {settings.storage} (nothing to resume)")
            storage = settings.storage
            settings, space, base, _ = load_sweep(run_dir)
            settings.storage = storage if is_uri(storage) else settings.storage
            print(f"resuming {run_dir}")
        elif (run_dir / SWEEP_JSON).exists() or (run_dir / TUNE_DIR).exists():
            raise ConfigError(
                f"--name {settings.name!r}: {run_dir} already holds a sweep; continue it with "
                f"--name {settings.name} --resume, or choose another --name"
            )
        check_writable(settings.storage, run_dir)
        _, notes = seed_point(space)
        if not args.resume:
            write_sweep_json(run_dir, settings, space, base, notes, argv)
        for note in notes:
            print(f"note: {note}")
        print(f"sweep {settings.name}: {settings.num_samples} trials x <= {settings.epochs} epochs, "
              f"{settings.slots()} at a time, outputs in {run_dir}")
        finished = run_sweep(settings, space, base, restore=args.resume)
        best = write_best_config(run_dir, base)
        if not finished:
            print(f"sweep interrupted: what finished is in {run_dir}/trials.csv; continue with "
                  f"python -m search.run --name {settings.name} --storage {settings.storage} --resume", file=sys.stderr)
            _report(run_dir)
            _upload(settings)
            raise SystemExit(130)
        if best is None:
            print("every trial failed: no best configuration (see trials.csv for the reasons)", file=sys.stderr)
        else:
            print(f"best trial {best['trial_index']} ({best['trial_id']}): val dice {best['best_val_dice']:.4f} {best['params']}")
        if not args.no_retrain:
            from search.retrain import retrain

            retrain(run_dir)
        _report(run_dir)
        _upload(settings)


def _upload(settings: SweepSettings) -> None:
    if is_uri(settings.storage):
        from search.storage import upload

        upload(settings.run_dir, settings.ray_root)
        print(f"uploaded {settings.run_dir} to {settings.ray_root}")


def _report(run_dir: Path) -> None:
    """Write the report; a failure here must not hide a finished sweep, so it is one warning line."""
    from search.report import build_report

    try:
        print(f"report: {build_report(run_dir)}")
    except Exception as err:  # noqa: BLE001 - the results are on disk; the report can be rebuilt
        print(f"warning: the report failed ({type(err).__name__}: {err}); rebuild it with "
              f"python -m search.report {run_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
