"""The launch routes, each tried on this machine with Ray's token authentication on.

- launch/slurm.sbatch runs as is, with stand-in ``srun``/``scontrol``/``hostname`` that run every
  step here; each "node" gets its own Ray ports.
- launch/ray-cluster.yaml: its head and worker start commands, wrapped as ``ray up`` wraps them,
  on "nodes" (home folders) holding the token file its file_mounts copy.
- launch/kuberay-job.yaml: checked against the RayJob CRD schema of the KubeRay release it targets.

Every process a simulation starts carries a marker variable in its environment (Ray hands the
environment on to raylets and workers); the stand-in ``ray stop`` and the clean-up end only those,
never the other Ray instances on this machine.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT

MARKER = "TUMORSEG_LAUNCH_TEST"
SLURM_HEAD_PORT, SLURM_PORT_BASE = 6420, 24000  # test_cluster.py uses 6390/6391 and 21000+/23000+
LAUNCHER_HEAD_PORT, LAUNCHER_PORT_BASE = 6430, 24500
CRD_SUBSET = ROOT / "tests" / "schemas" / "kuberay-v1.7.0-rayjob-subset.yaml"


# ----------------------------------------------------------------------------- helpers


def marked_pids(tag: str) -> set[int]:
    """This machine's processes whose environment holds MARKER=tag."""
    wanted = f"{MARKER}={tag}".encode()
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if wanted in (proc / "environ").read_bytes().split(b"\0"):
                    pids.add(int(proc.name))
            except OSError:  # gone, or not ours
                pass
    return pids


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(poll_s)
    return result


def kill_marked(tag: str) -> None:
    """End every process of one simulation: SIGTERM, then SIGKILL whatever is left."""
    for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        for pid in marked_pids(tag):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            wait_until(lambda: not marked_pids(tag), grace_s, "Ray processes to exit")
            return
        except AssertionError:
            continue


def node_flags(base: int, index: int, head: bool) -> list[str]:
    """Ray ports of "node" index, all within base+100*index .. +99."""
    b = base + 100 * index
    flags = [f"--node-manager-port={b}", f"--object-manager-port={b + 1}", f"--dashboard-agent-listen-port={b + 2}",
             f"--dashboard-agent-grpc-port={b + 3}", f"--runtime-env-agent-port={b + 4}",
             f"--metrics-export-port={b + 5}", f"--min-worker-port={b + 10}", f"--max-worker-port={b + 99}"]
    return flags + ([f"--dashboard-port={b + 6}", f"--ray-client-server-port={b + 7}"] if head else [])


def clean_env(**extra: str) -> dict:
    """This process's environment without Ray auth settings or cluster address, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return env | {"PYTHONPATH": str(ROOT)} | extra


def alive_nodes(address: str, token: str | None) -> int:
    """Alive nodes as a driver holding token sees them (None: a driver without token auth); 0 if refused."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {"RAY_AUTH_MODE": "disabled"}
    code = f"import ray; ray.init(address={address!r}, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(**auth), timeout=60,
                              check=False)
    except subprocess.TimeoutExpired:  # ray.init keeps retrying while the head does not answer
        return 0
    words = proc.stdout.split()
    return int(words[-1]) if proc.returncode == 0 and words and words[-1].isdigit() else 0


@pytest.fixture
def sim(tmp_path_factory):
    """A short tmp folder and a marker tag for one simulation; its processes are ended afterwards."""
    tmp = tmp_path_factory.mktemp("ln")  # short: Ray's socket paths must stay under 107 chars
    tag = f"{tmp.name}-{os.getpid()}"
    try:
        yield tmp, tag
    finally:
        kill_marked(tag)


# ----------------------------------------------------------------------------- SLURM

