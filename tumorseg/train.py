"""The command line of one training run (the training itself is ``tumorseg.engine.train``).

    python -m tumorseg.train --data DIR --out DIR [--resize 256 --epochs 20 ...]

Every ``TrainConfig`` field is a flag (``tumorseg.cli.add_dataclass_arguments``) whose default is
the seed recipe. ``--data`` is any layout ``tumorseg.data`` reads (``--layout``, ``--labels``,
``--split``, ``--group-by``, ``--splits``, ``--allow-unlabelled``: ``tumorseg.data.add_data_arguments``);
without it the built-in synthetic dataset is used. The run writes ``metrics.json`` (naming the
dataset), ``history.csv``, ``model.pt``, ``predictions.png`` and, when valid/test were carved by
case, ``splits.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tumorseg.checkpoint import save_model
from tumorseg.cli import ArgumentParser, add_dataclass_arguments, exit_on_user_error
from tumorseg.config import SEED_REPORTED_TEST_METRICS, TrainConfig, field_names
from tumorseg.data import SPLITS_JSON, DataOptions, DatasetInfo, Split, add_data_arguments
from tumorseg.engine import TrainResult, evaluate, train
from tumorseg.metrics import dice_per_image
from tumorseg.model import check_model, load_encoder_state


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="tumorseg.train", description="Train one model (default UNet-ResNet18) once; every default is the seed recipe.")
    p.add_argument("--data", type=Path, default=None, help="dataset folder, any layout (default: built-in synthetic set)")
    p.add_argument("--out", type=Path, default=Path("results/train"), help="output folder (default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=None, help="array cache (default: $TUMORSEG_CACHE_DIR or ~/.cache/tumorseg)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_data_arguments(p)
    add_dataclass_arguments(p.add_argument_group("training configuration (TrainConfig)"), TrainConfig)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = set(field_names())
    cfg = TrainConfig.from_dict({k: v for k, v in vars(args).items() if k in names})
    check_model(cfg.arch, cfg.encoder, cfg.resize_px)
    return cfg


def resolve_data_dir(data: Path | None, synthetic_root: Path | None = None) -> Path:
    """The user's dataset, or the built-in synthetic one (written on first use under ``synthetic_root``)."""
    if data:
        return Path(data)
    from tumorseg.synthetic import ensure_synthetic

    path = ensure_synthetic(root=synthetic_root)
    print(f"no --data given: using the built-in synthetic dataset at {path}")
    return path


def seed_reported_row(info: DatasetInfo | None) -> dict | None:
    """The seed run's reported numbers, only where they apply: on the Kaggle dataset itself."""
    if info is None or not info.is_kaggle_brain_tumor:
        return None
    return {**SEED_REPORTED_TEST_METRICS, "measured_on": "the Kaggle dataset's own test split at 256 px (seed run)"}


def write_run_outputs(
    out: Path, result: TrainResult, cfg: TrainConfig, test: Split | None, data: Path | DatasetInfo
) -> tuple[dict, np.ndarray | None]:
    """``metrics.json``, ``history.csv``, ``model.pt``, ``predictions.png`` for a finished run.

    ``data``: the dataset's ``DatasetInfo`` (or just its folder). Returns the metrics and the
    per-image test counts (the one test pass, for per-image outputs).
    """
    info = data if isinstance(data, DatasetInfo) else None
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
        "data": info.path if info else str(data),
        "dataset": info.to_dict() if info else None,
        "best_epoch": result.best_epoch,
        "valid": result.best_val_metrics,
        "test": test_metrics,
    }
    if seed_reported_row(info):
        metrics["seed_reported_test"] = seed_reported_row(info)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    pd.DataFrame(result.history).to_csv(out / "history.csv", index=False)
    save_model(out / "model.pt", result.model, cfg, best_epoch=result.best_epoch, val_metrics=result.best_val_metrics,
               dataset=info.to_dict() if info else {"path": str(data)})
    if test is not None:
        save_prediction_grid(out / "predictions.png", result.model, test, cfg, dice_per_image(counts))
    return metrics, counts


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with exit_on_user_error("tumorseg.train"):
        cfg = config_from_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        from tumorseg.data import load_dataset, open_dataset, report_duplicates

        from tumorseg.sanity import data_warnings, print_warnings, warmup_warnings

        print_warnings(warmup_warnings(cfg.warmup_epochs, cfg.epochs))
        options = DataOptions.from_args(args)
        data_dir = resolve_data_dir(args.data)
        encoder_state = load_encoder_state(cfg.encoder_weights, cfg.encoder)  # fail fast, before any decoding
        t0 = time.perf_counter()
        dataset = open_dataset(data_dir, options)
        print(f"data: {dataset.info.describe()}")
        if dataset.carved:
            args.out.mkdir(parents=True, exist_ok=True)
            dataset.write_splits(args.out / SPLITS_JSON)
            print(f"valid/test carved by case: {args.out / SPLITS_JSON} (reuse with --splits)")
        data = load_dataset(dataset, cfg.resize_px, cache_dir=args.cache_dir)
        print(f"data ready in {time.perf_counter() - t0:.1f}s: " + ", ".join(f"{k} {len(v)}" for k, v in data.items()))
        report_duplicates(data, print)
        print_warnings(data_warnings(data["train"], [cfg.resize_px], cfg.batch_size))
        result = train(cfg, data, encoder_state=encoder_state, progress=True)
        metrics, _ = write_run_outputs(args.out, result, cfg, data["test"], dataset.info)
        test, seed = metrics["test"], metrics.get("seed_reported_test")
        print(
            f"best epoch {result.best_epoch}: val dice {result.best_val_metrics['dice']:.4f} | test dice "
            f"{test['dice']:.4f} f1 {test['f1']:.4f} precision {test['precision']:.4f} recall {test['recall']:.4f}"
            + (f" (seed reported f1 {seed['f1']} on Kaggle's own test split at 256 px)" if seed else "")
            + f" on {dataset.info.name} -> {args.out}"
        )


if __name__ == "__main__":
    main()
