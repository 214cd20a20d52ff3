"""The GPU check script runs end to end (here on the CPU, with tiny settings)."""

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_gpucheck_runs_on_cpu_and_writes_its_numbers(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_cli("-m", "tumorseg.gpucheck", "--device", "cpu", "--size-px", "64", "--batch", "2", "--steps", "2",
                   "--processes", "1,2", "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    numbers = json.loads(out.read_text())
    for key in ("fp32", "bf16", "bf16+channels_last"):
        assert numbers[key]["images_per_s"] > 0
    assert numbers["concurrent_1"] > 0 and numbers["concurrent_2"] > 0
    assert "2 concurrent trial process(es)" in proc.stdout
