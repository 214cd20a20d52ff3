"""The trainable: a thin adapter from one sampled point to ``tumorseg.engine.train``.

``run_trial`` is the code path of every trial. It knows nothing of Ray: it gets a ``report``
function. ``tune_trainable`` is the Ray adapter (imports Ray lazily); ``--debug`` mode calls
``run_trial`` directly with a printing ``report``, so a breakpoint in ``tumorseg/engine.py`` works.

Per epoch the trial reports native-resolution validation metrics and hands over a checkpoint of
that epoch's resumable state, which holds both the latest weights (to resume from) and the best
ones (what the trial is selected by), so a retried trial continues where it crashed.

With more than one GPU per trial, ``tune_trainable`` launches a Ray Train ``TorchTrainer`` whose
workers each run the same ``run_trial`` (Accelerate picks up the process group Ray sets up) and
relays their reports to Tune with ``TuneReportCallback``; only rank 0 writes checkpoints. A NaN/inf loss
or an out-of-memory error ends the trial at once with ``val_dice = 0`` and a ``failure_reason``:
retrying the same configuration would fail the same way, so it is recorded, not retried.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from tumorseg.config import TrainConfig
from tumorseg.data import Split, load_split

from search.datapath import trial_data
from search.rundir import dir_for, read_trial_end, trial_index

STATE_FILE = "state.pt"
CHECKPOINT_COST_SHARE = 0.05  # checkpoints take at most ~5 % of a trial's time (checkpointing_report)
TRAIN_DIR = "train"  # a data-parallel trial's Ray Train run (its checkpoints) inside the trial's folder
COORDINATOR_CPUS = 0.01  # what a data-parallel trial's own function holds: it only waits on its trainer

# report(metrics, checkpoint): ``checkpoint`` is a function returning the resumable state (or
# None), so a reporter that does not save (a non-zero rank, the debug printer) never builds it.
Report = Callable[[dict, "Callable[[], dict] | None"], None]


def load_search_data(data_dir, resizes: list[int], cache_dir: Path | None = None) -> dict[int, dict[str, Split]]:
    """``{resize: {"train": Split, "valid": Split}}`` for every size the space may sample.

    The validation split's native masks are the same object at every size, so the object store
    (which pickles the whole dict once) holds them once.
    """
    data: dict[int, dict[str, Split]] = {}
    native = None
    for size in sorted(set(resizes)):
        valid = load_split(data_dir, "valid", size, native=native is None, cache_dir=cache_dir)
        if native is None:
            native = valid.native_masks
        data[size] = {
            "train": load_split(data_dir, "train", size, cache_dir=cache_dir),
            "valid": dataclasses.replace(valid, native_masks=native),
        }
    return data


def run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    data: dict[int, dict[str, Split]],
    report: Report,
    restore_state: dict | None = None,
    encoder_states: dict[str, dict] | None = None,
    extra: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    threads: float | None = None,
) -> None:
    """Train ``base`` + ``params`` and report each epoch; ``extra`` is added to every report.

    ``encoder_states``: ``{encoder: tensors}`` the driver resolved for every encoder of the space
    (``tumorseg.model.load_encoder_states``); the trial takes its encoder's. Every report carries
    the model's cost (``params_m``, ``gflops`` per image at the trial's resize). ``threads``:
    torch's intra-op threads in this process (None: leave them as they are).
    """
    from tumorseg.engine import NonFiniteLossError, TrainingOOMError, train
    from tumorseg.model import cost, create_model

    if threads is not None:
        _set_threads(threads)
    cfg = TrainConfig.from_dict({**base, **params})
    split = data[cfg.resize_px]["train"]
    extra = {**cost(create_model(None, split.channels, cfg.arch, cfg.encoder), cfg.resize_px), **(extra or {})}
    encoder_state = (encoder_states or {}).get(cfg.encoder)
    last_epoch = restore_state["epoch"] if restore_state else 0
    if restore_state:
        extra["resumed_from_epoch"] = last_epoch

    def on_epoch(metrics: dict, state_fn) -> None:
        nonlocal last_epoch
        last_epoch = metrics["epoch"]
        report({**metrics, **extra}, state_fn)

    try:
        train(cfg, data[cfg.resize_px], on_epoch, resume_state=restore_state, encoder_state=encoder_state, log=log, progress=progress)
    except (NonFiniteLossError, TrainingOOMError) as err:
        # the worst score (for ASHA and TPE too), so it never becomes "best", and the reason;
        # "epoch" = epochs completed
        report({"epoch": last_epoch, "val_dice": 0.0, "best_val_dice": 0.0, "failure_reason": str(err), **extra}, None)


# ----------------------------------------------------------------------------- Ray adapter


def save_state(state: dict, directory: Path) -> None:
    import torch

    torch.save(state, Path(directory) / STATE_FILE)


def load_state(directory: Path) -> dict:
    import torch

    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def restored_state(checkpoint, load=load_state) -> dict | None:
    """The resumable state in a Tune/Train checkpoint (None: a fresh start)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load(directory)


