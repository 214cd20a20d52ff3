"""One training run, free of Ray: ``train_one_epoch``, ``evaluate``, ``train`` and the CLI.

    python -m tumorseg.train --data DIR --out DIR [--resize 256 --epochs 20 ...]

Every flag's default is the seed recipe (``tumorseg.config.TrainConfig``). Without ``--data`` the
built-in synthetic dataset is used. The run writes ``metrics.json``, ``history.csv``, ``model.pt``
and ``predictions.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from tumorseg.cli import ArgumentParser, exit_on_user_error
from tumorseg.config import SEED_REPORTED_TEST_METRICS, TrainConfig, field_names
from tumorseg.data import Split
from tumorseg.losses import create_loss
from tumorseg.metrics import SegmentationMeter, dice_per_image
from tumorseg.model import create_model, load_encoder_state
from tumorseg.transforms import AugmentedArrays, normalize, seed_worker, train_transform


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; training stops at once."""


class TrainingOOMError(RuntimeError):
    """The device ran out of memory; retrying the same configuration would fail again."""


# ----------------------------------------------------------------------------- device, precision


def select_mixed_precision(cfg: TrainConfig) -> str:
    """Accelerate's ``mixed_precision`` for ``cfg.precision`` on this machine ("bf16" or "no")."""
    if cfg.precision == "fp32":
        return "no"
    if torch.cuda.is_available():
        supported = torch.cuda.is_bf16_supported()
    else:  # CPU: oneDNN bf16 kernels need AVX512-BF16 or AMX; elsewhere bf16 is slower than fp32
        supported = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if cfg.precision == "bf16" and not supported:
        print("warning: bf16 is not supported on this device; training in fp32", file=sys.stderr)
    return "bf16" if supported else "no"


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


# ----------------------------------------------------------------------------- schedule


