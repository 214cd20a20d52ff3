"""What the scale benches measure with, and where: timers wrapped around the driver's code, the
driver's memory and CPU, the Ray processes' CPU, and a local Ray cluster of simulated nodes.

Used by ``search.bench_scale`` (``--scale``), ``search.bench_floor`` (``--tune-floor``) and
``search.bench_data`` (``--data-scale``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the driver's process


class Timers:
    """Cumulative wall time and call counts of wrapped functions (the bench's own instrumentation)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}  # the calling thread's CPU time (less noisy on a shared machine)
        self.calls: dict[str, int] = {}
        self.each: dict[str, list[float]] = {}  # every call's duration, for labels wrapped with keep=True
        self._undo: list = []

    def wrap(self, owner, name: str, label: str | None = None, after=None, keep: bool = False) -> None:
        label = label or name
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                self.seconds[label] = self.seconds.get(label, 0.0) + took
                self.cpu_seconds[label] = self.cpu_seconds.get(label, 0.0) + time.thread_time() - c0
                self.calls[label] = self.calls.get(label, 0) + 1
                if keep:
                    self.each.setdefault(label, []).append(took)
                if after is not None:
                    after(*args, **kwargs)

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    def line(self, label: str) -> str:
        n = self.calls.get(label, 0)
        s = self.seconds.get(label, 0.0)
        return f"{n} calls, {s:.2f} s in all, {1000 * s / max(1, n):.2f} ms each"


class PeakRss:
    """The process's resident memory, sampled every ``interval_s`` while running."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.peak_mib = self.now_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mib = max(self.peak_mib, self.now_mib())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def box_cpu_ticks() -> tuple[int, int]:
    """The whole machine's CPU ticks so far, (busy, total) over all cores (``/proc/stat``): every
    process counts, the trial processes and Ray's included, whether or not they are still alive."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


@contextlib.contextmanager
def time_cap(seconds: float | None):
    """SIGINT to this process after ``seconds`` (None: never); Tune stops gracefully on it, the
    unfinished trials INTERRUPTED, and what ran is measured."""
    cap = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT)) if seconds else None
    if cap:
        cap.start()
    try:
        yield
    finally:
        if cap:
            cap.cancel()


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def processes_cpu_s(env_entry: str) -> dict[str, float]:
    """CPU seconds so far of the processes whose environment holds ``env_entry``, by kind."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in pids_with_env(env_entry):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kind = next((k for k in ("raylet", "gcs_server", "ray::ImplicitFunc", "ray::IDLE") if k in cmdline), "other Ray processes")
        kind = {"ray::ImplicitFunc": "trial workers", "ray::IDLE": "trial workers"}.get(kind, kind)
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


def worker_starts(temp_dir: Path) -> int:
    """Python worker processes the cluster's raylets have started so far (their logs say so)."""
    return sum(log.read_text(errors="replace").count("Started worker process") for log in Path(temp_dir).glob("session_*/logs/raylet*.out"))


def du_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- the cluster


# for a cluster of many logical CPUs on a small machine: Ray starts one idle worker per logical CPU
# when the driver attaches; Tune's trial actors need their own (another runtime env), so on 2 cores
# those starts only delay the first trials
SIMULATED_CLUSTER_ENV = {"RAY_prestart_worker_first_driver": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@contextlib.contextmanager
def local_cluster(workers: int, cpus: int, gpus: int, temp_dir: Path, head_port: int, port_base: int, bench: str,
                  extra_env: dict | None = None):
    """A head and ``workers`` worker nodes on this machine (``launch/local-cluster.sh``), ``cpus``
    logical CPUs and ``gpus`` logical GPUs each; yields its address and start time. Everything it
    started ends with it."""
    env = {**os.environ, "TUMORSEG_HEAD_PORT": str(head_port), "TUMORSEG_NODE_PORT_BASE": str(port_base),
           "TUMORSEG_RAY_TEMP_DIR": str(temp_dir), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           **(extra_env or {})}
    script = str(ROOT / "launch" / "local-cluster.sh")
    t0 = time.perf_counter()
    proc = subprocess.run([script, "start", str(workers), str(cpus), str(gpus)], check=False, capture_output=True, text=True, env=env)
    try:
        if proc.returncode != 0:
            raise SystemExit(f"{bench}: the local Ray cluster did not start:\n{proc.stdout}{proc.stderr}")
        yield {"address": f"127.0.0.1:{head_port}", "start_s": time.perf_counter() - t0}
    finally:
        subprocess.run([script, "stop"], check=False, capture_output=True, env=env)
        # Ray's agents rename themselves (ray::DashboardAgent) and the client server's command line
        # names neither the port nor the folder: end what is left by the environment they inherited
        for pid in pids_with_env(f"TUMORSEG_RAY_TEMP_DIR={temp_dir}"):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def pids_with_env(entry: str) -> list[int]:
    """This user's processes whose environment holds ``entry`` (``NAME=value``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
    return found
