"""The study on a real PostgreSQL server: a sweep killed and resumed, passwords kept off the disk.

A throwaway cluster (Debian's ``postgresql`` package: initdb, pg_ctl) in a temporary folder, on a
free loopback port and a unix socket there. initdb refuses to run as root, so as root the server
runs as the ``postgres`` user the package creates (``runuser``). Skipped, with the reason, where
the binaries, that user or psycopg2 are missing.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import conftest
import optuna
import pandas as pd
import pytest
from conftest import ROOT, run_cli, sweep_args

from search import study as studydb

PASSWORD = "pg-s3cret-4321"  # grep-able: must never reach a file of the run folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user() -> list[str]:
    """The command prefix that runs PostgreSQL's tools as a user initdb accepts."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: initdb refuses root and cannot be run as another user")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run the server as (initdb refuses root)")
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server with user ``tumorseg`` (password ``PASSWORD`` over TCP) and database ``sweeps``."""
    missing = [tool for tool in ("initdb", "pg_ctl", "postgres") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"PostgreSQL server binaries not found ({', '.join(missing)}): apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="psycopg2 is the [postgres] extra")
    prefix = _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="tumorseg-pg-"))  # not pytest's tmp_path: root-only folders above it
    data, port = root / "data", _free_port()
    if prefix:
        shutil.chown(root, "postgres")
    subprocess.run([*prefix, "initdb", "-D", str(data), "-U", "tumorseg", "--auth-local=trust", "--auth-host=scram-sha-256",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    subprocess.run([*prefix, "pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        import psycopg2

        conn = psycopg2.connect(host=str(root), port=port, user="tumorseg", dbname="postgres")  # unix socket: trust
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cursor:
            cursor.execute(f"ALTER USER tumorseg PASSWORD '{PASSWORD}'")
            cursor.execute("CREATE DATABASE sweeps")
        conn.close()
        yield {"url": f"postgresql://tumorseg:{PASSWORD}@127.0.0.1:{port}/sweeps", "port": port}
    finally:
        subprocess.run([*prefix, "pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=120, check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_a_wrong_password_is_one_line_without_the_password(postgres, tmp_path):
    url = postgres["url"].replace(PASSWORD, "not-it")
    proc = run_cli("-m", "search.run", "--storage", str(tmp_path), "--name", "x", "--study-storage", url, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.strip() == (f"search.run: error: --study-storage postgresql://tumorseg@127.0.0.1:{postgres['port']}/sweeps: "
                                   'cannot open the study database (connection to server at "127.0.0.1", '
                                   f'port {postgres["port"]} failed: FATAL:  password authentication failed for user "tumorseg")')
    assert not (tmp_path / "x" / "sweep.json").exists()


def _finished(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "trials.csv"
    table = pd.read_csv(path, dtype={"trial_id": str}) if path.is_file() else pd.DataFrame(columns=["status"])
    return table[table["status"].isin(["COMPLETED", "STOPPED_EARLY"])]


@pytest.mark.slow
def test_sweep_on_postgres_killed_and_resumed(postgres, paths, ray_tmp):
    """3 trials, 2 at a time: SIGKILL the driver once the first trial finished (another one is mid-run),
    resume with the password from PGPASSWORD (sweep.json has the URL without it), check the study."""
    args = sweep_args(paths, ray_tmp, "pg", "--gpus", "2", "--num-samples", "3", "--epochs", "2", "--grace-period", "2",
                      "--study-storage", postgres["url"])
    run_dir = paths["storage"] / "pg"
    driver = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **conftest.NO_CUDA}, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 900
        while _finished(run_dir).empty:
            assert driver.poll() is None and time.monotonic() < deadline, "the sweep ended or hung before a trial finished"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        driver.wait()
    url = postgres["url"].replace(f":{PASSWORD}", "")
    storage = studydb.open_storage(postgres["url"])
    killed = optuna.load_study(study_name="pg", storage=storage)
    assert {t.state.name for t in killed.trials} <= {"COMPLETE", "RUNNING"} and any(t.state.name == "RUNNING" for t in killed.trials)
    # a trial the searcher created just before the kill, after Tune's last snapshot: made certain here
    ghost = killed.ask()
    ghost.set_user_attr(studydb.TUNE_ID_ATTR, "ghost000")

    proc = run_cli(*sweep_args(paths, ray_tmp, "pg", "--resume", "--no-retrain"), env={**conftest.NO_CUDA, "PGPASSWORD": PASSWORD},
                   timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = pd.read_csv(run_dir / "trials.csv", dtype={"trial_id": str}).set_index("trial_id")
    assert len(table) == 3 and set(table["status"]) == {"COMPLETED"}
    trials = optuna.load_study(study_name="pg", storage=storage).trials
    by_tune_id = {}
    for trial in trials:
        tune_id = trial.user_attrs[studydb.TUNE_ID_ATTR]
        assert tune_id not in by_tune_id, f"Tune trial {tune_id} is in the study twice"
        by_tune_id[tune_id] = trial
    for tune_id, row in table.iterrows():  # every trial of the sweep, finished once, as trials.csv says
        trial = by_tune_id.pop(tune_id)
        assert trial.state.name == "COMPLETE" and trial.value == pytest.approx(row["best_val_dice"])
        assert sorted(trial.intermediate_values) == [1, 2]
    assert "ghost000" in by_tune_id
    for ghost in by_tune_id.values():  # trials created after Tune's last snapshot: FAIL, with the reason
        assert ghost.state.name == "FAIL" and ghost.user_attrs["failure_reason"] == studydb.STALE_REASON
    assert studydb.redact(postgres["url"]) == url
    for path in run_dir.rglob("*"):  # sweep.json, Tune's pickles (tuner.pkl, searcher state), logs: no password
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert PASSWORD.encode() not in path.read_bytes(), path
    assert f'"storage": "{url}"' in (run_dir / "sweep.json").read_text()