class WarmupThenPlateau:
    """Linear warmup per step over ``warmup_epochs``, then ReduceLROnPlateau on val loss per epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
        self.warmup_steps = cfg.warmup_epochs * steps_per_epoch
        self.steps = 0
        self.warmup = None
        if self.warmup_steps:
            total = self.warmup_steps
            self.warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / total))
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )

    def step_batch(self) -> None:
        self.steps += 1
        if self.warmup is not None and self.steps < self.warmup_steps:
            self.warmup.step()

    def step_epoch(self, val_loss: float) -> None:
        if self.steps >= self.warmup_steps:
            self.plateau.step(val_loss)

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "warmup": self.warmup.state_dict() if self.warmup else None,
            "plateau": self.plateau.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        if self.warmup is not None and state["warmup"] is not None:
            self.warmup.load_state_dict(state["warmup"])
        self.plateau.load_state_dict(state["plateau"])


# ----------------------------------------------------------------------------- one epoch, evaluation


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


def to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 ``(B, 1, H, W)`` -> normalised float on ``device`` (non-blocking from pinned memory)."""
    x = normalize(images.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


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
        if step % 10 == 9 and not finite:  # sync with the device only every 10 steps
            break
    if not finite:
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
def predict_logits(model, images: np.ndarray, cfg: TrainConfig) -> torch.Tensor:
    """Logits at training resolution for uint8 ``(N, S, S)`` images, in ``eval_batch_size`` chunks."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(images), cfg.eval_batch_size):
        batch = torch.from_numpy(np.array(images[start : start + cfg.eval_batch_size])[:, None])
        outputs.append(model(to_input(batch, device, cfg.channels_last)).float())
    return torch.cat(outputs)


@torch.no_grad()
def evaluate(
    model, split: Split, cfg: TrainConfig, criterion=None, autocast=contextlib.nullcontext, shard: tuple[int, int] = (0, 1)
) -> tuple[dict, np.ndarray]:
    """Metrics of ``model`` on ``split`` at native resolution (see ``tumorseg.metrics``).

    Runs on the model's device. Returns ``(metrics, per_image_counts)``; with ``criterion``,
    ``metrics["loss"]`` is the training loss at training resolution (what ReduceLROnPlateau watches).
    ``shard=(rank, world)``: this process scores its slice of the images and the counts of all
    processes are gathered, so every process returns the metrics of the whole split.
    """
    model.eval()
    device = next(model.parameters()).device
    meter = SegmentationMeter(threshold=cfg.threshold)
    loss_sum, batches = 0.0, 0
    rank, world = shard
    first, last = (len(split) * rank) // world, (len(split) * (rank + 1)) // world
    for start in range(first, last, cfg.eval_batch_size):
        index = slice(start, min(start + cfg.eval_batch_size, last))
        x = to_input(torch.from_numpy(np.array(split.images[index])[:, None]), device, cfg.channels_last)
        with autocast():
            logits = model(x).float()
        target = torch.from_numpy(np.array(split.masks[index])[:, None]).to(device)
        meter.update_soft(logits, target)
        if criterion is not None:
            loss_sum += criterion(logits, target).item()
            batches += 1
        native = F.interpolate(logits, size=split.native_hw, mode="bilinear", align_corners=False)
        meter.update(native, torch.from_numpy(split.native_mask(index)[:, None]).to(device))
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


# ----------------------------------------------------------------------------- one run


@dataclass
class TrainResult:
    model: torch.nn.Module  # unwrapped, on CPU, holding the best (by val Dice) weights
    best_epoch: int
    best_val_metrics: dict
    history: list[dict] = field(default_factory=list)


EpochCallback = Callable[[dict, Callable[[], dict]], None]


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
    ``progress`` shows a per-batch progress bar (debug mode).
    """
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg)
    if encoder_state is None and resume_state is None:
        encoder_state = load_encoder_state(cfg.encoder_weights)
    model = create_model(encoder_state)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = build_train_loader(data["train"], cfg)
    criterion = create_loss(cfg)
    schedule = WarmupThenPlateau(optimizer, cfg, steps_per_epoch=len(loader))

    start_epoch, best_dice, best_epoch, best_weights, history, best_val = 0, -1.0, 0, None, [], {}
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        schedule.load_state_dict(resume_state["schedule"])
        start_epoch = resume_state["epoch"]
        best_dice, best_epoch = resume_state["best_val_dice"], resume_state["best_epoch"]
        best_weights = resume_state["best_model"]
        history = list(resume_state["history"])
        best_val = dict(resume_state["best_val_metrics"])
        loader.generator.manual_seed(cfg.seed + start_epoch)  # a fresh, reproducible shuffle order

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if cfg.compile:
        model = torch.compile(model)
    eval_model = accelerator.unwrap_model(model)

    try:
        for epoch in range(start_epoch, cfg.epochs):
            lr = optimizer.param_groups[0]["lr"]
            batches = loader
            if progress:
                from tqdm.auto import tqdm

                batches = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
            train_stats = train_one_epoch(model, batches, criterion, optimizer, schedule, accelerator, cfg)
            shard = (accelerator.process_index, accelerator.num_processes)
            val, _ = evaluate(eval_model, data["valid"], cfg, criterion, accelerator.autocast, shard)
            schedule.step_epoch(val["loss"])
            improved = val["dice"] > best_dice
            if improved:
                best_dice, best_epoch, best_val = val["dice"], epoch + 1, val
                best_weights = _to_cpu_copy(eval_model.state_dict())
            metrics = {
                "epoch": epoch + 1,
                "lr": lr,
                **train_stats,
                **{f"val_{k}": v for k, v in val.items()},
                "best_val_dice": best_dice,
                "best_epoch": best_epoch,
            }
            history.append(metrics)
            if log and accelerator.is_main_process:
                log(
                    f"epoch {epoch + 1:3d}/{cfg.epochs}  lr {lr:.2e}  train_loss {metrics['train_loss']:.4f}  "
                    f"val_loss {val['loss']:.4f}  val_dice {val['dice']:.4f}  val_f1 {val['f1']:.4f}  "
                    f"{metrics['train_images_per_s']:.0f} img/s{'  *' if improved else ''}"
                )

            def state_fn(epoch=epoch, improved=improved) -> dict:
                """A snapshot (copies, on CPU) of everything needed to continue after this epoch."""
                current = best_weights if improved else _to_cpu_copy(eval_model.state_dict())
                return {
                    "config": cfg.to_dict(),
                    "epoch": epoch + 1,
                    "model": current,
                    "optimizer": _to_cpu_copy(optimizer.state_dict()),
                    "schedule": copy.deepcopy(schedule.state_dict()),
                    "best_val_dice": best_dice,
                    "best_epoch": best_epoch,
                    "best_model": best_weights,
                    "best_val_metrics": dict(best_val),
                    "history": [dict(h) for h in history],
                }

            if on_epoch is not None:
                on_epoch(metrics, state_fn)
    except torch.OutOfMemoryError:
        raise TrainingOOMError(f"out of memory at resize {cfg.resize_px}, batch {cfg.batch_size}") from None

    # drop Accelerate's autocast wrapper: the returned model computes in fp32 exactly like a
    # reloaded model.pt, so test metrics reproduce from the file
    best_model = copy.deepcopy(accelerator.unwrap_model(model, keep_fp32_wrapper=False)).to("cpu")
    if best_weights is not None:
        best_model.load_state_dict(best_weights)
    return TrainResult(model=best_model, best_epoch=best_epoch, best_val_metrics=best_val, history=history)


def _to_cpu_copy(tree):
    """Deep copy of a (nested) state dict with every tensor cloned to CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _to_cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu_copy(v) for v in tree)
    return copy.deepcopy(tree)


# ----------------------------------------------------------------------------- model files

MODEL_FORMAT = "tumorseg-model"


def save_model(path: Path, model: torch.nn.Module, cfg: TrainConfig, **extra: Any) -> None:
    """Weights + config + metadata, all plain types: loadable with ``weights_only=True``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": MODEL_FORMAT, "version": 1, "config": cfg.to_dict(), "model": state, **extra}, path)


