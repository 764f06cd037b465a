"""The study report from a tidy table: export rows, trials rebuilt, figures, HTML in Chromium."""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from promptcl.cli import main
from promptcl.study.report import _matrix_rows, build_report, trials, write_table


def _trial(name, method, fa, params, flops, state=None, train_flops=None):
    acc = np.array([[90.0, 0, 0], [80.0, 85.0, 0], [70.0, 75.0, fa * 3 - 145.0]])
    trial = {"run_id": f"id-{name}", "trial": name, "method": method, "pareto": "", "config": json.dumps({"top_k": 2}),
             "method_state": json.dumps(state or {}), "final_average_accuracy": fa, "cumulative_average_accuracy": 80.0,
             "forgetting": 10.0, "backward_transfer": -10.0, "trainable_params": params, "train_flops_per_image": 2.0,
             "test_flops_per_image": flops, "backbone_flops_per_image": 1.0}
    if train_flops is not None:  # a run from before the engine counted training work has none
        trial["train_flops_per_run"] = train_flops
    return trial, acc


@pytest.fixture
def rows():
    out = []
    usage = {"expert_usage": [[[5, 0, 3], [1, 1, 6]]], "prompt_layers": [0]}
    gates = {"gate_activation": "tanh", "prompt_layers": [0, 1], "alpha": [1.1, 0.9], "tau": [1.0, 1.2]}
    for trial, acc in (_trial("a", "smope", 80.0, 100, 1.0, usage, 3e12), _trial("b", "norga", 90.0, 1000, 2.0, gates,
                                                                                 5e12),
                       _trial("c", "l2p", 70.0, 500, 2.0)):
        out.extend(_matrix_rows(trial, acc))
    return out


def test_tidy_rows_rebuild_each_trial(rows, tmp_path):
    assert len(rows) == 3 * 6  # three trials x the lower triangle of a 3-task matrix
    path = write_table(rows, tmp_path / "study.parquet")
    table = pq.read_table(path)
    assert {"run_id", "method", "train_task", "eval_task", "accuracy", "final_average_accuracy"} <= set(table.column_names)
    rebuilt = trials(table.to_pylist())
    assert [t["trial"] for t in rebuilt] == ["b", "a", "c"]  # best FA first
    assert rebuilt[1]["accuracy_matrix"][1, 0] == 80.0 and np.isnan(rebuilt[1]["accuracy_matrix"][0, 1])
    assert rebuilt[0]["method_state"]["tau"] == [1.0, 1.2]


def test_trials_of_a_study_with_a_validation_split_rank_by_what_it_selected_on(rows, tmp_path):
    """Where every trial has FA on the held-out images (the study's selection), the best trial, the
    heatmap's, is the best by it, not by the test FA; the trial table shows it as "val FA"."""
    held_out = {"id-a": 95.0, "id-b": 85.0, "id-c": 90.0}
    selected = [{**row, "validation_final_average_accuracy": held_out[row["run_id"]]} for row in rows]
    assert [t["trial"] for t in trials(selected)] == ["a", "c", "b"]
    page = build_report(selected, tmp_path / "r", title="t").read_text()
    assert "<th>val FA</th>" in page
    one_missing = [{**row, "validation_final_average_accuracy": float("nan")} if row["run_id"] == "id-c" else row
                   for row in selected]
    assert [t["trial"] for t in trials(one_missing)] == ["b", "a", "c"]  # not comparable: by test FA
    assert "<th>val FA</th>" not in build_report(rows, tmp_path / "plain", title="t").read_text()


def test_report_from_parquet_renders_in_chromium_without_console_errors(rows, tmp_path):
    write_table(rows, tmp_path / "study.parquet")
    assert main(["report", "--from-parquet", str(tmp_path / "study.parquet"), "--out", str(tmp_path / "r")]) == 0
    out = tmp_path / "r"
    for name in ("tradeoff.png", "forgetting.png", "task_curves.png", "accuracy_matrix.png", "expert_usage.png"):
        assert (out / name).stat().st_size > 5_000
    text = (out / "index.html").read_text()
    assert text.count("<tr>") == 1 + 3 + 1 + 1  # trial table header + 3 trials, gate table header + 1
    # training FLOPs per run: a column, "–" for the trial without the figure
    assert "<th>train FLOPs/run</th>" in text and ">5,000,000,000,000</td>" in text
    assert '<td data-v="-Infinity">–</td>' in text  # missing: shown as a dash, sorted below every number
    import browser

    page = browser.load((out / "index.html").as_uri(), screenshot="report_from_parquet.png", wait_for_text="Trials")
    assert page.errors == []
    assert "NoRGa gates after training" in page.text and "1.100, 0.900" in page.text


