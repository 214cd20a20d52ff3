"""``python -m search.bench --scale``: the sweep's orchestration at 100-2,000 trials on 64 simulated GPUs.

    python -m search.bench --scale [--trials 100,500,2000] [--nodes 1] [--gpus 64] [--epoch-s 3]

**It measures orchestration, not training.** Every trial runs the real trainable
(``search.trainable.tune_trainable``: Tune's context, the data from the object store, one report per
epoch and checkpoints at a bounded cost through ``checkpointing_report``) with the model (``run_trial``) replaced by
a calibrated sleep (``sleep_trial``) and its state written as a small JSON file instead of a torch
file, so 64 trial processes fit on a 2-core box (a torch import is ~290 MB per process). The driver
is ``search.run``'s own: the same settings, searcher (Optuna TPE), ASHA scheduler, callbacks
(trials.csv, the live view) and report, attached to a local Ray cluster of ``--nodes`` nodes with
``--gpus`` logical GPUs in all (``launch/local-cluster.sh``).

Per N it prints: driver CPU seconds per trial result, wall time against the ideal (sum of sleeps /
slots) and slot utilisation, the driver's peak RSS, trials.csv writes (count, time, size), Tune's
experiment-state snapshots, the searcher's proposals per second, report build time and HTML size,
the importance time, and the checkpoint bytes left on disk. Targets in brackets (issue 15).

The sleep of epoch e of a trial is ``--epoch-s`` x its resize's pixel share (mean 1 over the
choices) x a per-(trial, epoch) jitter in 0.8-1.2; its validation Dice is a smooth function of
the sampled parameters that rises with the epoch, plus noise, so TPE and ASHA have structure to act
on. Shorten ``--epoch-s``, not the trials, to make it faster, until the machine sets the pace
(about 15 results per second on the 2-core box, whose CPUs the trial processes and the driver fill:
README, "Scaling"; ``--tune-floor`` measures Tune alone on the same cluster).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from search.bench_probes import (SIMULATED_CLUSTER_ENV, PeakRss, Timers, box_cpu_ticks, cpu_s, du_bytes, load_average, local_cluster,
                                 processes_cpu_s, time_cap, worker_starts)

STATE_JSON = "state.json"
HEAD_PORT, NODE_PORT_BASE = 6445, 25000  # away from the tests' clusters (6390-6401, 21000-23300)


# ----------------------------------------------------------------------------- the simulated trial


def _unit(*key) -> float:
    """A deterministic number in [0, 1) from ``key`` (same on every node and run)."""
    return int(hashlib.blake2b(repr(key).encode(), digest_size=8).hexdigest(), 16) / 2**64


def epoch_sleep_s(params: dict, trial: int, epoch: int, epoch_s: float, resize_choices: list[int]) -> float:
    """How long epoch ``epoch`` of a trial sleeps: bigger images take longer (pixel count)."""
    mean_area = statistics.fmean(r * r for r in resize_choices)
    return epoch_s * params["resize_px"] ** 2 / mean_area * (0.8 + 0.4 * _unit("sleep", trial, epoch))


def simulated_dice(params: dict, trial: int, epoch: int) -> float:
    """A validation Dice with structure: best near lr 5e-4, a little better at bigger sizes and
    small weight decay, rising with the epoch, with per-epoch noise."""
    lr_fit = math.exp(-((math.log10(params["lr"]) + 3.3) ** 2) / 0.5)
    quality = 0.35 + 0.45 * lr_fit + 0.05 * params["resize_px"] / 512 - 0.02 * abs(math.log10(params["weight_decay"]) + 3) / 2
    return max(0.0, quality * (1 - math.exp(-epoch / 5)) + 0.02 * (_unit("dice", trial, epoch) - 0.5))


def sleep_trial(params: dict, *, base: dict, data, report, restore_state: dict | None = None, extra: dict | None = None,
                epoch_s: float = 1.0, resize_choices: list[int] = (256,), checkpoint_kb: int = 16, **_) -> None:
    """``run_trial``'s stand-in: per epoch, sleep, then report metrics and a checkpoint of ``checkpoint_kb``."""
    extra = {**(extra or {}), "params_m": 14.33, "gflops": 21.7 * (params["resize_px"] / 256) ** 2}
    trial = int(extra.get("trial_index") or 0)
    first = restore_state["epoch"] + 1 if restore_state else 1
    best = restore_state["best_val_dice"] if restore_state else 0.0
    if restore_state:
        extra["resumed_from_epoch"] = restore_state["epoch"]
    for epoch in range(first, base["epochs"] + 1):
        started = time.time()
        slept = epoch_sleep_s(params, trial, epoch, epoch_s, list(resize_choices))
        time.sleep(slept)
        dice = simulated_dice(params, trial, epoch)
        best = max(best, dice)
        metrics = {"epoch": epoch, "val_dice": dice, "best_val_dice": best, "val_loss": 1 - dice, "train_loss": 1 - dice,
                   "lr": params["lr"], "slept_s": slept, "first_step_ts": started,
                   "train_images_per_s": 16 / slept if slept else 0.0}
        state = {"epoch": epoch, "best_val_dice": best, "padding": "0" * (checkpoint_kb * 1024)}
        report({**metrics, **extra}, lambda state=state: state)  # as run_trial


