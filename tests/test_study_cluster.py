"""Studies that outlive their driver, and a cluster that grows while a study runs."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def _study(address: str, tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / f"driver-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen([sys.executable, str(ROOT / "studies" / "smope_topk.py"), "--smoke",
                             "--runs-dir", str(tmp_path), "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db",
                             *extra], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _runs(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("smope_topk_smoke")
    return client, (client.search_runs([experiment.experiment_id]) if experiment else [])


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _finished_children(tmp_path: Path) -> int:
    try:
        _, runs = _runs(tmp_path)
    except Exception:  # the store is still being created
        return 0
    return sum("mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED" for r in runs)


def test_a_study_whose_driver_is_killed_resumes_with_every_trial_once(local_ray, tmp_path):
    """SIGKILL the study driver after its first trial finished; ``--resume`` completes the study:
    every trial exactly once in Tune, one parent and one child per trial in MLflow, none RUNNING."""
    from ray.tune import ExperimentAnalysis

    args = ("--num-samples", "2", "--max-concurrent", "1", "--resume")
    first = _study(local_ray, tmp_path, *args)
    try:
        _wait_for(lambda: _finished_children(tmp_path) >= 1 or first.poll() is not None, 300, "a finished trial")
        assert first.poll() is None, "the study ended before it could be interrupted"
        time.sleep(2)  # the second trial is under way
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    second = _study(local_ray, tmp_path, *args)
    assert second.wait(600) == 0

    client, runs = _runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    trials = ExperimentAnalysis(str(tmp_path / "ray_results" / "smope_topk_smoke")).trial_dataframes
    assert len(trials) == 2 and all(df["task"].iloc[-1] == 5 for df in trials.values())
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(
        df["trial_id"].iloc[-1] for df in trials.values())
    for run in children:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "average_accuracy")]
        assert sorted(steps) == [0, 1, 2, 3, 4]  # no task logged twice across the interruption
    # the resumed searcher continued the same persistent Optuna study: each Tune trial completed
    # once in it (a suggestion the killed driver never ran is marked FAIL, not left RUNNING)
    import optuna

    study = optuna.load_study(study_name="smope_topk_smoke", storage=f"sqlite:///{tmp_path}/optuna.db")
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2
    assert optuna.trial.TrialState.RUNNING not in states


def _runs_started(tmp_path: Path) -> int:
    try:
        _, runs = _runs(tmp_path)
    except Exception:
        return 0
    return sum("mlflow.parentRunId" in r.data.tags for r in runs)


def test_trials_wait_for_a_node_with_the_driver_resource_and_spread_over_the_nodes(tmp_path):
    """``--driver-resource`` that no node offers yet: the console says so and no trial starts. A
    node that offers it joins mid-study: it takes both trial drivers, and as each node has room for
    one 0.9-CPU Train worker only, the two trials train one on the new node and one on the head
    (MLflow's ray_node_id tags); the study completes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "object_store_memory": 128 * 2**20,
                                      "include_dashboard": False})
    study = None
    try:
        study = _study(cluster.address, tmp_path, "--num-samples", "2", "--max-concurrent", "2",
                       "--cpus-per-worker", "0.9", "--driver-resource", "promptcl_driver")
        console = next(tmp_path.glob("driver-*.log"))
        _wait_for(lambda: "no node offers the resource 'promptcl_driver'" in console.read_text()
                  or study.poll() is not None, 300, "the console line")
        time.sleep(10)  # time enough for a trial to start and open its MLflow run, were its driver placed
        assert study.poll() is None and _runs_started(tmp_path) == 0
        joined = cluster.add_node(num_cpus=1, resources={"promptcl_driver": 10}, object_store_memory=128 * 2**20)
        assert study.wait(600) == 0, console.read_text()[-3000:]
        _, runs = _runs(tmp_path)
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
        assert {r.data.tags["ray_node_id"] for r in children} == {joined.node_id, cluster.head_node.node_id}
    finally:
        if study is not None and study.poll() is None:
            study.kill()
        cluster.shutdown()