SRUN = '''#!{python}
"""Stand-in srun: runs the step on this machine. `ray start` on node<i> gets node i's Ray ports and
the test's temp dir; `ray stop` ends only this test's processes (not its own parents)."""
import json, os, signal, sys, time
FLAGS = json.loads({flags!r})
args, node = sys.argv[1:], "node0"
while args and args[0].startswith("-"):
    opt = args.pop(0)
    if opt == "-w":
        node = args.pop(0)
with open({log!r}, "a") as log:
    log.write(f"{{node}}: {{' '.join(args)}}\\n")
if args[:2] == ["ray", "start"]:
    args += FLAGS[node]["head" if "--head" in args else "worker"] + ["--temp-dir={ray_dir}"]
if args[:2] != ["ray", "stop"]:
    os.execvp(args[0], args)
mine, pid = set(), os.getpid()
while pid > 1:  # this process and its parents (the batch script) carry the marker too: spare them
    mine.add(pid)
    pid = int(open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[1])
def marked():
    found = set()
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"{marker}" in open(f"/proc/{{p}}/environ", "rb").read().split(b"\\0"):
                found.add(int(p))
        except OSError:
            pass
    return found - mine
for sig in (signal.SIGTERM, signal.SIGKILL):
    for p in marked():
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    for _ in range(40):
        if not marked():
            sys.exit(0)
        time.sleep(0.25)
'''


