"""Bad input: each case gives one line naming the culprit and exit status 2, never a traceback."""

import json
import os
import random
import shutil
import signal

import numpy as np
import pytest
import torch

from conftest import run_cli
from tumorseg.data import DataError, load_split
from tumorseg.synthetic import SyntheticSpec, make_synthetic


def _coco(root, split="train"):
    return root / split / "_annotations.coco.json"


def _edit(root, change):
    coco = json.loads(_coco(root).read_text())
    change(coco)
    _coco(root).write_text(json.dumps(coco))


DATA_CASES = {
    "folder missing": (lambda r: shutil.rmtree(r), "data folder not found: {root}"),
    "split missing": (lambda r: shutil.rmtree(r / "valid"), "split folder missing: {root}/valid"),
    "json missing": (lambda r: _coco(r).unlink(), "annotation file not found: {root}/train/_annotations.coco.json"),
    "json malformed": (lambda r: _coco(r).write_text('{"images": ['), "{root}/train/_annotations.coco.json: not valid JSON"),
    "json not coco": (lambda r: _coco(r).write_text("[1, 2, 3]"), "{root}/train/_annotations.coco.json: not a COCO file"),
    "image listed but missing": (lambda r: (r / "train" / "phantom_train_0002.jpg").unlink(),
                                 "but missing: {root}/train/phantom_train_0002.jpg"),
    "image unreadable": (lambda r: (r / "train" / "phantom_train_0004.jpg").write_bytes(b"GIF89a nope"),
                         "{root}/train/phantom_train_0004.jpg: unreadable or truncated image"),
    "image truncated": (lambda r: (r / "train" / "phantom_train_0005.jpg").write_bytes(
        (r / "train" / "phantom_train_0005.jpg").read_bytes()[:700]), "{root}/train/phantom_train_0005.jpg: unreadable or truncated image"),
    "zero images": (lambda r: _edit(r, lambda c: c.update(images=[], annotations=[])), "_annotations.coco.json: the split has zero images"),
    "empty polygon": (lambda r: _edit(r, lambda c: c["annotations"][0].update(segmentation=[[]])), "annotations[0]: a polygon needs at least 3"),
    "degenerate polygon": (lambda r: _edit(r, lambda c: c["annotations"][1].update(segmentation=[[1, 1, 2, 2, 3, 3, 1, 1]])),
                           "annotations[1]: degenerate polygon"),
    "category-less annotation": (lambda r: _edit(r, lambda c: c["annotations"][2].pop("category_id")),
                                 "annotations[2]: missing or invalid 'category_id'"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_gives_one_line_naming_the_file(case, synthetic_dir, tmp_path, capsys):
    from tumorseg.train import main

    root = tmp_path / "ds"
    shutil.copytree(synthetic_dir, root)
    breaker, message = DATA_CASES[case]
    breaker(root)
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(root), "--out", str(tmp_path / "out"), "--encoder-weights", "none", "--epochs", "1", "--resize", "64"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert err.startswith("tumorseg.train: error: ") and message.format(root=root) in err


# Every bad flag of every CLI, in one table: (module, args, the message of its one-line error).
CLI_CASES = [
    ("search.run", ["--gpus", "-1"], "--gpus must be >= 0, got -1"),
    ("search.run", ["--gpus", "abc"], "argument --gpus: invalid float value"),
    ("search.run", ["--num-samples", "0"], "--num-samples must be > 0, got 0"),
    ("search.run", ["--cpus-per-trial", "0"], "--cpus-per-trial must be > 0, got 0"),
    ("search.run", ["--max-concurrent", "-2"], "--max-concurrent must be >= 0, got -2"),
    ("search.run", ["--retrain-seeds", "0"], "--retrain-seeds must be > 0, got 0"),
    ("search.run", ["--final-epochs", "0"], "--final-epochs must be > 0, got 0"),
    ("search.run", ["--gpus", "2", "--gpus-per-trial", "3"], "--gpus-per-trial 3 is more than --gpus 2"),
    ("search.run", ["--gpus", "4", "--gpus-per-trial", "1.5"], "--gpus-per-trial above 1 must be a whole number"),
    ("search.run", ["--loss-types", "dice,focal"], "--loss-types: ['focal']"),
    ("search.run", ["--lr-range", "1e-2,1e-4"], "--lr-range: low 0.01 > high 0.0001"),
    ("search.run", ["--lr-range", "0,1e-3"], "--lr-range: a log-uniform range needs low > 0"),
    ("search.run", ["--weight-decay-range", "0.1,0.001"], "--weight-decay-range: low 0.1 > high 0.001"),
    ("search.run", ["--resize-choices", "100"], "--resize-choices 100: Unet-resnet18 downsamples by 32; use a multiple of 32"),
    ("search.run", ["--archs", "PSPNet,DeepLabV3Plus", "--resize-choices", "40"], "--resize-choices 40: DeepLabV3Plus-resnet18 downsamples by 16"),
    ("search.run", ["--archs", "Unet,FPNet"], "--archs: unknown smp architecture 'FPNet'; did you mean FPN"),
    ("search.run", ["--encoders", "resnet18,mobilenetv2"], "--encoders: unknown smp encoder 'mobilenetv2'; did you mean mobilenet_v2"),
    ("search.run", ["--encoder", "resnet-18"], "--encoder: unknown smp encoder 'resnet-18'; did you mean resnet18"),
    ("search.run", ["--archs", "Unet,DPT"], "--arch DPT --encoder resnet18: smp cannot build this pair"),
    ("search.run", ["--batch-size", "8", "--batch-sizes", "8,16"], "--batch-size fixes what --batch-sizes searches: give one of them"),
    ("search.run", ["--aug-strengths", "1,-1"], "--aug-strengths: values must be >= 0, got -1"),
    ("search.run", ["--fixed", "arch=FPN"], "--fixed arch: searched parameter"),
    ("search.run", ["--epochs", "2", "--grace-period", "3"], "--epochs 2 is smaller than the ASHA --grace-period 3"),
    ("search.run", ["--epochs", "4", "--warmup-epochs-range", "0,4"],
     "--warmup-epochs-range 0,4: a warmup of 4 epochs never ends within --epochs 4"),
    ("search.run", ["--fixed", "colour=red"], "--fixed 'colour=red': expected NAME=VALUE"),
    ("search.run", ["--fixed", "lr=0.1"], "--fixed lr: searched parameter"),
    ("search.run", ["--resume", "--name", "ghost"], "--resume: no sweep named 'ghost'"),
    ("search.run", ["--debug", "--resume"], "--debug runs one trial in this process without Ray; it cannot --resume a sweep"),
    ("search.run", ["--resize", "100", "--debug"], "unrecognized arguments: --resize 100"),  # no abbreviation of --resize-choices
    ("search.run", ["--gpus", "3", "--gpus-per-trial", "3"], "--batch-size 16 must be a multiple of --gpus-per-trial 3"),
    ("search.run", ["--data", "/no/such/folder"], "--data: folder not found: /no/such/folder"),
    ("search.run", ["--sampler", "cmaes"], "argument --sampler: invalid choice: 'cmaes'"),
    ("search.run", ["--study-storage", "postgresql://tumorseg@127.0.0.1:1/study"],  # nothing listens on port 1
     ("--study-storage postgresql://tumorseg@127.0.0.1:1/study: cannot open the study database (connection to server at "
      '"127.0.0.1", port 1 failed: Connection refused')),
    ("search.run", ["--study-storage", "sqlite:////sys/study.db"],  # sysfs: no user, root included, may create files
     "--study-storage sqlite:////sys/study.db: cannot write to the folder /sys (Permission denied)"),
    ("search.run", ["--study-storage", "postgresql://tumorseg@db:port/x"], "--study-storage postgresql://tumorseg@db:port/x: not a database URL"),
    ("tumorseg.train", ["--batch-size", "-4"], "batch_size must be > 0, got -4"),
    ("tumorseg.train", ["--epochs", "0"], "epochs must be > 0, got 0"),
    ("tumorseg.train", ["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    ("tumorseg.train", ["--resize", "100"], "--resize 100: Unet-resnet18 downsamples by 32; use a multiple of 32 (e.g. 96 or 128)"),
    ("tumorseg.train", ["--arch", "DeepLabV3Plus", "--resize", "72"], "--resize 72: DeepLabV3Plus-resnet18 downsamples by 16; use a multiple of 16"),
    ("tumorseg.train", ["--arch", "Unet++"], "--arch: unknown smp architecture 'Unet++'; did you mean Unet"),
    ("tumorseg.train", ["--arch", "deeplabv3plus"], "--arch: unknown smp architecture 'deeplabv3plus'; did you mean DeepLabV3Plus"),
    ("tumorseg.train", ["--encoder", "efficientnet_b0"], "--encoder: unknown smp encoder 'efficientnet_b0'; did you mean efficientnet-b0"),
    ("tumorseg.train", ["--arch", "DPT"], "--arch DPT --encoder resnet18: smp cannot build this pair (Only Timm encoders are supported for DPT"),
    ("tumorseg.train", ["--data", "/nonexistent/ds"], "data folder not found: /nonexistent/ds"),
    ("tumorseg.train", ["--encoder-weights", "/no/such/file.pth"], "--encoder-weights: no such file"),
    ("search.retrain", ["/no/run"], "run folder not found: /no/run"),
    ("search.retrain", ["/no/run", "--final-epochs", "0"], "--final-epochs must be > 0, got 0"),
    ("search.report", ["/no/run"], "run folder not found: /no/run"),
    ("tumorseg.export", ["/no/run"], "model source not found: /no/run"),
    ("tumorseg.export", ["tests"], "tests: no final model (no tests/final/model/member<k>.pt"),
    ("tumorseg.predict", ["README.md", "scan.png"], "README.md: not a model source (expected a run folder, a model.pt or a model.onnx)"),
    ("tumorseg.predict", ["tests", "scan.png"], "tests: no final model (no tests/final/model/member<k>.pt"),
    ("tumorseg.predict", ["model.pt", "scan.png", "--batch-size", "0"], "--batch-size must be > 0, got 0"),
]


def test_more_gpus_than_cuda_visible_devices_lists_is_one_line(paths, tmp_path):
    proc = run_cli("-m", "search.run", "--data", str(paths["data"]), "--storage", str(tmp_path), "--gpus", "2",
                   "--resize-choices", "64", "--encoder-weights", "none", "--no-dashboard",
                   env={"CUDA_VISIBLE_DEVICES": "0"}, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("search.run: error: --gpus 2: CUDA_VISIBLE_DEVICES='0' lists fewer devices, "
                                                    "and Ray gives a machine no more GPUs than it lists; lower --gpus or unset CUDA_VISIBLE_DEVICES")
    assert not (tmp_path / "sweep.json").exists() and not any(tmp_path.glob("*/sweep.json"))


def _where_to_write(module, tmp_path) -> list[str]:
    """Flags that keep a CLI's output in ``tmp_path`` (the rows' own flags come after and win)."""
    return {"search.run": ["--storage", str(tmp_path)],
            "tumorseg.train": ["--out", str(tmp_path), "--encoder-weights", "none"],
            "tumorseg.export": ["--out", str(tmp_path)], "tumorseg.predict": ["--out", str(tmp_path)]}.get(module, [])


# Runs one CLI's rows in one process: what `python -m MODULE ARGS` runs (MODULE.main(ARGS)), row
# after row, each with its own stderr and exit status; an escaped exception is printed as Python
# prints it. What the import itself writes to stderr is kept apart (no row may depend on it).
CLI_ROWS = r"""
import contextlib, importlib, io, json, sys, traceback

module, rows = sys.argv[1], json.loads(sys.argv[2])
with contextlib.redirect_stderr(io.StringIO()) as import_err:
    main = importlib.import_module(module).main
results = []
for argv in rows:
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps({"import_stderr": import_err.getvalue(), "rows": results}))
"""


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Each CLI_CASES row's exit status and stderr, keyed by its index: one process per CLI (imports once)."""
    results = {}
    for module in dict.fromkeys(m for m, _, _ in CLI_CASES):
        indices = [i for i, (m, _, _) in enumerate(CLI_CASES) if m == module]
        rows = [_where_to_write(module, tmp_path_factory.mktemp("cli")) + CLI_CASES[i][1] for i in indices]
        proc = run_cli("-c", CLI_ROWS, module, json.dumps(rows), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["import_stderr"] == "", f"importing {module} wrote to stderr: {out['import_stderr']}"
        results.update(zip(indices, out["rows"]))
    return results


@pytest.mark.parametrize("case", range(len(CLI_CASES)), ids=[" ".join([m, *a]) for m, a, _ in CLI_CASES])
def test_bad_flags_exit_2_with_one_line(case, cli_results):
    result, message = cli_results[case], CLI_CASES[case][2]
    assert result["code"] == 2, result["stderr"]
    assert len(result["stderr"].strip().splitlines()) == 1 and "Traceback" not in result["stderr"], result["stderr"]
    assert message in result["stderr"]


@pytest.mark.parametrize("module", ["search.run", "tumorseg.train"])
def test_a_bad_flag_as_a_process_exits_2_with_one_line(module, tmp_path):
    """The rows above run in one process per CLI; here the real entry point, ``python -m``, once per CLI."""
    proc = run_cli("-m", module, *_where_to_write(module, tmp_path), "--epochs", "0", timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"{module}: error: --epochs must be > 0, got 0"
                                                                         if module == "search.run" else
                                                                         f"{module}: error: epochs must be > 0, got 0"]


def test_a_study_of_that_name_from_another_sweep_is_refused(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path}/team.db"
    optuna.create_study(study_name="lungs", storage=url)  # another sweep's study, in a shared database
    proc = run_cli("-m", "search.run", "--storage", str(tmp_path), "--name", "lungs", "--study-storage", url, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.strip() == (f"search.run: error: --study-storage {url} already holds a study named 'lungs' (another "
                                   "sweep's): continue that sweep with --name lungs --resume, or choose another --name")
    assert not (tmp_path / "lungs" / "sweep.json").exists()


def test_space_file_with_unknown_name_exits_2(tmp_path):
    (tmp_path / "space.yaml").write_text("lr_range: [1.0e-4, 1.0e-2]\nwarmup_range: [0, 3]\n")
    proc = run_cli("-m", "search.run", "--storage", str(tmp_path), "--space", str(tmp_path / "space.yaml"), timeout=60)
    assert proc.returncode == 2 and "unknown search-space name(s) warmup_range" in proc.stderr


# ----------------------------------------------------------------------------- model files


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if ever unpickled


@pytest.mark.parametrize("kind", ["pickled code", "text", "foreign state dict", "missing"])
def test_predict_refuses_files_that_are_not_our_models(kind, tmp_path, synthetic_dir):
    model = tmp_path / "model.pt"
    marker = tmp_path / "pwned"
    if kind == "pickled code":
        torch.save({"format": "tumorseg-model", "model": Evil(str(marker))}, model)
    elif kind == "text":
        model.write_text("definitely not a model")
    elif kind == "foreign state dict":
        torch.save({"weight": torch.zeros(3)}, model)
    image = next((synthetic_dir / "test").glob("*.jpg"))
    proc = run_cli("-m", "tumorseg.predict", str(model), str(image), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    expected = "model file not found" if kind == "missing" else "not a tumorseg model file"
    assert expected in proc.stderr and str(model) in proc.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------- fuzzing

FUZZ_CHUNKS = int(os.environ.get("TUMORSEG_FUZZ_CHUNKS", 4))  # 75 cases each; raise it to fuzz harder

JUNK = [None, -1, 0, 3.5, 10**12, "", "x", "../../etc/passwd", "a\x00b", [], {}, True, [[1, 2]], float("nan"), [1e308, 1e308, -1e308, 5, 7, 7]]


def _mutate_json(coco, rng):
    """1-3 random structural mutations of a COCO dict (in place)."""
    for _ in range(rng.randint(1, 3)):
        target = coco
        path = []
        while isinstance(target, (dict, list)) and target and rng.random() < 0.75:
            key = rng.choice(list(target)) if isinstance(target, dict) else rng.randrange(len(target))
            path.append((target, key))
            target = target[key]
        if not path:
            continue
        parent, key = path[-1]
        action = rng.random()
        if action < 0.3 and isinstance(parent, dict):
            del parent[key]
        elif action < 0.4 and isinstance(parent, list):
            parent.append(parent[key])  # duplicate an entry
        else:
            parent[key] = rng.choice(JUNK)


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("fuzz") / "base", SyntheticSpec(image_px=64, n_train=1, n_valid=8, n_test=1))


def _timeout(signum, frame):
    raise TimeoutError("the loader hung")


@pytest.mark.parametrize("chunk", range(FUZZ_CHUNKS))
def test_fuzzed_annotations_and_jpegs_end_in_data_or_clear_error(chunk, fuzz_base, tmp_path):
    rng = random.Random(1000 + chunk)
    original = _coco(fuzz_base, "valid").read_text()
    jpegs = sorted((fuzz_base / "valid").glob("*.jpg"))
    outcomes = {"ok": 0, "error": 0}
    previous = signal.signal(signal.SIGALRM, _timeout)
    try:
        for case in range(75):
            root = tmp_path / f"case{case}"
            shutil.copytree(fuzz_base, root)
            kind = rng.random()
            if kind < 0.55:
                coco = json.loads(original)
                _mutate_json(coco, rng)
                text = json.dumps(coco)
            else:
                text = original
            if rng.random() < 0.15:
                text = text[: rng.randrange(len(text))]  # a truncated annotation file
            _coco(root, "valid").write_text(text)
            if kind >= 0.55:
                victim = root / "valid" / rng.choice(jpegs).name
                data = bytearray(victim.read_bytes())
                if rng.random() < 0.6:
                    data = data[: rng.randrange(len(data))]
                else:
                    for _ in range(rng.randint(1, 20)):
                        data[rng.randrange(len(data))] = rng.randrange(256)
                victim.write_bytes(bytes(data))
            signal.alarm(20)
            try:
                split = load_split(root, "valid", 32, native=True, cache_dir=root / "cache")
            except DataError as err:
                assert "\n" not in str(err) and str(root) in str(err), str(err)
                outcomes["error"] += 1
            else:
                n = len(json.loads(_coco(root, "valid").read_text())["images"])
                assert split.images.shape == (n, 32, 32) and split.images.dtype == np.uint8
                assert set(np.unique(split.masks)) <= {0, 1}
                assert split.native_masks.shape[0] == n
                outcomes["ok"] += 1
            finally:
                signal.alarm(0)
            shutil.rmtree(root)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["error"] > 10 and outcomes["ok"] > 5, outcomes  # both outcomes were exercised
