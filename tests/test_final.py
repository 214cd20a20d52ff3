"""The final stage on a hand-made run folder (64 px, 1 epoch): retrain runs keyed by what produced
them (a changed best configuration or fewer seeds never reuses or averages other runs), seed
ensembles, post-processing chosen on validation, baselines, the shipped model and the report."""

import json

import numpy as np
import pytest

from search.cli import build_parser, settings_from_args
from search.rundir import SweepSettings, run_key, write_sweep_json
from search.space import SearchSpace, fit_to_budget
from tumorseg.config import TrainConfig

FIXED = {**TrainConfig(resize_px=64, batch_size=8, encoder_weights="none", num_workers=0).to_dict(), "epochs": 1, "seed": 0}
GOOD = {"resize_px": 64, "loss_type": "dice", "lr": 3e-3, "warmup_epochs": 0, "weight_decay": 0.01}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """16 training images at 64 px (2 steps an epoch): this test trains 5 runs."""
    from tumorseg.synthetic import SyntheticSpec, make_synthetic

    spec = SyntheticSpec(image_px=64, n_train=16, n_valid=12, n_test=12, empty_fraction=0.2)
    return make_synthetic(tmp_path_factory.mktemp("tiny"), spec)


def make_run_dir(root, data, best_params: dict):
    """What search.run leaves before its retrain: sweep.json and best_config.json."""
    space, notes = fit_to_budget(SearchSpace(resize_choices=[64], lr_range=(1e-4, 5e-3)), epochs=1, grace_period=1, explicit=False)
    settings = SweepSettings(name="final", storage=str(root), data=str(data), epochs=1, grace_period=1, retrain_seeds=2)
    run_dir = root / "final"
    run_dir.mkdir()
    write_sweep_json(run_dir, settings, space, FIXED, notes=notes, sampler={}, argv=[])
    write_best(run_dir, best_params)
    return run_dir


def write_best(run_dir, params: dict) -> None:
    best = {"trial_index": 1, "trial_id": "x", "best_val_dice": 0.5, "params": params,
            "config": TrainConfig.from_dict({**FIXED, **params}).to_dict()}
    (run_dir / "best_config.json").write_text(json.dumps(best))


def test_final_epochs_flag_and_its_default():
    args = build_parser().parse_args(["--epochs", "4", "--encoder-weights", "none"])
    settings, *_ = settings_from_args(args)
    assert settings.final_epochs is None and settings.retrain_epochs() == 12  # 3 x --epochs
    args = build_parser().parse_args(["--epochs", "4", "--final-epochs", "7", "--encoder-weights", "none"])
    assert settings_from_args(args)[0].retrain_epochs() == 7


def test_run_key_ignores_the_seed_only():
    cfg = TrainConfig(resize_px=64).to_dict()
    key = run_key(cfg, "fp")
    assert run_key({**cfg, "seed": 5}, "fp") == key
    assert len({key, run_key({**cfg, "lr": 2e-4}, "fp"), run_key({**cfg, "epochs": 21}, "fp"), run_key(cfg, "other")}) == 4


def test_the_shipped_recipe_is_chosen_on_validation_and_ties_go_to_the_sweeps_best():
    from search.finalize import choose_shipped

    def entries(best: float, seed_recipe: float) -> dict:
        return {recipe: {"ensemble_postprocessed": {"valid": {"dice": dice}, "test": {"dice": 1 - dice}}}
                for recipe, dice in (("best", best), ("seed_recipe", seed_recipe))}

    assert choose_shipped(entries(0.70, 0.72))[0] == "seed_recipe"  # clearly better on validation (test never read)
    assert choose_shipped(entries(0.70, 0.7019))[0] == "best"  # within the margin: the sweep's choice stands
    assert choose_shipped(entries(0.72, 0.70))[0] == "best"
    shipped, why = choose_shipped({"seed_recipe": entries(0, 0.5)["seed_recipe"]})
    assert (shipped, why) == ("seed_recipe", "no trial succeeded")
    assert "best 0.7000, seed recipe 0.7200" in choose_shipped(entries(0.70, 0.72))[1]


