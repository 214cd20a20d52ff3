"""The Tune experiment: Optuna's TPE proposes, ASHA stops, Tune runs the trainable.

``METRIC`` is what ASHA compares at its rungs and what TPE learns from: the best native-resolution
validation Dice a trial has reached so far. One epoch's Dice is noisy early on; the running best is
what the trial would be selected by, and it is the score trials.csv and the report rank.
"""

from __future__ import annotations

from search.rundir import TUNE_DIR, SweepSettings, trial_dirname, trial_name
from search.space import SearchSpace, define_by_run, seed_point

METRIC = "best_val_dice"
# each proposal reads the best and the latest trials, not all (search.sampler_window)
HISTORY = {"best": 32, "recent": 256}


def sampler_settings(settings: SweepSettings) -> dict:
    """TPE's settings for this sweep (recorded in sweep.json).

    Optuna's default of 10 random start-up trials would make a 12-16 trial sweep mostly random
    search: a quarter of the budget (3 to 10 trials, the seed recipe included) is random, the rest
    TPE. ``multivariate`` + ``group`` model the conditional loss parameters jointly; the constant
    liar keeps trials proposed while others still run from all landing on the same point.
    """
    return {
        "name": "TPESampler",
        "n_startup_trials": max(3, min(10, settings.num_samples // 4)),
        "multivariate": True,
        "group": True,
        "constant_liar": True,
        "seed": settings.seed,
        "history": HISTORY,
    }


def make_searcher(settings: SweepSettings, space: SearchSpace, max_concurrent: int):
    import warnings

    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from search.sampler_window import WindowedSampler

    options = {k: v for k, v in sampler_settings(settings).items() if k not in ("name", "history")}
    with warnings.catch_warnings():  # multivariate/group are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(**options)
    sampler = WindowedSampler(sampler, **HISTORY)  # proposals stop getting slower with the number of trials
    points = settings.points or [seed_point(space)[0]]
    searcher = OptunaSearch(space=define_by_run(space), metric=METRIC, mode="max", points_to_evaluate=points, sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent + lookahead(settings, max_concurrent))


def lookahead(settings: SweepSettings, slots: int) -> int:
    """Trials proposed beyond the slots, waiting for one (resources, not the searcher, bound the running ones).

    Tune hands a finished trial's process to a waiting trial (actor reuse) only if one is waiting
    when the trial ends; proposed no earlier, the next trial gets a new process (Python, torch and
    smp imported again). Measured with 64 slots: 121 processes started for the first 170 trials
    without; with --max-concurrent the cap stays exact.
    """
    return 0 if settings.max_concurrent else max(1, slots // 8)


def make_scheduler(settings: SweepSettings):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=METRIC, mode="max", max_t=settings.epochs,
                         grace_period=settings.grace_period, reduction_factor=settings.reduction_factor)


def make_trainable(settings: SweepSettings, base: dict, data, encoder_states, code: dict | None = None):
    """The trainable with its shared inputs bound (the data's handle: ``search.datapath``) and its resources.

    ``code``: ``tune_trainable``'s ``run``/``save``/``load`` replacements (``search.bench_scale``).
    """
    from ray import tune

    from search.datapath import data_handle
    from search.trainable import COORDINATOR_CPUS, tune_trainable

    workers = int(settings.gpus_per_trial) if settings.gpus_per_trial > 1 else 1
    # data-parallel trials: the Tune trial only waits on its TorchTrainer, whose workers hold the
    # GPUs and CPUs; Ray needs a non-empty request, so the coordinator takes a token share of CPU
    resources = {"cpu": COORDINATOR_CPUS} if workers > 1 else {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    bound = tune.with_parameters(tune_trainable, base=base, data_ref=data_handle(data, settings.data_path), encoder_states=encoder_states,
                                 threads=settings.cpus_per_trial, workers=workers, storage=settings.tune_path, **(code or {}))
    return tune.with_resources(bound, resources)


def make_tuner(settings: SweepSettings, space: SearchSpace, trainable, max_concurrent: int, callbacks: list):
    from ray import tune

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(settings, space, max_concurrent),
            scheduler=make_scheduler(settings),
            num_samples=settings.num_samples,
            reuse_actors=settings.reuse_actors,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=settings.ray_root,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            # the latest epoch's state, and the one before it: with 1, Tune snapshots the whole
            # experiment (every trial and the searcher) after every checkpoint of every trial, a cost
            # per result that grows with the trials; with 2, about once per epoch-time of the sweep.
            # Finished trials' checkpoints are deleted (search.checkpoints).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            verbose=2 if settings.verbose else 0,  # 0: search.live's view instead of Tune's status boxes
            log_to_file=True,  # each trial's stdout/stderr in its folder (the terminal gets neither) ...
            sync_config=tune.SyncConfig(sync_artifacts=True),  # ... copied there from Ray's session folder
        ),
    )


def restore_tuner(settings: SweepSettings, trainable):
    from ray import tune

    return tune.Tuner.restore(settings.tune_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
