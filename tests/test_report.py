"""The study report from a tidy table: export rows, trials rebuilt, figures, HTML in Chromium."""

import json

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
