"""A finished trial's checkpoints are deleted as soon as it finishes (a Ray Tune callback on the driver).

A trial's checkpoint (its resumable state: model, AdamW moments, best weights; about 165 MB for
UNet-ResNet18) exists to continue the trial after a crash or an interrupted sweep. Once the trial
has finished (it ran its epochs, ASHA stopped it, or it failed with a recorded reason) nothing
reads it again: ``--resume`` restarts only unfinished trials, and the retrain trains the best
configuration from scratch. Kept, they would grow with the sweep (2,000 trials x 165 MB = 330 GB);
deleted, the sweep holds checkpoints only for the trials running now. Trials that end in ``ERROR``
(crashed more than ``--max-failures`` times) keep theirs, for a look at what they had reached.

A data-parallel trial's checkpoints are Ray Train's, in the trial's ``train/`` folder; they go too.
Deletion uses the checkpoint's own pyarrow filesystem (the storage's), so a URI storage (``s3://``,
``gs://``) is cleaned like a local folder, in one background thread, so a slow object store never
holds up the driver's loop; the end of the experiment waits for it.
"""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor

from ray.tune import Callback

from search.trainable import TRAIN_DIR

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint_"  # Tune's checkpoint folders in a trial's folder


def delete_trial_checkpoints(filesystem, trial_path: str) -> int:
    """Delete every ``checkpoint_*`` folder directly under ``trial_path`` on ``filesystem``; how many."""
    from pyarrow.fs import FileSelector, FileType

    entries = filesystem.get_file_info(FileSelector(trial_path, allow_not_found=True))
    doomed = [e.path for e in entries if e.type == FileType.Directory and posixpath.basename(e.path).startswith(CHECKPOINT_PREFIX)]
    for path in doomed:
        filesystem.delete_dir(path)
    return len(doomed)


class DeleteFinishedCheckpoints(Callback):
    """Deletes a trial's checkpoints once Tune's saved experiment state records it finished.

    Not at once: until Tune's next snapshot of the experiment (``get_state`` is called while one is
    written) a driver that dies would come back believing the trial unfinished and restart it from
    those checkpoints. So a trial completed before snapshot k is deleted at snapshot k + 1 (by then
    snapshot k is on the storage), and everything left at the end of the experiment, after Tune's
    final snapshot.
    """

    def __init__(self):
        self._executor: ThreadPoolExecutor | None = None
        self._finished: list[tuple] = []  # completed since the last snapshot
        self._recorded: list[tuple] = []  # completed before the last snapshot: deleted at the next one
        self.deleted = 0  # checkpoint folders deleted

    def __getstate__(self):  # Tune pickles callbacks with the experiment state
        return {}

    def __setstate__(self, state):
        self.__init__()

    def on_trial_complete(self, iteration, trials, trial, **info):
        checkpoint = trial.checkpoint  # the latest one, registered before Tune completes the trial
        if checkpoint is not None:
            filesystem, trial_path = checkpoint.filesystem, posixpath.dirname(checkpoint.path.rstrip("/"))
        else:  # none through Tune; a data-parallel trial keeps Ray Train's in its train/ folder
            filesystem, trial_path = trial.storage.storage_filesystem, trial.path
        self._finished.append((filesystem, [trial_path, posixpath.join(trial_path, TRAIN_DIR)], str(trial)))

    def get_state(self):  # Tune is writing a snapshot of the experiment
        doomed, self._recorded, self._finished = self._recorded, self._finished, []
        self._submit(doomed)
        # nothing to restore: no return value

    def on_experiment_end(self, trials, **info):  # after Tune's final snapshot
        doomed, self._recorded, self._finished = self._recorded + self._finished, [], []
        self._submit(doomed)
        self.wait()

    def wait(self) -> None:
        """Until every deletion asked for so far is done."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _submit(self, doomed: list[tuple]) -> None:
        if not doomed:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delete-checkpoints")
        self._executor.submit(self._delete, doomed)

    def _delete(self, doomed: list[tuple]) -> None:
        for filesystem, folders, name in doomed:
            for folder in folders:
                try:
                    self.deleted += delete_trial_checkpoints(filesystem, folder)
                except Exception as err:  # noqa: BLE001 - a checkpoint left behind costs disk, not results
                    logger.warning("%s: could not delete its checkpoints under %s (%s)", name, folder, err)