def checkpointing_report(report_fn, checkpoint_cls, may_checkpoint: bool = True, save=save_state,
                         cost_share: float = CHECKPOINT_COST_SHARE, clock=time.perf_counter) -> Report:
    """A ``Report`` over Ray's ``report_fn`` that saves the state (``save(state, directory)``) as a
    ``checkpoint_cls`` when asked and when it is due.

    Due: the first time, then once the time since the last checkpoint is at least its cost (save,
    plus Tune copying it into the storage) / ``cost_share``, so checkpoints take at most about that
    share of a trial's time. With minutes-long epochs that is every epoch; with epochs of a few
    seconds and a 165 MB state, every few epochs (a crash then repeats those few). A finished trial
    needs none: its end is recorded apart (``search.checkpoints.RecordTrialEnds``). A checkpointed
    report carries ``checkpoint_s``. ``may_checkpoint=False`` (a non-zero rank) only reports,
    never building the state.
    """
    last = {"end": None, "cost_s": 0.0}

    def report(metrics: dict, checkpoint_fn) -> None:
        started = clock()
        due = last["end"] is None or started - last["end"] >= last["cost_s"] / cost_share
        if checkpoint_fn is None or not may_checkpoint or not due:
            report_fn(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            save(checkpoint_fn(), directory)
            metrics = {**metrics, "checkpoint_s": clock() - started}  # building and writing the state
            report_fn(metrics, checkpoint=checkpoint_cls.from_directory(directory))  # Tune copies it into the storage
        last["end"] = clock()
        last["cost_s"] = last["end"] - started

    return report


def tune_trainable(params: dict, *, base: dict, data_ref, encoder_states=None, threads: float = 1,
                   workers: int = 1, storage: str | None = None, run=None, save=None, load=None) -> None:
    """The function Ray Tune runs per trial (bound with ``tune.with_parameters``).

    ``data_ref`` is the handle of the ``load_search_data`` dict (``search.datapath``): an object in
    Ray's object store (zero-copy views) or the files of the node-local memory-mapped cache.
    ``run`` trains (default ``run_trial``, looked up when the trial starts) and ``save``/``load``
    write and read its resumable state in a checkpoint folder (default ``save_state``/``load_state``:
    torch files); ``search.bench_scale`` passes a calibrated sleep and JSON state instead, to measure
    the orchestration of thousands of trials without training.
    """
    from ray import tune

    context = tune.get_context()
    storage_context = context.get_storage()
    if read_trial_end(storage_context.storage_filesystem, storage_context.trial_fs_path) is not None:
        return  # it had finished after a stopped driver's last snapshot (search.checkpoints.RecordTrialEnds)
    extra = {
        "trial_start_ts": time.time(),  # this attempt's start, for the report's timeline
        "trial_index": trial_index(context.get_trial_name()),
    }
    if workers > 1:
        trial_dir = dir_for(context.get_trial_name(), context.get_trial_id())
        train_storage = os.path.join(storage, trial_dir) if storage else context.get_trial_dir()
        _run_train_workers(params, base, data_ref, encoder_states, threads, workers, extra, train_storage)
        return
    extra.update(_placement())
    report = checkpointing_report(tune.report, tune.Checkpoint, save=save or save_state)
    (run or run_trial)(params, base=base, data=trial_data(data_ref, params.get("resize_px")), report=report, threads=threads,
                       restore_state=restored_state(tune.get_checkpoint(), load or load_state), encoder_states=encoder_states,
                       extra=extra)


def _set_threads(threads: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))  # Ray gives a trial 1 thread unless told otherwise


