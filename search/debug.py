"""``python -m search.run --debug``: one trial in this process through ``run_trial``, no Ray at all.

The trial is the seed recipe's point on a tiny budget (2 epochs unless ``--epochs`` is given), so
a breakpoint anywhere in ``tumorseg`` is hit in the same code path as a real trial's.
"""

from __future__ import annotations

from search.rundir import SweepSettings
from search.space import SearchSpace, seed_point


def run_debug(settings: SweepSettings, space: SearchSpace, base: dict, explicit_epochs: bool) -> None:
    from tumorseg.model import load_encoder_states

    from search.trainable import load_search_data, run_trial

    params, notes = seed_point(space)
    for note in notes:
        print(f"note: {note}")
    base = {**base, "epochs": base["epochs"] if explicit_epochs else 2, "num_workers": 0}
    if params["warmup_epochs"] >= base["epochs"]:  # the tiny budget would end inside the warmup
        params["warmup_epochs"] = base["epochs"] - 1
        print(f"note: warmup_epochs {params['warmup_epochs']} so the {base['epochs']}-epoch debug run reaches its lr")
    print(f"debug: one trial in-process, no Ray: {params} for {base['epochs']} epoch(s)")
    cfg = {**base, **params}
    encoder_states = load_encoder_states(base["encoder_weights"], [cfg["encoder"]])
    dataset = settings.open_dataset(write_splits=False)  # debug mode leaves no run folder behind
    print(f"data: {dataset.info.describe()}")
    data = load_search_data(dataset, [params["resize_px"]], settings.cache_dir)

    def report(metrics: dict, checkpoint_fn) -> None:
        keys = ("epoch", "val_dice", "val_loss", "best_val_dice", "failure_reason")
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k in keys}
        print("report:", shown)

    run_trial(params, base=base, data=data, report=report, encoder_states=encoder_states, extra={"trial_index": 0},
              log=print, progress=True)
