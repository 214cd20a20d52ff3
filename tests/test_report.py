"""The sweep report: builds in every state of a sweep, Optuna's numbers, renders in Chromium."""

import json
import re
import shutil

import optuna
import pandas as pd
import pytest

from conftest import ROOT, run_cli
from search.report import build_report, common_params, importances
from search.study import STATES

ARTIFACTS = ROOT / "results" / "test-artifacts"


def _copy(run_dir, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(run_dir, target)
    return target


@pytest.mark.slow
def test_report_from_finished_sweep_matches_its_files(finished_sweep):
    run_dir, _ = finished_sweep
    page = build_report(run_dir).read_text()
    final = json.loads((run_dir / "final" / "metrics.json").read_text())
    for recipe in ("best", "seed_recipe"):  # one retrain seed: the value, no "+- 0.0000"
        dice = final[recipe]["test"]["dice"]
        assert f"<td>{dice['mean']:.4f}</td>" in page
    assert "&plusmn; 0.0000" not in page
    # synthetic data: the seed run's Kaggle numbers are not shown as if comparable
    assert "seed run as originally reported" not in page and "built-in synthetic" in page
    table = pd.read_csv(run_dir / "trials.csv")
    best = table.loc[table["best_val_dice"].idxmax()]
    assert f"validation Dice <b>{best['best_val_dice']:.4f}</b>" in page
    assert "Metric definitions" in page and "pooled" in page
    assert "too few to trust" in page  # 6 trials
    assert page.count("<img alt=") == 3  # best / median / worst overlays
    assert "python -m search.run" in page and "segmentation-models-pytorch" in page


@pytest.mark.slow
def test_report_from_interrupted_sweep_says_what_is_missing(finished_sweep, tmp_path):
    run_dir = _copy(finished_sweep[0], tmp_path, "interrupted")
    shutil.rmtree(run_dir / "final")
    (run_dir / "best_config.json").unlink()
    table = pd.read_csv(run_dir / "trials.csv")
    table.loc[4:, "status"] = "RUNNING"
    table.to_csv(run_dir / "trials.csv", index=False)
    page = build_report(run_dir).read_text()
    assert "No final model yet" in page and "python -m search.retrain" in page
    assert "No best configuration" in page
    assert "Learning curves" in page and "Resource timeline" in page


@pytest.mark.slow
def test_report_when_every_trial_failed(finished_sweep, tmp_path):
    run_dir = _copy(finished_sweep[0], tmp_path, "all-failed")
    shutil.rmtree(run_dir / "final")
    (run_dir / "best_config.json").unlink()
    table = pd.read_csv(run_dir / "trials.csv")
    table["status"], table["failure_reason"] = "FAILED", "training loss became non-finite"
    table.to_csv(run_dir / "trials.csv", index=False)
    (run_dir / "study.db").unlink()  # and the study says so too
    study = optuna.create_study(study_name="six", storage=f"sqlite:///{run_dir / 'study.db'}")
    for _ in range(len(table)):
        study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    proc = run_cli("-m", "search.report", str(run_dir), timeout=120)
    assert proc.returncode == 0, proc.stderr
    page = (run_dir / "report.html").read_text()
    assert "Every trial failed (6)" in page and "Not enough complete trials for importances (0 of 6" in page
    assert "training loss became non-finite" in page


@pytest.mark.slow
def test_report_of_a_sweep_that_never_started(finished_sweep, tmp_path):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    shutil.copyfile(finished_sweep[0] / "sweep.json", run_dir / "sweep.json")
    page = build_report(run_dir).read_text()
    assert "No trials recorded yet" in page and "No trial has reported an epoch yet" in page


def test_report_cli_bad_folder(tmp_path):
    proc = run_cli("-m", "search.report", str(tmp_path / "nope"), timeout=60)
    assert proc.returncode == 2 and "run folder not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_report_reads_importances_from_the_study_which_agrees_with_trials_csv(finished_sweep):
    run_dir, _ = finished_sweep
    study = optuna.load_study(study_name="six", storage=f"sqlite:///{run_dir / 'study.db'}")
    table = pd.read_csv(run_dir / "trials.csv", dtype={"trial_id": str})
    # the plain export and the study: the same trials, states and values
    in_study = sorted((t.user_attrs["tune_trial_id"], t.state.name, round(t.value, 12)) for t in study.trials)
    in_csv = sorted((r.trial_id, STATES[r.status], round(r.best_val_dice, 12)) for r in table.itertuples())
    assert in_study == in_csv
    # Optuna's evaluators on that study (its 3 COMPLETE trials, one point evaluated three times), not on
    # a study rebuilt from all six rows: PED-ANOVA cannot tell the parameters apart, fANOVA sees no variance
    params = common_params(study)
    expected_ped = optuna.importance.get_param_importances(study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
                                                           params=params)
    assert expected_ped == pytest.approx(dict.fromkeys(params, 1 / len(params)))
    ours = importances(study)
    assert ours["PED-ANOVA"] == pytest.approx(expected_ped) and "zero total variance" in ours["fANOVA"]["error"]
    page = (run_dir / "report.html").read_text()
    assert "PED-ANOVA: " + ", ".join(f"{k} {v:.3f}" for k, v in expected_ped.items()) in page
    assert "over its <b>3</b> COMPLETE trials" in page and "3 PRUNED (stopped by ASHA)" in page


@pytest.mark.slow
def test_report_of_a_run_folder_from_before_studies_says_so(finished_sweep, tmp_path):
    run_dir = _copy(finished_sweep[0], tmp_path, "old")
    (run_dir / "study.db").unlink()
    sweep = json.loads((run_dir / "sweep.json").read_text())
    del sweep["study"]
    (run_dir / "sweep.json").write_text(json.dumps(sweep))
    page = build_report(run_dir).read_text()
    assert "No Optuna study: this run folder has no study.db (it was made before sweeps kept their Optuna study)" in page
    assert "Learning curves" in page and "No trial has reported an epoch yet" not in page


@pytest.mark.slow
def test_report_is_self_contained(finished_sweep):
    page = (finished_sweep[0] / "report.html").read_text()
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=[\"']?https?://", page)
    assert "cdn.plot.ly/plotly" not in page.split("</head>")[1]


@pytest.mark.slow
def test_report_renders_in_headless_chromium(finished_sweep):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    page_path = finished_sweep[0] / "report.html"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors, requests = [], []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("request", lambda req: requests.append(req.url))
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        charts = page.evaluate("document.querySelectorAll('.plotly-graph-div').length")
        drawn = page.evaluate(
            "Array.from(document.querySelectorAll('.plotly-graph-div')).filter(d => d.querySelector('.main-svg')).length")
        width = page.evaluate("document.documentElement.scrollWidth")
        page.screenshot(path=str(ARTIFACTS / "report-screenshot.png"), full_page=True)
        browser.close()
    assert errors == []
    assert charts == 7 and drawn == charts  # importance, history, parallel, slices, curves, timeline, Dice vs cost
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
    assert width <= 1280  # readable on a laptop: no horizontal overflow
