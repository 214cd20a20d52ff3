"""Test-only: put this folder on PYTHONPATH with TUMORSEG_INJECT_FAULT set, and every process of a
sweep (the driver and Ray's trial workers, which inherit the environment) runs trials through
``faults.faulty_run_trial``. Production code holds no fault-injection hook."""

import os

if os.environ.get("TUMORSEG_INJECT_FAULT"):
    import faults

    faults.install()
