"""``python -m search.bench --data-scale``: the data path at 100x the dev data, object store against node cache.

    python -m search.bench --data-scale [--slices 20000] [--image-px 256] [--sizes 128,256] [--keep]

Writes a synthetic dataset of ``--slices`` slices to disk (``tumorseg.synthetic``; 80/10/10
train/valid/test), builds the driver's ``.npy`` cache of it (``tumorseg.data``), starts a 2-node
Ray cluster on this machine (``launch/local-cluster.sh``: separate object stores and node caches),
and for each data path (``search.datapath``) measures: the driver's preparation (the object
store's ``ray.put``), the time until each node's first trial has its data, bytes moved to each
node, the head's memory (object store and driver RSS), and the start-up of a later trial on a
node that has the data. A "trial" here is a Ray task on that node that gets the data as
``search.trainable`` does and reads one training batch. Everything it wrote is deleted at the end
(``--keep`` keeps it). On one machine, "moved" is loopback and local disk, not a network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from search.bench_probes import PeakRss, du_bytes, load_average, local_cluster

HEAD_PORT, NODE_PORT_BASE = 6447, 25200  # away from the tests' clusters and bench --scale's


def first_batch(data_ref: dict, resize_px: int) -> dict:
    """What a trial does before training: get the data (``search.datapath.trial_data``), read a batch."""
    import ray

    from search.datapath import open_node_cache

    t0 = time.perf_counter()
    if "ref" in data_ref:
        data, copied = ray.get(data_ref["ref"]), None
    else:
        data, copied = open_node_cache(data_ref, [resize_px])
    train = data[resize_px]["train"]
    checksum = int(train.images[:16].sum()) + int(train.masks[:16].sum())
    return {"s": time.perf_counter() - t0, "copied": copied, "checksum": checksum, "end": time.time(),
            "node": ray.get_runtime_context().get_node_id()}


def plasma_used_mib() -> float:
    from ray._private.internal_api import memory_summary

    match = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return float(match.group(1)) if match else float("nan")


def measure_path(path: str, data: dict, resize_px: int) -> dict:
    """Both nodes' first trial at once, then a second trial on each; the head's memory."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from search.datapath import data_bytes, data_handle

    nodes = sorted((n["NodeID"] for n in ray.nodes() if n["Alive"]), key=lambda n: n != ray.get_runtime_context().get_node_id())
    task = ray.remote(num_cpus=1)(first_batch)
    t0 = time.time()
    handle = data_handle(data, path, log=lambda line: None)
    prepared = time.time() - t0
    on = lambda node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    first = ray.get([on(node).remote(handle, resize_px) for node in nodes])
    second = ray.get([on(node).remote(handle, resize_px) for node in nodes])
    total = data_bytes(data)
    return {
        "path": path, "prepare_s": prepared, "bytes": total,
        "first_ready_s": [r["end"] - t0 for r in first], "first_get_s": [r["s"] for r in first],
        # node cache: the bytes each node's first trial copied (measured); object store: not measured
        # here, the object's size (Ray pulls an object whole to a node that reads it; the head has it)
        "moved": [r["copied"] for r in first] if path == "node-cache" else [0] + [total] * (len(first) - 1),
        "second_get_s": [r["s"] for r in second], "checksums": [r["checksum"] for r in first + second],
        "head_plasma_mib": plasma_used_mib(), "driver_rss_mib": PeakRss.now_mib(),
        "handle_bytes": len(json.dumps(handle, default=str)) if path == "node-cache" else None,
    }


def main(argv=None) -> None:
    from tumorseg.cli import ArgumentParser

    p = ArgumentParser(prog="search.bench --data-scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=20000, help="slices in all (80/10/10 train/valid/test)")
    p.add_argument("--image-px", type=int, default=256, help="native size of the synthetic slices")
    p.add_argument("--sizes", default="128,256", help="resizes the sweep may sample (all go to the object store)")
    p.add_argument("--out", type=Path, default=None, help="where to write the dataset and caches (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the dataset and caches")
    args = p.parse_args(argv)
    sizes = sorted(int(v) for v in args.sizes.split(","))
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # the local cluster's; read when Ray is first imported
    from tumorseg.bench import machine
    from tumorseg.data import open_dataset
    from tumorseg.synthetic import SyntheticSpec, make_synthetic

    from search.trainable import load_search_data

    print(f"machine: {machine()}; load average {load_average()}")
    out = Path(tempfile.mkdtemp(prefix="tumorseg-data-scale-", dir=args.out))
    temp_dir = Path(tempfile.mkdtemp(prefix="tsd-", dir="/tmp"))
    try:
        n_valid = n_test = args.slices // 10
        spec = SyntheticSpec(image_px=args.image_px, n_train=args.slices - n_valid - n_test, n_valid=n_valid, n_test=n_test)
        t0 = time.perf_counter()
        data_dir = make_synthetic(out / "data", spec)
        print(f"dataset: {args.slices} synthetic slices at {args.image_px} px written in {time.perf_counter() - t0:.0f} s, "
              f"{du_bytes(data_dir) / 2**20:.0f} MiB on disk")
        t0 = time.perf_counter()
        data = load_search_data(open_dataset(data_dir), sizes, cache_dir=out / "shared-cache")
        from search.datapath import data_bytes

        print(f"driver cache at sizes {sizes}: built in {time.perf_counter() - t0:.0f} s, {data_bytes(data) / 2**20:.0f} MiB of arrays "
              f"(train {len(data[sizes[0]]['train'])}, valid {len(data[sizes[0]]['valid'])} slices)")
        import ray

        results = []
        # head + one worker node, 2 CPUs each, each with its own node cache folder
        with local_cluster(1, 2, 0, temp_dir, HEAD_PORT, NODE_PORT_BASE, "search.bench --data-scale",
                           {"RAY_USAGE_STATS_ENABLED": "0"}) as cluster:
            address = cluster["address"]
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            try:
                for path in ("object-store", "node-cache"):
                    results.append(measure_path(path, data, sizes[-1]))
            finally:
                ray.shutdown()
            node_caches = {d.name: du_bytes(d) for d in (temp_dir / "node-cache").iterdir()} if (temp_dir / "node-cache").is_dir() else {}
        print(f"two Ray nodes on this machine; trials read the {sizes[-1]} px arrays; times from the driver handing out the data")
        for r in results:
            moved = ", ".join(f"{m / 2**20:.0f}" for m in r["moved"])
            print(f"{r['path']}: driver prepares {r['prepare_s']:.1f} s; first trial has its data after "
                  + ", ".join(f"{s:.1f}" for s in r["first_ready_s"]) + " s (head, worker node); "
                  f"MiB moved to each node: {moved}{'' if r['path'] == 'node-cache' else ' (the object size, not measured)'}; a later trial on a node: "
                  + ", ".join(f"{1000 * s:.0f}" for s in r["second_get_s"]) + " ms; "
                  f"head object store {r['head_plasma_mib']:.0f} MiB, driver RSS after {r['driver_rss_mib']:.0f} MiB")
        same = len({tuple(r["checksums"]) for r in results}) == 1
        print(f"same arrays on every node and path: {same}; node caches on disk: "
              + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(node_caches.items())))
        print(json.dumps(results))
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
    print(f"load average at the end {load_average()}")


if __name__ == "__main__":
    main()
