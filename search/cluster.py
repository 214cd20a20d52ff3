"""The Ray cluster a sweep runs on: start a local one or attach, token auth, resources.

Everything here runs on the driver. What depends on the machines that run trials (how many CPUs
a trial gets, how many trials fit at once) is derived from the cluster's nodes, never from the
driver's own hardware: a KubeRay head or a SLURM login node may have no GPU at all.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tumorseg.errors import ConfigError

from search.rundir import SweepSettings


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


def start_ray(settings: SweepSettings, log=print) -> None:
    """Attach to ``settings.address`` or start a fresh local cluster with ``settings.gpus`` GPUs."""
    import ray

    if ray.is_initialized():
        return
    if settings.address:
        ray.init(address=settings.address, log_to_driver=settings.verbose)
        route_ray_logs(None, settings.verbose)
        log(f"attached to the Ray cluster at {settings.address}: {ray.cluster_resources()}")
        return
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and settings.gpus > len([d for d in listed.split(",") if d.strip()]):
        raise ConfigError(f"--gpus {settings.gpus:g}: CUDA_VISIBLE_DEVICES={listed!r} lists fewer devices, and Ray gives a "
                          "machine no more GPUs than it lists; lower --gpus or unset CUDA_VISIBLE_DEVICES")
    visible = cuda_device_count()
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
        log_to_driver=settings.verbose,  # trial output: tune/<trial>/stdout|stderr (RunConfig(log_to_file=True))
    )
    route_ray_logs(None, settings.verbose)  # ray.init may have reset its handlers
    if settings.dashboard and context.dashboard_url:
        print_dashboard_help(context.dashboard_url, settings.dashboard_host, log)


# Driver-side loggers whose records are Tune's progress talk, not problems of the cluster
TUNE_LOGGERS = ("ray.tune", "ray.train", "ray.air")
_LOG_FILE_HANDLER = "tumorseg_ray_log"


def _terminal_worthy(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR and not record.name.startswith(TUNE_LOGGERS)


def route_ray_logs(log_path: Path | None, verbose: bool) -> None:
    """Ray's and Optuna's log records go to ``log_path`` (``rundir.RAY_LOG``); the terminal keeps
    only errors of Ray itself, unless ``verbose``. Safe to call again (``log_path`` None: keep the file).

    What this quiets: Tune's "Experiment state snapshotting" warnings, trial start/finish talk,
    the token-auth notice, Optuna's "A new study created". Trials' own output (checkpoint lines,
    tracebacks) is in each trial's folder, ``tune/<trial>/stdout`` and ``stderr``.
    """
    import optuna
    import ray  # noqa: F401 - installs Ray's terminal handler, which the filter below needs to see

    loggers = [logging.getLogger("ray"), logging.getLogger("optuna")]
    if log_path is not None:
        handler = logging.FileHandler(log_path)
        handler.set_name(_LOG_FILE_HANDLER)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for logger in loggers:
            for old in [h for h in logger.handlers if h.get_name() == _LOG_FILE_HANDLER]:
                logger.removeHandler(old)
                old.close()
            logger.addHandler(handler)
    if verbose:
        return
    # Tune's new-style output prints its "Configuration for experiment" box even at verbose=0;
    # the legacy reporter prints nothing at verbose=0 (read when the Tuner runs, on the driver)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    optuna.logging.disable_default_handler()
    for logger in loggers:
        for handler in logger.handlers:
            if handler.get_name() != _LOG_FILE_HANDLER and _terminal_worthy not in handler.filters:
                handler.addFilter(_terminal_worthy)


def print_dashboard_help(url: str, host: str, log=print) -> None:
    port = url.rsplit(":", 1)[-1]
    log(f"Ray dashboard: http://{url}  (bound to {host})")
    if os.environ.get("RAY_AUTH_MODE", "token") != "disabled":
        log(f"  sign in with Ray's token: `ray get-auth-token` (stored in {ray_token_file()})")
    log(f"  from another machine: ssh -N -L {port}:127.0.0.1:{port} {os.environ.get('USER', 'user')}@<this host>, "
        f"then open http://localhost:{port}")


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def alive_nodes() -> list[dict]:
    """``[{"CPU": n, "GPU": n, ...}, ...]``: the resources of each live node of the attached cluster."""
    import ray

    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def default_cpus_per_trial(nodes: list[dict], gpus_per_trial: float) -> float:
    """CPUs a trial gets when ``--cpus-per-trial`` is not given, from the cluster's nodes.

    CPU-only trials take 1 CPU. GPU trials take their share of a GPU node's CPUs: the smallest
    CPUs-per-GPU ratio over the nodes that have GPUs, times the trial's GPUs (at least 1), so a
    trial fits on every GPU node and the GPUs, not the CPUs, bound how many run at once.
    """
    if gpus_per_trial <= 0:
        return 1
    ratios = [node.get("CPU", 0) / node["GPU"] for node in nodes if node.get("GPU", 0) > 0]
    if not ratios:
        return 1
    return float(max(1, int(min(ratios) * gpus_per_trial + 1e-9)))


def concurrent_trials(settings: SweepSettings, total_cpus: float, total_gpus: float) -> tuple[int, str]:
    """How many trials can run at once, and the binding limit in words."""
    limits = {"CPUs": int(total_cpus // max(settings.cpus_per_trial or 1, 1e-9) + 1e-9)}
    if settings.gpus_per_trial > 0:
        gpus = min(settings.gpus, total_gpus) if settings.gpus else total_gpus
        limits["GPUs"] = int(gpus // settings.gpus_per_trial + 1e-9)
    if settings.max_concurrent:
        limits["--max-concurrent"] = settings.max_concurrent
    binding = min(limits, key=limits.get)
    return max(1, limits[binding]), binding


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