def _placement() -> dict:
    import ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
        "pid": os.getpid(),
    }


def _run_train_workers(params, base, data_ref, encoder_states, threads, workers, extra, storage) -> None:
    """Data-parallel trial: a ``TorchTrainer`` over ``workers`` GPU workers, reports relayed to Tune.

    Its checkpoints go to ``<trial folder in the sweep's storage>/train/`` (shared storage, not the
    node's staging folder); when Tune retries the trial, the trainer finds them there and the
    workers resume from the latest one.
    """
    from ray import train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    # --cpus-per-trial is the trial's total: COORDINATOR_CPUS for this function, the rest split over workers
    worker_cpus = (threads - COORDINATOR_CPUS) / workers
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"params": params, "base": base, "data_ref": data_ref, "encoder_states": encoder_states,
                           "threads": worker_cpus, "extra": extra},
        # one GPU per worker; the process group's backend is chosen on the workers, from their device
        torch_config=device_torch_config(),
        scaling_config=train.ScalingConfig(num_workers=workers, use_gpu=True, resources_per_worker={"CPU": worker_cpus, "GPU": 1}),
        run_config=train.RunConfig(
            name=TRAIN_DIR,
            storage_path=storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=train.CheckpointConfig(num_to_keep=1),
            # a worker group that cannot start (no resources) fails the trial instead of retrying forever;
            # crashes are retried by Tune's FailureConfig, which restarts this trainer from its checkpoint
            failure_config=train.FailureConfig(max_failures=0, controller_failure_limit=2),
        ),
    )
    trainer.fit()


def train_worker(config: dict) -> None:
    """One Ray Train worker of a data-parallel trial: ``run_trial`` on this rank."""
    from ray import train

    import torch

    if not torch.cuda.is_available():
        # Ray Train tells Accelerate to use cuda:<local rank> (ACCELERATE_TORCH_DEVICE) even for
        # logical GPUs; on a worker without CUDA the device is the CPU (gloo process group)
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    context = train.get_context()
    extra = {**config["extra"], **_placement(), "world_size": context.get_world_size()}
    # every rank reports (a collective); rank 0 alone builds and hands over the checkpoint
    report = checkpointing_report(train.report, train.Checkpoint, may_checkpoint=context.get_world_rank() == 0)
    run_trial(config["params"], base=config["base"], data=trial_data(config["data_ref"], config["params"].get("resize_px")), report=report,
              restore_state=restored_state(train.get_checkpoint()), encoder_states=config["encoder_states"], extra=extra,
              threads=round(config["threads"]))


# ----------------------------------------------------------------------------- process-group backend


def backend_for(workers_have_cuda: list[bool]) -> str:
    """NCCL when every worker of the group has a CUDA device, else gloo (logical GPUs on CPU machines)."""
    return "nccl" if workers_have_cuda and all(workers_have_cuda) else "gloo"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device_torch_config():
    """A ``TorchConfig`` whose backend is chosen when the worker group starts, by asking the workers.

    Ray Train's default decides from the *requested* resources (a GPU request means NCCL), and the
    driver's own devices say nothing about the workers': a KubeRay head or a SLURM login node has no
    GPU while the workers do, and logical GPUs on a CPU machine have no CUDA for NCCL.
    """
    import dataclasses

    from ray.train.torch.config import TorchConfig, _TorchBackend

    class _DeviceBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            backend = backend_for(worker_group.execute(_has_cuda))
            super().on_start(worker_group, dataclasses.replace(backend_config, backend=backend))

    @dataclasses.dataclass
    class DeviceTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _DeviceBackend

    return DeviceTorchConfig()
