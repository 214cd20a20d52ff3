"""ONNX export of the model you take home: parity with torch, the ensemble graph, the model card, and
``tumorseg.predict`` giving the same masks from the exported file as from the run folder / model.pt."""

import csv
import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from tumorseg.checkpoint import load_model, save_model
from tumorseg.config import TrainConfig
from tumorseg.export import export
from tumorseg.export import main as export_main
from tumorseg.imageio import decode_for_model, read_header
from tumorseg.inference import predict_probabilities
from tumorseg.model import create_model
from tumorseg.postprocess import (
    PostProcess,
    apply_postprocess,
    load_final_model,
    save_postprocess,
)
from tumorseg.predict import PROBABILITY_SCALE
from tumorseg.predict import main as predict_main
from tumorseg.transforms import normalize

TINY = {"resize_px": 64, "encoder_weights": "none", "precision": "fp32", "eval_batch_size": 4}
POSTPROCESS = PostProcess(threshold=0.4, flip_tta=True, min_component_px=3)
DATASET = {"path": "/data/brain", "name": "brain", "layout": "coco", "fingerprint": "feedc0de12345678", "channels": 1,
           "split_sizes": {"train": 12, "valid": 4, "test": 4}, "splits_from": "data", "is_kaggle_brain_tumor": False}
RUN_METRICS = {  # a hand-made final/metrics.json: the card must show every entry that carries metrics
    "dataset": DATASET,
    "best": {"test": {"dice": {"mean": 0.61, "std": 0.02, "values": [0.59, 0.63]}},
             "ensemble": {"test": {"dice": 0.6345, "f1": 0.65}, "test_postprocessed": {"dice": 0.6512}}},
    "baselines": {"all_background": {"dice": 0.062}, "mean_box": {"dice": 0.149}},
}
COMMAND = "python -m tumorseg.export RUN"


@torch.no_grad()
def save_tiny(path, seed: int) -> None:
    """A randomly initialised Unet-resnet18 whose logits on noise images have median 0, so that its
    masks hold both classes (untrained, most seeds call nearly every pixel tumour)."""
    torch.manual_seed(seed)
    model = create_model(None, 1).eval()
    noise = np.random.default_rng(seed).integers(0, 256, (2, 1, 64, 64), dtype=np.uint8)
    model.segmentation_head[0].bias -= model(normalize(torch.from_numpy(noise))).median()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, model, TrainConfig(seed=seed, **TINY), dataset=DATASET)


def make_run(root, members: int = 2):
    """The final/ folder the final stage writes: member<k>.pt, postprocess.json, metrics.json."""
    for k in range(members):
        save_tiny(root / "final" / "model" / f"member{k}.pt", seed=k)
    save_postprocess(root / "final" / "postprocess.json", POSTPROCESS, [])
    (root / "final" / "metrics.json").write_text(json.dumps(RUN_METRICS))
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run"))
    return run, export(run, command=COMMAND, log=lambda *_: None)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def members_by_hand(run, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble written out: every member on x and on flip(x) flipped back; mean of the sigmoids."""
    views = []
    for k in range(2):
        model = load_model(run / "final" / "model" / f"member{k}.pt")[0].float()
        views += [model(x), model(x.flip(-1)).flip(-1)]
    logits = torch.cat(views, 1)
    return torch.sigmoid(logits).mean(1, keepdim=True).numpy(), logits.numpy()


def test_onnx_matches_torch_at_two_sizes_and_batch_sizes(exported):
    run, path = exported
    assert path == run / "export" / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False)
    assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("image", ["batch", 1, "height", "width"])]
    assert [o.name for o in session.get_outputs()] == ["probability", "logits"]
    generator = torch.Generator().manual_seed(1)
    for shape in [(1, 1, 64, 64), (3, 1, 96, 128)]:  # dynamic batch, height and width
        x = torch.randn(shape, generator=generator)
        probability, logits = session.run(None, {"image": x.numpy()})
        expected_probability, expected_logits = members_by_hand(run, x)
        assert probability.shape == (shape[0], 1, *shape[2:]) and logits.shape == (shape[0], 4, *shape[2:])
        assert np.abs(probability - expected_probability).max() <= 1e-4
        assert np.abs(logits - expected_logits).max() <= 1e-3  # each view: member 0, 0 flipped, 1, 1 flipped
        assert np.abs(logits[:, 0] - logits[:, 2]).max() > 1e-2  # two different members, not one twice


def test_model_card_says_where_the_model_came_from_and_how_to_feed_it(exported):
    run, path = exported
    card = json.loads((run / "export" / "model_card.json").read_text())
    members = [run / "final" / "model" / f"member{k}.pt" for k in range(2)]
    assert card["command"] == COMMAND
    assert [m["sha256"] for m in card["source"]["member_files"]] == [sha256(m) for m in members]
    assert card["onnx"]["sha256"] == sha256(path) and card["onnx"]["opset"] >= 17 and card["onnx"]["flip_tta_in_graph"]
    assert card["onnx"]["parity"]["max_abs_diff"]["probability"] <= 1e-4
    assert card["model"]["members"] == 2 and card["model"]["resize_px"] == 64
    assert {k: card["postprocess"][k] for k in POSTPROCESS.to_dict()} == POSTPROCESS.to_dict()
    assert card["data"] == DATASET and card["metrics"] == RUN_METRICS
    assert card["preprocessing"]["mean"] == pytest.approx(0.449) and card["preprocessing"]["std"] == pytest.approx(0.226)
    assert card["versions"]["onnxruntime"] == ort.__version__ and card["versions"]["torch"].startswith(torch.__version__.split("+")[0])

    text = (run / "export" / "model_card.md").read_text()
    for expected in ["(ensemble of 2)", "fingerprint `feedc0de12345678`", "train 12, valid 4, test 4",
                     "**threshold 0.4, flip TTA, remove components < 3 px**", "to 64 x 64 px", "use multiples of 32",
                     "(x - 0.449000) / 0.226000", "float32 (batch, 4, height, width)", f"`{COMMAND}`",
                     "| best / test | 0.6100 ± 0.0200 |", "| best / ensemble / test | 0.6345 | 0.6500 |",
                     "| best / ensemble / test_postprocessed | 0.6512 |", "| baselines / all_background | 0.0620 |",
                     "| baselines / mean_box | 0.1490 |"]:
        assert expected in text


def write_scans(root) -> None:
    """A nested folder: native sizes other than the model's 64 px, three formats."""
    rng = np.random.default_rng(0)
    (root / "sub" / "deep").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (96, 128), dtype=np.uint8)).save(root / "sub" / "b.png")
    Image.fromarray(rng.integers(0, 256, (80, 80), dtype=np.uint8)).save(root / "sub" / "deep" / "c.jpg", quality=95)


