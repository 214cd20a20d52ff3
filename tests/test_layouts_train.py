"""tumorseg.train on every layout (64 px, 1 epoch); model.pt records channels; predict refuses others."""

import json

import numpy as np
import pytest
from PIL import Image

from tumorseg.checkpoint import load_model
from tumorseg.synthetic import SyntheticSpec, make_synthetic

TINY = ["--resize", "64", "--epochs", "1", "--encoder-weights", "none", "--batch-size", "8", "--num-workers", "0"]


@pytest.mark.parametrize("kw, channels", [
    (dict(layout="coco"), 1),
    (dict(layout="pairs"), 1),
    (dict(layout="pairs-beside", channels=3, bit_depth=16), 3),
    (dict(layout="nnunet", channels=2), 2),
])
def test_train_on_every_layout(tmp_path, capsys, kw, channels):
    from tumorseg.train import main

    spec = SyntheticSpec(image_px=64, n_train=16, n_valid=4, n_test=4, **kw)
    root = make_synthetic(tmp_path / "data", spec)
    out = tmp_path / "run"
    main(["--data", str(root), "--out", str(out), *TINY])
    printed = capsys.readouterr().out
    assert f"data: built-in synthetic ({spec.layout.split('-')[0]}, {channels} channel(s)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"]["channels"] == channels and metrics["dataset"]["name"] == "built-in synthetic"
    assert "seed_reported_test" not in metrics  # the seed's Kaggle numbers only on the Kaggle data
    model, _, payload = load_model(out / "model.pt")
    assert payload["in_channels"] == channels and model.encoder.conv1.in_channels == channels
    carved = (out / "splits.json").is_file()
    assert carved == (spec.layout != "coco")
    if carved:
        listed = json.loads((out / "splits.json").read_text())
        assert sum(map(len, listed.values())) == 24 and all((root / n).is_file() for n in listed["test"])


def test_predict_refuses_another_channel_count(tmp_path, capsys):
    from tumorseg.predict import main as predict
    from tumorseg.train import main

    root = make_synthetic(tmp_path / "data", SyntheticSpec(image_px=64, n_train=16, n_valid=4, n_test=4,
                                                           layout="pairs", channels=3, presplit=True))
    main(["--data", str(root), "--out", str(tmp_path / "run"), *TINY])
    good = sorted((root / "test" / "images").iterdir())[0]
    predict([str(tmp_path / "run" / "model.pt"), str(good), "--out", str(tmp_path / "pred")])
    assert np.asarray(Image.open(tmp_path / "pred" / f"{good.stem}_mask.png")).shape == (64, 64)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(grey)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        predict([str(tmp_path / "run" / "model.pt"), str(grey), "--out", str(tmp_path / "pred")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tumorseg.predict: error: {grey}: the image has 1 channel(s) but the model takes 3"]
