"""``python -m tumorseg.predict`` on folders: what it writes, on a model whose output is known."""

import csv
import math

import numpy as np
import pytest
from PIL import Image
from test_inference import FixedLogits, hand_made_logits

from tumorseg import checkpoint
from tumorseg.config import TrainConfig
from tumorseg.predict import PROBABILITY_SCALE, main
from tumorseg.visualize import PRED_RGB, outline

P_HIGH = 1 / (1 + math.exp(-2.0))  # the hand-made map's brighter block (logit 2); its other block: logit 1, p 0.73


@pytest.fixture
def fixed_model(tmp_path, monkeypatch):
    """A model.pt SOURCE that loads as ``FixedLogits`` at 64 px with threshold 0.8: whatever the image,
    tumour is exactly the 20 x 20 block at rows/columns 36-55 of the 64 px map."""
    logits, expected = hand_made_logits()
    cfg = TrainConfig(resize_px=64, threshold=0.8, encoder_weights="none", eval_batch_size=2)
    monkeypatch.setattr(checkpoint, "load_model", lambda path: (FixedLogits(logits), cfg, {}))
    source = tmp_path / "model.pt"
    source.write_bytes(b"stand-in: load_model is replaced")
    return source, expected


def grey(path, size_px: int, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size_px, size_px), value, np.uint8)).save(path)


def test_predict_a_nested_folder(fixed_model, tmp_path):
    source, expected = fixed_model
    scans = tmp_path / "scans"
    grey(scans / "x.png", 64)
    grey(scans / "sub" / "deeper" / "y.png", 128)  # native size twice the model's
    grey(scans / "sub" / "z.jpg", 64)
    (scans / "notes.txt").write_text("not an image")
    grey(scans / "preds" / "old_mask.png", 64)  # inside --out: an earlier run's output, not an input
    main([str(source), str(scans), "--out", str(scans / "preds"), "--batch-size", "2", "--probabilities"])

    with open(scans / "preds" / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    # 128 px: logits upsampled bilinearly (half-pixel centres) 2x; the block 36-55 becomes rows/columns
    # 73-110 above logit(0.8): native pixel 72 sits at 35.75 in the map, logit 0.25*(-5) + 0.75*2 = 0.25 < 1.39
    assert rows == [
        ["file", "mask", "tumour_px", "tumour_fraction", "max_probability"],
        [str(scans / "sub" / "deeper" / "y.png"), "sub/deeper/y_mask.png", "1444", repr(38 * 38 / 128**2), f"{P_HIGH:.6f}"],
        [str(scans / "sub" / "z.jpg"), "sub/z_mask.png", "400", repr(400 / 64**2), f"{P_HIGH:.6f}"],
        [str(scans / "x.png"), "x_mask.png", "400", "0.09765625", f"{P_HIGH:.6f}"],
    ]
    mask = np.asarray(Image.open(scans / "preds" / "x_mask.png"))
    np.testing.assert_array_equal(mask, expected * 255)
    big = np.zeros((128, 128), np.uint8)
    big[73:111, 73:111] = 255
    np.testing.assert_array_equal(np.asarray(Image.open(scans / "preds" / "sub" / "deeper" / "y_mask.png")), big)
    red = np.all(np.asarray(Image.open(scans / "preds" / "x_overlay.png")) == PRED_RGB, axis=-1)
    np.testing.assert_array_equal(red, outline(expected))
    probs = np.asarray(Image.open(scans / "preds" / "x_prob.png"))
    assert probs.dtype == np.uint16 and probs[45, 45] == round(P_HIGH * PROBABILITY_SCALE)
    assert probs[20, 20] == round(1 / (1 + math.exp(-1.0)) * PROBABILITY_SCALE) and probs[0, 0] == round(
        1 / (1 + math.exp(5.0)) * PROBABILITY_SCALE)
    assert sorted(p.name for p in (scans / "preds").iterdir()) == [
        "old_mask.png", "predictions.csv", "sub", "x_mask.png", "x_overlay.png", "x_prob.png"]


def test_one_image_keeps_working_without_a_folder(fixed_model, tmp_path):
    source, expected = fixed_model
    grey(tmp_path / "scan.png", 64)
    main([str(source), str(tmp_path / "scan.png"), "--out", str(tmp_path / "out")])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "scan_mask.png")), expected * 255)
    assert not (tmp_path / "out" / "scan_prob.png").exists()


def _tiny_onnx_without_metadata(path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["probability"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("probability", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _folder_without_images(t, source):
    grey(t / "scan.png", 64)
    (t / "empty" / "sub").mkdir(parents=True)
    (t / "empty" / "sub" / "notes.txt").write_text("not an image")
    return [source, t / "scan.png", t / "empty"]


def _unreadable_image(t, source):
    grey(t / "in" / "a.png", 64)
    (t / "in" / "b.png").write_bytes(b"GIF89a nope")
    return [source, t / "in"]


def _one_output_name(t, source):
    grey(t / "a" / "x.png", 64)
    grey(t / "b" / "x.png", 64)
    return [source, t / "a", t / "b"]


def _onnx(t, write):
    write(t / "m.onnx")
    grey(t / "scan.png", 64)
    return [t / "m.onnx", t / "scan.png"]


BAD_INPUTS = {  # name: (make the case in tmp_path, return predict's arguments; the one-line message)
    "folder without images": (_folder_without_images,
                              "{t}/empty: no images (.png .jpg .jpeg .tif .tiff .bmp) in this folder or below"),
    "unreadable image": (_unreadable_image, "{t}/in/b.png: unreadable or truncated image"),
    "missing input": (lambda t, source: [source, t / "nope.png"], "input not found: {t}/nope.png"),
    "two images, one output name": (_one_output_name, ("{t}/a/x.png and {t}/b/x.png would both write {t}/out/x_mask.png; "
                                                      "predict them into separate --out folders")),
    "garbage .onnx": (lambda t, _: _onnx(t, lambda p: p.write_bytes(b"\x00garbage")), "{t}/m.onnx: not a readable ONNX model"),
    "foreign .onnx": (lambda t, _: _onnx(t, _tiny_onnx_without_metadata),
                      "{t}/m.onnx: not a tumorseg ONNX export (no 'tumorseg' metadata; make one with python -m tumorseg.export)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_give_one_line_naming_the_file(case, fixed_model, tmp_path, capsys):
    source, _ = fixed_model
    make, message = BAD_INPUTS[case]
    args = [str(a) for a in make(tmp_path, source)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tumorseg.predict: error: " + message.format(t=tmp_path)), err
    assert not (tmp_path / "out" / "predictions.csv").exists()  # nothing predicted before the inputs were all checked
