"""The Ray Tune + Optuna study on a real local Ray cluster, logged to a real MLflow store."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))
sys.path.insert(0, str(ROOT / "dashboards"))
sys.path.insert(0, str(ROOT / "tests"))


def test_gate_study_compares_hide_and_norga(local_ray, tmp_path, capsys, monkeypatch):
    import norga_gate
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)  # a relative --storage-path (made absolute: Ray takes no other)
    assert norga_gate.main(["--smoke", "--no-report", "--runs-dir", str(tmp_path), "--mlflow-uri", uri,
                            "--storage-path", "ray_rel", "--validation-fraction", "0.2"]) == 0
    assert (tmp_path / "ray_rel" / "norga_gate_smoke").is_dir()
    out = capsys.readouterr().out
    assert "Best trial per method (accuracy vs parameters and test FLOPs) (selected on the validation images" in out
    assert " | val FA | FA | " in out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("norga_gate_smoke").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["method"] for r in children) == ["hide", "norga"]
    norga = next(r for r in children if r.data.tags["method"] == "norga")
    assert norga.data.params["method_config/gate_activation"] == "sigmoid"
    assert all(0 < r.data.metrics["task_identity_accuracy"] <= 100 for r in children)
    assert all("unfair_protocol" not in r.data.tags for r in children)
    # held-out training images: evaluated, and what the searcher saw instead of the test sets
    from ray.tune import ExperimentAnalysis

    assert all(r.data.params["run/validation_fraction"] == "0.2" for r in children)
    finals = {r.data.tags["trial_id"]: r.data.metrics for r in children}
    for trial_id, df in ExperimentAnalysis(str(tmp_path / "ray_rel" / "norga_gate_smoke")).trial_dataframes.items():
        last = df.iloc[-1]
        assert last["search_score"] == pytest.approx(4 + last["validation_final_average_accuracy"] / 100)
        assert last["validation_final_average_accuracy"] != last["final_average_accuracy"]
    assert all(0 < m["validation_final_average_accuracy"] <= 100 for m in finals.values())
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["objectives"] == "validation_final_average_accuracy:max"  # the front the report stars
    best = max(children, key=lambda r: r.data.metrics["validation_final_average_accuracy"])
    assert [r.data.tags["pareto"] for r in children if r is not best] == ["false"] and best.data.tags["pareto"] == "true"


def test_a_validation_split_moves_the_studys_selection_off_the_test_sets():
    """With a validation split (a search's default) the default objectives, the best trials and the
    searcher's score read FA on the held-out training images; the single accuracy objective goes
    through search_score. --validation-fraction 0 selects on the test sets."""
    import numpy as np

    from promptcl.study.objectives import ACCURACY, ACCURACY_AND_COST, on_validation
    from promptcl.study.trainer import task_metrics
    from promptcl.study.tuner import best_per, format_table, spec_from_args, study_parser

    assert on_validation(ACCURACY) == ACCURACY
    assert [str(o) for o in on_validation(ACCURACY_AND_COST)] == [
        "validation_final_average_accuracy:max", "trainable_params:min", "test_flops_per_image:min"]

    def spec(*argv):
        parser = study_parser("a study", name="s", num_samples=1, objectives=ACCURACY_AND_COST)
        return spec_from_args(parser.parse_args(list(argv)), method="smope", search_space=None, smoke_overrides={})

    held = spec()  # a search holds out a tenth by default
    assert held.run_options["validation_fraction"] == 0.1 and held.objectives == on_validation(ACCURACY_AND_COST)
    assert held.selection_metric() == "validation_final_average_accuracy"
    plain = spec("--validation-fraction", "0")
    assert plain.objectives == ACCURACY_AND_COST and plain.selection_metric() == "final_average_accuracy"
    assert plain.run_options["validation_fraction"] == 0
    assert spec("--validation-fraction", "0.1", "--objectives", "final_average_accuracy:max").objectives == ACCURACY
    # the single accuracy objective goes through search_score (validation-based); its front is tagged on the same
    single = spec("--objectives", "final_average_accuracy:max")
    assert [str(o) for o in single.front_objectives()] == ["validation_final_average_accuracy:max"]
    assert spec("--validation-fraction", "0", "--objectives", "final_average_accuracy:max").front_objectives() == ACCURACY
    assert held.front_objectives() == held.objectives
    acc, validation = np.array([[80.0, 0.0], [60.0, 70.0]]), np.array([[90.0, 0.0], [50.0, 60.0]])
    assert task_metrics(acc, validation)["search_score"] == pytest.approx(1 + 55 / 100)
    assert task_metrics(acc)["search_score"] == pytest.approx(1 + 65 / 100)
    rows = [{"k": 1, "final_average_accuracy": 80.0, "validation_final_average_accuracy": 60.0},
            {"k": 1, "final_average_accuracy": 70.0, "validation_final_average_accuracy": 65.0}]
    assert best_per(rows, "k")[0]["final_average_accuracy"] == 80.0
    assert best_per(rows, "k", "validation_final_average_accuracy")[0]["final_average_accuracy"] == 70.0
    rows = [{**r, "cumulative_average_accuracy": 1.0, "forgetting": 0.0, "trainable_params": 1,
             "test_flops_per_image": 1e6} for r in rows]
    assert format_table(rows, ["k"]).splitlines()[2] == "1 | 60.00 | 80.00 | 1.00 | 0.00 | 1 | 1.00"


def test_bad_study_input_fails_before_ray_starts(tmp_path, capsys, monkeypatch):
    import smope_topk

    assert smope_topk.main(["--smoke", "--dataset", "imagenet-x", "--runs-dir", str(tmp_path / "r")]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def driverless_database_url() -> str:
    """A database URL whose SQLAlchemy driver is not installed here (a known server, no Python module)."""
    import importlib.util

    for url, module in (("mssql+pyodbc://host/db", "pyodbc"), ("mysql+mysqldb://host/db", "MySQLdb"),
                        ("postgresql+pg8000://host/db", "pg8000")):
        if importlib.util.find_spec(module) is None:
            return url
    pytest.skip("every candidate database driver is installed here")


@pytest.mark.parametrize("flags,message", [
    (["--trial-runner", "inline", "--workers-per-trial", "2"],
     "inline trials run one CPU process; use --trial-runner train for 2 workers"),
    (["--storage-path", "STORAGE"], "feature cache"),
    (["--storage-path", "FILE"], "--storage-path 'FILE' exists and is not a directory"),
    (["--storage-path", "FILE/sub"],
     "--storage-path 'FILE/sub' lies under 'FILE', which exists and is not a directory"),
    (["--runs-dir", "FILE/runs"], "--runs-dir 'FILE/runs' lies under 'FILE'"),
    (["--optuna-storage", "notaurl"], "--optuna-storage 'notaurl' is not a database URL"),
    (["--optuna-storage", "bogus://host/db"],
     "--optuna-storage 'bogus://host/db' names a database SQLAlchemy does not know ('bogus'"),
    (["--optuna-storage", "DRIVERLESS"], "--optuna-storage 'DRIVERLESS' needs the Python module"),
    (["--mlflow-uri", "DRIVERLESS"], "MLflow tracking URI 'DRIVERLESS' needs the Python module"),
    (["--optuna-storage", "sqlite:///FILE"], "--optuna-storage 'sqlite:///FILE': 'FILE' is not an SQLite database"),
    (["--optuna-storage", "sqlite:///FILE/o.db"], "its directory 'FILE' exists and is not a directory"),
    (["--mlflow-uri", "sqlite:///FILE"], "MLflow tracking URI 'sqlite:///FILE': 'FILE' is not an SQLite database"),
    (["--runs-dir", "STORAGE"],
     "the Optuna store under --runs-dir 'sqlite:///STORAGE/optuna.db': 'STORAGE/optuna.db' is a directory"),
    (["--mlflow-uri", "sqlite:x.db"], "MLflow tracking URI 'sqlite:x.db' is not a database URL"),
    (["--cpus-per-worker", "inf"], "cpus_per_worker must be a finite number > 0, got inf"),
    (["--gpus-per-worker", "2"], "gpus_per_worker needs use_gpu"),
    (["--mlflow-uri", "bogus://x"], "MLflow tracking URI 'bogus://x' names no tracking store"),
    (["--mlflow-uri", "http://127.0.0.1:9"], "MLflow tracking URI 'http://127.0.0.1:9': the server cannot be reached "
     "(Connection refused); start it, or give another --mlflow-uri"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**32 - 1], got -1"),
    (["--search-seed", "4294967296"], "search_seed must be an integer in [0, 2**32 - 1]"),
    (["--num-samples", "0"], "num_samples and max_concurrent must be >= 1"),
    (["--name", "../escape"], "a study name is letters, digits"),
    (["--objectives", "task_identity_accuracy:max,trainable_params:min"],
     "smope infer(s) no task at test time, so a trial reports no task_identity_accuracy"),
    (["--set", "top_k=2"], "--set top_k: the study searches it"),
    (["--set", "warp=9"], "unknown setting(s) warp"),
    (["--validation-fraction", "0", "--objectives", "validation_final_average_accuracy:max,trainable_params:min"],
     "the objective(s) validation_final_average_accuracy:max read the held-out training images, which runs "
     "without a validation split (--validation-fraction 0) do not have"),
])
def test_bad_study_options_fail_before_ray_or_mlflow_start(tmp_path, capsys, monkeypatch, flags, message):
    """One line, exit 2, nothing created: no runs directory, MLflow store, Optuna database or Ray."""
    import smope_topk

    from promptcl.study import tuner

    def no_ray(*args, **kwargs):
        raise AssertionError("the study started Ray")

    monkeypatch.setattr(tuner, "ensure_ray", no_ray)  # (another test's Ray may be up in this process)

    storage = tmp_path / "storage"
    storage.mkdir()
    (storage / "feature_cache").write_text("a file where the store's directory goes")
    (storage / "optuna.db").mkdir()  # a directory where the Optuna store of --runs-dir STORAGE goes
    (tmp_path / "file").write_text("a file")
    names = {"STORAGE": str(storage), "FILE": str(tmp_path / "file"), "DRIVERLESS": driverless_database_url()}
    flags = [names.get(f, f.replace("FILE", names["FILE"])) for f in flags]
    for name, value in names.items():
        message = message.replace(name, value)
    runs = ["--runs-dir", str(tmp_path / "r")] if "--runs-dir" not in flags else []
    before = sorted(str(p) for p in tmp_path.rglob("*"))  # (inside STORAGE too)
    assert smope_topk.main(["--smoke", *runs, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_store_sqlite_cannot_write_is_refused_before_work(tmp_path, monkeypatch):
    """An existing SQLite store in a read-only file or directory (this suite runs as root, for which
    every file is writable: the file system's answer is stood in for)."""
    import os
    import sqlite3

    from promptcl.storage import check_database_url

    db = tmp_path / "mlflow.db"
    sqlite3.connect(db).execute("create table t (x)").connection.close()
    check_database_url("MLflow tracking URI", f"sqlite:///{db}")
    for read_only in (db, tmp_path):
        monkeypatch.setattr(os, "access", lambda path, mode, ro=read_only: Path(path) != ro)
        with pytest.raises(ValueError, match=f"'{read_only}' is not writable$"):
            check_database_url("MLflow tracking URI", f"sqlite:///{db}")


LOCAL_RAY_REFUSALS = [
    (["studies/smope_topk.py", "--smoke", "--driver-resource", "promptcl_driver"],
     "smope_topk: error: --driver-resource promptcl_driver: a study without RAY_ADDRESS starts a local Ray with no "
     "custom resources, so its trials would never start (set RAY_ADDRESS to a cluster whose head offers it)"),
    (["studies/smope_topk.py", "--smoke", "--cpus-per-worker", "64"],
     "smope_topk: error: a trial asks for 64 CPU (this machine has "),
    (["studies/smope_topk.py", "--smoke", "--use-gpu", "--gpus-per-worker", "64"],
     "smope_topk: error: a trial asks for 64 GPU (this machine has "),
    (["promptcl", "run", "--method", "smope", "--dataset", "digits", "--num-workers", "2", "--cpus-per-worker", "32"],
     "promptcl: error: --num-workers 2 asks for 64 CPU (this machine has "),
]


@pytest.mark.parametrize("command, message", LOCAL_RAY_REFUSALS, ids=["driver-resource", "cpus", "gpus", "run"])
def test_what_a_local_ray_cannot_give_fails_before_work(tmp_path, command, message):
    """A study or run without RAY_ADDRESS starts a Ray on this machine, with no autoscaler and no
    custom resources: a request it cannot meet would leave the trials waiting for ever."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    program = ([str(Path(sys.executable).parent / "promptcl")] if command[0] == "promptcl"
               else [sys.executable, str(ROOT / command[0])])
    where = ["--out", str(tmp_path / "out")] if command[0] == "promptcl" else ["--runs-dir", str(tmp_path / "r")]
    done = subprocess.run([*program, *command[1:], *where], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ray
def test_the_local_capacity_check_counts_the_cpus_and_gpus_of_the_ray_a_study_starts():
    """The check reads Ray's CPU count through a private function: it must still be what
    ``ensure_ray`` starts with (a drift would refuse runs that fit, or let a too large one wait)."""
    import os
    import subprocess

    from ray._private.utils import get_num_cpus  # noqa: F401 (a Ray without it leaves only the fallback)

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = ("import json, ray; from promptcl.study.tuner import ensure_ray, local_ray_capacity; ensure_ray(); "
            "r = ray.cluster_resources(); print(json.dumps([{k: r.get(k, 0.0) for k in ('CPU', 'GPU')}, "
            "local_ray_capacity()]))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    started, assumed = json.loads(done.stdout.strip().splitlines()[-1])
    assert started == assumed and started["CPU"] >= 1


def test_a_driver_resource_no_node_offers_gets_a_console_line(local_ray):
    from promptcl.study.tuner import driver_resource_note

    note = driver_resource_note("promptcl_driver")
    assert note.startswith("no node offers the resource 'promptcl_driver' (--driver-resource) yet")
    assert driver_resource_note("CPU") is None  # the local cluster's nodes offer CPUs


def test_asha_stops_trials_at_task_boundaries_and_ranks_them_below_finished_ones(local_ray, tmp_path, capsys):
    """ASHA compares trials at the same task; a stopped trial ends KILLED in MLflow, tagged with
    the task it stopped at, and its searcher score ranks below every trial that finished."""
    import smope_topk
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert smope_topk.main(["--smoke", "--asha", "--num-samples", "5", "--max-concurrent", "1", "--no-report",
                            "--runs-dir", str(tmp_path), "--mlflow-uri", uri]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smope_topk_smoke").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 5 and parent.info.status == "FINISHED"
    finished = [r for r in children if r.info.status == "FINISHED"]
    killed = [r for r in children if r.info.status == "KILLED"]
    statuses = [(r.info.run_name, r.info.status, r.data.tags.get("stopped_at_task")) for r in children]
    assert len(finished) + len(killed) == 5 and killed and finished, statuses
    assert parent.data.metrics["completed_trials"] == len(finished)
    for run in killed:  # rungs of grace 1, reduction 2 over 5 tasks: tasks 1, 2, 4
        assert run.data.tags["stopped_at_task"] in {"1", "2", "4"}
        assert "final_average_accuracy" not in run.data.metrics
        # the worker may log a task more before the stop reaches it, never the whole sequence
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "average_accuracy"))
        assert steps[: int(run.data.tags["stopped_at_task"])] == list(range(int(run.data.tags["stopped_at_task"])))
        assert len(steps) < 5 and len(steps) == len(set(steps))
    for run in finished:
        assert "final_average_accuracy" in run.data.metrics
    # the console says which trials the scheduler stopped, and after which task
    stopped = sorted(line.split()[2:4] for line in out.splitlines() if "stopped   by the scheduler" in line)
    assert stopped == sorted([r.info.run_name.removeprefix("trial_"), "stopped"] for r in killed)
    assert "Report:" not in out
    trials = ExperimentAnalysis(str(tmp_path / "ray_results" / "smope_topk_smoke")).trial_dataframes
    # ASHA decided on the held-out images: replaying its rule (stop below the median of the trials
    # already recorded at a rung; one trial at a time, in order) on their scores gives its decisions
    stopped_at = {r.data.tags["trial_id"]: int(r.data.tags.get("stopped_at_task", 0)) for r in children}
    started = {r.data.tags["trial_id"]: r.info.start_time for r in children}
    recorded = {1: [], 2: [], 4: []}
    for df in sorted(trials.values(), key=lambda df: started[df["trial_id"].iloc[0]]):
        rows = df.set_index("task")
        assert rows["search_score"].tolist() == pytest.approx(
            [t - 1 + a / 100 for t, a in rows["validation_average_accuracy"].items()])
        for rung, earlier in recorded.items():
            score = rows["search_score"][rung]
            stops = bool(earlier) and score < np.nanpercentile(earlier, 50)
            earlier.append(score)
            assert stops == (stopped_at[df["trial_id"].iloc[0]] == rung)
            if stops:
                break
    # what the searcher saw: a stopped trial's best score is below every finished trial's
    final_scores = [df["search_score"].iloc[-1] for df in trials.values() if df["task"].iloc[-1] == 5]
    stopped_scores = [df["search_score"].max() for df in trials.values() if df["task"].iloc[-1] < 5]
    assert len(stopped_scores) == len(killed) and max(stopped_scores) < min(final_scores)
    # and what Optuna stored: one COMPLETE trial each, every stopped one below every finished one
    import optuna

    stored = optuna.load_study(study_name="smope_topk_smoke", storage=f"sqlite:///{tmp_path}/optuna.db").trials
    assert [t.state.name for t in stored] == ["COMPLETE"] * 5
    values = sorted(t.value for t in stored)
    assert values[: len(killed)] == pytest.approx(sorted(stopped_scores))
    assert values[len(killed):] == pytest.approx(sorted(final_scores))


def test_method_comparison_grid_runs_every_method_and_seed_once(local_ray, tmp_path, capsys):
    import method_comparison
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert method_comparison.main(["--smoke", "--methods", "simplecil,ovor", "--seeds", "2", "--max-concurrent", "4",
                                   "--no-report", "--runs-dir", str(tmp_path), "--mlflow-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "| simplecil |" in out and "| ovor |" in out and "±" in out

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("method_comparison_smoke")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted((r.data.tags["method"], r.data.params["run/seed"]) for r in children) == [
        ("ovor", "0"), ("ovor", "1"), ("simplecil", "0"), ("simplecil", "1")]
    ovor = [r for r in children if r.data.tags["method"] == "ovor"]
    # the smoke settings reach each method where its config has them
    assert {r.data.params["method_config/vor_epochs"] for r in ovor} == {"1"}
    assert parent.data.tags["method"] == "simplecil,ovor"
    assert {"methods.md", "methods.parquet"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    table = pq.read_table(tmp_path / "method_comparison_smoke" / "methods.parquet").to_pylist()
    by_method = {row["method"]: row for row in table}
    for method in ("ovor", "simplecil"):
        fa = [r.data.metrics["final_average_accuracy"] for r in children if r.data.tags["method"] == method]
        assert by_method[method]["seeds"] == [0, 1]
        assert by_method[method]["final_average_accuracy_mean"] == pytest.approx(sum(fa) / 2)
    assert by_method["simplecil"]["trainable_params"] == 0


def test_method_comparison_rejects_unknown_methods_before_ray_starts(tmp_path, capsys):
    import method_comparison

    assert method_comparison.main(["--methods", "l2p,nope", "--runs-dir", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert method_comparison.main(["--methods", "smope,l2p,smope", "--runs-dir", str(tmp_path)]) == 2
    assert "--methods names smope more than once" in capsys.readouterr().err
    for listed in ("", "smope,", "smope,,l2p"):  # not every method, nor smope alone (--seeds 0: never a study)
        assert method_comparison.main(["--methods", listed, "--seeds", "0", "--runs-dir", str(tmp_path)]) == 2
        assert f"--methods {listed!r} has an empty name" in capsys.readouterr().err
    # names with spaces around them are methods: the next check (the seeds) is the one that refuses
    assert method_comparison.main(["--methods", " smope , l2p", "--seeds", "0", "--runs-dir", str(tmp_path)]) == 2
    assert "--seeds must be >= 1, got 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags", [["--num-samples", "4"], ["--seed", "1"], ["--search-seed", "0"]])
def test_method_comparison_rejects_search_flags_a_grid_ignores(tmp_path, capsys, flags):
    import method_comparison

    assert method_comparison.main([*flags, "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{flags[0]} do not apply to a method x seed grid" in err and "--seeds N" in err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on a sqlite store, bound to 127.0.0.1; yields its URL."""
    import subprocess

    import browser

    port = browser.free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path}/server-mlflow.db", "--artifacts-destination",
                               str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        browser.wait_for_http(f"{url}/health", timeout=120)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_smoke_study_over_http_logs_runs_and_a_persistent_multi_objective_optuna_study(
        local_ray, mlflow_server, tmp_path, capsys):
    """The default study's script with two objectives against an MLflow tracking server: parent and
    child runs with metrics and artifacts, a model-training experiment whose child runs the MLflow
    UI lists with their FA (headless Chromium), a persistent Optuna study whose front MLflow tags,
    optuna-dashboard on its store."""
    import json
    import subprocess
    import urllib.parse
    from collections import Counter

    import browser

    import optuna
    import pyarrow.parquet as pq
    import smope_topk
    from mlflow.tracking import MlflowClient

    uri, storage = mlflow_server, f"sqlite:///{tmp_path}/optuna.db"
    assert smope_topk.main(["--smoke", "--num-samples", "4", "--max-concurrent", "4", "--objectives",
                            "final_average_accuracy:max,trainable_params:min,train_flops_per_run:min",
                            "--runs-dir", str(tmp_path), "--mlflow-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "Best trial per top_k" in out and "test MFLOPs/img" in out
    assert "Pareto front of final_average_accuracy:max, trainable_params:min, train_flops_per_run:min" in out
    assert f"optuna-dashboard {storage}" in out
    # The console: one line per trial event (off a terminal, per task too), Ray's output in the log,
    # the paths of the log, the report and the MLflow store last.
    lines = out.strip().splitlines()
    events = [line.split("] ", 1)[1].split()[2] for line in lines if line.startswith("[") and "] trial " in line]
    assert Counter(events) == {"started": 4, "task": 4 * 4, "finished": 4}
    assert len(lines) < 60 and "pid=" not in out and "Trial status" not in out
    log = tmp_path / "smope_topk_smoke.log"  # (worker logs too, but this cluster does not forward them)
    assert "Trial status" in log.read_text()
    assert [line.split(":")[0] for line in lines[-3:]] == ["Log", "Report", "MLflow"]
    assert lines[-3].split()[-1] == str(log)
    report = tmp_path / "smope_topk_smoke" / "report" / "index.html"
    assert lines[-2].split()[-1] == str(report) and report.exists()

    study = optuna.load_study(study_name="smope_topk_smoke", storage=storage)
    trials = study.get_trials()
    assert len(trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE and len(t.values) == 3 for t in trials)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("smope_topk_smoke")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and parent.data.metrics["completed_trials"] == 4
    # Optuna proposed different configurations, each logged as flattened params
    proposals = {tuple(r.data.params[f"method_config/{k}"] for k in ("top_k", "noise_scale")) for r in children}
    assert len(proposals) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["method_config/epochs"] == "2"  # the smoke preset's fixed setting
        history = client.get_metric_history(child.info.run_id, "average_accuracy")
        assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
        for key in ("final_average_accuracy", "cumulative_average_accuracy", "forgetting", "trainable_params",
                    "test_flops_per_image"):
            assert key in child.data.metrics
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"accuracy_matrix.json", "config.json", "results.parquet", "summary.json"} <= artifacts
    # every result Tune saw carried the cost objectives (known before training), not only the last
    from ray.tune import ExperimentAnalysis

    results = ExperimentAnalysis(str(tmp_path / "ray_results" / "smope_topk_smoke")).trial_dataframes
    assert len(results) == 4 and all(len(df) == 5 and df["trainable_params"].notna().all() for df in results.values())
    values = lambda r: tuple(r.data.metrics[k] for k in study.metric_names)  # noqa: E731
    # Optuna's objective values are the MLflow metrics of the same trials
    assert Counter(tuple(t.values) for t in trials) == Counter(values(r) for r in children)
    # Optuna's front is the set of trials MLflow tags pareto=true
    assert Counter(tuple(t.values) for t in study.best_trials) == Counter(
        values(r) for r in children if r.data.tags["pareto"] == "true")
    assert {r.data.tags["pareto"] for r in children} <= {"true", "false"}
    assert len(parent.data.tags["pareto_trials"].split(",")) == len(study.best_trials)
    assert "report/index.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}

    # a final-only cost (the training FLOPs the engine counted) is an objective like the accuracy
    assert study.metric_names == ["final_average_accuracy", "trainable_params", "train_flops_per_run"]

    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on runs, not traces

    import tradeoff  # the trade-off dashboard reads the same MLflow store

    assert tradeoff.main(["--experiment", "smope_topk_smoke", "--mlflow-uri", uri,
                          "--out", str(tmp_path / "map.png")]) == 0
    assert (tmp_path / "map.png").stat().st_size > 0
    assert "pareto" in capsys.readouterr().out

    # the study's report from the same store, logged back to its parent run
    from promptcl.cli import main as promptcl

    assert promptcl(["report", "--experiment", "smope_topk_smoke", "--mlflow-uri", uri, "--out",
                     str(tmp_path / "report")]) == 0
    table = pq.read_table(tmp_path / "report" / "study.parquet")
    assert table.num_rows == 4 * 15 and len(set(table.column("run_id").to_pylist())) == 4  # trials x (task, task)
    assert (tmp_path / "report" / "expert_usage.png").is_file()
    # the report's files, nothing else of the runs directory (the study's own report logged the same set)
    assert {a.path.split("/")[-1] for a in client.list_artifacts(parent.info.run_id, "report")} == {
        "index.html", "study.parquet", "tradeoff.png", "forgetting.png", "task_curves.png", "accuracy_matrix.png",
        "expert_usage.png"}

    # optuna-dashboard opens the same store and lists the study
    port = browser.free_port()
    dashboard = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), storage, "--host",
                                  "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        listed = json.loads(browser.wait_for_http(f"http://127.0.0.1:{port}/api/studies"))
        assert [(s["study_name"], s["directions"]) for s in listed["study_summaries"]] == [
            ("smope_topk_smoke", ["maximize", "minimize", "minimize"])]

        # In headless Chromium (skipped from here when it is not installed): the dashboard renders
        # the front without console errors, and the MLflow UI lists the trials with their FA.
        browser.chromium()
        page = browser.load(f"http://127.0.0.1:{port}/dashboard/studies/{listed['study_summaries'][0]['study_id']}",
                            screenshot="optuna_dashboard_pareto.png", wait_for_text="Pareto Front")
        assert "Pareto Front" in page.text and "trainable_params" in page.text
        assert page.errors == [] and page.screenshot.stat().st_size > 10_000
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
    ids = urllib.parse.quote(json.dumps([r.info.run_id for r in children]))
    page = browser.load(f"{uri}/#/compare-runs?runs={ids}&experiments=" + urllib.parse.quote(json.dumps(
        [experiment.experiment_id])), screenshot="mlflow_compare_trials.png", wait_for_text="final_average_accuracy",
        width=2400)  # the comparison table renders only the columns in view
    for child in children:
        assert child.info.run_name in page.text
        assert f"{child.data.metrics['final_average_accuracy']:.2f}" in page.text
    assert page.screenshot.stat().st_size > 10_000
    report = browser.load((tmp_path / "report" / "index.html").as_uri(), screenshot="study_report.png",
                          wait_for_text="Trials")
    assert report.errors == [] and all(child.info.run_name in report.text for child in children)


def test_a_multi_objective_study_refuses_asha(tmp_path, capsys):
    import smope_topk

    assert smope_topk.main(["--smoke", "--asha", "--objectives", "final_average_accuracy:max,trainable_params:min",
                            "--runs-dir", str(tmp_path)]) == 2
    assert "--asha needs the objective final_average_accuracy:max" in capsys.readouterr().err


def _toy_space(trial) -> None:
    trial.suggest_float("x", 0.0, 1.0)


def _searcher(tmp_path, metric="search_score", mode="max"):
    """The study's searcher over a persistent Optuna study in tmp_path, as ``_make_tuner`` builds it."""
    import optuna

    from promptcl.study.tuner import StoredOptunaSearch

    return StoredOptunaSearch(space=_toy_space, metric=metric, mode=mode, study_name="s",
                              storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db"))


def _optuna_states(tmp_path) -> list[str]:
    import optuna

    return [t.state.name for t in optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db").trials]


def test_a_restored_searcher_fails_only_the_optuna_trials_tune_lost(tmp_path):
    """Tune saves its searcher with its trials; after a lost driver, the trials that state holds
    run on (Optuna must still take their results), one asked for after the save never runs."""
    first = _searcher(tmp_path)
    first.suggest("done")
    first.suggest("running")
    first.on_trial_complete("done", {"search_score": 1.0})
    first.save(str(tmp_path / "searcher.pkl"))  # Tune's last state save
    first.suggest("lost")

    resumed = _searcher(tmp_path)
    resumed.restore(str(tmp_path / "searcher.pkl"))  # what Tuner.restore does on --resume
    assert _optuna_states(tmp_path) == ["COMPLETE", "RUNNING", "FAIL"]
    resumed.on_trial_complete("running", {"search_score": 2.0})  # the resumed trial finishes
    assert _optuna_states(tmp_path) == ["COMPLETE", "COMPLETE", "FAIL"]


@pytest.mark.parametrize("metric, mode", [("trainable_params", "min"),
                                          (["final_average_accuracy", "trainable_params"], ["max", "min"])],
                         ids=["cost", "accuracy-and-cost"])
def test_an_errored_trial_is_a_failed_optuna_trial(tmp_path, metric, mode):
    """Cost metrics are in every result: a crashed trial's last one must not make it COMPLETE (a
    cheap crash would win ``trainable_params:min``) nor, beside a missing accuracy, leave it RUNNING."""
    searcher = _searcher(tmp_path, metric, mode)
    searcher.suggest("crashed")
    searcher.on_trial_complete("crashed", {"task": 2, "trainable_params": 10.0}, error=True)
    assert _optuna_states(tmp_path) == ["FAIL"]


def test_an_interrupted_study_exits_130_with_a_line_on_resuming(tmp_path, monkeypatch, capsys):
    """The console end of an interrupted study (tests/test_study_cluster.py interrupts one)."""
    from promptcl.study import tuner

    def interrupted(spec, validated):
        raise tuner.StudyInterrupted("study 's' was interrupted; ...: rerun the same command with --resume ...")

    monkeypatch.setattr(tuner, "run_study", interrupted)
    spec = tuner.StudySpec(name="s", method="smope", dataset="digits", search_space=_toy_space, runs_dir=tmp_path)
    assert tuner.run_study_script(spec, table_params=[], best_by="x", prog="s") == 130
    captured = capsys.readouterr()
    assert captured.err.startswith("s: study 's' was interrupted") and captured.out == ""


def test_the_study_state_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A driver lost while writing the state file leaves the previous one intact, not a stub."""
    from promptcl.study import tracking, tuner

    spec = tuner.StudySpec(name="s", method="smope", dataset="digits", search_space=_toy_space, runs_dir=tmp_path)
    uri = spec.resolved_tracking_uri()
    experiment_id = tracking.ensure_experiment(uri, spec.name, artifact_dir=tmp_path / "mlartifacts")
    first = tuner._parent_run(spec, uri, experiment_id, resuming=False)
    state_fs = tuner._state_fs

    class HalfWritten:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def write(self, data):
            self.stream.write(data[: len(data) // 2])
            raise OSError("driver lost")

    class DyingFs:  # the real file system, but the driver dies halfway through a write
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def open_output_stream(self, path):
            return HalfWritten(self.fs.open_output_stream(path))

    with monkeypatch.context() as m:
        m.setattr(tuner, "_state_fs", lambda spec: (DyingFs(state_fs(spec)[0]), state_fs(spec)[1]))
        with pytest.raises(OSError, match="driver lost"):
            tuner._parent_run(spec, uri, experiment_id, resuming=False)
    assert tuner.stored_parent_run(spec) == first


def _smope_spec(monkeypatch, argv):
    """The StudySpec that ``smope_topk.main(argv)`` runs."""
    import smope_topk

    seen = {}
    with monkeypatch.context() as m:
        m.setattr(smope_topk, "run_study_script", lambda spec, **kwargs: seen.update(spec=spec) or 0)
        smope_topk.main(argv)
    return seen["spec"]


@pytest.mark.parametrize("case, flags, message", [
    ("changed", ["--num-samples", "5", "--objectives", "final_average_accuracy:max,trainable_params:min"],
     "--resume: study 'smope_topk_smoke' at STUDY began with num_samples=3, objectives=['final_average_accuracy:max']; "
     "this command gives num_samples=5, objectives=['final_average_accuracy:max', 'trainable_params:min'] (a restored "
     "study keeps its settings: rerun it with them, or give another --name)"),
    ("changed", ["--trial-runner", "train", "--max-failures", "2"], "--resume: study 'smope_topk_smoke' at STUDY "
     "began with max_failures=0, trial_runner='inline'; this command gives max_failures=2, trial_runner='train'"),
    ("no-optuna-study", [], "--resume: study 'smope_topk_smoke' at STUDY searches with the Optuna study "
     "'smope_topk_smoke', which sqlite:///RUNS/optuna.db does not hold"),
    ("corrupt", [], "the study state file STUDY/promptcl_study.json is corrupt ('{\"parent_run'): delete it"),
    ("other-mlflow", ["--mlflow-uri", "sqlite:///RUNS/other.db"], "--resume: study 'smope_topk_smoke' at STUDY logs "
     "to the MLflow parent run PARENT, which the tracking store sqlite:///RUNS/other.db does not hold (resume with "
     "the --mlflow-uri or MLFLOW_TRACKING_URI it began with, or give another --name)"),
])
def test_resume_refuses_a_study_it_cannot_continue_before_any_work(tmp_path, capsys, monkeypatch, case, flags,
                                                                    message):
    """Tune restores a study as it began and its searcher opens the Optuna study it began with: a
    changed spec, a lost Optuna study or MLflow parent run or a broken state file is one line, exit 2,
    before Ray or any new MLflow run; a state file of an older version (no spec) is not checked."""
    import optuna
    import smope_topk

    from promptcl.study import tracking, tuner

    def no_ray(*args, **kwargs):
        raise AssertionError("the study started Ray")

    monkeypatch.setattr(tuner, "ensure_ray", no_ray)
    runs = tmp_path / "r"
    argv = ["--smoke", "--runs-dir", str(runs), "--num-samples", "3", "--resume"]
    spec = _smope_spec(monkeypatch, argv)
    Path(spec.experiment_path()).mkdir(parents=True)
    (Path(spec.experiment_path()) / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    uri = spec.resolved_tracking_uri()
    parent = tracking.start_run(uri, tracking.ensure_experiment(uri, spec.name), "study")
    tuner._write_study_state(spec, {"parent_run_id": parent, "spec": tuner.spec_identity(spec)})
    if case != "no-optuna-study":
        optuna.create_study(study_name=spec.name, storage=spec.resolved_optuna_storage())
    if case == "corrupt":  # what an older version's in-place write could leave
        (Path(spec.experiment_path()) / "promptcl_study.json").write_text('{"parent_run')
    before = sorted(p.name for p in runs.iterdir())
    capsys.readouterr()
    flags = [f.replace("RUNS", str(runs)) for f in flags]
    assert smope_topk.main([*argv, *flags]) == 2
    err = capsys.readouterr().err.strip()
    expected = message.replace("STUDY", spec.experiment_path()).replace("RUNS", str(runs)).replace("PARENT", parent)
    assert err.startswith(f"smope_topk: error: {expected}") and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in runs.iterdir()) == before  # no other MLflow store, no Optuna database

    if case == "changed":  # an older version's state file: resumed as it is
        tuner._write_study_state(spec, {"parent_run_id": parent})
        changed = _smope_spec(monkeypatch, [*argv, *flags])
        tuner.validate_study(changed)


def test_a_search_over_methods_validates_every_method_it_searches(tmp_path):
    import expert_scaling
    import norga_gate

    from promptcl.study.objectives import parse_objectives
    from promptcl.study.tuner import StudySpec, validate_study

    def spec(space, method):
        objectives = parse_objectives("task_identity_accuracy:max,trainable_params:min")
        return StudySpec(name="m", method=method, dataset="digits", search_space=space, runs_dir=tmp_path / "r",
                         feature_cache=False, objectives=objectives)

    assert spec(norga_gate.search_space, "norga").methods() == ("hide", "norga")
    assert spec(expert_scaling.make_search_space("digits"), "smope").methods() == ("smope", "hide", "norga")

    def hide_or_smope(trial):
        trial.suggest_categorical("method", ["hide", "smope"])

    with pytest.raises(ValueError, match="^smope infer"):  # its SMoPE trials report no task identity
        validate_study(spec(hide_or_smope, "hide"))
    assert not (tmp_path / "r").exists()


def test_set_gives_every_trial_a_method_setting(tmp_path, monkeypatch):
    """`--set KEY=VALUE` (as promptcl run's) is a fixed setting of every trial, checked with the
    method: e.g. the contrastive groups NoRGa needs to run on two workers per trial."""
    import norga_gate

    from promptcl.study import tuner

    seen = {}
    monkeypatch.setattr(norga_gate, "run_study_script", lambda spec, **kwargs: seen.update(spec=spec) or 0)
    argv = ["--smoke", "--runs-dir", str(tmp_path / "r"), "--workers-per-trial", "2"]
    norga_gate.main(argv)
    with pytest.raises(ValueError, match="contrastive term over the whole batch"):
        tuner.validate_study(seen["spec"])
    norga_gate.main([*argv, "--set", "contrastive_group=16"])
    assert seen["spec"].fixed_overrides["contrastive_group"] == "16" and seen["spec"].fixed_overrides["epochs"] == 2
    assert tuner.validate_study(seen["spec"]).overrides["contrastive_group"] == "16"
