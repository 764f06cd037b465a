"""Runs on N Ray Train workers: exact sharded evaluation, 1 vs 2 workers, a worker killed mid-run."""

import json
import os
import sys
from pathlib import Path

import pytest

from promptcl.cli import main
from promptcl.engine import RunSpec, evaluate_checkpoint, resolve_run
from promptcl.study.trainer import Scaling, evaluate_on_workers

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """The digits SMoPE run in one plain process (the reference for everything below)."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(["run", "--method", "smope", "--dataset", "digits", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def two_workers(local_ray, tmp_path_factory):
    base = tmp_path_factory.mktemp("two")
    cwd = os.getcwd()
    os.chdir(base)
    try:  # a relative --out (Ray's storage path is made absolute from it)
        assert main(["run", "--method", "smope", "--dataset", "digits", "--out", "run", "--no-progress",
                     "--num-workers", "2"]) == 0
    finally:
        os.chdir(cwd)
    return base / "run"


def test_two_worker_evaluation_equals_the_single_process_one(local_ray, one_worker, tmp_path):
    spec = RunSpec(method="smope", dataset="digits")
    checkpoint = one_worker / "checkpoints" / "task_04.pt"
    single = evaluate_checkpoint(resolve_run(spec), checkpoint)
    summary = json.loads((one_worker / "summary.json").read_text())
    assert single.tolist() == summary["accuracy_matrix"][-1]
    sharded = evaluate_on_workers(spec, checkpoint, Scaling(num_workers=2), storage_path=str(tmp_path))
    assert sharded.tolist() == single.tolist()  # exactly, not approximately


def test_two_workers_train_within_two_points_of_one(one_worker, two_workers):
    one = json.loads((one_worker / "summary.json").read_text())
    two = json.loads((two_workers / "summary.json").read_text())
    assert (one["num_workers"], two["num_workers"]) == (1, 2)
    assert abs(one["final_average_accuracy"] - two["final_average_accuracy"]) <= 2.0
    assert two["config"] == one["config"]
    assert two["train_flops_per_run"] == one["train_flops_per_run"] > 0  # the work of all ranks, counted once
    assert sorted(p.name for p in (two_workers / "checkpoints").iterdir()) == [f"task_{t:02d}.pt" for t in range(5)]
    assert (two_workers / "results.parquet").is_file()


def test_batch_size_must_divide_across_workers(tmp_path, capsys):
    code = main(["run", "--method", "smope", "--dataset", "digits", "--out", str(tmp_path / "x"),
                 "--num-workers", "3"])
    assert code == 2
    assert "batch_size=32 is not divisible by 3 workers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def fixed_configuration(trial) -> None:
    """A search space with nothing to search: every trial runs the digits preset."""


def test_a_killed_worker_restarts_from_its_task_checkpoint_in_the_same_mlflow_run(
        local_ray, two_workers, tmp_path, monkeypatch):
    """Rank 1 exits hard after task 2 of 5; Train restarts both workers from the task-2 checkpoint.
    The accuracy matrix equals the uninterrupted 2-worker run's, in one MLflow child run."""
    from mlflow.tracking import MlflowClient

    from promptcl.study.tuner import StudySpec, run_study

    monkeypatch.setenv("PROMPTCL_INJECT_WORKER_FAULT", "task=2,rank=1")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rows = run_study(StudySpec(name="fault", method="smope", dataset="digits", search_space=fixed_configuration,
                               num_samples=1, runs_dir=tmp_path, tracking_uri=uri,
                               scaling=Scaling(num_workers=2, max_failures=1)))
    assert len(rows) == 1
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fault").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    child = children[0].info.run_id
    for metric in ("average_accuracy", "acc/task_0", "final_average_accuracy"):
        steps = [m.step for m in client.get_metric_history(child, metric)]
        assert len(steps) == len(set(steps)), f"duplicate steps for {metric}: {steps}"
    assert sorted(m.step for m in client.get_metric_history(child, "average_accuracy")) == [0, 1, 2, 3, 4]
    restarted = json.loads(Path(client.download_artifacts(child, "accuracy_matrix.json", str(tmp_path))).read_text())
    uninterrupted = json.loads((two_workers / "summary.json").read_text())["accuracy_matrix"]
    assert restarted == uninterrupted
    # the fault fired, once; the restart resumes from the task-2 checkpoint, or from task 1's if the
    # controller had not taken rank 0's last report when rank 1 died (the hook gives it two polls)
    assert children[0].data.tags["restarted_from_task"] in ("02", "01")


