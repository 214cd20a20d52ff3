"""Trials on the sweep's storage across a ``--resume``: checkpoints mended, finished trials kept finished.

Tune keeps the latest two checkpoints of a trial (``CheckpointConfig(num_to_keep=2)``, see
``search.tuner``; with 1 it snapshots the whole experiment after every checkpoint). A trial's
checkpoint (its resumable state: model, AdamW moments, best weights; about 165 MB for
UNet-ResNet18) exists to continue the trial after a crash or an interrupted sweep. Two Ray Tune
callbacks on the driver look after trials and their checkpoints; ``search.tuner.make_tuner``
registers both.

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

``RecordTrialEnds``: when a trial has finished (it ran its epochs, ASHA stopped it, or it failed with
a recorded reason) its last result is written to ``end.json`` in its folder, at once and before the
study and trials.csv are told. Tune's snapshot is written only now and then (about once per
epoch-time of the sweep, or every 10 s), and a snapshot per finished trial would cost O(trials) each,
O(trials^2) over a sweep; the record costs one small file per trial. ``--resume`` trusts it: a trial
the snapshot still shows unfinished but with an ``end.json`` ends as recorded, without training
again. Then nothing reads the trial's checkpoints again (the retrain trains the best configuration
from scratch); kept, they would grow with the sweep (2,000 trials x 165 MB = 330 GB), so they are
deleted and the sweep holds checkpoints only for the trials running now. Trials that end in
``ERROR`` (crashed more than ``--max-failures`` times) keep theirs, for a look at what they had
reached; ``--keep-checkpoints`` keeps everything. A data-parallel trial's checkpoints are Ray
Train's, in the trial's ``train/`` folder; they go too. Writing and deleting use the storage's
pyarrow filesystem, so a URI storage (``s3://``, ``gs://``) is handled like a local folder;
deletions run in one background thread, so a slow object store never holds up the driver's loop.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from ray.tune import Callback

from search.rundir import TRIAL_END_JSON, read_trial_end, write_trial_end
from search.trainable import STATE_FILE, TRAIN_DIR, restored_state

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint_"  # Tune's checkpoint folders in a trial's folder (and partial ones)
CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)$")  # a complete name: its index
RESULT_FILE = "result.json"  # Tune's per-trial results, one JSON line per report
LOGGED_FILES = (RESULT_FILE, "progress.csv")  # what Tune's loggers write per trial (JSON lines, CSV rows)


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
    # Tune restores the trial's last result from these metrics: the line reported with that
    # checkpoint, or (result.json reaches the storage with the snapshot, so it may lack it) the epoch
    # the state itself ends at
    metrics = reported_metrics(filesystem, trial_path, name) or _last_epoch_of(checkpoint) or dict(latest.metrics or {})
    # the index of the last checkpoint written: the trial's next one goes after every folder there
    trial.storage.current_checkpoint_index = saved[-1][0]
    _restore_from(trial, _TrainingResult(checkpoint=checkpoint, metrics=metrics))
    return posixpath.basename(missing), name


def _restore_from(trial, checkpoint_result) -> None:
    """Make ``checkpoint_result`` the one Tune restores the trial from (None: none, a fresh start).
    Ray has no public way to do this; the fields set are those ``Trial.on_checkpoint`` sets."""
    manager = trial.run_metadata.checkpoint_manager
    manager._checkpoint_results = [checkpoint_result] if checkpoint_result is not None else []
    manager._latest_checkpoint_result = checkpoint_result
    trial.invalidate_json_state()
    trial.run_metadata.invalidate_cache()


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


class RecordTrialEnds(Callback):
    """Records each finished trial on the storage, and on ``--resume`` keeps it finished; deletes its checkpoints.

    When a trial ends (it ran its epochs, ASHA stopped it, or it failed with a recorded reason) its
    results are copied to the storage and its last result goes to ``end.json`` in its folder
    (``search.rundir.write_trial_end``), in the driver's loop, before the study and trials.csv are
    told (this callback comes first). Tune's experiment snapshot, which
    ``--resume`` restores, is written only now and then, so a driver killed in between would bring the
    trial back unfinished and train it again. On the resumed driver's first step, before Tune starts
    any trial, a restored unfinished trial with an ``end.json`` gets that last result back and loses
    its checkpoint; the trainable (``search.trainable.tune_trainable``) finds the same file and returns
    at once, so the trial ends as it had, nothing trained or reported twice. Then, unless
    ``delete_checkpoints`` is off (``--keep-checkpoints``), its checkpoints are deleted in a background
    thread (a slow object store never holds up the driver's loop; the end of the experiment waits for
    it), as are those of trials that came back finished from the snapshot with no end event.
    """

    def __init__(self, delete_checkpoints: bool = True):
        self.delete_checkpoints = delete_checkpoints
        self._executor: ThreadPoolExecutor | None = None
        self._restored_checked = False
        self.deleted = 0  # checkpoint folders deleted

    def __getstate__(self):  # pickled in tuner.pkl and unpickled on --resume
        return {"delete_checkpoints": self.delete_checkpoints}

    def __setstate__(self, state):
        self.__init__(**state)

    def on_step_begin(self, iteration, trials, **info):
        if self._restored_checked:
            return
        self._restored_checked = True
        for trial in trials:
            if trial.status == "TERMINATED":  # finished before the last snapshot; its deletion may not have run
                self._delete(trial)
                continue
            if trial.status == "ERROR":
                continue
            try:
                kept = restore_recorded_end(trial)
            except Exception as err:  # noqa: BLE001 - a storage hiccup here must not stop the resume
                print(f"{trial}: could not read its {TRIAL_END_JSON} ({type(err).__name__}: {err}); "
                      "Tune restores it as saved", file=sys.stderr)
                continue
            if kept:
                print(f"{trial}: it had finished before the driver stopped ({TRIAL_END_JSON}); "
                      "it ends as it had, without training again", file=sys.stderr)

    def on_trial_complete(self, iteration, trials, trial, **info):
        try:
            upload_logs(trial)  # first: the storage's results are whole whenever the end is recorded
            write_trial_end(trial.storage.storage_filesystem, trial.path, trial.last_result)
        except Exception as err:  # noqa: BLE001 - the sweep goes on; a --resume would train it again
            logger.warning("%s: could not record its end under %s (%s)", trial, trial.path, err)
            return
        self._delete(trial)

    def on_experiment_end(self, trials, **info):
        self.wait()

    def wait(self) -> None:
        """Until every deletion asked for so far is done."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _delete(self, trial) -> None:
        if not self.delete_checkpoints:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delete-checkpoints")
        folders = [trial.path, posixpath.join(trial.path, TRAIN_DIR)]
        self._executor.submit(self._delete_folders, trial.storage.storage_filesystem, folders, str(trial))

    def _delete_folders(self, filesystem, folders: list[str], name: str) -> None:
        for folder in folders:
            try:
                self.deleted += delete_trial_checkpoints(filesystem, folder)
            except Exception as err:  # noqa: BLE001 - a checkpoint left behind costs disk, not results
                logger.warning("%s: could not delete its checkpoints under %s (%s)", name, folder, err)