def load_model(path: Path) -> tuple[torch.nn.Module, TrainConfig, dict]:
    """Read a ``model.pt`` written by ``save_model``; refuse anything else (never unpickles code)."""
    from tumorseg.errors import UserError

    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"model file not found: {path}") from None
    except Exception as err:  # noqa: BLE001 - pickled code, garbage, truncation: all "not ours"
        raise UserError(f"{path}: not a tumorseg model file ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise UserError(f"{path}: not a tumorseg model file (no '{MODEL_FORMAT}' marker)")
    cfg = TrainConfig.from_dict(payload["config"])
    model = create_model(None)
    model.load_state_dict(payload["model"])
    if cfg.channels_last:  # as trained: the memory format changes the float rounding
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), cfg, payload


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = ArgumentParser(
        prog="tumorseg.train",
        description="Train UNet-ResNet18 once; every default is the seed recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=Path, default=None, help="Kaggle-layout dataset folder (default: built-in synthetic set)")
    p.add_argument("--out", type=Path, default=Path("results/train"), help="output folder")
    p.add_argument("--cache-dir", type=Path, default=None, help="array cache (default: $TUMORSEG_CACHE_DIR or ~/.cache/tumorseg)")
    p.add_argument("--resize", dest="resize_px", type=int, default=d.resize_px, help="training size in px")
    p.add_argument("--loss", dest="loss_type", choices=["dice", "dice_bce", "dice_focal"], default=d.loss_type)
    p.add_argument("--dice-weight", type=float, default=d.dice_weight)
    p.add_argument("--bce-weight", type=float, default=d.bce_weight)
    p.add_argument("--focal-weight", type=float, default=d.focal_weight)
    p.add_argument("--focal-gamma", type=float, default=d.focal_gamma)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument("--plateau-factor", type=float, default=d.plateau_factor)
    p.add_argument("--plateau-patience", type=int, default=d.plateau_patience)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--rotate-deg", type=float, default=d.rotate_deg)
    p.add_argument("--translate-frac", type=float, default=d.translate_frac)
    p.add_argument("--jitter-strength", type=float, default=d.jitter_strength)
    p.add_argument("--encoder-weights", default=d.encoder_weights, help="imagenet | none | path to a weights file")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = set(field_names())
    return TrainConfig.from_dict({k: v for k, v in vars(args).items() if k in names})


def resolve_data_dir(data: Path | None, synthetic_root: Path | None = None) -> Path:
    """The user's dataset, or the built-in synthetic one (written on first use under ``synthetic_root``)."""
    if data:
        return Path(data)
    from tumorseg.synthetic import ensure_synthetic

    path = ensure_synthetic(root=synthetic_root)
    print(f"no --data given: using the built-in synthetic dataset at {path}")
    return path


def write_run_outputs(
    out: Path, result: TrainResult, cfg: TrainConfig, test: Split | None, data_dir: Path
) -> tuple[dict, np.ndarray | None]:
    """``metrics.json``, ``history.csv``, ``model.pt``, ``predictions.png`` for a finished run.

    Returns the metrics and the per-image test counts (the one test pass, for per-image outputs).
    """
    import pandas as pd

    from tumorseg.visualize import save_prediction_grid

    out.mkdir(parents=True, exist_ok=True)
    test_metrics, counts = None, None
    if test is not None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        test_metrics, counts = evaluate(result.model.to(device), test, cfg)
        result.model.to("cpu")
    metrics = {
        "config": cfg.to_dict(),
        "data": str(data_dir),
        "best_epoch": result.best_epoch,
        "valid": result.best_val_metrics,
        "test": test_metrics,
        "seed_reported_test": SEED_REPORTED_TEST_METRICS,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    pd.DataFrame(result.history).to_csv(out / "history.csv", index=False)
    save_model(out / "model.pt", result.model, cfg, best_epoch=result.best_epoch, val_metrics=result.best_val_metrics)
    if test is not None:
        save_prediction_grid(out / "predictions.png", result.model, test, cfg, dice_per_image(counts))
    return metrics, counts


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with exit_on_user_error("tumorseg.train"):
        cfg = config_from_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        from tumorseg.data import load_dataset

        data_dir = resolve_data_dir(args.data)
        encoder_state = load_encoder_state(cfg.encoder_weights)  # fail fast, before any decoding
        t0 = time.perf_counter()
        data = load_dataset(data_dir, cfg.resize_px, cache_dir=args.cache_dir)
        print(f"data ready in {time.perf_counter() - t0:.1f}s: " + ", ".join(f"{k} {len(v)}" for k, v in data.items()))
        result = train(cfg, data, encoder_state=encoder_state)
        metrics, _ = write_run_outputs(args.out, result, cfg, data["test"], data_dir)
        test = metrics["test"]
        print(
            f"best epoch {result.best_epoch}: val dice {result.best_val_metrics['dice']:.4f} | test dice "
            f"{test['dice']:.4f} f1 {test['f1']:.4f} precision {test['precision']:.4f} recall {test['recall']:.4f} "
            f"(seed reported f1 {SEED_REPORTED_TEST_METRICS['f1']}) -> {args.out}"
        )


if __name__ == "__main__":
    main()
