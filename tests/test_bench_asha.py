"""The ASHA-yield benchmark's replay: Ray's own ASHAScheduler fed recorded learning curves."""

import json

import pytest

from search.bench_asha import parse_settings, replay, replay_in_order, write_subset
from tumorseg.errors import ConfigError


def _curves(*val: list[float], epoch_s: float = 1.0) -> list[dict]:
    """Hand-made trials: per-epoch val Dice (best so far derived), every epoch ``epoch_s`` long."""
    out = []
    for values in val:
        best = [max(values[: k + 1]) for k in range(len(values))]
        out.append({"val_dice": list(values), "best_val_dice": best, "epoch_s": [epoch_s] * len(values), "failed": False})
    return out


GOOD, WEAK, LATE = [0.5, 0.6, 0.7, 0.8], [0.2, 0.3, 0.4, 0.5], [0.1, 0.7, 0.8, 0.9]


def test_a_grace_period_of_the_whole_budget_stops_nothing():
    curves = _curves(GOOD, WEAK, LATE)
    out = replay(curves, epochs=4, grace=4, rf=3, metric="best_val_dice", slots=2)
    assert out == {"epochs": 12, "best": 0.9, "used": [4, 4, 4]}


def test_one_slot_judges_each_trial_against_the_ones_before_it():
    # rungs at epochs 1 and 2 (grace 1, rf 2, max_t 4); the cutoff is the median of the rung's records
    out = replay(_curves(GOOD, WEAK, LATE), epochs=4, grace=1, rf=2, metric="best_val_dice", slots=1)
    # GOOD is first everywhere (passes); WEAK 0.2 < 0.5 at epoch 1; LATE 0.1 < median(0.5, 0.2) = 0.35:
    # the late bloomer is stopped before its second epoch, and the best (0.9) is lost
    assert out == {"epochs": 6, "best": 0.8, "used": [4, 1, 1]}


def test_the_order_of_arrival_decides_what_is_stopped():
    curves = _curves(GOOD, WEAK)
    kwargs = {"epochs": 4, "grace": 1, "rf": 2, "metric": "best_val_dice"}
    good_first = [(0, 1), (1, 1), (0, 2), (0, 3), (0, 4)]
    weak_first = [(1, 1), (0, 1), (0, 2), (1, 2), (1, 3), (0, 3), (1, 4), (0, 4)]
    assert replay_in_order(curves, good_first, **kwargs)["used"] == [4, 1]
    # WEAK arrives first at epoch 1 and passes (an empty rung stops nothing); at epoch 2 it meets
    # GOOD's 0.6 and is stopped; its later reports never happen
    assert replay_in_order(curves, weak_first, **kwargs)["used"] == [4, 2]
    # with two slots and equal epoch times WEAK reaches each rung just after GOOD (ties go to the lower index)
    assert replay(curves, **kwargs, slots=2)["used"] == [4, 1]


def test_the_rung_metric_can_be_the_last_epoch_or_the_best_so_far():
    dip = [0.6, 0.1, 0.1, 0.1]  # best so far stays 0.6, the last epoch drops
    curves = _curves([0.5, 0.55, 0.6, 0.6], dip)  # judged at epoch 2 (grace 2) against 0.55
    assert replay(curves, epochs=4, grace=2, rf=2, metric="best_val_dice", slots=1)["used"] == [4, 4]
    assert replay(curves, epochs=4, grace=2, rf=2, metric="val_dice", slots=1)["used"] == [4, 2]


def test_settings_are_grace_rf_metric_triples():
    assert parse_settings("2:3:best,1:4:last") == [(2, 3.0, "best"), (1, 4.0, "last")]
    with pytest.raises(ConfigError, match="--settings '2:3:mean'"):
        parse_settings("2:3:mean")


def test_the_subset_is_a_coco_folder_of_links(tmp_path):
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 8, "width": 8} for i in range(5)]
    annotations = [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [0, 0, 2, 2]} for i in range(5)]
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "t"}]}
    (src / "train" / "_annotations.coco.json").write_text(json.dumps(coco))
    for image in images:
        (src / "train" / image["file_name"]).write_bytes(b"x")
    out = write_subset(src, tmp_path / "out", {"train": 2}, seed=0)
    subset = json.loads((out / "train" / "_annotations.coco.json").read_text())
    kept = [im["id"] for im in subset["images"]]
    assert len(kept) == 2 and [a["image_id"] for a in subset["annotations"]] == kept
    assert sorted(p.name for p in (out / "train").glob("*.jpg")) == sorted(f"{i}.jpg" for i in kept)
    assert all((out / "train" / f"{i}.jpg").resolve() == (src / "train" / f"{i}.jpg").resolve() for i in kept)
    assert write_subset(src, tmp_path / "again", {"train": 2}, seed=0) and json.loads(
        (tmp_path / "again" / "train" / "_annotations.coco.json").read_text()) == subset  # seeded: the same subset
    with pytest.raises(ConfigError, match="--train-images 9: .* has only 5 images"):
        write_subset(src, tmp_path / "big", {"train": 9})
