"""One training run, free of Ray: the accelerator, one epoch, evaluation and ``train``.

``train`` trains on ``data["train"]``, evaluates on ``data["valid"]`` after every epoch and keeps
the weights with the best validation Dice. Its ``on_epoch`` callback gets each epoch's metrics and
a function returning the full resumable state (see ``snapshot``); ``resume_state`` continues from one.
"""

from __future__ import annotations

import copy
import functools
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from tumorseg.checkpoint import plain_state_dict, to_cpu_copy
from tumorseg.config import TrainConfig
from tumorseg.data import Split
from tumorseg.inference import bf16_supported, forward_logits, to_input, to_native, uses_bf16
from tumorseg.losses import create_loss
from tumorseg.metrics import SegmentationMeter
from tumorseg.model import create_model, load_encoder_state
from tumorseg.schedule import WarmupThenPlateau
from tumorseg.transforms import AugmentedArrays, seed_worker, train_transform


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; training stops at once."""


class TrainingOOMError(RuntimeError):
    """The device ran out of memory; retrying the same configuration would fail again."""


# ----------------------------------------------------------------------------- device, data


def select_mixed_precision(cfg: TrainConfig) -> str:
    """Accelerate's ``mixed_precision`` for ``cfg.precision`` on this machine ("bf16" or "no")."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.precision == "bf16" and not bf16_supported(device):
        print("warning: bf16 is not supported on this device; training in fp32", file=sys.stderr)
    return "bf16" if uses_bf16(cfg, device) else "no"


