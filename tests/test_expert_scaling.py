"""The expert/prompt scaling study: its search space and grid only ever propose valid, differently
costed runs (cheap, no Ray), and a two-trial smoke study runs end to end on the shared local Ray
and logs each trial's accuracy and cost to MLflow."""

import pickle
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))

import expert_scaling  # noqa: E402

from promptcl.cost import measure_cost  # noqa: E402
from promptcl.engine import RunSpec, resolve_run  # noqa: E402

DATASET = "digits"


def _config(trial, space) -> dict:
    """A trial's config as Ray's OptunaSearch builds it: suggested values, then the constants."""
    constants = space(trial)
    return {**trial.params, **(constants or {})}


def _resolve(config: dict):
    overrides = dict(config)
    method = overrides.pop("method")
    return resolve_run(RunSpec(method=method, dataset=DATASET, overrides=overrides))


def _check_valid(config: dict, depths: dict[str, int]):
    """The config resolves to a run (a bad key or value raises) whose settings are in range."""
    run = _resolve(config)
    layers = run.config.prompt_layers
    assert layers == tuple(range(len(layers))) and 1 <= len(layers) <= depths[config["method"]]
    if config["method"] == "smope":
        assert 1 <= run.config.top_k <= run.config.num_experts
        assert (run.config.num_experts, run.config.top_k) == (config["num_experts"], config["top_k"])
    else:
        assert "num_experts" not in config and "top_k" not in config
        assert run.config.prompt_length == config["prompt_length"]
    return run


def test_depth_comes_from_the_datasets_backbone():
    from promptcl.core.backbone import LOCAL_BACKBONES

    assert expert_scaling.method_depths(DATASET) == {m: LOCAL_BACKBONES["vit_digits"]["depth"]
                                                     for m in expert_scaling.METHODS}
    assert expert_scaling.layer_counts(4) == (1, 2, 4) and expert_scaling.layer_counts(12) == (1, 6, 12)


@pytest.mark.parametrize("smoke", [False, True])
def test_every_grid_point_resolves_to_a_valid_run(smoke):
    import optuna

    space = expert_scaling.make_search_space(DATASET, smoke=smoke)
    pickle.loads(pickle.dumps(space))  # Tune pickles the searcher, and this space with it
    grid = expert_scaling.grid_points(DATASET)
    assert len(grid) == 24 and len({tuple(sorted(p.items())) for p in grid}) == len(grid)
    assert [p["method"] for p in grid[:3]] == ["smope", "hide", "norga"]  # a short run sees every method

    # Enqueued as Ray's OptunaSearch does with points_to_evaluate: the space proposes exactly them.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    for point in grid:
        study.enqueue_trial(point)
    for point in grid:
        trial = study.ask()
        config = _config(trial, space)
        assert trial.params == point
        _check_valid(config, space.depths)
        if smoke:
            assert config.items() >= expert_scaling.SMOKE_PER_METHOD[config["method"]].items()
            # the fixed smoke overrides reach every method's config too
            _resolve({**config, **expert_scaling.SMOKE_FIXED})
        else:
            assert not {"ca_epochs", "tap_epochs", "tii_epochs"} & config.keys()
        study.tell(trial, 0.0)


def test_tpe_proposals_are_valid_runs():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = expert_scaling.make_search_space(DATASET)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(50):
        trial = study.ask()
        config = _config(trial, space)
        run = _check_valid(config, space.depths)
        seen.add((config["method"], len(run.config.prompt_layers)))
        # A made-up score, so TPE's model (not only its random start-up) proposes the later trials.
        study.tell(trial, len(run.config.prompt_layers) + (config.get("top_k", 0) % 3))
    assert {m for m, _ in seen} == set(expert_scaling.METHODS)
    assert len({n for _, n in seen}) > 1