def test_report_of_a_missing_table_fails_clearly(tmp_path, capsys):
    assert main(["report", "--from-parquet", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "r")]) == 2
    assert "no report table" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no finished trials"):
        build_report([], tmp_path / "empty", title="empty")


def test_the_map_uses_the_front_the_study_tagged(rows, tmp_path):
    tagged = [{**r, "pareto": "true" if r["trial"] == "c" else "false"} for r in rows]
    page = build_report(tagged, tmp_path / "r", title="t").read_text()
    assert "Pareto front of the study&#x27;s objectives" in page
    rows_html = [r for r in page.split("<tr>") if 'data-v="yes"' in r]
    assert len(rows_html) == 1 and rows_html[0].startswith('<td data-v="c">')


def test_tradeoff_map_adds_training_flops_per_run_where_trials_have_it(rows):
    from promptcl.study.report import tradeoff_figure

    items = trials(rows)
    with_runs = tradeoff_figure(items, [True, False, False], "front")
    assert [ax.get_xlabel() for ax in with_runs.axes] == ["trainable parameters", "test FLOPs per image",
                                                          "training FLOPs per run"]
    per_method = with_runs.axes[2].collections[:-1]  # one scatter per method, then the front's stars
    assert sum(len(c.get_offsets()) for c in per_method) == 2  # l2p's trial has no figure: not drawn
    old = [{k: v for k, v in t.items() if k != "train_flops_per_run"} for t in items]
    assert len(tradeoff_figure(old, [True, False, False], "front").axes) == 2


def _study_run(uri, experiment_id, name, trials):
    """A study (parent) run with finished trials, as the tuner and trainer log them (real MLflow):
    ``trials`` = [(method, dataset, fa, trainable params, pareto tag)]."""
    from promptcl.study import tracking

    parent = tracking.start_run(uri, experiment_id, f"{name}-study", tags={"study": name})
    for i, (method, dataset, fa, params, pareto) in enumerate(trials):
        run = tracking.start_run(uri, experiment_id, f"{name}-{i}", parent_run_id=parent, tags={"method": method})
        tracking.log_params(uri, run, {"run/dataset": dataset, "run/backbone": "vit_digits", "run/seed": i,
                                       "run/protocol": "native", "method_config/top_k": 2})
        summary = {"final_average_accuracy": fa, "cumulative_average_accuracy": fa, "forgetting": 1.0,
                   "backward_transfer": -1.0, "trainable_params": params, "train_flops_per_image": 2.0,
                   "test_flops_per_image": 1.0, "backbone_flops_per_image": 1.0,
                   "accuracy_matrix": [[fa, 0.0], [fa, fa]], "config": {}}
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "summary.json").write_text(json.dumps(summary))
            tracking.log_run_outputs(uri, run, summary, Path(tmp))
        tracking.finish(uri, run, tags={"pareto": pareto})
    tracking.finish(uri, parent)
    return parent


