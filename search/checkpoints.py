"""Trial checkpoints on the sweep's storage: mended on ``--resume``, deleted once a trial is finished.

Tune keeps the latest two checkpoints of a trial (``CheckpointConfig(num_to_keep=2)``, see
``search.tuner``; with 1 it snapshots the whole experiment after every checkpoint). A trial's
checkpoint (its resumable state: model, AdamW moments, best weights; about 165 MB for
UNet-ResNet18) exists to continue the trial after a crash or an interrupted sweep. Two Ray Tune
callbacks on the driver look after them; ``search.tuner.make_tuner`` registers both.

``ContinueFromSavedCheckpoint``: when a trial reports a checkpoint beyond the two kept, Tune
registers it and deletes the oldest at once, and writes the experiment snapshot that names the
newer ones later (snapshots are spaced out; with 2 kept, about once per epoch-time of the sweep).
A driver killed in between (SIGKILL, a lost ssh session, the OOM killer) can leave a snapshot that
names a deleted checkpoint; Tune's restore then fails that trial ("Could not recover from
checkpoint as it does not exist on storage anymore") on every retry, and a trial that was nearly
done ends ``ERROR``. This callback mends that before Tune starts the restored trials: such a trial
continues from the oldest checkpoint beside the named one with a higher index. That one had been
registered (a checkpoint is deleted only once two newer ones are), so it was complete; a still
newer one may have been cut off mid-upload by the kill. The trial's next checkpoint is numbered
after every folder there.

``DeleteFinishedCheckpoints``: once a trial has finished (it ran its epochs, ASHA stopped it, or it
failed with a recorded reason) nothing reads its checkpoints again: ``--resume`` restarts only
unfinished trials (the mending above skips finished ones), and the retrain trains the best
configuration from scratch. Kept, they would grow with the sweep (2,000 trials x 165 MB = 330 GB);
deleted, the sweep holds checkpoints only for the trials running now. They go once Tune's
experiment snapshot on the storage records the trial finished, never before, so a resumed driver
never restarts a trial whose checkpoints are gone. Trials that end in ``ERROR`` (crashed more than
``--max-failures`` times) keep theirs, for a look at what they had reached; ``--keep-checkpoints``
keeps everything. A data-parallel trial's checkpoints are Ray Train's, in the trial's ``train/``
folder; they go too. Deletion uses the checkpoint's own pyarrow filesystem (the storage's), so a
URI storage (``s3://``, ``gs://``) is cleaned like a local folder, in one background thread, so a
slow object store never holds up the driver's loop; the end of the experiment waits for it.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import posixpath
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from ray.tune import Callback

from search.trainable import STATE_FILE, TRAIN_DIR, restored_state

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint_"  # Tune's checkpoint folders in a trial's folder (and partial ones)
CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)$")  # a complete name: its index
RESULT_FILE = "result.json"  # Tune's per-trial results, one JSON line per report
SNAPSHOT_PATTERN = "experiment_state-*.json"  # Tune's experiment snapshots, one per driver session


# ----------------------------------------------------------------------------- --resume: a named checkpoint gone


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


# ----------------------------------------------------------------------------- finished trials: checkpoints deleted


def delete_trial_checkpoints(filesystem, trial_path: str) -> int:
    """Delete every ``checkpoint_*`` folder directly under ``trial_path`` on ``filesystem``; how many."""
    from pyarrow.fs import FileSelector, FileType

    entries = filesystem.get_file_info(FileSelector(trial_path, allow_not_found=True))
    doomed = [e.path for e in entries if e.type == FileType.Directory and posixpath.basename(e.path).startswith(CHECKPOINT_PREFIX)]
    for path in doomed:
        filesystem.delete_dir(path)
    return len(doomed)


def recorded_finished(filesystem, experiment_path: str) -> set[str] | None:
    """Ids of the trials that the newest experiment snapshot on the storage records TERMINATED
    (None: no snapshot there, or one being written; Ray's own format, read as Tune's restore reads it)."""
    from pyarrow.fs import FileSelector

    entries = filesystem.get_file_info(FileSelector(experiment_path, allow_not_found=True))
    snapshots = sorted(e.path for e in entries if fnmatch.fnmatch(posixpath.basename(e.path), SNAPSHOT_PATTERN))
    if not snapshots:
        return None
    try:
        with filesystem.open_input_stream(snapshots[-1]) as stream:
            state = json.loads(stream.readall())
        trials = [json.loads(trial_json) for trial_json, _ in state["trial_data"]]
    except (OSError, ValueError, KeyError, TypeError):  # being written, or cut off
        return None
    return {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}


class DeleteFinishedCheckpoints(Callback):
    """Deletes a trial's checkpoints once Tune's experiment snapshot on the storage records it finished.

    Not at once: until the snapshot on the storage says so, a driver that dies would come back
    believing the trial unfinished and restore it from those checkpoints. Whenever Tune writes a
    snapshot (``get_state`` is called while it does) and at the end of the experiment (after Tune's
    final snapshot, written and uploaded), a background thread reads the newest snapshot on the
    storage and deletes the checkpoints of the finished trials it records; the others wait for a
    later one (an upload still running, or skipped by Tune's syncer, only delays them). A trial that
    finished just before a killed driver's last snapshot comes back finished on ``--resume`` without
    a completion event: the resumed driver queues those on its first step.
    """

    def __init__(self):
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pending: list[tuple] = []  # (trial id, filesystem, folders, name) finished, not yet deleted
        self._experiment: tuple | None = None  # (filesystem, path) of the experiment folder on the storage
        self._resumed_checked = False
        self.deleted = 0  # checkpoint folders deleted

    def __getstate__(self):  # pickled in tuner.pkl and unpickled on --resume
        return {}

    def __setstate__(self, state):
        self.__init__()

    def on_step_begin(self, iteration, trials, **info):
        if not self._resumed_checked:  # finished before the last snapshot of a stopped driver
            self._resumed_checked = True
            for trial in trials:
                if trial.status == "TERMINATED":
                    self._queue(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._queue(trial)

    def get_state(self):  # Tune is writing a snapshot of the experiment
        self._submit()
        # nothing to restore: no return value

    def on_experiment_end(self, trials, **info):  # after Tune's final snapshot (none if the loop failed)
        self._submit()
        self.wait()

    def wait(self) -> None:
        """Until every deletion asked for so far is done."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _queue(self, trial) -> None:
        checkpoint = trial.checkpoint  # the latest one, registered before Tune completes the trial
        if checkpoint is not None:
            filesystem, trial_path = checkpoint.filesystem, posixpath.dirname(checkpoint.path.rstrip("/"))
        else:  # none through Tune; a data-parallel trial keeps Ray Train's in its train/ folder
            filesystem, trial_path = trial.storage.storage_filesystem, trial.path
        if self._experiment is None:
            self._experiment = (trial.storage.storage_filesystem, trial.storage.experiment_fs_path)
        with self._lock:
            self._pending.append((trial.trial_id, filesystem, [trial_path, posixpath.join(trial_path, TRAIN_DIR)], str(trial)))

    def _submit(self) -> None:
        if not self._pending:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delete-checkpoints")
        self._executor.submit(self._delete_recorded)

    def _delete_recorded(self) -> None:
        try:
            recorded = recorded_finished(*self._experiment) or set()
        except Exception as err:  # noqa: BLE001 - a checkpoint left behind costs disk, not results
            logger.warning("could not read Tune's experiment snapshot on the storage (%s); checkpoints kept for now", err)
            return
        with self._lock:
            doomed = [p for p in self._pending if p[0] in recorded]
            self._pending = [p for p in self._pending if p[0] not in recorded]
        for _, filesystem, folders, name in doomed:
            for folder in folders:
                try:
                    self.deleted += delete_trial_checkpoints(filesystem, folder)
                except Exception as err:  # noqa: BLE001 - a checkpoint left behind costs disk, not results
                    logger.warning("%s: could not delete its checkpoints under %s (%s)", name, folder, err)