def save_json_state(state: dict, directory) -> None:
    Path(directory, STATE_JSON).write_text(json.dumps(state))


def load_json_state(directory) -> dict:
    return json.loads(Path(directory, STATE_JSON).read_text())


def trial_code(epoch_s: float, resize_choices: list[int], checkpoint_kb: int) -> dict:
    """``tune_trainable``'s run/save/load for the simulation (see ``search.tuner.make_trainable``)."""
    run = functools.partial(sleep_trial, epoch_s=epoch_s, resize_choices=list(resize_choices), checkpoint_kb=checkpoint_kb)
    return {"run": run, "save": save_json_state, "load": load_json_state}


# ----------------------------------------------------------------------------- one sweep


def sweep_args(n: int, gpus: int, epochs: int, grace: int, reduction: float, storage: Path, name: str, address: str) -> list[str]:
    return ["--address", address, "--gpus", str(gpus), "--num-samples", str(n), "--epochs", str(epochs),
            "--grace-period", str(grace), "--reduction-factor", str(reduction), "--storage", str(storage), "--name", name,
            "--no-retrain", "--no-dashboard", "--encoder-weights", "none", "--seed", "0"]


def instrument(timers: Timers, writes: list) -> None:
    """Time the driver's parts that grow with the number of trials (wrapping, not changing, them)."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search import ConcurrencyLimiter

    from search import callbacks
    from search.studysearch import StudyCallback

    def record_write(rows, path):
        writes.append(Path(path).stat().st_size)

    timers.wrap(callbacks, "write_table", "trials.csv writes", after=record_write)
    timers.wrap(callbacks.TrialsTableCallback, "_write", "TrialsTableCallback (rows + write)")
    timers.wrap(callbacks.LiveViewCallback, "_show", "live view lines")
    timers.wrap(StudyCallback, "on_trial_result", "study: record an epoch")
    timers.wrap(StudyCallback, "_end", "study: record a trial's end")
    timers.wrap(ConcurrencyLimiter, "suggest", "searcher suggest", keep=True)
    timers.wrap(ConcurrencyLimiter, "on_trial_complete", "searcher on_trial_complete")
    timers.wrap(ConcurrencyLimiter, "on_trial_result", "searcher on_trial_result")
    timers.wrap(TuneController, "save_to_dir", "experiment-state snapshots")
    timers.wrap(TuneController, "_process_trial_result", "Tune: process a result (scheduler, callbacks, searcher)")


def run_sweep(n: int, address: str, gpus: int, out: Path, epoch_s: float, epochs: int, grace: int, reduction: float,
              checkpoint_kb: int, temp_dir: Path, max_s: float | None = None) -> dict:
    """One simulated sweep of ``n`` trials through ``search.run``'s driver code; its measurements."""
    from search import cluster, rundir, study
    from search.cli import build_parser, settings_from_args
    from search.run import fit, place_trials
    from search.trials import read_table
    from search.tuner import sampler_settings

    name = f"scale-{n}"
    argv = sweep_args(n, gpus, epochs, grace, reduction, out, name, address)
    settings, space, base, notes = settings_from_args(build_parser().parse_args(argv))
    cluster.use_auth_token(settings)
    run_dir = settings.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # the sweep's study in run_dir/study.db, as search.run keeps it: the sampler learns from the trials
    # StudyCallback records there (without it nothing would ever tell the study a trial ended)
    (run_dir / rundir.STUDY_DB).unlink(missing_ok=True)  # an earlier bench's, with --out reused
    study_url = study.sweep_url(settings)
    study.check_study(study_url, settings.name, resume=False)
    study.register_url(settings.name, study_url)
    cluster.route_ray_logs(run_dir / rundir.RAY_LOG, False)
    with contextlib.redirect_stdout(open(run_dir / "driver.txt", "w")):
        cluster.start_ray(settings)
        slots = place_trials(settings, base)
    rundir.write_sweep_json(run_dir, settings, space, base, notes=notes, sampler=sampler_settings(settings), argv=argv,
                            study=study.study_record(settings, study_url))
    code = trial_code(epoch_s, space.resize_choices, checkpoint_kb)
    data = {}  # the simulated trials read no data
    timers, writes = Timers(), []
    instrument(timers, writes)
    starts_before = worker_starts(temp_dir)
    marker = f"TUMORSEG_RAY_TEMP_DIR={temp_dir}"
    ray_cpu_before = processes_cpu_s(marker)
    cpu0, main0, box0, t0 = cpu_s(), time.thread_time(), box_cpu_ticks(), time.perf_counter()
    try:
        with time_cap(max_s), PeakRss() as rss, open(run_dir / "live.txt", "w") as live, contextlib.redirect_stdout(live):
            fit(settings, space, base, data, None, slots, restore=False, study_url=study_url, code=code)
    finally:
        timers.restore()
    wall = time.perf_counter() - t0
    driver_cpu, main_cpu = cpu_s() - cpu0, time.thread_time() - main0
    box = [now - before for now, before in zip(box_cpu_ticks(), box0)]
    ray_cpu = {k: v - ray_cpu_before.get(k, 0.0) for k, v in processes_cpu_s(marker).items()}
    import ray

    ray.shutdown()

    table = read_table(run_dir)
    results = int(table["epochs_run"].sum())
    slept = sum(sum(epoch_sleep_s(row, int(row["trial_index"]), e, epoch_s, space.resize_choices) for e in range(1, int(row["epochs_run"]) + 1))
                for row in table.to_dict("records"))
    timed = table.dropna(subset=["start_ts", "end_ts"])
    span = timed["end_ts"].max() - timed["start_ts"].min()
    busy = (timed["end_ts"] - timed["start_ts"]).clip(lower=0).sum()
    # steady state: from the moment every slot first held a trial to the moment the last trial started
    starts = timed["start_ts"].sort_values()
    steady_from, steady_to = starts.iloc[min(slots, len(starts)) - 1], starts.iloc[-1]
    steady = _busy_between(timed, steady_from, steady_to) / (slots * (steady_to - steady_from)) if steady_to > steady_from else float("nan")
    checkpoints = list((run_dir / rundir.TUNE_DIR).glob("*/checkpoint_*"))
    measured = {
        "n": n, "slots": slots, "results": results, "statuses": table["status"].value_counts().to_dict(),
        "wall_s": wall, "ideal_s": slept / slots, "sum_sleep_s": slept,
        "utilisation": busy / (slots * span) if span > 0 else float("nan"), "steady_utilisation": steady,
        "driver_cpu_s": driver_cpu, "driver_ms_per_result": 1000 * driver_cpu / max(1, results),
        "main_thread_ms_per_result": 1000 * main_cpu / max(1, results),
        "driver_peak_rss_mib": rss.peak_mib, "ray_cpu_s": ray_cpu, "box_busy": box[0] / max(1, box[1]), "box_cores": os.cpu_count(),
        "csv_writes": len(writes), "csv_final_kib": writes[-1] / 1024 if writes else 0.0, "csv_written_mib": sum(writes) / 2**20,
        "checkpoints_left": len(checkpoints), "checkpoint_bytes_left": sum(du_bytes(c) for c in checkpoints),
        "timers": {label: {"calls": timers.calls[label], "s": timers.seconds[label], "cpu_s": timers.cpu_seconds[label]}
                   for label in timers.calls},
        "worker_starts": worker_starts(temp_dir) - starts_before,
        "suggest_ms": _deciles_ms(timers.each.get("searcher suggest", [])),
        "live_lines": len((run_dir / "live.txt").read_text().splitlines()),
    }
    measured.update(report_and_importance(run_dir, space))
    return measured


