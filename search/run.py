"""The sweep: Ray Tune + Optuna (TPE) + ASHA over smp model trainings (UNet-ResNet18 unless --archs/--encoders), then retrain and test.

    python -m search.run --gpus 4                      # a local Ray cluster on this box
    python -m search.run --address auto --gpus 16      # an existing Ray cluster
    python -m search.run --debug                       # one trial in-process, no Ray at all
    python -m search.run --name NAME --resume          # continue an interrupted sweep

The order matters for what is left on disk: flags, data and storage are all checked before the
run folder is claimed (``sweep.json`` written), so a run that fails before its first trial can be
retried under the same name. Outputs: ``search.rundir`` (and ``results/README.md``).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from tumorseg.cli import exit_on_user_error
from tumorseg.config import TrainConfig
from tumorseg.errors import ConfigError

from search import cluster, rundir, study
from search.cli import RESUMED_SETTINGS, build_parser, check_resume_flags, explicit_flags, settings_from_args
from search.rundir import SweepSettings
from search.space import SearchSpace
from search.storage import check_visible_from_all_nodes, check_writable, is_uri


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with exit_on_user_error("search.run"):
            run(args, argv, explicit_flags(parser, argv))
    except KeyboardInterrupt:
        name = f" --name {args.name}" if args.name else ""
        print(f"\ninterrupted: finished work is on disk; continue with python -m search.run{name} --storage {args.storage} --resume",
              file=sys.stderr)
        raise SystemExit(130) from None


def run(args, argv: list[str], given: set[str]) -> None:
    settings, space, base, notes = settings_from_args(args)
    if args.debug:
        for note in notes:
            print(f"note: {note}")
        from search.debug import run_debug

        run_debug(settings, space, base, explicit_epochs="epochs" in given)
        return
    if args.resume:
        saved_settings, saved_space, saved_base, payload = resume_settings(settings, given)
        check_resume_flags(given, (settings, space, base), (saved_settings, saved_space, saved_base))
        settings, space, base, notes = saved_settings, saved_space, saved_base, payload.get("seed_point_notes", [])
        print(f"resuming {settings.run_dir}")
        if "study" not in payload:
            print("note: this sweep predates its Optuna study database: it continues without one")
    elif rundir.holds_sweep(settings.run_dir):
        raise ConfigError(f"--name {settings.name!r}: {settings.run_dir} already holds a sweep; continue it with "
                          f"--name {settings.name} --resume, or choose another --name")
    for note in notes:
        print(f"note: {note}")
    with_study = not args.resume or "study" in payload
    finished = run_sweep(settings, space, base, notes, argv, restore=args.resume, with_study=with_study)
    finish(settings, base, finished)


def resume_settings(given: SweepSettings, flags: set[str]) -> tuple[SweepSettings, SearchSpace, dict, dict]:
    """The saved sweep, with the flags that may change on resume (``flags``: those given) applied."""
    run_dir = given.run_dir
    if is_uri(given.storage) and not (run_dir / rundir.SWEEP_JSON).is_file():
        from search.storage import download

        download(given.ray_root, run_dir, only=rundir.DRIVER_FILES)
    if not (run_dir / rundir.SWEEP_JSON).is_file():
        raise ConfigError(f"--resume: no sweep named {given.name!r} under {given.storage} (nothing to resume)")
    settings, space, base, payload = rundir.load_sweep(run_dir)
    if is_uri(given.storage):
        settings.storage = given.storage
    settings.address = given.address  # where the cluster is now (also from RAY_ADDRESS)
    for name in flags & set(RESUMED_SETTINGS):
        setattr(settings, name, getattr(given, name))
    return settings, space, base, payload


def print_data_summary(dataset, size_px: int, cache_dir, run_dir: Path) -> None:
    """The three lines that matter before a sweep (which data, how it is split, what trivial
    models score), printed and kept in the run folder for the report."""
    from tumorseg.data import inspect
    from tumorseg.inspect_data import summary_lines

    lines = summary_lines(inspect(dataset, size_px, cache_dir))
    print("\n".join(lines))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / rundir.DATA_SUMMARY_TXT).write_text("\n".join(lines) + "\n")


def prepare_data(settings: SweepSettings, space: SearchSpace, base: dict, restore: bool) -> dict:
    """The sweep's arrays at every resize it may sample, after the data summary and its warnings."""
    from tumorseg.sanity import data_warnings, print_warnings

    from search.trainable import load_search_data

    t0 = time.perf_counter()
    if not restore:  # left by an attempt that failed before it claimed the name: not this sweep's
        for stale in (rundir.SPLITS_JSON, rundir.DATA_SUMMARY_TXT):
            (settings.run_dir / stale).unlink(missing_ok=True)
    dataset = settings.open_dataset()
    print_data_summary(dataset, min(space.resize_choices), settings.cache_dir, settings.run_dir)
    data = load_search_data(dataset, space.resize_choices, settings.cache_dir)
    print(f"data for sizes {sorted(data)} ready in {time.perf_counter() - t0:.1f}s")
    train = data[max(data)]["train"]
    print_warnings(data_warnings(train, sorted(data), base.get("batch_size", TrainConfig().batch_size), "--resize-choices"))
    return data