def test_a_report_is_of_one_study_run_not_every_run_of_the_experiment(tmp_path, capsys):
    """A fresh run of a study name starts a new study run in the same experiment: the report, the
    dashboard's loader and the table take the latest one (or the one asked for), never the union,
    whose old Pareto tags would make a mixed 'front'."""
    from promptcl.study import tracking
    from promptcl.study.report import export_study
    from promptcl.study.tradeoff import load_trials

    uri = tracking.default_tracking_uri(tmp_path)
    experiment_id = tracking.ensure_experiment(uri, "study", tmp_path / "artifacts")
    old = _study_run(uri, experiment_id, "study", [("smope", "digits", 95.0, 1000, "true")])
    new = _study_run(uri, experiment_id, "study", [("smope", "mnist5k", 60.0, 2000, "true"),
                                                   ("l2p", "mnist5k", 50.0, 906, "true")])
    latest = trials(export_study(uri, "study"))
    assert [(t["method"], t["dataset"], t["seed"], t["study_run_id"]) for t in latest] == [
        ("smope", "mnist5k", "0", new), ("l2p", "mnist5k", "1", new)]
    assert [t["trial"] for t in trials(export_study(uri, "study", parent_run_id=old))] == ["study-0"]
    assert {r["run_id"] for r in load_trials(uri, "study")} == {t["run_id"] for t in latest}
    assert len(load_trials(uri, "study", old)) == 1
    assert tracking.study_run(f"{uri}?timeout=20", "study") == (experiment_id, new)  # a URI with a query
    # every trial of a study run, page by page
    assert len(tracking.children(uri, experiment_id, new)) == 2
    assert len(tracking.search_all_runs(uri, experiment_id, page_size=2)) == 5

    out = tmp_path / "report"
    assert main(["report", "--experiment", "study", "--mlflow-uri", uri, "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "2 finished trials (dataset: mnist5k; backbone: vit_digits; protocol: native)" in page
    assert ">906</td>" in page and ">2,000</td>" in page  # parameter counts as whole numbers
    assert "report/index.html" in {a.path for a in tracking.client(uri).list_artifacts(new, "report")}
    assert not tracking.client(uri).list_artifacts(old, "report")
    assert main(["report", "--experiment", "study", "--study-run", old, "--mlflow-uri", uri, "--out",
                 str(tmp_path / "old"), "--no-log"]) == 0
    assert "1 finished trial (dataset: digits;" in (tmp_path / "old" / "index.html").read_text()

    capsys.readouterr()
    child = tracking.children(uri, experiment_id, old)[0].info.run_id
    for bad, message in ((child, "is not a study run of MLflow experiment 'study'"),
                         ("0" * 32, "is not a study run")):
        assert main(["report", "--experiment", "study", "--study-run", bad, "--mlflow-uri", uri, "--out",
                     str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    tracking.ensure_experiment(uri, "empty")
    assert main(["report", "--experiment", "empty", "--mlflow-uri", uri, "--out", str(tmp_path / "bad")]) == 2
    assert "has no study run" in capsys.readouterr().err
    assert main(["report", "--from-parquet", str(out / "study.parquet"), "--study-run", new, "--out",
                 str(tmp_path / "bad")]) == 2
    assert "--study-run selects a study run of --experiment" in capsys.readouterr().err


def test_a_trial_without_trainable_parameters_stays_on_a_wide_log_axis():
    """SimpleCIL trains nothing: beside a 4M-parameter method the axis is symmetric-log (linear near
    0), so its point is drawn, not lost below a log axis's range."""
    from promptcl.study.report import tradeoff_figure

    items = [{"trial": m, "method": m, "config": {}, "final_average_accuracy": fa, "trainable_params": params,
              "test_flops_per_image": 1.0, "backbone_flops_per_image": 1.0}
             for m, fa, params in (("simplecil", 60.0, 0.0), ("finetune", 70.0, 76_900.0),
                                     ("coda", 85.0, 3_916_900.0))]
    fig = tradeoff_figure(items, [True, True, True], "front")
    params_axis = fig.axes[0]
    assert params_axis.get_xscale() == "symlog"
    left, right = params_axis.get_xlim()
    assert left <= 0 < 3_916_900 <= right
    drawn = [tuple(xy) for c in params_axis.collections[:-1] for xy in c.get_offsets()]
    assert (0.0, 60.0) in drawn
    wide = [{**t, "trainable_params": t["trainable_params"] + 1000} for t in items]
    assert tradeoff_figure(wide, [True] * 3, "front").axes[0].get_xscale() == "log"


def test_every_table_of_the_report_sorts_by_its_own_columns_in_chromium(rows, tmp_path):
    """The sort script takes a header's column within its own table (the gate table's headers are
    not the trial table's columns) and sorts cells without a data-v by their text."""
    import browser

    page = build_report(rows, tmp_path / "r", title="t")
    clicks = """(() => {
      const header = (table, name) => [...document.querySelectorAll(table + ' th')].find(th => th.textContent === name);
      const column = (table, i) => [...document.querySelector(table).tBodies[0].rows].map(r => r.cells[i].textContent);
      header('#trials', 'FA').click();
      const fa = column('#trials', 4);
      header('#gates', 'activation').click();
      header('#trials', 'trainable params').click(); header('#trials', 'trainable params').click();
      return JSON.stringify({fa, params: column('#trials', 7), gates: column('#gates', 0)});
    })()"""
    loaded = browser.load(page.as_uri(), screenshot="report_sorted.png", wait_for_text="Trials", script=clicks)
    assert loaded.errors == []
    assert json.loads(loaded.result) == {"fa": ["70.00", "80.00", "90.00"], "params": ["1,000", "500", "100"],
                                         "gates": ["b"]}


def test_bad_report_input_is_one_line_and_writes_nothing(rows, tmp_path, capsys, monkeypatch):
    from promptcl.study import tracking

    monkeypatch.chdir(tmp_path)  # a URI --out taken for a path would make s3:/... here
    write_table(rows, tmp_path / "study.parquet")
    (tmp_path / "taken" / "index.html").mkdir(parents=True)
    (tmp_path / "file").write_text("a file")
    pq.write_table(pq.read_table(tmp_path / "study.parquet").drop(["run_id"]), tmp_path / "other.parquet")
    store = tracking.default_tracking_uri(tmp_path / "mlruns")
    (tmp_path / "mlruns").mkdir()
    empty_uri = tracking.default_tracking_uri(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    experiment_id = tracking.ensure_experiment(empty_uri, "study")
    tracking.finish(empty_uri, tracking.start_run(empty_uri, experiment_id, "study-study"))  # no trial finished
    cases = [
        (["--from-parquet", str(tmp_path / "study.parquet"), "--out", str(tmp_path / "file")],
         "--out '%s' exists and is not a directory" % (tmp_path / "file")),
        (["--from-parquet", str(tmp_path / "file"), "--out", str(tmp_path / "out")], "is not a Parquet file"),
        (["--from-parquet", str(tmp_path / "other.parquet"), "--out", str(tmp_path / "out")],
         "is not a study table written by a report (no column 'run_id')"),
        (["--experiment", "study", "--mlflow-uri", "bogus://x", "--out", str(tmp_path / "out")],
         "MLflow tracking URI 'bogus://x' names no tracking store"),
        (["--experiment", "study", "--mlflow-uri", store, "--out", str(tmp_path / "out")],
         f"no MLflow store at {store}"),
        (["--experiment", "study", "--mlflow-uri", f"sqlite:///{tmp_path / 'file'}", "--out", str(tmp_path / "out")],
         f"'{tmp_path / 'file'}' is not an SQLite database"),
        (["--experiment", "study", "--mlflow-uri", str(tmp_path / "mlruns"), "--out", str(tmp_path / "out")],
         "is a file store, which MLflow refuses unless MLFLOW_ALLOW_FILE_STORE=true"),
        (["--experiment", "study", "--mlflow-uri", empty_uri, "--out", str(tmp_path / "out")],
         "has no finished trials to report"),
        (["--experiment", "", "--mlflow-uri", empty_uri, "--out", str(tmp_path / "out")],
         "--experiment names no MLflow experiment"),
        (["--from-parquet", str(tmp_path / "study.parquet"), "--out", "s3://bucket/report"],
         "the report is written to a local directory, not a URI"),
        (["--from-parquet", str(tmp_path / "study.parquet"), "--out", str(tmp_path / "taken")],
         "its index.html exists and is not a file"),
    ]
    capsys.readouterr()  # MLflow's set-up lines
    for argv, message in cases:
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        assert main(["report", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no store, table or page made


def test_a_report_replaces_its_own_files_only_and_logs_only_them(tmp_path, capsys):
    """``--out`` may hold other files, even the MLflow store itself: they stay and are not uploaded
    (the whole folder once was, recursing into the store's artifacts). A figure of an earlier report
    this study has no data for is removed; a failed upload leaves ``--out`` as it was."""
    from promptcl.study import tracking

    uri = tracking.default_tracking_uri(tmp_path)
    experiment_id = tracking.ensure_experiment(uri, "study", tmp_path / "mlartifacts")
    parent = _study_run(uri, experiment_id, "study", [("l2p", "digits", 90.0, 906, "true")])
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "expert_usage.png").write_bytes(b"an earlier SMoPE study's figure")
    assert main(["report", "--experiment", "study", "--mlflow-uri", uri, "--out", str(tmp_path)]) == 0
    report_files = {"index.html", "study.parquet", "tradeoff.png", "forgetting.png", "task_curves.png",
                    "accuracy_matrix.png"}
    assert {a.path for a in tracking.client(uri).list_artifacts(parent, "report")} == {
        f"report/{name}" for name in report_files}
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "expert_usage.png").exists()
    assert report_files <= {p.name for p in tmp_path.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{tmp_path.name}.")]  # no stage left

    # an upload that fails (a file where the run's report/ artifacts go): one line, --out untouched
    artifacts = Path(tracking.client(uri).get_run(parent).info.artifact_uri.removeprefix("file://"))
    shutil.rmtree(artifacts / "report")
    (artifacts / "report").write_text("in the way")
    (tmp_path / "index.html").write_text("the page before")
    capsys.readouterr()
    assert main(["report", "--experiment", "study", "--mlflow-uri", uri, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and (tmp_path / "index.html").read_text() == "the page before"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{tmp_path.name}.")]


def test_finished_trials_are_the_finished_children_with_a_final_accuracy(tmp_path):
    """A study run's report rows come from its trials that FINISHED and logged a final accuracy: a
    failed trial (even one that got to log FA) and a finished one without FA (stopped early by a
    scheduler) are left out, and so is the parent run itself."""
    from promptcl.study import tracking

    uri = tracking.default_tracking_uri(tmp_path)
    experiment_id = tracking.ensure_experiment(uri, "study", tmp_path / "artifacts")
    parent = tracking.start_run(uri, experiment_id, "study-study")
    tracking.log_metrics(uri, parent, {"final_average_accuracy": 99.0})  # a parent, not a trial
    runs = {}
    for name, metrics, status in (("done", {"final_average_accuracy": 80.0}, "FINISHED"),
                                  ("stopped", {"average_accuracy": 70.0}, "FINISHED"),
                                  ("failed", {"final_average_accuracy": 90.0}, "FAILED"),
                                  ("running", {"final_average_accuracy": 60.0}, None)):
        runs[name] = tracking.start_run(uri, experiment_id, name, parent_run_id=parent)
        tracking.log_metrics(uri, runs[name], metrics)
        if status:
            tracking.finish(uri, runs[name], status=status)
    tracking.finish(uri, parent)
    found_parent, found = tracking.finished_trials(uri, "study")
    assert found_parent == parent
    assert [r.info.run_id for r in found] == [runs["done"]]


def test_log_task_logs_the_row_of_the_task_just_trained_once(tmp_path):
    """Step t carries accuracy after training task t on each seen task (row t of the matrix, not
    column t) and their mean; logging step t again (a restarted worker) adds nothing."""
    from promptcl.study import tracking

    uri = tracking.default_tracking_uri(tmp_path)
    run = tracking.start_run(uri, tracking.ensure_experiment(uri, "study"), "trial")
    acc = np.array([[90.0, 0.0, 0.0], [70.0, 80.0, 0.0], [50.0, 60.0, 40.0]])
    tracking.log_task(uri, run, 1, acc)
    tracking.log_task(uri, run, 1, acc)
    c = tracking.client(uri)
    history = {name: [(m.step, m.value) for m in c.get_metric_history(run, name)]
               for name in ("acc/task_0", "acc/task_1", "average_accuracy")}
    assert history == {"acc/task_0": [(1, 70.0)], "acc/task_1": [(1, 80.0)], "average_accuracy": [(1, 75.0)]}
    assert "acc/task_2" not in c.get_run(run).data.metrics


def test_final_metrics_are_logged_once_at_the_last_tasks_step(tmp_path):
    """A trial's final metrics sit at the step of its last task (beside the per-task curves) and a
    restarted worker logging them again adds no second point; the matrix and config go as artifacts."""
    from promptcl.study import tracking

    uri = tracking.default_tracking_uri(tmp_path)
    run = tracking.start_run(uri, tracking.ensure_experiment(uri, "study", tmp_path / "artifacts"), "trial")
    summary = {"final_average_accuracy": 75.0, "forgetting": 5.0, "task_identity_accuracy": 90.0,
               "accuracy_matrix": [[80.0, 0.0, 0.0], [70.0, 80.0, 0.0], [60.0, 70.0, 95.0]], "config": {"a": 1}}
    for _ in range(2):
        tracking.log_run_outputs(uri, run, summary, tmp_path)
    c = tracking.client(uri)
    for name, value in (("final_average_accuracy", 75.0), ("forgetting", 5.0), ("task_identity_accuracy", 90.0)):
        assert [(m.step, m.value) for m in c.get_metric_history(run, name)] == [(2, value)]
    assert {a.path for a in c.list_artifacts(run)} >= {"accuracy_matrix.json", "config.json"}


def test_every_command_finds_the_store_the_same_way(tmp_path, monkeypatch, capsys):
    """The MLflow store of a study, `report` and the trade-off dashboard: the one given, else
    $MLFLOW_TRACKING_URI, else sqlite under the runs directory, $PROMPTCL_RUNS_DIR's by default."""
    from promptcl.study import tracking

    store = tracking.default_tracking_uri(tmp_path / "store")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(None, tmp_path / "r") == f"sqlite:///{(tmp_path / 'r').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert tracking.tracking_uri(None, tmp_path / "r") == store
    assert tracking.tracking_uri("http://127.0.0.1:5000", tmp_path / "r") == "http://127.0.0.1:5000"
    # a relative sqlite store is the one in this directory, also for trials and workers that run elsewhere
    monkeypatch.chdir(tmp_path)
    absolute = f"sqlite:///{tmp_path.resolve()}/rel.db"
    assert tracking.tracking_uri("sqlite:///rel.db") == absolute
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    assert tracking.tracking_uri(None) == absolute
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)

    experiment_id = tracking.ensure_experiment(store, "study", tmp_path / "artifacts")
    parent = tracking.start_run(store, experiment_id, "study-study")
    trial = tracking.start_run(store, experiment_id, "trial", parent_run_id=parent)
    tracking.log_metrics(store, trial, {"final_average_accuracy": 80.0, "trainable_params": 10.0,
                                        "test_flops_per_image": 1e6, "backbone_flops_per_image": 1e6})
    tracking.finish(store, trial)
    tracking.finish(store, parent)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "dashboards"))
    import tradeoff
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no runs/ store here: only the variable names one
    assert tradeoff.main(["--experiment", "study", "--out", str(tmp_path / "map.png")]) == 0
    assert (tmp_path / "map.png").stat().st_size > 0
    # the study's runs directory named by $PROMPTCL_RUNS_DIR alone
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("PROMPTCL_RUNS_DIR", str(tmp_path / "store"))
    assert tracking.tracking_uri(None) == store
    assert tradeoff.main(["--experiment", "study", "--out", str(tmp_path / "again.png")]) == 0
    # the dashboard stars the front the study tagged (on its objectives), as the report does
    tagged = _study_run(store, experiment_id, "study", [("l2p", "digits", 85.0, 3500, "false"),
                                                       ("l2p", "digits", 83.0, 4000, "true")])
    capsys.readouterr()
    assert tradeoff.main(["--experiment", "study", "--study-run", tagged, "--out", str(tmp_path / "t.png")]) == 0
    out = capsys.readouterr().out
    assert "Pareto front of the study's objectives" in out
    assert "* | 83.00 | 4,000" in out and "  | 85.00 | 3,500" in out
    # an --out that would not be the file it names is refused before MLflow is read
    capsys.readouterr()
    for out, message in ((tmp_path / "elsewhere", "must end in the figure's format"),
                         (tmp_path / "map.png" / "x.png", "its directory"), (tmp_path / "d.png", "is a directory")):
        (tmp_path / "d.png").mkdir(exist_ok=True)
        assert tradeoff.main(["--experiment", "study", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
