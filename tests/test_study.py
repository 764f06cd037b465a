"""The Ray Tune + Optuna study on a real local Ray cluster, logged to a real MLflow store."""

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))
sys.path.insert(0, str(ROOT / "dashboards"))


def test_smoke_study_logs_parent_and_child_runs(local_ray, tmp_path, capsys):
    import smope_topk
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert smope_topk.main(["--smoke", "--runs-dir", str(tmp_path), "--mlflow-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "Best trial per top_k" in out and "test MFLOPs/img" in out

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("smope_topk_smoke")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    # Optuna proposed different configurations, each logged as flattened params
    proposals = {tuple(r.data.params[f"method_config/{k}"] for k in ("top_k", "noise_scale")) for r in children}
    assert len(proposals) == 2
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
    assert parents[0].data.metrics["completed_trials"] == 2
    assert (tmp_path / "ray_results" / "smope_topk_smoke").is_dir()

    import tradeoff  # the dashboard reads the same store

    assert tradeoff.main(["--experiment", "smope_topk_smoke", "--mlflow-uri", uri,
                          "--out", str(tmp_path / "map.png")]) == 0
    assert (tmp_path / "map.png").stat().st_size > 0
    assert "pareto" in capsys.readouterr().out


def test_gate_study_compares_hide_and_norga(local_ray, tmp_path, capsys):
    import norga_gate
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert norga_gate.main(["--smoke", "--runs-dir", str(tmp_path), "--mlflow-uri", uri]) == 0
    assert "Best trial per method" in capsys.readouterr().out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("norga_gate_smoke").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["method"] for r in children) == ["hide", "norga"]
    norga = next(r for r in children if r.data.tags["method"] == "norga")
    assert norga.data.params["method_config/gate_activation"] == "sigmoid"
    assert all("task_identity_accuracy" in r.data.metrics for r in children)
    assert all("unfair_protocol" not in r.data.tags for r in children)


def test_bad_study_input_fails_before_ray_starts(tmp_path, capsys, monkeypatch):
    import smope_topk

    assert smope_topk.main(["--smoke", "--dataset", "imagenet-x", "--runs-dir", str(tmp_path / "r")]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
