"""Beyond one box: a 2-node Ray cluster, data-parallel trials, URI storage, launch files."""

import json
import os
import subprocess
import time

import pandas as pd
import pytest
import yaml

from conftest import ROOT, run_cli, sweep_args

FIXED = ["--lr-range", "3e-3,3e-3", "--weight-decay-range", "0.01,0.01", "--warmup-epochs-range", "0,0",
         "--loss-types", "dice_bce", "--weight-range", "1,1"]


# ----------------------------------------------------------------------------- launch files


def test_ray_cluster_launcher_config_has_what_ray_up_needs():
    config = yaml.safe_load((ROOT / "launch" / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, key
    assert config["provider"]["type"] in {"aws", "gcp", "azure"} and config["provider"]["region"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, spec in types.items():
        assert "node_config" in spec and "resources" in spec, name
    assert any("gpu" in name for name in types) and sum(t.get("max_workers", 0) for t in types.values()) <= config["max_workers"]
    assert any("pip install" in c and "tumorseg" in c for c in config["setup_commands"])
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])


def test_kuberay_rayjob_has_required_fields():
    job = yaml.safe_load((ROOT / "launch" / "kuberay-job.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert "python -m search.run --address auto" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["template"]["spec"]["containers"][0]["image"]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(w["groupName"] and "rayStartParams" in w and w["template"]["spec"]["containers"] for w in workers)
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for w in workers for c in w["template"]["spec"]["containers"]]
    assert all(gpu_limits)


@pytest.mark.parametrize("script", ["slurm.sbatch", "local-cluster.sh"])
def test_shell_launchers_parse(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / "launch" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (ROOT / "launch" / script).read_text()
    if script == "slurm.sbatch":
        assert "ray start --head" in text and "--block" in text and "trap cleanup EXIT" in text
        assert "python -m search.run --address" in text


# ----------------------------------------------------------------------------- a 2-node cluster


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Head + one worker node on this machine (launch/local-cluster.sh), 1 CPU + 1 logical GPU each."""
    env = {**os.environ, "TUMORSEG_HEAD_PORT": "6391", "TUMORSEG_NODE_PORT_BASE": "23000",
           "TUMORSEG_RAY_TEMP_DIR": str(tmp_path_factory.mktemp("rc")), "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "launch" / "local-cluster.sh")
    proc = subprocess.run([script, "start", "1", "1", "1"], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        yield {"address": "127.0.0.1:6391", "env": env, "script": script}
    finally:
        subprocess.run([script, "stop"], capture_output=True, env=env, timeout=120)
        left = subprocess.run(["pgrep", "-f", env["TUMORSEG_RAY_TEMP_DIR"]], capture_output=True, text=True)
        assert left.stdout.strip() == "", "Ray processes left behind"


def test_sweep_on_two_nodes_uses_both_and_shares_storage(two_nodes, paths, ray_tmp):
    args = sweep_args(paths, ray_tmp, "two-nodes", "--address", two_nodes["address"], "--gpus", "2",
                      "--num-samples", "4", "--epochs", "2", "--grace-period", "2", "--no-retrain", *FIXED)
    proc = run_cli(*args, env={"PYTHONPATH": str(ROOT)}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "attached to the Ray cluster at 127.0.0.1:6391" in proc.stdout
    run_dir = paths["storage"] / "two-nodes"
    table = pd.read_csv(run_dir / "trials.csv")
    assert set(table["status"]) == {"COMPLETED"} and len(table) == 4
    assert table["node_id"].nunique() == 2  # trials ran on both nodes
    for row in table.itertuples():  # every node's results and checkpoints in the one storage folder
        trial_dir = run_dir / "tune" / row.trial_dir
        assert (trial_dir / "result.json").is_file() and list(trial_dir.glob("checkpoint_*/state.pt"))


def test_losing_a_node_retries_its_trials_from_checkpoints(two_nodes, paths, ray_tmp):
    args = sweep_args(paths, ray_tmp, "node-loss", "--address", two_nodes["address"], "--gpus", "2",
                      "--num-samples", "4", "--epochs", "4", "--grace-period", "4", "--no-retrain", *FIXED)
    import sys

    driver = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = paths["storage"] / "node-loss"
    deadline = time.monotonic() + 600
    while True:  # wait until a trial on the worker node has a checkpoint
        worker_trials = [
            d for d in (run_dir / "tune").glob("trial_*")
            if list(d.glob("checkpoint_*")) and (d / "result.json").is_file()
            and json.loads((d / "result.json").read_text().splitlines()[0])["node_id"] != _head_node_id(two_nodes)
        ]
        if worker_trials:
            break
        assert driver.poll() is None and time.monotonic() < deadline, "no trial checkpointed on the worker node"
        time.sleep(1)
    killed = subprocess.run([two_nodes["script"], "kill-worker", "1"], capture_output=True, text=True, env=two_nodes["env"])
    assert killed.returncode == 0, killed.stderr
    output, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, output[-3000:]
    table = pd.read_csv(run_dir / "trials.csv").set_index("trial_dir")
    assert set(table["status"]) == {"COMPLETED"}
    victim = worker_trials[0].name
    assert table.loc[victim, "num_failures"] >= 1
    results = [json.loads(line) for line in (run_dir / "tune" / victim / "result.json").read_text().splitlines()]
    resumed = [r for r in results if r.get("resumed_from_epoch")]
    assert resumed and resumed[0]["node_id"] == _head_node_id(two_nodes)  # continued on the surviving node
    assert max(r["epoch"] for r in results) == 4


def _head_node_id(cluster) -> str:
    code = ("import ray; ray.init(address='%s', logging_level='ERROR'); "
            "print([n['NodeID'] for n in ray.nodes() if n['Alive'] and 'node_1' not in n['Resources']][0])" % cluster["address"])
    if "head" not in cluster:
        env = {**cluster["env"], "RAY_AUTH_MODE": "token"}
        cluster["head"] = subprocess.run(["python", "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout.strip().splitlines()[-1]
    return cluster["head"]


# ----------------------------------------------------------------------------- data-parallel trials


def _single_trial(paths, ray_tmp, name, gpus, gpus_per_trial):
    args = sweep_args(paths, ray_tmp, name, "--gpus", str(gpus), "--gpus-per-trial", str(gpus_per_trial),
                      "--cpus-per-trial", "2", "--num-samples", "1", "--epochs", "2", "--grace-period", "2", "--no-retrain", *FIXED)
    proc = run_cli(*args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = paths["storage"] / name
    trial_dir = next((run_dir / "tune").glob("trial_000_*"))
    return trial_dir, [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]


def test_two_worker_trial_matches_one_worker_and_its_checkpoint_loads(paths, ray_tmp):
    from search.trainable import load_state
    from tumorseg.model import create_model

    single_dir, single = _single_trial(paths, ray_tmp, "one-worker", gpus=1, gpus_per_trial=1)
    pair_dir, pair = _single_trial(paths, ray_tmp, "two-workers", gpus=2, gpus_per_trial=2)
    assert [r["world_size"] for r in pair] == [2, 2] and "world_size" not in single[0]
    # same data, seed and global batch; each worker sees half of it (gloo on CPU): the curves agree
    for one, two in zip(single, pair):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=0.15)
        assert two["val_dice"] == pytest.approx(one["val_dice"], abs=0.2)
    checkpoints = list((pair_dir / "train").glob("checkpoint_*/state.pt"))
    assert len(checkpoints) == 1  # rank 0 only, one kept
    state = load_state(checkpoints[0].parent)
    model = create_model(None)
    model.load_state_dict(state["best_model"])
    assert state["best_val_dice"] == pytest.approx(max(r["val_dice"] for r in pair))


# ----------------------------------------------------------------------------- storage


def test_uri_storage_holds_every_result(paths, tmp_path, ray_tmp):
    store = tmp_path / "bucket"
    args = sweep_args(paths, ray_tmp, "via-uri", "--num-samples", "2", "--epochs", "1", "--grace-period", "1",
                      "--retrain-seeds", "1", *FIXED)
    args[args.index("--storage") + 1] = store.as_uri()  # file:///...: the same pyarrow path as s3://
    proc = run_cli(*args, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    remote = store / "via-uri"
    assert len(list((remote / "tune").glob("trial_*/result.json"))) == 2
    for name in ("sweep.json", "trials.csv", "best_config.json", "report.html", "final"):
        assert (remote / name).exists() and (tmp_path / "results" / "via-uri" / name).exists()
    assert "uploaded" in proc.stdout


def test_unreachable_storage_uri_is_refused_before_trials(tmp_path):
    proc = run_cli("-m", "search.run", "--storage", "nosuchscheme://bucket/x", "--name", "n", cwd=tmp_path,
                   env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2 and "--storage" in proc.stderr and "Traceback" not in proc.stderr
