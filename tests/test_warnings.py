"""Warnings that prevent wasted runs: one ``warning:`` line on stderr, and the run goes on."""

import numpy as np

from conftest import run_cli
from tumorseg.data import Split
from tumorseg.sanity import data_warnings, warmup_warnings


def _split(n: int, native_hw=(96, 120)) -> Split:
    images = np.zeros((n, 64, 64), np.uint8)
    return Split("train", images, images.copy(), None, native_hw, tuple(f"{i}.jpg" for i in range(n)))


def test_warmup_as_long_as_the_run_warns_and_a_shorter_one_does_not():
    assert warmup_warnings(2, 1) == ["warning: --warmup-epochs 2 >= --epochs 1: the whole run trains below the recipe's "
                                     "lr (the warmup never ends); lower --warmup-epochs or raise --epochs"]
    assert warmup_warnings(2, 2) and not warmup_warnings(1, 2) and not warmup_warnings(0, 1)


def test_resize_above_the_native_size_names_the_sizes_and_the_native_size():
    # native 96 x 120: 96 is not above it, 128 and 256 are (the smaller side bounds the detail)
    lines = data_warnings(_split(20), [64, 96, 128, 256], batch_size=16, resize_flag="--resize-choices")
    assert lines == ["warning: --resize-choices 128,256 is above the images' native size 96x120: upsampling costs "
                     "compute and adds no detail"]
    assert data_warnings(_split(20), [96], batch_size=16) == []


def test_a_train_split_smaller_than_one_batch_warns():
    assert data_warnings(_split(5), [64], batch_size=8) == [
        "warning: the train split has 5 image(s), fewer than --batch-size 8: every epoch is a single short batch; "
        "lower --batch-size or add data"]
    assert data_warnings(_split(8), [64], batch_size=8) == []


def test_train_cli_prints_each_warning_once_and_still_trains(synthetic_dir, tmp_path):
    # synthetic_dir: 96 px images, 96 train images; the default warmup is 2 epochs
    proc = run_cli("-m", "tumorseg.train", "--data", str(synthetic_dir), "--out", str(tmp_path / "out"), "--epochs", "1",
                   "--resize", "128", "--batch-size", "128", "--encoder-weights", "none", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert [w.split(":")[1].split()[0] for w in warnings] == ["--warmup-epochs", "--resize", "the"], warnings
    assert "above the images' native size 96x96" in warnings[1] and "96 image(s), fewer than --batch-size 128" in warnings[2]
    assert (tmp_path / "out" / "model.pt").is_file()
