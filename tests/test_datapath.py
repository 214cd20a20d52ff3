"""The two ways data reaches trials (search/datapath.py): Ray's object store, or a memory-mapped cache per node."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT


def test_auto_chooses_the_object_store_up_to_the_cut_off(monkeypatch, synthetic_dir, tmp_path):
    from search import datapath
    from search.trainable import load_search_data

    data = load_search_data(synthetic_dir, [64], cache_dir=tmp_path)
    nbytes = datapath.data_bytes(data)
    train, valid = data[64]["train"], data[64]["valid"]
    assert nbytes == train.images.nbytes + train.masks.nbytes + valid.images.nbytes + valid.masks.nbytes + valid.native_masks.nbytes
    monkeypatch.setattr(datapath, "OBJECT_STORE_MAX_BYTES", nbytes)
    assert datapath.choose(data) == "object-store" and datapath.choose(data, "node-cache") == "node-cache"
    monkeypatch.setattr(datapath, "OBJECT_STORE_MAX_BYTES", nbytes - 1)
    assert datapath.choose(data) == "node-cache" and datapath.choose(data, "object-store") == "object-store"


def test_a_cache_some_node_cannot_read_means_the_object_store_or_a_clear_error(monkeypatch, synthetic_dir, tmp_path):
    import ray

    from search import datapath
    from search.trainable import load_search_data
    from tumorseg.errors import ConfigError

    data = load_search_data(synthetic_dir, [64], cache_dir=tmp_path)
    monkeypatch.setattr(datapath, "OBJECT_STORE_MAX_BYTES", 0)  # auto: the node cache
    monkeypatch.setattr(ray, "put", lambda value: "object-ref")
    lines = []
    monkeypatch.setattr(datapath, "blind_nodes", lambda path: [])
    assert "node_cache" in datapath.data_handle(data, "auto", log=lines.append)
    monkeypatch.setattr(datapath, "blind_nodes", lambda path: ["10.0.0.2 abcd1234"] if Path(path).is_relative_to(tmp_path) else [])
    assert datapath.data_handle(data, "auto", log=lines.append) == {"ref": "object-ref"}
    assert lines[-1].startswith("data path: object-store") and "10.0.0.2 abcd1234 cannot read the driver's --cache-dir" in lines[-1]
    with pytest.raises(ConfigError, match=r"^--data-path node-cache: node\(s\) 10.0.0.2 abcd1234 cannot read"):
        datapath.data_handle(data, "node-cache", log=lines.append)


def test_node_cache_copies_once_per_node_and_maps_the_same_arrays(synthetic_dir, tmp_path):
    from search.datapath import describe, open_node_cache
    from search.trainable import load_search_data

    data = load_search_data(synthetic_dir, [64, 96], cache_dir=tmp_path / "shared")
    handle = json.loads(json.dumps(describe(data)))  # plain data: what Tune ships to the trials
    node = tmp_path / "node"
    mapped, copied = open_node_cache(handle, [96], root=node)
    assert set(mapped) == {96}  # only the resize the trial samples is copied
    expected = sum(getattr(s, k).nbytes for s in data[96].values() for k in ("images", "masks")) + data[96]["valid"].native_masks.nbytes
    assert copied == sum(f.stat().st_size for f in node.rglob("*.npy")) and copied >= expected
    assert all(Path(mapped[96][s].images.filename).is_relative_to(node) for s in ("train", "valid"))
    for split in ("train", "valid"):
        assert np.array_equal(mapped[96][split].images, data[96][split].images)
        assert np.array_equal(mapped[96][split].masks, data[96][split].masks)
    assert np.array_equal(mapped[96]["valid"].native_mask(slice(0, 4)), data[96]["valid"].native_mask(slice(0, 4)))
    assert open_node_cache(handle, [96], root=node)[1] == 0  # the node's next trial copies nothing


# ----------------------------------------------------------------------------- a 2-node cluster

TRIALS_ON_EACH_NODE = """
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from search.datapath import data_handle, trial_data
from search.trainable import load_search_data, run_trial

address, data_dir, cache_dir = sys.argv[1:4]
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
data = load_search_data(data_dir, [64], cache_dir=cache_dir)
params = {"resize_px": 64, "loss_type": "dice", "lr": 3e-3, "warmup_epochs": 0, "weight_decay": 0.01}
base = {"epochs": 1, "encoder_weights": "none", "num_workers": 0, "batch_size": 8, "seed": 0}

@ray.remote(num_cpus=1)
def trial(handle):
    reports = []
    run_trial(params, base=base, data=trial_data(handle, 64), report=lambda m, s: reports.append(m), threads=1)
    return {"node": ray.get_runtime_context().get_node_id(), "val_dice": reports[-1]["val_dice"],
            "train_loss": reports[-1]["train_loss"]}

nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
out = {}
for path in ("object-store", "node-cache"):
    handle = data_handle(data, path, log=lambda line: None)
    on = [trial.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)) for n in nodes]
    out[path] = ray.get([t.remote(handle) for t in on])
print(json.dumps(out))
"""


@pytest.fixture
def two_node_cluster(tmp_path_factory):
    env = {**os.environ, "TUMORSEG_HEAD_PORT": "6441", "TUMORSEG_NODE_PORT_BASE": "25400",
           "TUMORSEG_RAY_TEMP_DIR": str(tmp_path_factory.mktemp("rc")), "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token"}
    script = str(ROOT / "launch" / "local-cluster.sh")
    proc = subprocess.run([script, "start", "1", "1", "0"], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        yield {"address": "127.0.0.1:6441", "env": env}
    finally:
        subprocess.run([script, "stop"], capture_output=True, env=env, timeout=120)


def test_both_data_paths_give_the_same_trial_results_on_two_nodes(two_node_cluster, synthetic_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-c", TRIALS_ON_EACH_NODE, two_node_cluster["address"], str(synthetic_dir),
                           str(tmp_path / "cache")], capture_output=True, text=True, cwd=ROOT, env=two_node_cluster["env"],
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    store, cache = results["object-store"], results["node-cache"]
    assert len({r["node"] for r in store}) == 2 and [r["node"] for r in cache] == [r["node"] for r in store]
    first = store[0]
    assert all(r["val_dice"] == first["val_dice"] and r["train_loss"] == first["train_loss"] for r in store + cache)
    node_cache = Path(two_node_cluster["env"]["TUMORSEG_RAY_TEMP_DIR"]) / "node-cache"  # launch/local-cluster.sh: one per node
    node_caches = sorted(p.parent.parent.parent.name for p in node_cache.rglob("images.npy"))
    assert node_caches == ["head", "head", "node_1", "node_1"]  # train and valid at 64 px, copied on each node

