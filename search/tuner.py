"""The Tune experiment: Optuna (TPE unless --sampler) proposes, ASHA stops, Tune runs the trainable.

``METRIC`` is what the sampler learns from and what trials.csv, the report and the retrain rank by:
the best native-resolution validation Dice a trial has reached so far. ASHA compares trials at a rung
by ``--rung-metric``: by default that epoch's validation Dice, which `search.bench --asha-yield`
measured losing less of the best than the running best at the same epochs saved (README, Benchmarks).
The sampler works on the sweep's Optuna study in a database (``search.study``): ``StudySearch``
asks it, ``StudyCallback`` mirrors every trial into it (``search.studysearch``). TPE and GP model
a bounded window of the study (the best, the latest and the running trials,
``search.sampler_window``), so their models stop growing with the number of trials.
"""

from __future__ import annotations

from search.rundir import TUNE_DIR, SweepSettings, trial_dirname, trial_name
from search.space import SearchSpace, define_by_run, seed_point

METRIC = "best_val_dice"
RUNG_METRICS = ("val_dice", "best_val_dice")  # --rung-metric: what ASHA compares at a rung


SAMPLERS = ("tpe", "gp", "random", "qmc")  # --sampler
# TPE's and GP's proposals model the best and the latest trials, not all (search.sampler_window);
# random and QMC model none (QMC reads its search space from the study's first finished trial)
HISTORY = {"best": 32, "recent": 256}
WINDOWED = ("tpe", "gp")


def sampler_settings(settings: SweepSettings) -> dict:
    """The sampler's settings for this sweep (recorded in sweep.json; ``make_sampler`` builds it), with
    the ``history`` window TPE and GP propose from (``HISTORY``, ``search.sampler_window``).

    TPE: Optuna's default of 10 random start-up trials would make a 12-16 trial sweep mostly random
    search: a quarter of the budget (3 to 10 trials, the seed recipe included) is random, the rest
    TPE. ``multivariate`` + ``group`` model the conditional loss parameters jointly; the constant
    liar keeps trials proposed while others still run from all landing on the same point.
    GP (Optuna's GPSampler, made for small budgets): the same start-up count, counted in COMPLETE
    trials only; conditional parameters are sampled at random. QMC: a scrambled Sobol sequence.
    """
    options = _sampler_options(settings)
    return {**options, "history": dict(HISTORY)} if settings.sampler in WINDOWED else options


def _sampler_options(settings: SweepSettings) -> dict:
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

    from search.sampler_window import WindowedSampler

    options = sampler_settings(settings)
    name, history = options.pop("name"), options.pop("history", None)
    with warnings.catch_warnings():  # multivariate/group are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = getattr(optuna.samplers, name)(**options)
    return WindowedSampler(sampler, **history) if history else sampler  # proposals stop getting slower with N


def make_searcher(settings: SweepSettings, space: SearchSpace, max_concurrent: int, storage_url: str | None = None):
    """Optuna's sampler on the sweep's study (``storage_url``; None: in memory), seed recipe or --points first;
    ``lookahead`` trials proposed beyond the ``max_concurrent`` slots."""
    from ray.tune.search import ConcurrencyLimiter

    from search.studysearch import StudySearch

    points = settings.points or [seed_point(space)[0]]
    searcher = StudySearch(storage_url=storage_url, study_name=settings.name, space=define_by_run(space), metric=METRIC,
                           mode="max", points_to_evaluate=points, sampler=make_sampler(settings))
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent + lookahead(settings, max_concurrent))


def lookahead(settings: SweepSettings, slots: int) -> int:
    """Trials proposed beyond the slots, waiting for one (resources, not the searcher, bound the running ones).

    Tune hands a finished trial's process to a waiting trial (actor reuse) only if one is waiting
    when the trial ends; proposed no earlier, the next trial gets a new process (Python, torch and
    smp imported again). Measured with 64 slots: 121 processes started for the first 170 trials
    without; with --max-concurrent the cap stays exact.
    """
    return 0 if settings.max_concurrent else lookahead_trials(slots)


def lookahead_trials(slots: int) -> int:
    """How many trials wait for a slot without --max-concurrent (also ``search.bench --tune-floor``'s)."""
    return max(1, slots // 8)


def make_scheduler(settings: SweepSettings):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=settings.rung_metric, mode="max", max_t=settings.epochs,
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


def mend_process_reuse(settings: SweepSettings) -> None:
    """With process reuse on, Tune's reuse mended in this driver (``search.actor_reuse``), for a new sweep and a resumed one."""
    if settings.reuse_actors:
        from search.actor_reuse import keep_starting_processes

        keep_starting_processes()


def make_tuner(settings: SweepSettings, space: SearchSpace, trainable, max_concurrent: int, callbacks: list,
               storage_url: str | None = None):
    from ray import tune

    from search.checkpoints import ContinueFromSavedCheckpoint, RecordTrialEnds
    from search.studysearch import StudyCallback

    mend_process_reuse(settings)

    # pickled with the experiment, so a --resume runs them too. In this order: a trial's end is on the
    # storage before the study and trials.csv are told, and on a resume's first step the trials that
    # had finished end as recorded before the rest are mended (search.checkpoints)
    callbacks = [ContinueFromSavedCheckpoint(), *callbacks]
    if storage_url is not None:  # mirrors every trial into the study, so what trials.csv shows is in the study
        callbacks = [StudyCallback(settings.name, storage_url, settings.epochs, METRIC), *callbacks]
    callbacks = [RecordTrialEnds(delete_checkpoints=not settings.keep_checkpoints), *callbacks]

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
            # the latest epoch's state, and the one before it: with 1, Tune snapshots the whole
            # experiment (every trial and the searcher) after every checkpoint of every trial, a cost
            # per result that grows with the trials; with 2, about once per epoch-time of the sweep.
            # Finished trials are recorded apart and their checkpoints deleted (search.checkpoints).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            verbose=2 if settings.verbose else 0,  # 0: search.live's view instead of Tune's status boxes
            log_to_file=True,  # each trial's stdout/stderr in its folder (the terminal gets neither) ...
            sync_config=tune.SyncConfig(sync_artifacts=True),  # ... copied there from Ray's session folder
        ),
    )


def restore_tuner(settings: SweepSettings, trainable):
    from ray import tune

    mend_process_reuse(settings)
    return tune.Tuner.restore(settings.tune_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
