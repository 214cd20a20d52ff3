"""Fault injection for the sweep tests, as a wrapper around ``search.trainable.run_trial``.

``TUMORSEG_INJECT_FAULT`` is a comma-separated list of faults per trial index:

- ``raise@E:T``: trial T raises in every epoch >= E, before reporting it (retries cannot help);
- ``crash@E:T``: trial T raises once, after reporting epoch E, on its first attempt (the retry
  resumes from the checkpoint);
- ``nan:T``: a learning rate that makes the loss non-finite;
- ``oom:T``: CUDA out of memory in the first epoch;
- ``hold@E:node_N``: a trial's first attempt on the Ray node with resource ``node_N`` (worker N of
  launch/local-cluster.sh), after reporting epoch E (with its checkpoint), writes
  ``$TUMORSEG_FAULT_DIR/held-<trial index>`` and waits there, mid-training, until its node is killed.
"""

from __future__ import annotations

import os

FAULT_ENV = "TUMORSEG_INJECT_FAULT"
FAULT_DIR_ENV = "TUMORSEG_FAULT_DIR"
FOLDER = os.path.dirname(os.path.abspath(__file__))


def environment(spec: str) -> dict[str, str]:
    """The environment variables that make a ``search.run`` subprocess inject ``spec``."""
    path = os.pathsep.join(p for p in (FOLDER, os.environ.get("PYTHONPATH", "")) if p)
    return {FAULT_ENV: spec, "PYTHONPATH": path}


def injected_faults(trial_index) -> dict[str, int]:
    """The faults asked for in this trial: ``{"raise": epoch, "nan": 1, ...}``."""
    faults = {}
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        kind, _, trial = spec.partition(":")
        kind, _, epoch = kind.partition("@")
        if trial_index is not None and trial.isdigit() and int(trial) == trial_index:
            faults[kind] = int(epoch or 1)
    return faults


def holds() -> dict[str, int]:
    """The ``hold`` faults asked for: ``{node resource: epoch}``."""
    specs = (spec.partition(":") for spec in os.environ.get(FAULT_ENV, "").split(",") if spec.startswith("hold@"))
    return {node: int(kind.partition("@")[2]) for kind, _, node in specs}


def _hold_here(metrics: dict, trial_index, restore_state) -> None:
    """Block this trial for good (see ``hold`` above) if it is asked for here and now."""
    epochs = holds()
    if restore_state is not None or metrics["epoch"] not in epochs.values():
        return
    import threading

    import ray

    node_id = ray.get_runtime_context().get_node_id()
    resources = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id)
    if any(node in resources and metrics["epoch"] == epoch for node, epoch in epochs.items()):
        marker = os.path.join(os.environ[FAULT_DIR_ENV], f"held-{trial_index}")
        with open(marker + ".tmp", "w") as f:
            f.write(node_id)
        os.replace(marker + ".tmp", marker)  # appears complete
        threading.Event().wait()  # until the node's processes are killed


def install() -> None:
    import search.trainable as trainable

    real_run_trial = trainable.run_trial

    def faulty_run_trial(params, *, base, data, report, restore_state=None, extra=None, **kwargs):
        faults = injected_faults((extra or {}).get("trial_index"))
        if "nan" in faults:
            params = {**params, "lr": 1e30}

        def faulty_report(metrics: dict, checkpoint_fn) -> None:
            if metrics.get("failure_reason"):
                return report(metrics, checkpoint_fn)
            if "oom" in faults:
                import torch

                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            if "raise" in faults and metrics["epoch"] >= faults["raise"]:
                raise RuntimeError(f"injected fault in epoch {metrics['epoch']} ({FAULT_ENV})")
            report(metrics, checkpoint_fn)  # returns once the driver has taken the result
            _hold_here(metrics, (extra or {}).get("trial_index"), restore_state)
            if "crash" in faults and metrics["epoch"] == faults["crash"] and restore_state is None:
                raise RuntimeError(f"injected one-off crash after epoch {metrics['epoch']} ({FAULT_ENV})")

        real_run_trial(params, base=base, data=data, report=faulty_report, restore_state=restore_state, extra=extra, **kwargs)

    trainable.run_trial = faulty_run_trial