def upload_logs(trial) -> None:
    """Copy the trial's result.json and progress.csv from the driver's staging folder to the storage.

    Tune's loggers write them in the staging folder and sync them to the storage with its experiment
    snapshots, now and then; a trial that ended since would otherwise be recorded finished with its
    last epochs missing from the storage's copies.
    """
    _copy_logged(trial, upload=True)


def _copy_logged(trial, upload: bool) -> None:
    """Tune's per-trial logs between the driver's staging folder and the storage: up, or down where
    the staging folder lacks them; a file that is the same on both sides stays."""
    from pyarrow.fs import FileType, LocalFileSystem, copy_files

    storage, local = trial.storage.storage_filesystem, LocalFileSystem()
    for name in LOGGED_FILES:
        staged, stored = os.path.join(trial.local_path, name), posixpath.join(trial.path, name)
        if storage.type_name == "local" and os.path.exists(staged) and os.path.exists(stored) and os.path.samefile(staged, stored):
            continue
        if upload and os.path.isfile(staged):
            copy_files(staged, stored, source_filesystem=local, destination_filesystem=storage)
        elif not upload and not os.path.exists(staged) and storage.get_file_info(stored).type == FileType.File:
            os.makedirs(trial.local_path, exist_ok=True)
            copy_files(stored, staged, source_filesystem=storage, destination_filesystem=local)


def restore_recorded_end(trial) -> bool:
    """If a restored, unfinished Tune trial had in fact finished (its ``end.json`` is there), give it
    back its recorded last result and no checkpoint to restore (its checkpoints may be deleted);
    whether it had.

    Tune's loggers append to a trial's ``result.json`` and ``progress.csv`` in the driver's staging
    folder and copy that over the storage's; they fetch the storage's first only for a trial with a
    checkpoint. This one has none, so they are fetched here, or its results would start empty.
    """
    end = read_trial_end(trial.storage.storage_filesystem, trial.path)
    if end is None:
        return False
    trial.update_last_result(end)
    _restore_from(trial, None)
    _copy_logged(trial, upload=False)
    return True