def _deciles_ms(durations: list[float]) -> dict:
    """Mean ms of the proposals that returned a trial, over the first and the last tenth of them
    (ConcurrencyLimiter's refusals while every slot is busy return at once and are left out)."""
    real = [d for d in durations if d > 2e-4]
    tenth = max(1, len(real) // 10)
    return {"first": 1000 * statistics.fmean(real[:tenth]) if real else 0.0,
            "last": 1000 * statistics.fmean(real[-tenth:]) if real else 0.0, "count": len(real), "s": sum(real)}


def _busy_between(timed, start: float, end: float) -> float:
    return (timed["end_ts"].clip(upper=end) - timed["start_ts"].clip(lower=start)).clip(lower=0).sum()


def report_and_importance(run_dir: Path, space) -> dict:
    """The report's cost on a run folder, and its importances' alone (on the sweep's study, as the report reads it)."""
    from search.report import build_report, importances
    from search.rundir import read_sweep_json
    from search.study import load_run_study

    t0 = time.perf_counter()
    study, why_not = load_run_study(run_dir, read_sweep_json(run_dir))
    if study is None:
        raise SystemExit(f"search.bench --scale --report-only: {why_not}")
    importances(study)
    importance_s = time.perf_counter() - t0
    cpu0, t0 = cpu_s(), time.perf_counter()
    path = build_report(run_dir)
    return {"importance_s": importance_s, "report_s": time.perf_counter() - t0, "report_cpu_s": cpu_s() - cpu0,
            "report_mib": path.stat().st_size / 2**20}


def synthetic_run_dir(n: int, out: Path, slots: int = 64, epoch_s: float = 3.0, epochs: int = 20, seed: int = 0) -> Path:
    """A finished sweep's folder of ``n`` simulated trials without running one (for ``--report-only``):
    ``sweep.json``, ``trials.csv``, each trial's ``result.json`` and the study in ``study.db``, as
    ``search.run`` writes them (COMPLETED: COMPLETE, ASHA's stops: PRUNED, each epoch's best Dice an
    intermediate value); parameters random from the default space, ASHA's stops by rung (grace 2, factor 3)."""
    import random

    import optuna

    from search import rundir
    from search import study as studydb
    from search.cli import build_parser, settings_from_args
    from search.space import define_by_run
    from search.trials import COLUMNS, write_table

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    argv = ["--num-samples", str(n), "--epochs", str(epochs), "--encoder-weights", "none", "--gpus", str(slots),
            "--storage", str(out), "--name", f"report-{n}"]
    settings, space, base, notes = settings_from_args(build_parser().parse_args(argv))
    run_dir = settings.run_dir
    (run_dir / rundir.TUNE_DIR).mkdir(parents=True, exist_ok=True)
    url = studydb.sweep_url(settings)
    rundir.write_sweep_json(run_dir, settings, space, base, notes=notes, sampler={}, argv=argv,
                            study=studydb.study_record(settings, url))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))  # proposes; the trials go to study.db
    rng, free_at, rows, frozen = random.Random(seed), [0.0] * slots, [], []
    rungs = [2, 6, 18]
    for i in range(n):
        trial = study.ask()
        define_by_run(space)(trial)
        params = trial.params
        run = epochs if rng.random() < 0.04 else next((r for r in rungs if rng.random() < 2 / 3), epochs)
        slot = min(range(slots), key=free_at.__getitem__)
        start = 1.7e9 + free_at[slot]
        lines, best, t, steps = [], 0.0, start, {}
        for epoch in range(1, run + 1):
            t += epoch_sleep_s(params, i, epoch, epoch_s, space.resize_choices)
            dice = simulated_dice(params, i, epoch)
            best = steps[epoch] = max(best, dice)
            lines.append(json.dumps({"epoch": epoch, "val_dice": dice, "best_val_dice": best, "timestamp": t, "trial_index": i}))
        free_at[slot] = t - 1.7e9
        trial_dir = f"trial_{i:03d}_{i:08x}"
        (run_dir / rundir.TUNE_DIR / trial_dir).mkdir(exist_ok=True)
        (run_dir / rundir.TUNE_DIR / trial_dir / "result.json").write_text("\n".join(lines) + "\n")
        rows.append({**dict.fromkeys(COLUMNS), **params, "trial_index": i, "trial_id": f"{i:08x}", "best_val_dice": best,
                     "last_val_dice": dice, "epochs_run": run, "status": "COMPLETED" if run == epochs else "STOPPED_EARLY",
                     "num_failures": 0, "node_id": f"node{slot // 8}", "gpu_ids": str(slot % 8), "start_ts": start,
                     "end_ts": t, "wall_time_s": t - start, "trial_dir": trial_dir, "params_m": 14.33,
                     "gflops": 21.7 * (params["resize_px"] / 256) ** 2, "train_images_per_s": 50.0})
        state = optuna.trial.TrialState.COMPLETE if run == epochs else optuna.trial.TrialState.PRUNED
        frozen.append(optuna.trial.create_trial(state=state, params=params, distributions=trial.distributions,
                                                value=best, intermediate_values=steps,
                                                user_attrs={studydb.TUNE_ID_ATTR: f"{i:08x}", "trial_name": f"trial_{i:03d}"}))
        study.tell(trial, best)
    stored = optuna.create_study(study_name=settings.name, storage=studydb.open_storage(url), direction="maximize")
    stored.add_trials(frozen)  # one transaction per trial
    write_table(rows, run_dir / rundir.TRIALS_CSV)
    return run_dir


