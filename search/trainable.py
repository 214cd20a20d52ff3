"""The trainable: a thin adapter from one sampled point to ``tumorseg.train.train``.

``run_trial`` is the code path of every trial. It knows nothing of Ray: it gets a ``report``
function. ``tune_trainable`` is the Ray adapter (imports Ray lazily); ``--debug`` mode calls
``run_trial`` directly with a printing ``report``, so a breakpoint in ``tumorseg/train.py`` works.

Per epoch the trial reports native-resolution validation metrics; it hands over a checkpoint
only when its best validation Dice improves (the resumable state of that epoch). A NaN/inf loss
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

STATE_FILE = "state.pt"
# Test-only fault injection, comma-separated: "raise@EPOCH:TRIAL" (raise after every epoch >=
# EPOCH of trial TRIAL), "nan:TRIAL" (a learning rate that makes the loss non-finite),
# "oom:TRIAL" (a CUDA out-of-memory error in the first epoch). See tests/test_faults.py.
FAULT_ENV = "TUMORSEG_INJECT_FAULT"

Report = Callable[[dict, "dict | None"], None]


def load_search_data(data_dir: Path, resizes: list[int], cache_dir: Path | None = None) -> dict[int, dict[str, Split]]:
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
    encoder_state: dict | None = None,
    extra: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> None:
    """Train ``base`` + ``params`` and report each epoch; ``extra`` is added to every report."""
    from tumorseg.train import NonFiniteLossError, TrainingOOMError, train

    cfg = TrainConfig.from_dict({**base, **params})
    extra = dict(extra or {})
    best = restore_state["best_val_dice"] if restore_state else float("-inf")
    last_epoch = restore_state["epoch"] if restore_state else 0
    if restore_state:
        extra["resumed_from_epoch"] = last_epoch
    faults = injected_faults(extra.get("trial_index"))
    if "nan" in faults:
        cfg = cfg.replace(lr=1e30)

    def on_epoch(metrics: dict, state_fn) -> None:
        nonlocal best, last_epoch
        if "oom" in faults:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        improved = metrics["val_dice"] > best
        best, last_epoch = max(best, metrics["val_dice"]), metrics["epoch"]
        report({**metrics, **extra}, state_fn() if improved else None)
        if "raise" in faults and metrics["epoch"] >= faults["raise"]:
            raise RuntimeError(f"injected fault after epoch {metrics['epoch']} ({FAULT_ENV})")

    try:
        train(cfg, data[cfg.resize_px], on_epoch, resume_state=restore_state, encoder_state=encoder_state, log=log, progress=progress)
    except (NonFiniteLossError, TrainingOOMError) as err:
        # the worst score, so it never becomes "best", and the reason for the report
        report({"epoch": last_epoch + 1, "val_dice": 0.0, "best_val_dice": max(best, 0.0), "failure_reason": str(err), **extra}, None)


def injected_faults(trial_index) -> dict[str, int]:
    """The faults ``TUMORSEG_INJECT_FAULT`` asks for in this trial: ``{"raise": epoch, "nan": 1, ...}``."""
    faults = {}
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        kind, _, trial = spec.partition(":")
        kind, _, epoch = kind.partition("@")
        if trial_index is not None and int(trial) == trial_index:
            faults[kind] = int(epoch or 1)
    return faults


# ----------------------------------------------------------------------------- Ray adapter


def save_state(state: dict, directory: Path) -> None:
    import torch

    torch.save(state, Path(directory) / STATE_FILE)


def load_state(directory: Path) -> dict:
    import torch

    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def tune_trainable(params: dict, *, base: dict, data, encoder_state=None, threads: int = 1) -> None:
    """The function Ray Tune runs per trial (bound with ``tune.with_parameters``)."""
    import ray
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(threads)))  # Ray gives a trial 1 thread unless told otherwise
    context = tune.get_context()
    restore_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restore_state = load_state(directory)
    extra = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
        "trial_start_ts": time.time(),  # this attempt's start, for the report's timeline
        "trial_index": trial_index(context.get_trial_name()),
        "pid": os.getpid(),
    }

    def report(metrics: dict, state: dict | None) -> None:
        if state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_state(state, directory)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    run_trial(params, base=base, data=data, report=report, restore_state=restore_state, encoder_state=encoder_state, extra=extra)


def trial_index(name: str) -> int | None:
    """The trial's order from its name (``trial_003`` -> 3; see ``search.run.trial_name``)."""
    try:
        return int(str(name).split("_")[1])
    except (IndexError, ValueError):
        return None
