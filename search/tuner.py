"""The Tune experiment: Optuna (TPE unless --sampler) proposes, ASHA stops, Tune runs the trainable.

``METRIC`` is what the sampler learns from and what trials.csv, the report and the retrain rank by:
the best native-resolution validation Dice a trial has reached so far. ASHA compares trials at a rung
by ``--rung-metric``: by default that epoch's validation Dice, which `search.bench --asha-yield`
measured losing less of the best than the running best at the same epochs saved (README, Benchmarks).
The sampler works on the sweep's Optuna study in a database (``search.study``): ``StudySearch``
asks it, ``StudyCallback`` mirrors every trial into it (``search.studysearch``).
"""

from __future__ import annotations

from search.rundir import TUNE_DIR, SweepSettings, trial_dirname, trial_name
from search.space import SearchSpace, define_by_run, seed_point

METRIC = "best_val_dice"
RUNG_METRICS = ("val_dice", "best_val_dice")  # --rung-metric: what ASHA compares at a rung


SAMPLERS = ("tpe", "gp", "random", "qmc")  # --sampler


def sampler_settings(settings: SweepSettings) -> dict:
    """The sampler's settings for this sweep (recorded in sweep.json; ``make_sampler`` builds it).

    TPE: Optuna's default of 10 random start-up trials would make a 12-16 trial sweep mostly random
    search: a quarter of the budget (3 to 10 trials, the seed recipe included) is random, the rest
    TPE. ``multivariate`` + ``group`` model the conditional loss parameters jointly; the constant
    liar keeps trials proposed while others still run from all landing on the same point.
    GP (Optuna's GPSampler, made for small budgets): the same start-up count, counted in COMPLETE
    trials only; conditional parameters are sampled at random. QMC: a scrambled Sobol sequence.
    """
    start_up = max(3, min(10, settings.num_samples // 4))
    if settings.sampler == "gp":
        return {"name": "GPSampler", "n_startup_trials": start_up, "seed": settings.seed,
                "deterministic_objective": False, "warn_independent_sampling": False}
    if settings.sampler == "random":
        return {"name": "RandomSampler", "seed": settings.seed}
    if settings.sampler == "qmc":
        return {"name": "QMCSampler", "qmc_type": "sobol", "scramble": True, "seed": settings.seed,
                "warn_independent_sampling": False}
    return {
        "name": "TPESampler",
        "n_startup_trials": start_up,
        "multivariate": True,
        "group": True,
        "constant_liar": True,
        "seed": settings.seed,
    }


def make_sampler(settings: SweepSettings):
    import warnings

    import optuna

    options = sampler_settings(settings)
    with warnings.catch_warnings():  # multivariate/group are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return getattr(optuna.samplers, options.pop("name"))(**options)


def make_searcher(settings: SweepSettings, space: SearchSpace, max_concurrent: int, storage_url: str | None = None):
    """Optuna's sampler on the sweep's study (``storage_url``; None: in memory), seed recipe or --points first."""
    from ray.tune.search import ConcurrencyLimiter

    from search.studysearch import StudySearch

    points = settings.points or [seed_point(space)[0]]
    searcher = StudySearch(storage_url=storage_url, study_name=settings.name, space=define_by_run(space), metric=METRIC,
                           mode="max", points_to_evaluate=points, sampler=make_sampler(settings))
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def make_scheduler(settings: SweepSettings):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=settings.rung_metric, mode="max", max_t=settings.epochs,
                         grace_period=settings.grace_period, reduction_factor=settings.reduction_factor)


def make_trainable(settings: SweepSettings, base: dict, data, encoder_states):
    """The trainable with its shared inputs bound (data through the object store, once) and its resources."""
    import ray
    from ray import tune

    from search.trainable import COORDINATOR_CPUS, tune_trainable

    workers = int(settings.gpus_per_trial) if settings.gpus_per_trial > 1 else 1
    # data-parallel trials: the Tune trial only waits on its TorchTrainer, whose workers hold the
    # GPUs and CPUs; Ray needs a non-empty request, so the coordinator takes a token share of CPU
    resources = {"cpu": COORDINATOR_CPUS} if workers > 1 else {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    bound = tune.with_parameters(tune_trainable, base=base, data_ref={"ref": ray.put(data)}, encoder_states=encoder_states,
                                 threads=settings.cpus_per_trial, workers=workers, storage=settings.tune_path)
    return tune.with_resources(bound, resources)


def make_tuner(settings: SweepSettings, space: SearchSpace, trainable, max_concurrent: int, callbacks: list,
               storage_url: str | None = None):
    from ray import tune

    from search.checkpoints import ContinueFromSavedCheckpoint
    from search.studysearch import StudyCallback

    callbacks = [ContinueFromSavedCheckpoint(), *callbacks]  # pickled with the experiment: --resume runs it
    if storage_url is not None:  # mirrors every trial into the study; first, so what trials.csv shows is in the study
        callbacks = [StudyCallback(settings.name, storage_url, settings.epochs, METRIC), *callbacks]

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(settings, space, max_concurrent, storage_url),
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
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the latest epoch's state
            callbacks=callbacks,
            verbose=2 if settings.verbose else 0,  # 0: search.live's view instead of Tune's status boxes
            log_to_file=True,  # each trial's stdout/stderr in its folder (the terminal gets neither) ...
            sync_config=tune.SyncConfig(sync_artifacts=True),  # ... copied there from Ray's session folder
        ),
    )


def restore_tuner(settings: SweepSettings, trainable):
    from ray import tune

    return tune.Tuner.restore(settings.tune_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
