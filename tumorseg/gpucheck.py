"""GPU check: training throughput and memory of one card, and how trials share it.

    python -m tumorseg.gpucheck [--size-px 256] [--batch 16] [--steps 30] [--compile]

Prints, for UNet-ResNet18 at ``--size-px`` and ``--batch``: training images/s for fp32, bf16,
bf16 + channels_last (and + torch.compile with ``--compile``), peak GPU memory of each, and the
aggregate images/s of 1, 2 and 4 concurrent trial processes on the one GPU (how much packing
trials with ``--gpus-per-trial 0.5/0.25`` gains). Needs torch, segmentation-models-pytorch and
accelerate only (no Ray, no data: inputs are random, which costs the model the same).
Runs on the CPU too (``--device cpu``) with small settings, which is how it is tested here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch


def measure(device: str, size_px: int, batch: int, steps: int, precision: str, channels_last: bool, compile_model: bool) -> dict:
    from tumorseg.config import TrainConfig
    from tumorseg.losses import create_loss
    from tumorseg.model import create_model
    from tumorseg.transforms import normalize

    torch.manual_seed(0)
    model = create_model(None).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = create_loss(TrainConfig())
    images = torch.randint(0, 255, (batch, 1, size_px, size_px), dtype=torch.uint8, device=device)
    masks = (torch.rand(batch, 1, size_px, size_px, device=device) > 0.97).to(torch.uint8)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")
    cuda = device.startswith("cuda")

    def step():
        x = normalize(images)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = criterion(model(x), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3 if not compile_model else 5):  # warm-up (cudnn autotune, compilation)
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return {"images_per_s": batch / statistics.median(times), "peak_mib": peak}


def _worker(args, queue, barrier):
    barrier.wait()  # all processes start timing together
    queue.put(measure(args["device"], args["size_px"], args["batch"], args["steps"], "bf16" if args["bf16"] else "fp32", True, False))


def concurrent(args: dict, processes: int) -> float:
    """Aggregate images/s of ``processes`` trial processes training at once on the same device."""
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(processes)
    procs = [ctx.Process(target=_worker, args=(args, queue, barrier)) for _ in range(processes)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(r["images_per_s"] for r in results)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="tumorseg.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size-px", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="also measure bf16 + channels_last + torch.compile")
    p.add_argument("--processes", default="1,2,4", help="concurrent trial processes to measure")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"device: {name}; torch {torch.__version__}; {args.size_px} px, batch {args.batch}, median of {args.steps} steps")
    results = {"device": name, "size_px": args.size_px, "batch": args.batch}
    bf16 = args.device.startswith("cuda") and torch.cuda.is_bf16_supported() or args.device == "cpu"
    variants = [("fp32", "fp32", False, False), ("bf16", "bf16", False, False), ("bf16+channels_last", "bf16", True, False)]
    if args.compile:
        variants.append(("bf16+channels_last+compile", "bf16", True, True))
    for label, precision, channels_last, compile_model in variants:
        if precision == "bf16" and not bf16:
            print(f"{label:30s}: bf16 not supported here")
            continue
        r = measure(args.device, args.size_px, args.batch, args.steps, precision, channels_last, compile_model)
        results[label] = r
        print(f"{label:30s}: {r['images_per_s']:8.1f} images/s   peak memory {r['peak_mib']:8.0f} MiB")
    shared = dict(device=args.device, size_px=args.size_px, batch=args.batch, steps=args.steps, bf16=bf16)
    for n in (int(v) for v in args.processes.split(",")):
        total = concurrent(shared, n)
        results[f"concurrent_{n}"] = total
        print(f"{n} concurrent trial process(es), bf16+channels_last: {total:8.1f} images/s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