def slurm_standins(tmp: Path, tag: str) -> Path:
    """bin/ with srun, scontrol (nodes node0 and node1) and hostname (127.0.0.1)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    flags = {f"node{i}": {"head": node_flags(SLURM_PORT_BASE, i, True), "worker": node_flags(SLURM_PORT_BASE, i, False)}
             for i in range(2)}
    scripts = {
        "srun": SRUN.format(python=sys.executable, flags=json.dumps(flags), log=str(tmp / "srun.log"),
                            ray_dir=tmp / "ray", marker=f"{MARKER}={tag}"),
        "scontrol": '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "node0\\nnode1\\n"\n',
        "hostname": "#!/bin/sh\necho 127.0.0.1\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.slow
def test_slurm_sbatch_forms_a_two_node_cluster_and_runs_the_sweep(sim):
    from tumorseg.synthetic import SyntheticSpec, make_synthetic

    tmp, tag = sim
    data = make_synthetic(tmp / "data", SyntheticSpec(image_px=96, n_train=32, n_valid=8, n_test=8))
    token_path = tmp / "home" / ".ray" / "auth_token"  # absent: the script creates it
    env = clean_env(**{
        MARKER: tag, "PATH": f"{slurm_standins(tmp, tag)}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242",
        "SLURM_CPUS_PER_TASK": "1", "SLURM_GPUS_ON_NODE": "1", "SLURM_SUBMIT_DIR": str(ROOT),
        "VENV": sys.prefix, "DATA_DIR": str(data), "STORAGE": str(tmp / "results"), "RAY_PORT": str(SLURM_HEAD_PORT),
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "SWEEP_ARGS": "--resize-choices 64 --epochs 1 --num-samples 2 --encoder-weights none --batch-size 8 "
                      "--grace-period 1 --no-dashboard --no-retrain",
    })
    proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch")], capture_output=True, text=True, env=env,
                          cwd=tmp, timeout=600, check=False)
    steps = (tmp / "srun.log").read_text() if (tmp / "srun.log").exists() else ""
    assert proc.returncode == 0, steps + proc.stdout[-3000:] + proc.stderr[-5000:]

    assert "node0: ray start --head --node-ip-address=127.0.0.1" in steps
    assert f"node1: ray start --address=127.0.0.1:{SLURM_HEAD_PORT}" in steps
    assert "Ray cluster: 2/2 nodes" in proc.stdout
    assert f"attached to the Ray cluster at 127.0.0.1:{SLURM_HEAD_PORT}" in proc.stdout
    assert "'GPU': 2.0" in proc.stdout  # one logical GPU from each node
    assert len(token_path.read_text()) == 64 and token_path.stat().st_mode & 0o077 == 0
    table = pd.read_csv(tmp / "results" / "slurm-4242" / "trials.csv")
    assert len(table) == 2 and set(table["status"]) == {"COMPLETED"}
    assert steps.rstrip().endswith("ray stop --force")  # the EXIT trap ran
    wait_until(lambda: not marked_pids(tag), 30, "the job's Ray processes to exit after its clean-up")


# ----------------------------------------------------------------------------- ray up


def launcher_config() -> dict:
    return yaml.safe_load((ROOT / "launch" / "ray-cluster.yaml").read_text())


def test_ray_cluster_yaml_passes_ray_up_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher_config()))  # as `ray up` does: Ray's ray/autoscaler/ray-schema.json


def local_start_command(command: str, port_base: int, index: int, temp_dir: Path) -> str:
    """A node's start command as it would run there, made local: the test's head port, this node's
    ports and temp dir; no autoscaler (it would call AWS)."""
    command = command.replace(":6379", f":{LAUNCHER_HEAD_PORT}").replace("--port=6379", f"--port={LAUNCHER_HEAD_PORT}")
    command = command.replace("--autoscaling-config=~/ray_bootstrap_config.yaml", "")
    flags = node_flags(port_base, index, head="--head" in command)
    return f"{command} --num-cpus=1 --temp-dir={temp_dir} {' '.join(flags)}"


@pytest.mark.slow
def test_ray_cluster_yaml_start_commands_form_an_authenticated_cluster(sim):
    from ray._private.services import get_node_ip_address
    from ray.autoscaler._private.util import with_head_node_ip

    tmp, tag = sim
    config = launcher_config()
    token = secrets.token_hex(32)
    laptop = tmp / "laptop"  # where `ray up` runs: `ray get-auth-token --generate` made its token
    (laptop / ".ray").mkdir(parents=True)
    (laptop / ".ray" / "auth_token").write_text(token)
    head_ip = get_node_ip_address()
    nodes = {"head": config["head_start_ray_commands"],
             "worker": with_head_node_ip(config["worker_start_ray_commands"], head_ip)}  # as ray up runs them
    for index, (node, commands) in enumerate(nodes.items()):
        home = tmp / node
        home.mkdir()
        for remote, local in config["file_mounts"].items():  # ray up copies these to every node
            if local.startswith("~/"):
                target = home / remote.removeprefix("~/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes((laptop / local.removeprefix("~/")).read_bytes())
        assert (home / ".ray" / "auth_token").read_text() == token, "file_mounts must copy the token to every node"
        for command in commands:
            if command.rstrip().endswith("ray stop"):
                continue  # it would end every Ray instance on this machine; a fresh node has nothing to stop
            command = local_start_command(command, LAUNCHER_PORT_BASE, index, tmp / "ray")
            proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=180,
                                  env=clean_env(HOME=str(home), **{MARKER: tag}), check=False)
            assert proc.returncode == 0, f"{node}: {command}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"

    address = f"{head_ip}:{LAUNCHER_HEAD_PORT}"
    wait_until(lambda: alive_nodes(address, token) == 2, 120, "head and worker to be alive")
    assert alive_nodes(address, None) == 0  # token authentication is on: a driver without the token is refused


# ----------------------------------------------------------------------------- KubeRay


def rayjob() -> dict:
    return yaml.safe_load((ROOT / "launch" / "kuberay-job.yaml").read_text())


def rayjob_errors(job: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(yaml.safe_load(CRD_SUBSET.read_text()))
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(job)]


def test_kuberay_rayjob_matches_the_crd_schema_and_turns_token_auth_on():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert rayjob_errors(job) == []
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    # the operator refuses token mode below Ray 2.52 (ray-operator/controllers/ray/utils/validation.go)
    assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0)


@pytest.mark.parametrize("path, value, message", [
    (("spec", "rayClusterSpec", "authOption"), {"mode": "token"}, "Additional properties are not allowed"),
    (("spec", "rayClusterSpec", "authOptions", "mode"), "tokens", "is not one of"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"), "2", "is not of type 'integer'"),
    (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "resources", "limits", "memory"),
     "32 GB", "does not match"),
])
def test_kuberay_schema_check_catches_mistakes(path, value, message):
    job = copy.deepcopy(rayjob())
    parent = job
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    errors = rayjob_errors(job)
    assert len(errors) == 1 and message in errors[0], errors
