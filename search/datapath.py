"""How the sweep's arrays reach the trials: Ray's object store, or a memory-mapped cache on each node.

``object-store``: the driver puts the arrays of every resize into Ray's object store once; each
node pulls the whole object (every resize) into its own store on its first trial, and its trials
read it zero-copy. The head holds it in memory for the whole sweep, every node holds a full copy
in memory too, and a node's first trial waits for the whole object.

``node-cache``: the driver keeps its ``.npy`` cache (``tumorseg.data``; built once, from any
layout) on storage every node can read (``--cache-dir`` on shared storage, like ``--data``; checked
before the first trial), and hands trials only the file names. The first trial of a node that needs a resize copies that
resize's files into the node's own cache folder (``$TUMORSEG_NODE_CACHE_DIR``, default
``<tmp>/tumorseg-node-cache``; once per node, under a file lock, keyed by content so later sweeps
reuse it), and every trial memory-maps them: nothing in Ray's object store, nothing on the head,
the node's page cache holds what is read (and can drop it), a node copies only the resizes its
trials sample.

``auto`` (the default) chooses by the arrays' size: the object store up to ``OBJECT_STORE_MAX_BYTES``,
the node cache above it (the object store after all if a node cannot read the driver's cache). The cut-off comes from ``python -m search.bench --data-scale`` (README,
"Scaling").
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from tumorseg.data import Split
from tumorseg.errors import ConfigError

from search.storage import blind_nodes

DATA_PATHS = ("auto", "object-store", "node-cache")
OBJECT_STORE_MAX_BYTES = 2 * 2**30  # up to 2 GiB of arrays: the object store (see the module doc)
NODE_CACHE_ENV = "TUMORSEG_NODE_CACHE_DIR"


def data_bytes(data: dict[int, dict[str, Split]]) -> int:
    """Bytes of the arrays of every resize (the validation split's native masks counted once)."""
    arrays = {id(a): a.nbytes for by_split in data.values() for s in by_split.values()
              for a in (s.images, s.masks, s.native_masks) if a is not None}
    return sum(arrays.values())


def choose(data: dict[int, dict[str, Split]], requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "object-store" if data_bytes(data) <= OBJECT_STORE_MAX_BYTES else "node-cache"


# ----------------------------------------------------------------------------- what the trials get


def _file(array) -> str | None:
    name = getattr(array, "filename", None)  # np.memmap: the .npy it maps
    return str(name) if name else None


def describe(data: dict[int, dict[str, Split]]) -> dict:
    """The node-cache handle of ``data``: per resize and split, its cache files and metadata (no arrays).

    ``data`` must be memory-mapped from ``tumorseg.data``'s cache (``load_search_data`` returns that).
    """
    splits = {}
    for size, by_split in data.items():
        for name, split in by_split.items():
            files = {"images": _file(split.images), "masks": _file(split.masks)}
            if split.native_masks is not None:
                files["native_masks"] = _file(split.native_masks)
            if not all(files.values()):
                raise ValueError(f"{name} at {size} px is not memory-mapped from the cache: the node cache needs its files")
            splits.setdefault(size, {})[name] = {"files": files, "native_hw": list(split.native_hw),
                                                 "file_names": list(split.file_names)}
    return {"node_cache": splits}


def node_cache_dir() -> Path:
    return Path(os.environ.get(NODE_CACHE_ENV) or Path(tempfile.gettempdir()) / "tumorseg-node-cache")


def local_copy(source: str, root: Path) -> tuple[Path, int]:
    """``source`` (a cache ``.npy``) in this node's cache, copied there first if needed; bytes copied.

    The cache keys its folders by content (``<split>-<fingerprint>/<size>px/``), so the last three
    path parts name the file; one trial per node copies it, the others wait on the lock.
    """
    source = Path(source)
    target = root.joinpath(*source.parts[-3:])
    stat = source.stat()
    size = stat.st_size

    def current() -> bool:  # copied with its modification time: a rebuilt cache file is copied again
        return target.is_file() and (target.stat().st_size, target.stat().st_mtime_ns) == (size, stat.st_mtime_ns)

    if current():
        return target, 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if current():  # another trial of this node copied it
            return target, 0
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copy2(source, tmp)
        os.replace(tmp, target)
    return target, size


def open_node_cache(handle: dict, sizes: list[int] | None = None, root: Path | None = None) -> tuple[dict, int]:
    """The arrays of ``handle`` (``describe``), memory-mapped from this node's cache; bytes copied.

    ``sizes``: only these resizes (a trial needs one); others stay absent from the returned dict.
    """
    root = Path(root) if root is not None else node_cache_dir()
    data, copied = {}, 0
    for size, by_split in handle["node_cache"].items():
        if sizes is not None and int(size) not in sizes:
            continue
        for name, entry in by_split.items():
            arrays = {}
            for key, source in entry["files"].items():
                path, n = local_copy(source, root)
                copied += n
                arrays[key] = np.load(path, mmap_mode="r")
            data.setdefault(int(size), {})[name] = Split(
                name=name, images=arrays["images"], masks=arrays["masks"], native_masks=arrays.get("native_masks"),
                native_hw=tuple(entry["native_hw"]), file_names=tuple(entry["file_names"]))
    return data, copied


def data_handle(data: dict[int, dict[str, Split]], requested: str = "auto", log=print) -> dict:
    """What the driver hands every trial (one line says which path and why).

    The node cache needs the driver's cache files readable on every node: checked first. If a node
    cannot read them, ``auto`` falls back to the object store and ``node-cache`` is refused.
    """
    import ray

    path = choose(data, requested)
    size = f"{data_bytes(data) / 2**30:.2f} GiB of arrays"
    why = "forced by --data-path" if requested != "auto" else f"{'<=' if path == 'object-store' else '>'} {OBJECT_STORE_MAX_BYTES / 2**30:g} GiB"
    if path == "node-cache":
        handle = describe(data)
        first = next(iter(next(iter(handle["node_cache"].values())).values()))["files"]["images"]
        blind = blind_nodes(first)
        if blind and requested == "node-cache":
            raise ConfigError(f"--data-path node-cache: node(s) {', '.join(blind)} cannot read the driver's cache file {first}; "
                              "put --cache-dir on storage every node sees (like --data), or use --data-path object-store")
        if not blind:
            log(f"data path: node-cache ({size}, {why})")
            return handle
        path, why = "object-store", f"node(s) {', '.join(blind)} cannot read the driver's --cache-dir, so not the node cache"
    log(f"data path: {path} ({size}, {why})")
    return {"ref": ray.put(data)}


def trial_data(data_ref: dict, resize_px: int | None = None) -> dict:
    """What a trial reads: from the object store (``{"ref": ObjectRef}``) or this node's cache."""
    if "ref" in data_ref:
        import ray

        return ray.get(data_ref["ref"])
    return open_node_cache(data_ref, None if resize_px is None else [resize_px])[0]