def test_grid_varies_the_cost():
    from promptcl.core.backbone import input_shape
    from promptcl.data.benchmarks import dataset_spec

    space = expert_scaling.make_search_space(DATASET)
    costs = {}
    for point in expert_scaling.grid_points(DATASET):
        run = _resolve({**point, "prompt_layers": expert_scaling.first_blocks(point["prompt_layers"])})
        costs[tuple(sorted(point.items()))] = measure_cost(
            run.method_cls, run.config, run.backbone, dataset_spec(DATASET).num_classes,
            input_shape(run.backbone), num_tasks=run.num_tasks)

    def cost(**point):
        return costs[tuple(sorted(point.items()))]

    for n in expert_scaling.layer_counts(space.depths["smope"]):
        for k in (1, 4):  # more experts per head: more trainable parameters
            assert (cost(method="smope", prompt_layers=n, num_experts=16, top_k=k)["trainable_params"]
                    > cost(method="smope", prompt_layers=n, num_experts=4, top_k=k)["trainable_params"])
        for e in (4, 16):  # more experts routed per token: a longer prefix, more FLOPs
            assert (cost(method="smope", prompt_layers=n, num_experts=e, top_k=4)["test_flops_per_image"]
                    > cost(method="smope", prompt_layers=n, num_experts=e, top_k=1)["test_flops_per_image"])
    for method in ("hide", "norga"):
        for n in expert_scaling.layer_counts(space.depths[method]):  # longer prompts: more of both
            long, short = (cost(method=method, prompt_layers=n, prompt_length=length) for length in (8, 2))
            assert long["trainable_params"] > short["trainable_params"]
            assert long["test_flops_per_image"] > short["test_flops_per_image"]
        one, all_ = (cost(method=method, prompt_layers=n, prompt_length=2) for n in (1, space.depths[method]))
        assert all_["trainable_params"] > one["trainable_params"]  # more prompted layers: more parameters
    one, all_ = (cost(method="smope", prompt_layers=n, num_experts=4, top_k=1) for n in (1, space.depths["smope"]))
    assert all_["trainable_params"] > one["trainable_params"]


def test_bad_dataset_fails_before_ray_starts(tmp_path, capsys):
    assert expert_scaling.main(["--smoke", "--grid", "--dataset", "imagenet-x",
                                "--runs-dir", str(tmp_path / "r")]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.ray
def test_smoke_grid_study_logs_accuracy_and_cost(local_ray, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert expert_scaling.main(["--smoke", "--grid", "--num-samples", "2", "--no-report", "--runs-dir", str(tmp_path),
                                "--mlflow-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "Best trial per method" in out and "test MFLOPs/img" in out and "num_experts" in out

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("expert_scaling_smoke").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    # The grid's first two points: the smallest SMoPE and the smallest HiDe, one prompted block each.
    by_method = {r.data.tags["method"]: r.data.params for r in children}
    assert sorted(by_method) == ["hide", "smope"]
    smope, hide = by_method["smope"], by_method["hide"]
    assert (smope["method_config/num_experts"], smope["method_config/top_k"]) == ("4", "1")
    assert hide["method_config/prompt_length"] == "2"
    for params in (smope, hide):
        assert params["method_config/prompt_layers"] == "[0]"
        assert params["method_config/epochs"] == "2"  # fixed smoke override
    assert smope["method_config/ca_epochs"] == "5" and hide["method_config/tap_epochs"] == "3"  # per method
    # each child's cost is its configuration's, counted afresh
    architecture = {"smope": dict(num_experts=4, top_k=1, prompt_layers=(0,)), "hide": dict(prompt_length=2,
                                                                                            prompt_layers=(0,))}
    for child in children:
        method = child.data.tags["method"]
        run = resolve_run(RunSpec(method=method, dataset="digits", overrides=architecture[method]))
        cost = measure_cost(run.method_cls, run.config, run.backbone, 10, (1, 8, 8), num_tasks=5)
        for key in ("trainable_params", "test_flops_per_image"):
            assert child.data.metrics[key] == cost[key], (method, key)
        assert 0 < child.data.metrics["final_average_accuracy"] <= 100
    assert parents[0].data.metrics["completed_trials"] == 2