def make_accelerator(cfg: TrainConfig):
    """A fresh ``Accelerator`` for this run (several runs may share one process)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    # Accelerate keeps process-wide state; reset it (not the distributed part) between runs.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # LOCAL_RANK alone (set by launchers) would mean "a GPU each"
        mixed_precision=select_mixed_precision(cfg),
        step_scheduler_with_optimizer=False,
        # data-parallel: batch_size stays the global batch, each process gets its slice
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def build_train_loader(split: Split, cfg: TrainConfig) -> torch.utils.data.DataLoader:
    dataset = AugmentedArrays(split.images, split.masks, train_transform(cfg, seed=cfg.seed))
    generator = torch.Generator().manual_seed(cfg.seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(dataset) > cfg.batch_size,  # no 1-image batches for BatchNorm
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=seed_worker,
        generator=generator,
    )


# ----------------------------------------------------------------------------- one epoch, evaluation


def all_finite(finite: torch.Tensor, accelerator) -> bool:
    """Whether the loss stayed finite on every process: all ranks stop together (a rank that left
    alone would leave the others waiting in the next gradient all-reduce until the timeout)."""
    bad = (~finite).to(torch.float32)
    return bool(accelerator.reduce(bad, "sum").item() == 0) if accelerator.num_processes > 1 else bool(finite)


def train_one_epoch(model, loader, criterion, optimizer, schedule, accelerator, cfg: TrainConfig) -> dict:
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
    images_seen, start, first_step_ts = 0, time.perf_counter(), None
    for step, (images, masks) in enumerate(loader):
        x = to_input(images, accelerator.device, cfg.channels_last)
        y = masks.to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        schedule.step_batch()
        if first_step_ts is None:
            first_step_ts = time.time()  # wall clock: start-up latency is measured against the driver's clock
        loss_sum += loss.detach()
        finite &= torch.isfinite(loss.detach())
        images_seen += len(images)
        if step % 10 == 9 and not all_finite(finite, accelerator):  # sync with the device only every 10 steps
            break
    if not all_finite(finite, accelerator):
        raise NonFiniteLossError(f"training loss became non-finite (lr {optimizer.param_groups[0]['lr']:.3g})")
    elapsed = time.perf_counter() - start
    loss_mean = accelerator.reduce(loss_sum, "mean").item()  # the mean over processes
    return {
        "train_loss": loss_mean / max(1, len(loader)),
        "train_images_per_s": images_seen * accelerator.num_processes / elapsed,
        "train_time_s": elapsed,
        "first_step_ts": first_step_ts,
    }


@torch.no_grad()
def evaluate(model, split: Split, cfg: TrainConfig, criterion=None, shard: tuple[int, int] = (0, 1)) -> tuple[dict, np.ndarray]:
    """Metrics of ``model`` on ``split`` at native resolution (see ``tumorseg.metrics``).

    Runs on the model's device at the one evaluation precision (``tumorseg.inference``): validation
    and the test pass score alike. Returns ``(metrics, per_image_counts)``; with ``criterion``,
    ``metrics["loss"]`` is the training loss at training resolution (what ReduceLROnPlateau watches).
    ``shard=(rank, world)``: this process scores its slice of the images and the counts of all
    processes are gathered, so every process returns the metrics of the whole split.
    """
    model.eval()
    meter = SegmentationMeter(threshold=cfg.threshold)
    loss_sum, batches = 0.0, 0
    rank, world = shard
    first, last = (len(split) * rank) // world, (len(split) * (rank + 1)) // world
    for start in range(first, last, cfg.eval_batch_size):
        index = slice(start, min(start + cfg.eval_batch_size, last))
        logits = forward_logits(model, split.images[index], cfg)
        target = torch.from_numpy(np.array(split.masks[index])[:, None]).to(logits.device)
        meter.update_soft(logits, target)
        if criterion is not None:
            loss_sum += criterion(logits, target).item()
            batches += 1
        meter.update(to_native(logits, split.native_hw), torch.from_numpy(split.native_mask(index)[:, None]).to(logits.device))
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, (meter.counts, meter.soft, loss_sum, batches))
        meter.counts = [c for part in parts for c in part[0]]  # rank order = image order
        meter.soft = sum(part[1] for part in parts)
        loss_sum, batches = sum(part[2] for part in parts), sum(part[3] for part in parts)
    metrics = meter.compute()
    if criterion is not None:
        metrics["loss"] = loss_sum / max(1, batches)
    return metrics, meter.per_image_counts


# ----------------------------------------------------------------------------- run state


@dataclass
class RunProgress:
    """Where a run stands after its last finished epoch (all of it goes into the resume state)."""

    epoch: int = 0  # epochs finished
    best_val_dice: float = -1.0
    best_epoch: int = 0
    best_model: dict | None = None  # CPU copy of the best weights
    best_val_metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def record(self, epoch: int, lr: float, train_stats: dict, val: dict, model) -> tuple[dict, bool]:
        """Add epoch ``epoch`` (1-based) to the history; returns its metrics and whether it is the best yet."""
        improved = val["dice"] > self.best_val_dice
        if improved:
            self.best_val_dice, self.best_epoch, self.best_val_metrics = val["dice"], epoch, val
            self.best_model = to_cpu_copy(plain_state_dict(model))
        metrics = {
            "epoch": epoch,
            "lr": lr,
            **train_stats,
            **{f"val_{k}": v for k, v in val.items()},
            "best_val_dice": self.best_val_dice,
            "best_epoch": self.best_epoch,
        }
        self.history.append(metrics)
        self.epoch = epoch
        return metrics, improved


def restore(resume_state: dict, model, optimizer, schedule) -> RunProgress:
    """Load a ``snapshot`` into the (not yet prepared) model, optimiser and schedule."""
    model.load_state_dict(resume_state["model"])
    optimizer.load_state_dict(resume_state["optimizer"])
    schedule.load_state_dict(resume_state["schedule"])
    return RunProgress(
        epoch=resume_state["epoch"],
        best_val_dice=resume_state["best_val_dice"],
        best_epoch=resume_state["best_epoch"],
        best_model=resume_state["best_model"],
        best_val_metrics=dict(resume_state["best_val_metrics"]),
        history=list(resume_state["history"]),
    )


def snapshot(cfg: TrainConfig, run: RunProgress, model, optimizer, schedule, improved: bool) -> dict:
    """Everything needed to continue after ``run.epoch`` (copies, on CPU, plain state-dict keys)."""
    return {
        "config": cfg.to_dict(),
        "epoch": run.epoch,
        "model": run.best_model if improved else to_cpu_copy(plain_state_dict(model)),
        "optimizer": to_cpu_copy(optimizer.state_dict()),
        "schedule": copy.deepcopy(schedule.state_dict()),
        "best_val_dice": run.best_val_dice,
        "best_epoch": run.best_epoch,
        "best_model": run.best_model,
        "best_val_metrics": dict(run.best_val_metrics),
        "history": [dict(h) for h in run.history],
    }


def epoch_line(cfg: TrainConfig, metrics: dict, improved: bool) -> str:
    return (
        f"epoch {metrics['epoch']:3d}/{cfg.epochs}  lr {metrics['lr']:.2e}  train_loss {metrics['train_loss']:.4f}  "
        f"val_loss {metrics['val_loss']:.4f}  val_dice {metrics['val_dice']:.4f}  val_f1 {metrics['val_f1']:.4f}  "
        f"{metrics['train_images_per_s']:.0f} img/s{'  *' if improved else ''}"
    )


# ----------------------------------------------------------------------------- one run


@dataclass
class TrainResult:
    model: torch.nn.Module  # unwrapped, on CPU, holding the best (by val Dice) weights
    best_epoch: int
    best_val_metrics: dict
    history: list[dict] = field(default_factory=list)


EpochCallback = Callable[[dict, Callable[[], dict]], None]


def with_progress_bar(loader, epoch: int, cfg: TrainConfig):
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI, Ray workers)
    return tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, disable=None)


def final_model(accelerator, model, best_weights: dict | None) -> torch.nn.Module:
    """A plain CPU copy holding ``best_weights``: no DDP, compile or autocast wrapper, like a reloaded model.pt."""
    plain = accelerator.unwrap_model(model, keep_fp32_wrapper=False, keep_torch_compile=False)
    best_model = copy.deepcopy(plain).to("cpu")
    if best_weights is not None:
        best_model.load_state_dict(best_weights)
    return best_model


def train(
    cfg: TrainConfig,
    data: dict[str, Split],
    on_epoch: EpochCallback | None = None,
    *,
    resume_state: dict | None = None,
    encoder_state: dict | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = False,
) -> TrainResult:
    """Train on ``data["train"]``, select by Dice on ``data["valid"]``; knows nothing of Ray.

    ``on_epoch(metrics, state_fn)`` is called after every epoch; ``state_fn()`` returns the full
    resumable state (pass it back as ``resume_state`` to continue from that epoch).
    ``encoder_state`` overrides ``cfg.encoder_weights`` (a driver resolves weights once).
    ``progress`` shows a per-batch progress bar on a terminal (the CLIs, the retrain, debug mode).
    """
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg)
    if encoder_state is None and resume_state is None:
        encoder_state = load_encoder_state(cfg.encoder_weights, cfg.encoder)
    model = create_model(encoder_state, in_channels=data["train"].channels, arch=cfg.arch, encoder=cfg.encoder)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = build_train_loader(data["train"], cfg)
    criterion = create_loss(cfg)
    schedule = WarmupThenPlateau(optimizer, cfg, steps_per_epoch=len(loader))
    run = RunProgress()
    if resume_state is not None:
        run = restore(resume_state, model, optimizer, schedule)
        loader.generator.manual_seed(cfg.seed + run.epoch)  # a fresh, reproducible shuffle order

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if cfg.compile:
        model = torch.compile(model)
    # the module itself (no DDP or compile wrapper): evaluated eagerly, its state dict has plain keys
    eval_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    shard = (accelerator.process_index, accelerator.num_processes)
    try:
        for epoch in range(run.epoch + 1, cfg.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            batches = with_progress_bar(loader, epoch, cfg) if progress else loader
            train_stats = train_one_epoch(model, batches, criterion, optimizer, schedule, accelerator, cfg)
            started = time.perf_counter()
            val, _ = evaluate(eval_model, data["valid"], cfg, criterion, shard)
            train_stats["val_time_s"] = time.perf_counter() - started
            schedule.step_epoch(val["loss"])
            metrics, improved = run.record(epoch, lr, train_stats, val, eval_model)
            if log and accelerator.is_main_process:
                log(epoch_line(cfg, metrics, improved))
            if on_epoch is not None:
                on_epoch(metrics, functools.partial(snapshot, cfg, run, eval_model, optimizer, schedule, improved))
    except torch.OutOfMemoryError:
        raise TrainingOOMError(f"out of memory at resize {cfg.resize_px}, batch {cfg.batch_size}") from None
    return TrainResult(final_model(accelerator, model, run.best_model), run.best_epoch, run.best_val_metrics, run.history)