def searcher_rate(n: int, slots: int) -> dict:
    """The searcher alone (search.tuner.make_searcher, ``slots`` trials in flight): CPU ms per
    proposal over the first and the last tenth of ``n`` trials, and proposals per CPU second over all."""
    import random

    import optuna

    from search.cli import build_parser, settings_from_args
    from search.tuner import METRIC, make_searcher

    settings, space, _, _ = settings_from_args(build_parser().parse_args(["--num-samples", str(n), "--encoder-weights", "none"]))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = make_searcher(settings, space, slots)  # in memory: the database's cost is StudyCallback's, in run_sweep
    searcher.set_search_properties(METRIC, "max", {})
    study = searcher.searcher._ot_study
    rng, live, times = random.Random(0), [], []
    for i in range(n):
        t0 = time.process_time()  # CPU time: the machine may be shared
        searcher.suggest(f"t{i}")
        times.append(time.process_time() - t0)
        live.append(f"t{i}")
        if len(live) >= slots:  # a trial ends: told to the study as StudyCallback tells it in a sweep
            done, value = live.pop(rng.randrange(len(live))), rng.random()
            study.tell(searcher.searcher._ot_trials[done], value)
            searcher.on_trial_complete(done, {METRIC: value, "epoch": 2})
    tenth = max(1, n // 10)
    return {"first_ms": 1000 * statistics.fmean(times[:tenth]), "last_ms": 1000 * statistics.fmean(times[-tenth:]),
            "per_s": n / sum(times)}


# ----------------------------------------------------------------------------- output


def print_sweep(r: dict, epoch_s: float, nodes: int) -> None:
    t = r["timers"]
    ms = lambda label: 1000 * t.get(label, {}).get("cpu_s", 0.0) / max(1, r["results"])
    trials = sum(r["statuses"].values())
    print(f"N={r['n']}: {r['results']} results from {trials} trials ({', '.join(f'{v} {k}' for k, v in r['statuses'].items())}), "
          f"{r['slots']} slots on {nodes} node(s), mean epoch sleep {epoch_s:g} s; {r['worker_starts']} worker processes started by Ray (the raylet's count)")
    print(f"  driver CPU {r['driver_cpu_s']:.1f} s = {r['driver_ms_per_result']:.2f} ms per trial result   [target <= 5 ms at N=2000]; "
          f"Tune's loop (the main thread) {r['main_thread_ms_per_result']:.2f} ms, Ray's own threads the rest")
    print("    of which (main-thread CPU ms per result, inclusive): " + ", ".join(
        f"{label} {ms(label):.2f}" for label in ("Tune: process a result (scheduler, callbacks, searcher)", "experiment-state snapshots",
                                                  "TrialsTableCallback (rows + write)", "study: record an epoch",
                                                  "study: record a trial's end", "searcher suggest", "live view lines")))
    print(f"  wall {r['wall_s']:.0f} s vs ideal {r['ideal_s']:.0f} s (sum of sleeps {r['sum_sleep_s']:.0f} s / {r['slots']} slots): "
          f"x{r['wall_s'] / r['ideal_s']:.2f}; slot utilisation {100 * r['utilisation']:.1f} % "
          f"(steady state {100 * r['steady_utilisation']:.1f} %)   [target >= 95 % at N=2000]")
    print(f"  the machine's CPUs were {100 * r['box_busy']:.1f} % busy over the sweep ({r['box_cores']} cores; every process: "
          f"the driver, Ray, the trial processes); driver peak RSS {r['driver_peak_rss_mib']:.0f} MiB; CPU of the Ray processes "
          "alive at the end: " + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(r["ray_cpu_s"].items())))
    print(f"  trials.csv: {r['csv_writes']} writes, {t.get('trials.csv writes', {}).get('cpu_s', 0):.1f} s CPU in all "
          f"({1000 * t.get('trials.csv writes', {}).get('cpu_s', 0) / max(1, r['csv_writes']):.1f} ms each), final {r['csv_final_kib']:.0f} KiB, "
          f"{r['csv_written_mib']:.1f} MiB written")
    snap = t.get("experiment-state snapshots", {"calls": 0, "s": 0, "cpu_s": 0})
    sug = r["suggest_ms"]
    print(f"  Tune experiment-state snapshots: {snap['calls']}, {snap['s']:.1f} s wall, {snap.get('cpu_s', 0):.1f} s CPU; searcher: {sug['count']} proposals, "
          f"{sug['s']:.1f} s = {sug['count'] / max(sug['s'], 1e-9):.0f} proposals per searcher-second; {sug['first']:.1f} ms each "
          f"over the first tenth, {sug['last']:.1f} ms over the last")
    print(f"  report: {r['report_s']:.1f} s, {r['report_mib']:.1f} MiB   [target <= 60 s, <= 15 MB]; importances {r['importance_s']:.1f} s")
    print(f"  checkpoints left on disk: {r['checkpoints_left']} ({r['checkpoint_bytes_left'] / 2**20:.1f} MiB); live view {r['live_lines']} lines")


