"""Where a sweep's results live: a local or shared path, or a URI (``s3://``, ``gs://``, ``file://``).

Ray writes every trial's results and checkpoints, from every node, to ``<storage>/<name>/tune``
(``RunConfig(storage_path=...)``, through pyarrow's filesystems). The driver's own files
(``sweep.json``, ``trials.csv``, ``final/``, ``report.html``) are written to a local folder first:
``<storage>/<name>`` itself for a path, ``results/<name>`` for a URI, then uploaded beside Ray's.

On a multi-node cluster a plain path must be the same shared filesystem on every node; the driver
checks that each node sees a probe file it wrote before any trial starts.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from tumorseg.errors import ConfigError


def is_uri(storage: str) -> bool:
    return "://" in str(storage)


def filesystem(uri: str):
    """``(pyarrow filesystem, path inside it)`` for a URI."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for bad URIs
        raise ConfigError(f"--storage {uri}: not a storage URI pyarrow can open ({err})") from None


def check_writable(storage: str, local_dir: Path) -> None:
    """Fail before any trial starts when results could not be written."""
    try:
        local_dir.mkdir(parents=True, exist_ok=True)
        probe = local_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--storage: cannot write to {local_dir} ({err.strerror or err})") from None
    if is_uri(storage):
        fs, path = filesystem(storage)
        probe = f"{path.rstrip('/')}/.tumorseg-write-test-{uuid.uuid4().hex[:8]}"
        try:
            fs.create_dir(path.rstrip("/") or "/", recursive=True)
            with fs.open_output_stream(probe) as stream:
                stream.write(b"ok")
            fs.delete_file(probe)
        except Exception as err:  # noqa: BLE001 - network, permission, missing bucket...
            raise ConfigError(f"--storage: cannot write to {storage} ({type(err).__name__}: {err})".splitlines()[0]) from None


def blind_nodes(path: Path | str) -> list[str]:
    """The alive nodes of a multi-node cluster that cannot see the file ``path`` ("address node-id")."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return []

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return os.path.isfile(path)

    refs = {
        node["NodeManagerAddress"] + " " + node["NodeID"][:8]: sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(str(path))
        for node in nodes
    }
    return [name for name, ref in refs.items() if not ray.get(ref, timeout=60)]


def check_visible_from_all_nodes(local_dir: Path) -> None:
    """On a multi-node cluster, every node must see the storage path the driver writes to."""
    probe = local_dir / f".node-probe-{uuid.uuid4().hex[:8]}"
    probe.write_text("visible")
    try:
        blind = blind_nodes(probe)
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise ConfigError(
            f"--storage {local_dir.parent}: node(s) {', '.join(blind)} cannot see this path, so their trials' "
            "results and checkpoints would stay on those nodes. Use a filesystem shared by every node "
            "(NFS, same mount point) or a URI such as s3://bucket/results"
        )


def upload(local_dir: Path, uri: str, exclude: str) -> None:
    """Copy the driver's files (not Ray's ``tune/``, which Ray writes there itself) to ``uri``."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    for item in Path(local_dir).iterdir():
        if item.name == exclude or item.name.startswith("."):
            continue
        target = f"{path.rstrip('/')}/{item.name}"
        if item.is_dir():
            fs.create_dir(target, recursive=True)
        pyarrow.fs.copy_files(str(item), target, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def download(uri: str, local_dir: Path, only: tuple[str, ...] | None = None) -> None:
    """Copy ``uri`` (or the listed names under it) into ``local_dir``."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    local_dir.mkdir(parents=True, exist_ok=True)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)):
        name = info.path.rsplit("/", 1)[-1]
        if only is not None and name not in only:
            continue
        pyarrow.fs.copy_files(info.path, str(local_dir / name), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())


def download_trial_results(uri: str, local_tune_dir: Path) -> None:
    """Each trial's ``result.json`` (for the report's learning curves) from ``<uri>``'s ``tune/``."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.Directory:
            continue
        name = info.path.rsplit("/", 1)[-1]
        source = f"{info.path}/result.json"
        if fs.get_file_info(source).type == pyarrow.fs.FileType.File:
            (local_tune_dir / name).mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(source, str(local_tune_dir / name / "result.json"), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