@pytest.mark.slow
def test_final_stage_ensembles_postprocesses_and_never_reuses_stale_runs(tiny_data, tmp_path):
    from search.finalize import choose_shipped
    from search.live import closing_block
    from search.report import build_report
    from search.retrain import retrain
    from tumorseg.data import load_dataset, open_dataset
    from tumorseg.inference import predict_probabilities
    from tumorseg.metrics import dice_per_image, mask_counts
    from tumorseg.postprocess import (
        apply_postprocess,
        load_final_model,
        load_postprocess,
    )

    run_dir = make_run_dir(tmp_path, tiny_data, GOOD)
    final = run_dir / "final"
    lines = []
    summary = retrain(run_dir, seeds=2, final_epochs=1, log=lines.append)
    assert json.loads((final / "metrics.json").read_text()) == json.loads(json.dumps(summary))
    for recipe in ("best", "seed_recipe"):
        entry = summary[recipe]
        assert entry["seeds"] == [0, 1] and entry["epochs"] == 1
        assert entry["runs"] == [f"{recipe}/{entry['key']}/seed{k}" for k in (0, 1)]
        assert len(entry["test"]["dice"]["values"]) == 2  # per seed, mean +- std
        assert entry["ensemble"]["members"] == 2
        assert set(entry["ensemble"]["test"]) == set(entry["ensemble_postprocessed"]["test"]) == {"dice", "iou", "precision", "recall", "f1"}
        # chosen on validation: the pipeline is never worse there than none
        assert entry["ensemble_postprocessed"]["valid"]["dice"] >= entry["ensemble"]["valid"]["dice"]
    fingerprint = summary["dataset"]["fingerprint"]
    assert summary["best"]["key"] == run_key(TrainConfig.from_dict({**FIXED, **GOOD}).to_dict(), fingerprint)

    dataset = open_dataset(tiny_data)
    test = load_dataset(dataset, 64, splits=("test",))["test"]
    test_masks = test.native_mask(slice(None))
    empty_share = float((test_masks.reshape(len(test_masks), -1).sum(1) == 0).mean())
    assert summary["baselines"]["all_background"]["test"]["dice"] == pytest.approx(empty_share)  # empty/empty = 1, else 0
    assert 0 < summary["baselines"]["train_mean_box"]["test"]["dice"] < 1

    # the shipped model, chosen on validation: its 2 members and its post-processing reproduce its test Dice
    shipped_recipe = summary["final_model"]["recipe"]
    assert (shipped_recipe, summary["final_model"]["chosen_by"]) == choose_shipped({r: summary[r] for r in ("best", "seed_recipe")})
    assert summary["final_model"]["members"] == ["model/member0.pt", "model/member1.pt"]
    models, cfg, pp = load_final_model(run_dir)
    assert len(models) == 2 and cfg.lr == {"best": GOOD["lr"], "seed_recipe": 1e-4}[shipped_recipe] and cfg.epochs == 1
    assert pp == load_postprocess(final / "postprocess.json") and pp.to_dict() == summary[shipped_recipe]["postprocess"]
    probs = predict_probabilities(models, test.images, cfg, test.native_hw, flip_tta=pp.flip_tta)
    dice = dice_per_image(mask_counts(apply_postprocess(probs, pp), test_masks)).mean()
    assert dice == pytest.approx(summary["final_model"]["test"]["dice"], abs=1e-9)
    for name in ("model.pt", "predictions.png", "overlay_best.png", "test_per_image.csv"):
        assert (final / name).is_file()

    page = build_report(run_dir).read_text()
    shipped = summary[shipped_recipe]["ensemble_postprocessed"]["test"]["dice"]
    assert "best configuration, ensemble of 2 (mean of probabilities)" in page and ": the shipped model" in page
    assert f"<td>{shipped:.4f}</td>" in page and "trivial baseline: all background" in page
    assert f"<td>{summary['baselines']['train_mean_box']['test']['dice']:.4f}</td>" in page
    assert "Post-processing of the best configuration" in page
    assert "shipped      ensemble of 2 + post-processing" in closing_block(run_dir, "final", str(tmp_path), None, summary, None)

    # a resumed sweep found another best configuration, and the retrain now has 1 seed
    old_key, recipe_key = summary["best"]["key"], summary["seed_recipe"]["key"]
    write_best(run_dir, {**GOOD, "lr": 2e-3})
    lines.clear()
    again = retrain(run_dir, seeds=1, final_epochs=1, log=lines.append)
    assert again["best"]["key"] != old_key and again["seed_recipe"]["key"] == recipe_key
    assert "retrain: seed_recipe seed 0 already done (seed_recipe/" + recipe_key + ")" in lines
    assert not any("best seed 0 already done" in line for line in lines)  # not the old configuration's run
    assert again["best"]["runs"] == [f"best/{again['best']['key']}/seed0"]
    # seed 1 of the seed recipe is still on disk, but not averaged in
    assert (final / "seed_recipe" / recipe_key / "seed1" / "metrics.json").is_file()
    assert again["seed_recipe"]["runs"] == [f"seed_recipe/{recipe_key}/seed0"]
    assert again["seed_recipe"]["test"]["dice"]["values"] == summary["seed_recipe"]["test"]["dice"]["values"][:1]
    assert again["seed_recipe"]["ensemble"]["members"] == 1
    assert sorted(p.name for p in (final / "model").iterdir()) == ["member0.pt"]
    models, cfg, _ = load_final_model(run_dir)
    assert len(models) == 1 and cfg.lr == {"best": 2e-3, "seed_recipe": 1e-4}[again["final_model"]["recipe"]]
    assert np.isfinite(again["final_model"]["test"]["dice"])