def _x_space(optuna_trial) -> None:  # (Tune pickles the searcher, and its space, by reference)
    optuna_trial.suggest_float("x", 0.0, 1.0)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_ctrl_c_leaves_the_study_to_resume_with_each_trial_once_in_optuna(local_ray, tmp_path, monkeypatch, stop):
    """A first Ctrl-C, or a SIGTERM (a scheduler's stop): Ray saves the running trial and fit()
    returns (reporting it TERMINATED). The study is not over: its parent run ends KILLED, the Optuna
    trial stays RUNNING (not FAIL), and ``--resume`` runs it to completion, which Optuna takes. A
    stand-in trainable (no CL run)."""
    import optuna

    from promptcl.engine import RunSpec
    from promptcl.study import tracking, tuner

    driver = os.getpid()

    def trial(config, *, context):  # 3 tasks; the second trial's first attempt presses Ctrl-C at task 1
        from ray import tune

        second = (tmp_path / "first_ran").exists()
        (tmp_path / "first_ran").touch()
        for task in range(1, 4):
            final = {"final_average_accuracy": 50.0 + config["x"]} if task == 3 else {}
            tune.report({"task": task, "average_accuracy": 50.0, "search_score": task - 1 + config["x"] / 100, **final})
            if second and not (tmp_path / "interrupted").exists():
                (tmp_path / "interrupted").touch()
                os.kill(driver, stop)
                time.sleep(3)  # (the driver stops the loop first: the trial finishes only on resume)

    monkeypatch.setattr(tuner, "_trial_driver", trial)
    spec = tuner.StudySpec(name="s", method="smope", dataset="digits", search_space=_x_space, num_samples=2,
                           max_concurrent=1, runs_dir=tmp_path, feature_cache=False)
    uri = spec.resolved_tracking_uri()
    experiment_id = tracking.ensure_experiment(uri, spec.name, artifact_dir=tmp_path / "mlartifacts")
    run = RunSpec(method="smope", dataset="digits")
    with pytest.raises(tuner.StudyInterrupted, match="rerun the same command with --resume"):
        tuner._run_tuner(spec, run, 3, uri, experiment_id)
    client = tracking.client(uri)
    study = optuna.load_study(study_name="s", storage=spec.resolved_optuna_storage())
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "RUNNING"]
    assert client.get_run(tuner.stored_parent_run(spec)).info.status == "KILLED"

    rows = tuner._run_tuner(dataclasses.replace(spec, resume=True), run, 3, uri, experiment_id)
    assert len(rows) == 2
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"]
    assert client.get_run(tuner.stored_parent_run(spec)).info.status == "FINISHED"


def test_a_search_whose_trial_failed_exits_1_saying_so(local_ray, tmp_path, monkeypatch, capsys):
    """A search goes on past a failed trial, prints its tables, and exits 1 with a line naming the
    failures and the log (its MLflow run ends FAILED). A stand-in trainable (no CL run)."""
    from promptcl.study import tracking, tuner

    def trial(config, *, context):  # the first trial crashes after its first task
        from ray import tune

        first = not (tmp_path / "first_ran").exists()
        (tmp_path / "first_ran").touch()
        for task in (1, 2):
            final = {"final_average_accuracy": 60.0, "cumulative_average_accuracy": 70.0, "forgetting": 5.0,
                     "trainable_params": 10.0, "test_flops_per_image": 1e6} if task == 2 else {}
            tune.report({"task": task, "average_accuracy": 50.0, "search_score": task - 1 + config["x"] / 100, **final})
            if first:
                raise RuntimeError("a crash in the trial")

    monkeypatch.setattr(tuner, "_trial_driver", trial)
    spec = tuner.StudySpec(name="s", method="smope", dataset="digits", search_space=_x_space, num_samples=2,
                           max_concurrent=1, runs_dir=tmp_path, feature_cache=False, report=False)
    assert tuner.run_study_script(spec, table_params=["x"], best_by="x", prog="study") == 1
    err = capsys.readouterr().err
    assert f"study: 1 of 2 trials failed; their errors are in {spec.log_path()}" in err
    parent = tracking.client(spec.resolved_tracking_uri()).get_run(tuner.stored_parent_run(spec))
    assert parent.info.status == "FAILED"
