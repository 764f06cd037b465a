"""``ray job submit -- python studies/smope_topk.py --smoke`` against a local ``ray start --head``."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_job_submit_runs_the_smoke_study(tmp_path):
    bin_dir = Path(sys.executable).parent
    ray = str(bin_dir / "ray")
    # The job's `python` resolves from the PATH that `ray start` saw.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    dashboard = free_port()
    address = f"http://127.0.0.1:{dashboard}"
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                    "--num-cpus=2", "--object-store-memory=268435456", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        job = subprocess.run(
            [ray, "job", "submit", "--address", address, "--working-dir", str(ROOT),
             "--runtime-env-json", '{"excludes": [".git", "runs", ".venv", ".tools"], "env_vars": {"PYTHONUNBUFFERED": "1"}}', "--",
             "python", "studies/smope_topk.py", "--smoke", "--runs-dir", str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    # the job's study wrote its runs where it was told, outside the uploaded working directory
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("smope_topk_smoke")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
