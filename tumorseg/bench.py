"""Benchmarks of the foundation (numbers, not pass/fail): cache, loader, training step.

    python -m tumorseg.bench [--data DIR] [--repeats 3] [--threads N]

Prints, with medians over ``--repeats``: cache build time and cache load time (all three splits),
DataLoader throughput (images/s per worker process at 256 px with the train augmentations), and
training-step throughput (images/s, fp32 and bf16, channels_last, batch 16) at 128 and 256 px.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from tumorseg.cli import ArgumentParser, exit_on_user_error  # noqa: E402
from tumorseg.config import TrainConfig  # noqa: E402
from tumorseg.data import load_dataset, load_split  # noqa: E402

DEFAULT_DEV_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brain-tumor-dev"


def machine() -> str:
    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({threads} torch threads), {gpu}, torch {torch.__version__}"


def bench_cache(data_dir: Path, size_px: int, repeats: int) -> tuple[float, float]:
    builds, loads = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            load_dataset(data_dir, size_px, cache_dir=Path(cache))
            builds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            data = load_dataset(data_dir, size_px, cache_dir=Path(cache))
            sum(int(s.images[-1, 0, 0]) for s in data.values())  # touch the maps
            loads.append(time.perf_counter() - t0)
    return statistics.median(builds), statistics.median(loads)


def loader_images_per_s(split, cfg: TrainConfig, workers: int, batches: int = 40) -> float:
    """Images/s of the training DataLoader alone (``workers`` processes; 0 = in the main process)."""
    from tumorseg.engine import build_train_loader

    loader = build_train_loader(split, cfg.replace(num_workers=workers))
    it = iter(loader)
    next(it)  # start the workers before timing
    t0, seen = time.perf_counter(), 0
    for _ in range(batches):
        try:
            images, _ = next(it)
        except StopIteration:
            it = iter(loader)
            images, _ = next(it)
        seen += len(images)
    rate = seen / (time.perf_counter() - t0)
    del it, loader
    return rate


def step_images_per_s(size_px: int, precision: str, batch: int = 16, steps: int = 6,
                      arch: str = "Unet", encoder: str = "resnet18") -> float:
    """Images/s of forward + backward + AdamW step of ``arch``-``encoder`` on random data (no loader)."""
    from tumorseg.losses import create_loss
    from tumorseg.model import create_model
    from tumorseg.engine import make_accelerator
    from tumorseg.inference import to_input

    cfg = TrainConfig(resize_px=size_px, precision=precision, encoder_weights="none", batch_size=batch, arch=arch, encoder=encoder)
    accelerator = make_accelerator(cfg)
    model = create_model(None, arch=arch, encoder=encoder).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    criterion = create_loss(cfg)
    images = torch.randint(0, 255, (batch, 1, size_px, size_px), dtype=torch.uint8)
    masks = (torch.rand(batch, 1, size_px, size_px) > 0.97).to(torch.uint8)

    def step():
        x = to_input(images, accelerator.device, True)
        with accelerator.autocast():
            loss = criterion(model(x), masks.to(accelerator.device))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()

    step()  # warm-up (allocations, oneDNN primitive creation)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def evaluate_seconds(data_dir: Path, size_px: int) -> float:
    """Seconds for one validation pass (native-resolution metrics) of an untrained model."""
    from tumorseg.engine import evaluate
    from tumorseg.losses import create_loss
    from tumorseg.model import create_model

    cfg = TrainConfig(resize_px=size_px, encoder_weights="none")
    valid = load_split(data_dir, "valid", size_px, native=True)
    model = create_model(None).to(memory_format=torch.channels_last)
    evaluate(model, valid, cfg, create_loss(cfg))  # warm-up; the evaluation precision of training (tumorseg.inference)
    t0 = time.perf_counter()
    evaluate(model, valid, cfg, create_loss(cfg))
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = ArgumentParser(prog="tumorseg.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path(os.environ.get("TUMORSEG_DEV_DATA", DEFAULT_DEV_DATA)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--cache-px", type=int, default=256)
    p.add_argument("--only", default="cache,eval,loader,step", help="which parts to run")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    with exit_on_user_error("tumorseg.bench"):
        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"machine: {machine()}")
        print(f"data: {args.data}")
        if "cache" in only:
            build_s, load_s = bench_cache(args.data, args.cache_px, args.repeats)
            print(f"cache build ({args.cache_px} px, train+valid+test): {build_s:7.2f} s   (median of {args.repeats})")
            print(f"cache load  ({args.cache_px} px, train+valid+test): {load_s:7.3f} s")
        if "eval" in only:
            for size in (128, 256):
                times = [evaluate_seconds(args.data, size) for _ in range(args.repeats)]
                print(f"validation pass, {size} px model, metrics at native resolution: {statistics.median(times):6.2f} s")
        if "loader" in only:
            train_256 = load_split(args.data, "train", 256)
            cfg = TrainConfig(resize_px=256)
            for workers in (0, 1):
                rates = [loader_images_per_s(train_256, cfg, workers) for _ in range(args.repeats)]
                label = "main process" if workers == 0 else "1 worker process"
                print(f"loader, train augmentations, 256 px, {label:17s}: {statistics.median(rates):8.0f} images/s")
        if "step" in only:
            for size in (128, 256):
                for precision in ("fp32", "bf16"):
                    rates = [step_images_per_s(size, precision) for _ in range(args.repeats)]
                    print(f"training step {size} px batch 16 {precision}: {statistics.median(rates):7.1f} images/s")


if __name__ == "__main__":
    main()
