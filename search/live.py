"""What ``search.run`` prints while the sweep runs and when it ends (no Ray import).

While it runs, one line per event (``search.callbacks.LiveViewCallback``):

    trial_002 start   resize 64  loss dice  lr 1.96e-03  warmup 0  wd 2.0e-05
    trial_002 RUNNING        epoch 1/4  val_dice 0.0651  best 0.0651  resize 64  loss dice
    trial_002 STOPPED_EARLY  epoch 2/4  val_dice 0.0856  best 0.0856  resize 64  loss dice
    -- 3/6 trials done, 2/2 slots busy, best 0.0856 (trial_002), 0:44 elapsed, ETA ~1:30

Status words are trials.csv's (``search.trials``). At the end, ``closing_block`` says what was
found, where it is, and the commands that come next.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from search.rundir import FINAL_DIR, TRIALS_CSV
from search.trials import FINISHED


def clock(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _num(value, fmt: str) -> str:
    return "-" if value is None or value != value else format(value, fmt)


def start_line(name: str, config: dict) -> str:
    parts = [f"resize {config.get('resize_px')}", f"loss {config.get('loss_type')}"]
    if config.get("loss_type") == "dice_bce":
        parts.append(f"(dice {_num(config.get('dice_weight'), '.2f')} + bce {_num(config.get('bce_weight'), '.2f')})")
    parts += [f"lr {_num(config.get('lr'), '.2e')}", f"warmup {config.get('warmup_epochs')}",
              f"wd {_num(config.get('weight_decay'), '.1e')}"]
    return f"{name} start   " + "  ".join(parts)


def trial_line(name: str, status: str, row: dict, max_epochs: int) -> str:
    """One trial's state: status, epoch/budget, this epoch's and the best val Dice, resize, loss."""
    line = (f"{name} {status:<14s} epoch {int(row.get('epochs_run') or 0)}/{max_epochs}  "
            f"val_dice {_num(row.get('last_val_dice'), '.4f')}  best {_num(row.get('best_val_dice'), '.4f')}  "
            f"resize {row.get('resize_px')}  loss {row.get('loss_type')}")
    if row.get("failure_reason"):
        line += f"  ({row['failure_reason']})"
    return line


class SweepProgress:
    """The header line's numbers: best so far, trials done, slots busy, elapsed and ETA."""

    def __init__(self, total_trials: int, slots: int, started_s: float | None = None):
        self.total_trials = total_trials
        self.slots = slots
        self.started_s = time.monotonic() if started_s is None else started_s
        self.done_at_start: set[str] = set()  # ids of the trials an earlier run of a resumed sweep finished
        self.rows: dict[str, tuple[str, dict]] = {}  # trial id -> (name, latest row)

    def update(self, trial_id: str, name: str, row: dict) -> None:
        self.rows[trial_id] = (name, row)

    def header(self, now_s: float | None = None) -> str:
        now_s = time.monotonic() if now_s is None else now_s
        rows = [row for _, row in self.rows.values()]
        # this run's finished trials, and the earlier run's (one kept finished on resume ends again here)
        new_done = sum(row["status"] in FINISHED for trial_id, (_, row) in self.rows.items() if trial_id not in self.done_at_start)
        done = len(self.done_at_start) + new_done
        busy = sum(row["status"] == "RUNNING" for row in rows)
        elapsed = now_s - self.started_s
        scored = [(row["best_val_dice"], name) for name, row in self.rows.values()
                  if row.get("best_val_dice") is not None and row["best_val_dice"] == row["best_val_dice"]
                  and row["status"] not in ("FAILED", "ERROR")]
        top = min(scored, key=lambda s: (-s[0], s[1]), default=None)  # ties: the earlier trial
        best = f"best {top[0]:.4f} ({top[1]})" if top else "best -"
        if done >= self.total_trials:
            eta = ""
        elif new_done:
            eta = f", ETA ~{clock(elapsed / new_done * (self.total_trials - done))}"
        else:
            eta = ", ETA after the first trial"
        return (f"-- {done}/{self.total_trials} trials done, {busy}/{self.slots} slots busy, {best}, "
                f"{clock(elapsed)} elapsed{eta}")


def closing_block(run_dir: Path, name: str, storage: str, best: dict | None, summary: dict | None,
                  report: Path | None) -> str:
    """The end of a run: the best configuration and its test metrics, where things are, what to run next."""
    run_dir = Path(run_dir)
    lines = ["", "done."]
    if best is not None:
        params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in best["params"].items())
        lines.append(f"  best trial   trial_{best['trial_index']:03d}: val dice {best['best_val_dice']:.4f}  ({params})")
    test = (summary or {}).get("best") or (summary or {}).get("seed_recipe")
    if test:
        recipe = "best" if "best" in summary else "seed_recipe"
        metrics = test["test"]
        seeds = len(test["seeds"])
        values = "  ".join(f"{k} {metrics[k]['mean']:.4f}" + (f" +- {metrics[k]['std']:.4f}" if seeds > 1 else "")
                           for k in ("dice", "f1", "precision", "recall"))
        lines.append(f"  test ({recipe}, {seeds} seed{'s' if seeds > 1 else ''})  {values}")
        shipped = summary.get("final_model")
        if shipped:
            members, entry = len(shipped["members"]), summary.get(shipped["recipe"], test)
            what = f"ensemble of {members} + post-processing" if members > 1 else "+ post-processing"
            of = "" if shipped["recipe"] == recipe else f" of the {shipped['recipe'].replace('_', ' ')} (better on validation)"
            lines.append(f"  shipped      {what}{of} ({entry.get('postprocess_describe', '?')}): test dice "
                         f"{shipped['test']['dice']:.4f}  {run_dir / FINAL_DIR / shipped['postprocess']}")
    model = run_dir / FINAL_DIR / "model.pt"
    if model.is_file():
        lines.append(f"  model        {model}")
    lines.append(f"  trials       {run_dir / TRIALS_CSV}")
    if report is not None:
        lines.append(f"  report       {report}")
    lines.append("next:")
    shipped_dir = run_dir / FINAL_DIR / "model"  # the ensemble + post-processing that test scored
    if shipped_dir.is_dir() or model.is_file():
        source = shlex.quote(str(run_dir if shipped_dir.is_dir() else model))
        lines.append(f"  predict      python -m tumorseg.predict {source} IMAGES_OR_FOLDER --out predictions/")
    if shipped_dir.is_dir():
        lines.append(f"  export       python -m tumorseg.export {shlex.quote(str(run_dir))}   (ONNX + model card; needs .[onnx])")
    lines.append(f"  report       python -m search.report {shlex.quote(str(run_dir))}")
    lines.append(f"  resume       python -m search.run --name {shlex.quote(name)} --storage {shlex.quote(storage)} --resume")
    return "\n".join(lines)