def test_an_inline_trial_killed_mid_run_restarts_from_its_tune_checkpoint(local_ray, one_worker, tmp_path,
                                                                          monkeypatch, capsys):
    """A one-worker trial runs in the Tune trial itself (no worker group); its process exits hard
    after task 2, Tune restarts the trial from the task-2 checkpoint it reported, and the run ends
    with the single-process accuracy matrix, in one MLflow child run."""
    from mlflow.tracking import MlflowClient

    from promptcl.study.tuner import StudySpec, run_study

    monkeypatch.setenv("PROMPTCL_INJECT_WORKER_FAULT", "task=2,rank=0")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = StudySpec(name="inline_fault", method="smope", dataset="digits", search_space=fixed_configuration,
                     num_samples=1, runs_dir=tmp_path, tracking_uri=uri, scaling=Scaling(max_failures=1))
    assert spec.inline_trials()
    rows = run_study(spec)
    assert len(rows) == 1
    client = MlflowClient(uri)
    children = [r for r in client.search_runs([client.get_experiment_by_name("inline_fault").experiment_id])
                if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    child = children[0]
    assert child.data.tags["restarted_from_task"] == "02" and child.data.params["run/num_workers"] == "1"
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "average_accuracy")) == [0, 1, 2, 3, 4]
    restarted = json.loads(Path(client.download_artifacts(child.info.run_id, "accuracy_matrix.json",
                                                          str(tmp_path))).read_text())
    assert restarted == json.loads((one_worker / "summary.json").read_text())["accuracy_matrix"]
    assert "restarts  from its checkpoint after task 3/5" in capsys.readouterr().out


@pytest.mark.parametrize("api", ["train", "tune"])
def test_a_worker_that_does_not_see_the_run_locations_fails_at_its_start(tmp_path, api):
    """Ray's own check comes when the first checkpoint is persisted, after a task's training, and
    MLflow would make an empty SQLite store: the workers check at their start (Ray's StorageContext
    of Train workers and of Tune trials)."""
    import shutil

    from promptcl.study import tracking
    from promptcl.study.trainer import check_node_sees_locations

    if api == "train":
        from ray.train.v2._internal.execution.storage import StorageContext
    else:
        from ray.train._internal.storage import StorageContext
    storage = StorageContext(storage_path=str(tmp_path / "ray_results"), experiment_dir_name="study")
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    tracking.ensure_experiment(uri, "study")  # the driver's store
    check_node_sees_locations(storage, uri)  # what the driver made: visible
    (tmp_path / "runs" / "mlflow.db").rename(tmp_path / "elsewhere.db")  # what a node without the driver's disk sees
    with pytest.raises(RuntimeError, match=r"the MLflow store 'sqlite:///.*/runs/mlflow.db' is not on node .*, where "
                                           r"this worker runs: give --mlflow-uri a tracking server every node reaches"):
        check_node_sees_locations(storage, uri)
    check_node_sees_locations(storage, "http://127.0.0.1:5000")  # a server is not a file here
    shutil.rmtree(tmp_path / "ray_results")
    with pytest.raises(RuntimeError, match=r"storage 'local:.*/ray_results/study' is not visible on node .*, where "
                                           r"this worker runs: put --storage-path .* or --out .* every node mounts"):
        check_node_sees_locations(storage)


def test_data_short_of_some_classes_fail_a_worker_run_in_one_line(local_ray, cifar100_files, tmp_path, capsys):
    """A CIFAR-100 test file with the first 10 classes only: the workers find it as they set up;
    the command says so in one line (not Ray's wrapped traceback) and leaves nothing."""
    import pickle

    root, _ = cifar100_files
    part = tmp_path / "cifar" / "cifar-100-python"
    part.mkdir(parents=True)
    for name in ("train", "meta"):
        (part / name).write_bytes((root / "cifar-100-python" / name).read_bytes())
    test = pickle.loads((root / "cifar-100-python" / "test").read_bytes())
    kept = [i for i, label in enumerate(test["fine_labels"]) if label < 10]
    (part / "test").write_bytes(pickle.dumps(
        {**test, "data": test["data"][kept], "fine_labels": [test["fine_labels"][i] for i in kept]}, protocol=2))
    assert main(["run", "--method", "simplecil", "--dataset", "cifar100", "--data-dir", str(part.parent),
                 "--backbone", "vit_tiny_patch16_224", "--random-init", "--out", str(tmp_path / "run"),
                 "--num-workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "has no test images: the data hold only some of cifar100's classes" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar"]