def run_sweep(settings: SweepSettings, space: SearchSpace, base: dict, notes: list[str], argv: list[str], restore: bool,
              with_study: bool = True) -> bool:
    """Check storage, study database, data and cluster, claim the run folder, run (or continue) the Tune experiment.

    Returns True when every trial finished.
    """
    cluster.use_auth_token(settings)  # before Ray is imported
    from tumorseg.model import load_encoder_states

    check_writable(settings.storage, settings.run_dir)
    study_url = study.sweep_url(settings) if with_study else None
    if study_url is not None:
        study.check_study(study_url, settings.name, resume=restore)
        study.register_url(settings.name, study_url)  # the restored searcher reconnects with it
    # once, for every encoder of the space, shipped to every trial
    encoder_states = load_encoder_states(base["encoder_weights"], space.encoders)
    data = prepare_data(settings, space, base, restore)
    cluster.route_ray_logs(settings.run_dir / rundir.RAY_LOG, settings.verbose)
    cluster.start_ray(settings)
    try:
        slots = place_trials(settings, base)
        if study_url is not None:
            shown = study.with_driver(study.redact(study_url))
            print(f"Optuna study {settings.name}: optuna-dashboard {shown} --host 127.0.0.1  (pip install -e '.[dashboard]')")
        if not is_uri(settings.storage):
            check_visible_from_all_nodes(settings.run_dir)
        mlflow_run = open_mlflow(settings, base)
        if not restore:
            from search.tuner import sampler_settings

            rundir.write_sweep_json(settings.run_dir, settings, space, base, notes=notes, sampler=sampler_settings(settings),
                                    argv=study.redact_argv(argv), study=study.study_record(settings, study_url))
        if mlflow_run:
            from search.tracking import record_sweep_run

            record_sweep_run(settings.run_dir, mlflow_run)
        return fit(settings, space, base, data, encoder_states, slots, restore, study_url, mlflow_run)
    finally:
        # The retrain runs in this process: free the idle trial processes (reused actors) and their
        # memory now, so they neither compete with it nor log their shutdown into its output.
        # On an attached cluster this only disconnects the driver.
        import ray

        ray.shutdown()


def place_trials(settings: SweepSettings, base: dict) -> int:
    """Fill in the trial shape from the cluster's nodes; print what runs at once and why; the cap."""
    import ray

    if settings.cpus_per_trial is None:
        settings.cpus_per_trial = cluster.default_cpus_per_trial(cluster.alive_nodes(), settings.gpus_per_trial)
    workers = int(settings.gpus_per_trial) if settings.gpus_per_trial > 1 else 1  # data-parallel ranks share the CPUs
    base.setdefault("num_workers", max(0, int(settings.cpus_per_trial / workers) - 1))
    cluster.check_resources(settings)
    total = ray.cluster_resources()
    slots, binding = cluster.concurrent_trials(settings, total.get("CPU", 0), total.get("GPU", 0))
    gpus = f", {settings.gpus_per_trial:g} GPU" if settings.gpus_per_trial else ""
    print(f"sweep {settings.name}: {settings.num_samples} trials x <= {settings.epochs} epochs; {slots} at a time "
          f"({settings.cpus_per_trial:g} CPU{gpus} each, bound by {binding}); outputs in {settings.run_dir}")
    if not settings.verbose:
        print(f"Ray's own log: {settings.run_dir / rundir.RAY_LOG} (--verbose shows it here)")
    return slots


