"""Trial checkpoints as ``--resume`` finds them on the sweep's storage.

Tune keeps one checkpoint per trial (the latest epoch's state, ``CheckpointConfig(num_to_keep=1)``):
when a trial reports checkpoint k+1, Tune registers it and deletes checkpoint k at once, and writes
the experiment snapshot that names k+1 a moment later. A driver killed in between (SIGKILL, a lost
ssh session, the OOM killer) leaves a snapshot that names a deleted checkpoint; Tune's restore then
fails that trial ("Could not recover from checkpoint as it does not exist on storage anymore") on
every retry, and a trial that was nearly done ends ``ERROR``.

``ContinueFromSavedCheckpoint`` mends that before Tune starts the restored trials: such a trial
continues from the oldest checkpoint beside the named one with a higher index. That is the one
whose registration deleted it, so it was complete (a still newer one may have been cut off
mid-upload by the kill).
"""

from __future__ import annotations

import json
import posixpath
import re
import sys

from ray.tune import Callback

from search.trainable import STATE_FILE, restored_state

CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)$")  # Tune's checkpoint folders in a trial's folder
RESULT_FILE = "result.json"  # Tune's per-trial results, one JSON line per report


def checkpoint_index(path: str) -> int | None:
    """The index in a ``checkpoint_000007`` folder's name (None: not a checkpoint folder)."""
    match = CHECKPOINT_NAME.match(posixpath.basename(path.rstrip("/")))
    return int(match.group(1)) if match else None


def holds_state(filesystem, checkpoint_path: str) -> bool:
    """Whether a checkpoint folder still holds the trial's state (a deletion cut off by the kill can
    leave the folder, or an object store's directory marker, without it)."""
    from pyarrow.fs import FileType

    return filesystem.get_file_info(posixpath.join(checkpoint_path, STATE_FILE)).type == FileType.File


def saved_checkpoints(filesystem, trial_path: str) -> list[tuple[int, str]]:
    """(index, path) of the checkpoint folders in a trial's folder on ``filesystem``, oldest first."""
    from pyarrow.fs import FileSelector, FileType

    found = []
    for entry in filesystem.get_file_info(FileSelector(trial_path, allow_not_found=True)):
        index = checkpoint_index(entry.path)
        if entry.type == FileType.Directory and index is not None:
            found.append((index, entry.path))
    return sorted(found)


def reported_metrics(filesystem, trial_path: str, checkpoint_name: str) -> dict:
    """The result the trial reported with ``checkpoint_name`` (its result.json line), or {}."""
    try:
        with filesystem.open_input_stream(posixpath.join(trial_path, RESULT_FILE)) as stream:
            lines = stream.readall().decode(errors="replace").splitlines()
    except (OSError, FileNotFoundError):
        return {}
    for line in reversed(lines):
        try:
            result = json.loads(line)
        except ValueError:  # a line cut off by the kill
            continue
        if result.get("checkpoint_dir_name") == checkpoint_name:
            return result
    return {}


def _last_epoch_of(checkpoint) -> dict:
    """The metrics of the last epoch a checkpoint's state holds ({} if it holds none)."""
    history = (restored_state(checkpoint) or {}).get("history") or []
    return dict(history[-1]) if history else {}


def continue_from_saved_checkpoint(trial) -> tuple[str, str] | None:
    """Point a restored Tune trial whose checkpoint is gone at the next one on storage.

    Returns the (missing, used) folder names, or None when nothing needed mending (or nothing could).
    Ray has no public way to do this; the fields set are those ``Trial.on_checkpoint`` sets.
    """
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint

    latest = trial.latest_checkpoint_result
    if latest is None or latest.checkpoint is None:
        return None
    filesystem, missing = latest.checkpoint.filesystem, latest.checkpoint.path.rstrip("/")
    missing_index = checkpoint_index(missing)
    if missing_index is None or holds_state(filesystem, missing):
        return None
    trial_path = posixpath.dirname(missing)
    saved = saved_checkpoints(filesystem, trial_path)
    newer = [path for index, path in saved if index > missing_index and holds_state(filesystem, path)]
    if not newer:
        return None
    name, checkpoint = posixpath.basename(newer[0]), Checkpoint(newer[0], filesystem)
    # Tune restores the trial's last result from these metrics, and a trial resumed after its last
    # epoch trains no more and ends with them: the line reported with that checkpoint, or (result.json
    # reaches the storage with the snapshot, so it may lack it) the epoch the state itself ends at
    metrics = reported_metrics(filesystem, trial_path, name) or _last_epoch_of(checkpoint) or dict(latest.metrics or {})
    mended = _TrainingResult(checkpoint=checkpoint, metrics=metrics)
    manager = trial.run_metadata.checkpoint_manager
    manager._checkpoint_results = [mended]
    manager._latest_checkpoint_result = mended
    # the index of the last checkpoint written: the trial's next one goes after every folder there
    trial.storage.current_checkpoint_index = saved[-1][0]
    trial.invalidate_json_state()
    trial.run_metadata.invalidate_cache()
    return posixpath.basename(missing), name


class ContinueFromSavedCheckpoint(Callback):
    """On the first step of a (resumed) experiment, before any trial is restored, mends the trials
    whose snapshot names a checkpoint that was deleted after the snapshot was taken."""

    def __init__(self):
        self._checked = False

    def __getstate__(self):  # pickled in tuner.pkl and unpickled on --resume: every driver checks once
        return {}

    def __setstate__(self, state):
        self.__init__()

    def on_step_begin(self, iteration, trials, **info):
        if self._checked:
            return
        self._checked = True
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                continue
            try:
                mended = continue_from_saved_checkpoint(trial)
            except Exception as err:  # noqa: BLE001 - a storage hiccup here must not stop the resume
                print(f"{trial}: could not check its saved checkpoint ({type(err).__name__}: {err}); "
                      "Tune restores it as saved", file=sys.stderr)
                continue
            if mended is not None:
                print(f"{trial}: its saved {mended[0]} was replaced just before the driver stopped; "
                      f"it continues from {mended[1]}", file=sys.stderr)
