"""Fault injection for the sweep tests, as a wrapper around ``search.trainable.run_trial``.

``TUMORSEG_INJECT_FAULT`` is a comma-separated list of faults per trial index:

- ``raise@E:T``: trial T raises in every epoch >= E, before reporting it (retries cannot help);
- ``crash@E:T``: trial T raises once, after reporting epoch E, on its first attempt (the retry
  resumes from the checkpoint);
- ``nan:T``: a learning rate that makes the loss non-finite;
- ``oom:T``: CUDA out of memory in the first epoch.
"""

from __future__ import annotations

import os

FAULT_ENV = "TUMORSEG_INJECT_FAULT"
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
        if trial_index is not None and int(trial) == trial_index:
            faults[kind] = int(epoch or 1)
    return faults


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
            report(metrics, checkpoint_fn)
            if "crash" in faults and metrics["epoch"] == faults["crash"] and restore_state is None:
                raise RuntimeError(f"injected one-off crash after epoch {metrics['epoch']} ({FAULT_ENV})")

        real_run_trial(params, base=base, data=data, report=faulty_report, restore_state=restore_state, extra=extra, **kwargs)

    trainable.run_trial = faulty_run_trial