def read_outputs(out) -> dict:
    """mask name -> (CSV row, mask {0,1}, probabilities from the 16-bit PNG)."""
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    found = {}
    for row in rows:
        stem = out / row["mask"].removesuffix("_mask.png")
        mask = np.asarray(Image.open(out / row["mask"])) // 255
        probs = np.asarray(Image.open(f"{stem}_prob.png"), np.float64) / PROBABILITY_SCALE
        found[row["mask"]] = (row, mask, probs)
    return found


def test_predict_from_the_onnx_file_equals_predict_from_the_run_folder(exported, tmp_path):
    run, path = exported
    write_scans(tmp_path / "scans")
    predict_main([str(run), str(tmp_path / "scans"), "--out", str(tmp_path / "from-run"), "--probabilities", "--batch-size", "2"])
    predict_main([str(path), str(tmp_path / "scans"), "--out", str(tmp_path / "from-onnx"), "--probabilities"])
    from_run, from_onnx = read_outputs(tmp_path / "from-run"), read_outputs(tmp_path / "from-onnx")
    assert sorted(from_run) == sorted(from_onnx) == ["a_mask.png", "sub/b_mask.png", "sub/deep/c_mask.png"]

    models, cfg, pp = load_final_model(run)
    for name, (row, mask, probs) in from_run.items():
        image = tmp_path / "scans" / name.replace("_mask.png", ".jpg" if "c_" in name else ".png")
        assert row["file"] == str(image) and mask.shape == read_header(image).hw  # native size
        # the run folder's masks are exactly what the final stage scores: its probabilities, its post-processing
        expected = predict_probabilities(models, decode_for_model(image, 64, 1)[None], cfg, mask.shape, flip_tta=True)
        np.testing.assert_array_equal(mask, apply_postprocess(expected, pp)[0])
        assert int(row["tumour_px"]) == mask.sum() and float(row["tumour_fraction"]) == mask.sum() / mask.size
        assert 0 < mask.sum() < mask.size  # a mask with both classes, so the comparison below means something
        _, onnx_mask, onnx_probs = from_onnx[name]
        assert np.abs(onnx_probs - probs).max() <= 1e-4 + 1 / PROBABILITY_SCALE
        away_from_threshold = np.abs(probs - pp.threshold) > 2e-4
        np.testing.assert_array_equal(onnx_mask[away_from_threshold], mask[away_from_threshold])


def test_export_of_a_model_pt_beside_its_metrics(exported, tmp_path, capsys):
    _, onnx_path = exported
    model = tmp_path / "train-run" / "model.pt"
    save_tiny(model, seed=3)
    (model.parent / "metrics.json").write_text(json.dumps({"dataset": DATASET, "valid": {"dice": 0.5}, "test": {"dice": 0.25, "f1": 0.5}}))
    export_main([str(model)])
    assert (tmp_path / "train-run" / "export" / "model.onnx").is_file()
    card = json.loads((tmp_path / "train-run" / "export" / "model_card.json").read_text())
    assert card["command"] == f"python -m tumorseg.export {model}" and card["model"]["members"] == 1
    assert card["postprocess"]["threshold"] == 0.5 and not card["onnx"]["flip_tta_in_graph"]
    text = (tmp_path / "train-run" / "export" / "model_card.md").read_text()
    assert "One model (no ensemble)" in text and "| test | 0.2500 | 0.5000 |" in text and "| valid | 0.5000 |" in text

    write_scans(tmp_path / "scans")
    predict_main([str(model), str(tmp_path / "scans"), "--out", str(tmp_path / "from-pt"), "--probabilities"])
    predict_main([str(tmp_path / "train-run" / "export" / "model.onnx"), str(tmp_path / "scans"), "--out",
                  str(tmp_path / "from-onnx"), "--probabilities"])
    from_pt, from_onnx = read_outputs(tmp_path / "from-pt"), read_outputs(tmp_path / "from-onnx")
    assert sorted(from_pt) == sorted(from_onnx) and len(from_pt) == 3
    for name, (row, mask, probs) in from_pt.items():
        onnx_row, onnx_mask, onnx_probs = from_onnx[name]
        assert np.abs(onnx_probs - probs).max() <= 1e-4 + 1 / PROBABILITY_SCALE
        away_from_threshold = np.abs(probs - 0.5) > 2e-4
        np.testing.assert_array_equal(onnx_mask[away_from_threshold], mask[away_from_threshold])
        assert row["file"] == onnx_row["file"] and 0 < mask.sum() < mask.size

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(onnx_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"tumorseg.export: error: {onnx_path}: already an ONNX model; export takes a run folder or a model.pt"]