def main(argv=None) -> None:
    from tumorseg.cli import ArgumentParser

    p = ArgumentParser(prog="search.bench --scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", default="100,500,2000", help="sweep sizes N, comma-separated")
    p.add_argument("--gpus", type=int, default=64, help="logical GPUs in all = trial slots")
    p.add_argument("--nodes", type=int, default=1, help="Ray nodes on this machine (GPUs split evenly)")
    p.add_argument("--epoch-s", type=float, default=3.0, help="mean sleep of one simulated epoch")
    p.add_argument("--epochs", type=int, default=20, help="epoch budget (ASHA max_t)")
    p.add_argument("--grace-period", type=int, default=2)
    p.add_argument("--reduction-factor", type=float, default=3)
    p.add_argument("--checkpoint-kb", type=int, default=16, help="size of a simulated checkpoint (a real one is ~165 MB)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop each sweep after this long (what ran is measured)")
    p.add_argument("--searcher-only", action="store_true", help="only the searcher's proposal rate")
    p.add_argument("--report-only", action="store_true", help="only the report and importances, on a simulated finished sweep")
    p.add_argument("--out", type=Path, default=None, help="keep the sweeps here (default: a temporary folder, removed)")
    p.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # the local cluster's; read when Ray is first imported
    sizes = [int(v) for v in args.trials.split(",")]
    from search.rundir import package_versions
    from tumorseg.bench import machine

    versions = package_versions()
    print(f"machine: {machine()}; load average {load_average()}")
    print(f"versions: ray {versions['ray']}, optuna {versions['optuna']}")
    print("SIMULATION: trials sleep instead of training (search.bench_scale.sleep_trial); this measures the orchestration, not training.")
    results = {"searcher": {}, "sweeps": []}
    for n in sizes if args.searcher_only else []:
        r = results["searcher"][n] = searcher_rate(n, args.gpus)
        print(f"searcher alone, N={n}, {args.gpus} in flight: {r['per_s']:.0f} proposals per CPU second; {r['first_ms']:.1f} CPU ms "
              f"each over the first tenth, {r['last_ms']:.1f} over the last")
    if args.report_only:
        with tempfile.TemporaryDirectory(prefix="tumorseg-report-") as tmp:
            for n in sizes:
                run_dir = synthetic_run_dir(n, Path(tmp), slots=args.gpus, epoch_s=args.epoch_s, epochs=args.epochs)
                from search.rundir import load_sweep

                r = results.setdefault("report", {})[n] = report_and_importance(run_dir, load_sweep(run_dir)[1])
                print(f"report of a simulated {n}-trial sweep: {r['report_s']:.1f} s, {r['report_mib']:.1f} MiB; importances "
                      f"{r['importance_s']:.1f} s   [target <= 60 s, <= 15 MB at N=2000]")
    elif not args.searcher_only:
        out = args.out or Path(tempfile.mkdtemp(prefix="tumorseg-scale-"))
        temp_dir = Path(tempfile.mkdtemp(prefix="tsb-", dir="/tmp"))  # short: Ray's socket paths have a length limit
        try:
            per_node = args.gpus // args.nodes  # one CPU per trial, as search.run derives it on a GPU node
            with local_cluster(args.nodes - 1, per_node, per_node, temp_dir, HEAD_PORT, NODE_PORT_BASE, "search.bench --scale",
                               SIMULATED_CLUSTER_ENV) as cluster:
                print(f"local Ray cluster: {args.nodes} node(s), {args.gpus // args.nodes} logical GPUs + CPUs each, up in {cluster['start_s']:.0f} s")
                for n in sizes:
                    r = run_sweep(n, cluster["address"], args.gpus, out.resolve(), args.epoch_s, args.epochs, args.grace_period,
                                  args.reduction_factor, args.checkpoint_kb, temp_dir, args.max_minutes and 60 * args.max_minutes)
                    results["sweeps"].append(r)
                    print_sweep(r, args.epoch_s, args.nodes)
                    sys.stdout.flush()
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
            if args.out is None:
                shutil.rmtree(out, ignore_errors=True)
    print(f"load average at the end {load_average()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
