"""``ray job submit -- python studies/smope_topk.py --smoke`` against a local ``ray start --head``."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_answers(address: str, head: subprocess.Popen, timeout: float = 120) -> bool:
    """True once the dashboard answers; False if ``ray start`` exits first."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return True
        except OSError:
            time.sleep(1)
    raise AssertionError("the head's dashboard never answered")


def _start_head(ray: str, env: dict, log: Path, temp_dir: Path, attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """A blocking ``ray start --head`` on free ports and its dashboard address. A port found free can
    be taken before Ray binds it (the other tests' Ray starts workers meanwhile), and then ``ray
    start`` exits: start again on new ports; after the last attempt fail with its output.

    The head keeps its own ``temp_dir``: a job's supervisor finds the cluster its driver joins as
    "the latest one started in its temp dir", which in the shared /tmp/ray can be another test's
    local Ray started a moment later (the job's trials then ran there, without its working dir)."""
    for _ in range(attempts):
        dashboard = free_port()
        # --block keeps this head's processes under one parent: terminating it stops this cluster only
        # (`ray stop` would also stop the other tests' local Ray, and with it the pytest process).
        with open(log, "w") as out:
            head = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                                     f"--port={free_port()}", "--num-cpus=2", "--object-store-memory=268435456",
                                     "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                                     "--disable-usage-stats", f"--temp-dir={temp_dir}",
                                     # the other tests' local Ray holds the default agent ports
                                     f"--dashboard-agent-listen-port={free_port()}",
                                     f"--dashboard-agent-grpc-port={free_port()}",
                                     f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
        address = f"http://127.0.0.1:{dashboard}"
        if _dashboard_answers(address, head):
            return head, address
    raise AssertionError(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")


def _submit_smoke_study(ray: str, address: str, env: dict[str, str], runs_dir: Path) -> subprocess.CompletedProcess:
    for _attempt in range(30):  # the job agent comes up a little after the dashboard
        job = subprocess.run(
            [ray, "job", "submit", "--address", address, "--working-dir", str(ROOT),
             "--runtime-env-json", '{"excludes": [".git", "runs", ".venv", ".tools"], "env_vars": {"PYTHONUNBUFFERED": "1"}}', "--",
             "python", "studies/smope_topk.py", "--smoke", "--runs-dir", str(runs_dir)],
            env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in job.stderr:
            return job
        time.sleep(2)
    return job


def test_job_submit_runs_the_smoke_study(tmp_path):
    bin_dir = Path(sys.executable).parent
    ray = str(bin_dir / "ray")
    # The job's `python` resolves from the PATH that `ray start` saw.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit
    head, address = _start_head(ray, env, tmp_path / "ray_start.log", temp_dir)
    runs_dir = tmp_path / "runs"
    try:
        job = _submit_smoke_study(ray, address, env, runs_dir)
    finally:
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    # the job's log holds the study console (one line per trial event), Ray's output its own log file
    assert sum("] trial " in line and " finished " in line for line in job.stdout.splitlines()) == 2
    log = (runs_dir / "smope_topk_smoke.log").read_text()
    assert "Trial status" not in job.stdout and "pid=" not in job.stdout
    assert "Trial status" in log  # Tune's tables
    worker_lines = [line for line in log.splitlines() if "pid=" in line and ": smope on digits" in line]
    # the trials' own lines, forwarded from their processes (Ray folds lines alike but for numbers
    # into one "[repeated Nx]" line, printed later, so at least one is certain)
    assert worker_lines
    # the job's study wrote its runs where it was told, outside the uploaded working directory
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("smope_topk_smoke")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