def open_mlflow(settings: SweepSettings, base: dict) -> dict | None:
    """``--mlflow``: the sweep's parent run (created, or reused on --resume) before any trial starts."""
    if not settings.mlflow:
        return None
    from search.tracking import open_sweep_run

    info = open_sweep_run(settings, base)
    print(f"MLflow: sweep run {info['parent_run_id']} (experiment {info['experiment_id']}) in {info['uri']}")
    return info


def fit(settings: SweepSettings, space: SearchSpace, base: dict, data, encoder_states, slots: int, restore: bool,
        study_url: str | None = None, mlflow_run: dict | None = None, code: dict | None = None) -> bool:
    """Run (or continue) the Tune experiment; ``code``: see ``search.tuner.make_trainable``."""
    from search.callbacks import LiveViewCallback, MLflowCallback, TrialsTableCallback
    from search.trials import FINISHED, read_table
    from search.tuner import make_trainable, make_tuner, restore_tuner

    trainable = make_trainable(settings, base, data, encoder_states, code)
    if restore:
        tuner = restore_tuner(settings, trainable)
    else:
        callbacks = [TrialsTableCallback(settings.run_dir, settings.epochs),
                     LiveViewCallback(settings.run_dir, settings.num_samples, settings.epochs, slots)]
        if mlflow_run:  # on --resume Tune restores the callbacks it saved, this one included
            callbacks.append(MLflowCallback(mlflow_run, settings.epochs))
        # make_tuner adds the study mirror and the checkpoint callbacks (search.checkpoints)
        tuner = make_tuner(settings, space, trainable, slots, callbacks, study_url)
    interrupted = False
    try:
        tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # Tune installs its own SIGINT handler for a graceful stop and leaves it in place; give
        # Ctrl-C back to Python so the retrain stage can be interrupted (and resumed) too
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if is_uri(settings.storage):  # learning curves for the report
        from search.storage import download_trial_results

        download_trial_results(settings.tune_path, settings.run_dir / rundir.TUNE_DIR)
    table = read_table(settings.run_dir)
    done = table is not None and len(table) >= settings.num_samples and table["status"].isin(FINISHED).all()
    return done and not interrupted


def finish(settings: SweepSettings, base: dict, finished: bool) -> None:
    """best_config.json, the retrain, the report, the upload: whatever the sweep left."""
    run_dir = settings.run_dir
    from search.trials import write_best_config

    best = write_best_config(run_dir, base)
    if not finished:
        print(f"sweep interrupted: what finished is in {run_dir}/{rundir.TRIALS_CSV}; continue with "
              f"python -m search.run --name {settings.name} --storage {settings.storage} --resume", file=sys.stderr)
        report = write_report(run_dir)
        if report is not None:
            print(f"report of what finished: {report}")
        upload(settings)
        close_mlflow(settings, finished=False)
        raise SystemExit(130)
    if best is None:
        print("every trial failed: no best configuration (see trials.csv for the reasons)", file=sys.stderr)
    else:
        print(f"best trial_{best['trial_index']:03d}: val dice {best['best_val_dice']:.4f}")
    summary = None
    if not settings.no_retrain:
        from search.retrain import retrain

        summary = retrain(run_dir, settings.retrain_seeds, settings.retrain_epochs())
    report = write_report(run_dir)
    upload(settings)
    close_mlflow(settings, finished=True)
    from search.live import closing_block

    print(closing_block(run_dir, settings.name, settings.storage, best, summary, report))


def close_mlflow(settings: SweepSettings, finished: bool) -> None:
    if settings.mlflow:
        from search.tracking import close_sweep_run

        close_sweep_run(settings.run_dir, finished)


def upload(settings: SweepSettings) -> None:
    if is_uri(settings.storage):
        from search.storage import upload as upload_dir

        upload_dir(settings.run_dir, settings.ray_root, exclude=rundir.TUNE_DIR)
        print(f"uploaded {settings.run_dir} to {settings.ray_root}")


def write_report(run_dir: Path) -> Path | None:
    """Write the report; a failure here must not hide a finished sweep, so it is one warning line."""
    from search.report import build_report

    try:
        return build_report(run_dir)
    except Exception as err:  # noqa: BLE001 - the results are on disk; the report can be rebuilt
        print(f"warning: the report failed ({type(err).__name__}: {err}); rebuild it with "
              f"python -m search.report {run_dir}", file=sys.stderr)
        return None


if __name__ == "__main__":
    main()
