"""Whole CL sequences through the CLI: outputs, determinism, batch invariance, bad input."""

import json
import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from promptcl import metrics
from promptcl.cli import main
from promptcl.cost import measure_cost
from promptcl.data.benchmarks import load_digits
from promptcl.engine import RunSpec, resolve_run, run_sequence
from promptcl.methods import get_method

FAST = ["--set", "epochs=2", "--set", "ca_epochs=3"]


def run_cli(out, *extra):
    return main(["run", "--method", "smope", "--dataset", "digits", "--seed", "0", "--out", str(out),
                 "--no-progress", *FAST, *extra])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    assert run_cli(out) == 0
    return out


def test_run_writes_results_summary_and_checkpoints(reference_run):
    table = pq.read_table(reference_run / "results.parquet")
    assert table.column_names == ["train_task", "eval_task", "accuracy", "n_samples"]
    umask = os.umask(0)
    os.umask(umask)
    assert reference_run.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it, not private
    assert table.num_rows == 15  # 5 tasks, lower triangle
    rows = table.to_pylist()
    assert all(r["eval_task"] <= r["train_task"] for r in rows)
    assert sum(r["n_samples"] for r in rows if r["train_task"] == 4) == len(load_digits().test)
    summary = json.loads((reference_run / "summary.json").read_text())
    acc = np.asarray(summary["accuracy_matrix"])
    # the matrix is the evaluated rows, every metric the pure function of it, the cost that of the run's config
    assert all(acc[r["train_task"], r["eval_task"]] == r["accuracy"] for r in rows)
    assert {k: summary[k] for k in metrics.summarize(acc)} == pytest.approx(metrics.summarize(acc))
    run = resolve_run(RunSpec(method="smope", dataset="digits", overrides={"epochs": 2, "ca_epochs": 3}))
    cost = measure_cost(run.method_cls, run.config, run.backbone, 10, (1, 8, 8), num_tasks=5)
    for key in ("trainable_params", "total_params", "train_flops_per_image", "test_flops_per_image"):
        assert summary[key] == cost[key], key
    assert summary["wall_seconds"] > 0
    assert summary["config"]["method_config"]["epochs"] == 2
    assert "task_identity_accuracy" not in summary and not get_method("smope").INFERS_TASK  # HiDe's: test_resume
    final = [r["accuracy"] for r in rows if r["train_task"] == 4]
    assert summary["final_average_accuracy"] == pytest.approx(np.mean(final))
    assert acc[0, 0] > 90  # two digit classes from a pretrained backbone
    checkpoints = sorted((reference_run / "checkpoints").glob("task_*.pt"))
    assert [c.name for c in checkpoints] == [f"task_{t:02d}.pt" for t in range(5)]
    state = torch.load(checkpoints[-1], weights_only=False)
    assert "experts.usage" in state["state"] and state["state"]["experts.usage"].sum() > 0
    assert not any(k.startswith("backbone.") for k in state["state"])


def test_a_validation_split_is_held_out_of_training_and_evaluated_like_the_test_sets(tmp_path):
    """SimpleCIL's class means come from the training images only: with 20 % held out they change,
    the held-out images give the validation matrix, and the test figures stay the test sets'."""
    from promptcl.data.benchmarks import held_out

    plain = run_sequence(resolve_run(RunSpec(method="simplecil", dataset="digits")), tmp_path / "plain")
    held = run_sequence(resolve_run(RunSpec(method="simplecil", dataset="digits", validation_fraction=0.2)),
                        tmp_path / "held")
    labels = load_digits().train_labels
    n_held = len(held_out(labels, 0.2, 0))
    assert n_held == sum(round(0.2 * (labels == c).sum()) for c in range(10))
    assert held["training_work"]["frozen_pass_images"] == plain["training_work"]["frozen_pass_images"] - n_held
    validation = np.asarray(held["validation_matrix"])
    assert validation.shape == (5, 5) and not np.array_equal(validation, held["accuracy_matrix"])
    assert held["validation_final_average_accuracy"] == pytest.approx(metrics.final_average_accuracy(validation))
    assert held["final_average_accuracy"] == pytest.approx(metrics.final_average_accuracy(held["accuracy_matrix"]))
    assert "validation_matrix" not in plain and "validation_final_average_accuracy" not in plain
    with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 0.5\]"):
        resolve_run(RunSpec(method="simplecil", dataset="digits", validation_fraction=0.7))


def test_an_empty_test_set_is_an_error_not_zero_accuracy():
    from promptcl.engine import build_method, evaluate

    method = build_method(resolve_run(RunSpec(method="simplecil", dataset="digits")), 10, 5, torch.device("cpu"))
    with pytest.raises(ValueError, match="task 3 has no test images"):
        evaluate(method, [], torch.device("cpu"), 3)


def test_a_runs_cost_is_that_of_its_own_config_not_its_presets(tmp_path):
    """A setting that changes the cost (SMoPE's expert count) shows in the summary's cost."""
    overrides = {"epochs": 1, "ca_epochs": 1, "num_experts": 4, "top_k": 1}
    run = resolve_run(RunSpec(method="smope", dataset="digits", overrides=overrides))
    summary = run_sequence(run, tmp_path / "run")
    own = measure_cost(run.method_cls, run.config, run.backbone, 10, (1, 8, 8), num_tasks=5)
    preset = measure_cost(run.method_cls, run.method_cls.PRESETS["small"], run.backbone, 10, (1, 8, 8), num_tasks=5)
    for key in ("trainable_params", "test_flops_per_image", "train_flops_per_image"):
        assert summary[key] == own[key] != preset[key], key


def test_same_seed_gives_identical_results(reference_run, tmp_path):
    assert run_cli(tmp_path / "b") == 0
    assert pq.read_table(tmp_path / "b" / "results.parquet").equals(pq.read_table(reference_run / "results.parquet"))


def test_eval_batch_size_does_not_change_any_accuracy(reference_run, tmp_path, monkeypatch):
    import promptcl.engine as engine

    evaluate, batch_sizes = engine.evaluate, set()

    def recording(method, loader, *args, **kwargs):  # the flag must reach every evaluation
        batch_sizes.update(len(labels) for _, labels in loader)
        return evaluate(method, loader, *args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", recording)
    assert run_cli(tmp_path / "c", "--eval-batch-size", "1") == 0
    assert batch_sizes == {1}
    a = pq.read_table(tmp_path / "c" / "results.parquet").to_pylist()
    b = pq.read_table(reference_run / "results.parquet").to_pylist()
    assert a == b


@pytest.mark.parametrize("args,message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--dataset", "cifar1000"], "unknown dataset 'cifar1000'"),
    (["--backbone", "resnet50"], "not a timm VisionTransformer"),
    (["--set", "top_k=9"], "top_k=9 must be between 1 and num_experts=8"),
    (["--set", "noise_scale=-0.1"], "noise_scale must be in [0, 1]"),
    (["--set", "warp=9"], "unknown setting(s) warp"),
    (["--set", "top_k=two"], "invalid value 'two' for top_k"),
    (["--set", "prompt_layers=0,9"], "exceed the backbone's 4 blocks"),
    (["--dataset", "cifar100"], "needs --data-dir"),
    (["--checkpoint-file", "/nonexistent/w.pt"], "does not exist"),
    (["--checkpoint-file", "/"], "checkpoint file '/' is not a file"),
    (["--seed", "-1"], "seed must be in [0, 2**32 - 1], got -1"),
    (["--seed", "4294967296"], "seed must be in [0, 2**32 - 1]"),
    (["--set", "lr=inf"], "lr must be finite, got 'inf'"),
    (["--set", "noise_scale=nan"], "noise_scale must be finite"),
    (["--set", "ca_weight_decay=-5"], "ca_weight_decay must be >= 0"),
    (["--increment", "0"], "increment must be >= 1, got 0"),
    (["--backbone", "vit_glyphs28"], "backbone 'vit_glyphs28' takes 1 x 28 x 28 inputs; digits images are 1 x 8 x 8"),
    (["--device", "cudaXYZ"], "device must be auto, cpu or cuda[:N]"),
    (["--feature-cache", "bogus://x"], "feature cache 'bogus://x' is not a location pyarrow can open"),
    (["--data-dir", "/nonexistent"], "dataset 'digits' is built in (no files to read): it takes no --data-dir"),
    (["--num-workers", "1", "--cpus-per-worker", "nan"], "cpus_per_worker must be a finite number > 0, got nan"),
    (["--num-workers", "1", "--gpus-per-worker", "2"], "gpus_per_worker needs use_gpu"),
    (["--gpus-per-worker", "2"], "--gpus-per-worker and --max-failures need --num-workers"),
    (["--num-workers", "1", "--device", "cuda"], "device 'cuda' on Ray Train workers needs use_gpu"),
])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    base = {"--method": "smope", "--dataset": "digits"}
    flags = dict(zip(args[::2], args[1::2]))
    argv = ["run", "--out", str(out)]
    for key in ("--method", "--dataset"):
        argv += [key, flags.pop(key, base[key])]
    for key, value in flags.items():
        argv += [key, value]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_feature_cache_that_is_a_file_is_refused_before_the_run(tmp_path, capsys):
    (tmp_path / "cache").write_text("not a directory")
    assert main(["run", "--method", "simplecil", "--dataset", "digits", "--out", str(tmp_path / "out"),
                 "--feature-cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert "feature cache" in err and "is not a directory" in err and len(err.splitlines()) == 1
    assert main(["run", "--method", "simplecil", "--dataset", "digits", "--out", str(tmp_path / "out"),
                 "--feature-cache", str(tmp_path / "cache" / "sub")]) == 2
    assert f"lies under {str(tmp_path / 'cache')!r}, which exists and is not a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cuda_device_without_one_is_refused_before_the_run(tmp_path, capsys):
    assert main(["run", "--method", "simplecil", "--dataset", "digits", "--device", "cuda:0",
                 "--out", str(tmp_path / "out")]) == 2
    assert "device 'cuda:0': no CUDA device is available here" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_terminated_run_removes_its_temporary_directory(tmp_path):
    """SIGTERM (a scheduler's or timeout's stop) unwinds the run like Ctrl-C: nothing half-written stays."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "promptcl.cli", "run", "--method", "smope", "--dataset", "digits",
                             "--out", str(out), "--no-progress", "--set", "epochs=200"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not list(tmp_path.glob(".out.*/checkpoints")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # the run's work directory exists (first task checkpoint not needed)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_existing_output_directory_is_refused(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert run_cli(tmp_path / "taken") == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("parent,state", [("missing", "does not exist"), ("file", "is not a directory")])
def test_an_output_directory_without_a_directory_above_it_is_refused(tmp_path, capsys, parent, state):
    (tmp_path / "file").write_text("a file")
    assert run_cli(tmp_path / parent / "out") == 2
    out = str(tmp_path / parent / "out")
    assert capsys.readouterr().err.strip().endswith(f"parent of output directory {out!r} {state}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    import promptcl.engine as engine

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine, "write_results", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_cli(tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


def test_resolve_run_applies_dataset_preset_and_overrides(cifar100_files):
    run = resolve_run(RunSpec(method="smope", dataset="digits", overrides={"top_k": "3", "noise_scale": 0.2}))
    assert run.config.top_k == 3 and run.config.noise_scale == 0.2
    assert run.config.num_experts == 8  # the digits preset
    assert run.backbone == "vit_digits"
    paper = resolve_run(RunSpec(method="smope", dataset="cifar100", data_dir=cifar100_files[0]))
    assert (paper.config.num_experts, paper.config.top_k, paper.config.prompt_layers) == (25, 5, (0, 1, 2, 3, 4, 5))


@pytest.mark.parametrize("method,backbone", [("l2p", "sup21k"), ("dualprompt", "sup21k"), ("sprompt++", "sup21k"),
                                            ("hide", "sup21k"), ("sprompt", "sup1k_augreg"),
                                            ("coda", "sup1k_augreg"), ("smope", "sup1k")])
def test_a_method_defaults_to_its_reference_codes_backbone(cifar100_files, method, backbone):
    """The l2p-/dualprompt-pytorch lineage loads the original in21k ViT-B_16.npz, S-Prompts' and
    CODA's code AugReg in21k -> in1k, SMoPE's AugReg2 in21k -> in1k (the dataset's default)."""
    run = resolve_run(RunSpec(method=method, dataset="cifar100", data_dir=cifar100_files[0]))
    assert run.backbone == backbone
    assert resolve_run(RunSpec(method=method, dataset="cifar100", data_dir=cifar100_files[0],
                               backbone="sup1k")).backbone == "sup1k"


@pytest.mark.parametrize("method", ["hide", "norga"])
def test_cli_runs_the_two_stage_methods(tmp_path, method):
    out = tmp_path / method
    assert main(["run", "--method", method, "--dataset", "digits", "--out", str(out), "--no-progress",
                 "--set", "epochs=1", "--set", "tii_epochs=2", "--set", "tap_epochs=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_passes"] == 2 and 0 < summary["task_identity_accuracy"] <= 100
    assert summary["config"]["run"]["method"] == method
    before_tap = np.asarray(summary["before_tap_matrix"])
    # filled in before each replay alignment (from task 1: task 0 has no older classes to align), for
    # every task seen so far
    assert before_tap.shape == (5, 5) and not np.triu(before_tap, 1).any() and not before_tap[0].any()
    assert all(before_tap[t, : t + 1].all() for t in range(1, 5))


def test_compiled_frozen_pass_gives_the_same_run(tmp_path):
    """--compile-backbone runs the un-prompted pass through torch.compile (a graph is really made)
    and changes no accuracy."""
    import torch._dynamo

    plain = run_sequence(resolve_run(RunSpec(method="simplecil", dataset="digits")), tmp_path / "plain")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run_sequence(resolve_run(RunSpec(method="simplecil", dataset="digits", compile_backbone=True)),
                            tmp_path / "compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert compiled["accuracy_matrix"] == plain["accuracy_matrix"]
    assert compiled["config"]["run"]["compile_backbone"] is True


def test_run_paths_are_made_absolute_for_workers_that_run_elsewhere(tmp_path, monkeypatch):
    """Ray Train workers run in directories of their own: the checkpoint, data and split paths of
    ``promptcl run`` reach them absolute."""
    from promptcl.cli import _parser, run_spec

    monkeypatch.chdir(tmp_path)
    spec = run_spec(_parser().parse_args(["run", "--method", "smope", "--dataset", "digits", "--out", "o",
                                          "--checkpoint-file", "w.safetensors", "--data-dir", "data",
                                          "--split-file", "../split.json"]))
    assert (spec.checkpoint_file, spec.data_dir, spec.split_file) == (
        str(tmp_path / "w.safetensors"), str(tmp_path / "data"), str(tmp_path.parent / "split.json"))

    class Handed(Exception):
        pass

    def on_ray(spec, scaling, out, *, progress, feature_cache):  # what the Ray Train run is handed
        raise Handed(feature_cache)

    import promptcl.cli as cli

    monkeypatch.setattr(cli, "_run_on_ray", on_ray)
    with pytest.raises(Handed, match=f"^{re.escape(str(tmp_path / 'cache'))}$"):
        cli.main(["run", "--method", "smope", "--dataset", "digits", "--out", "o", "--num-workers", "1",
                  "--feature-cache", "cache"])
    assert not any(tmp_path.iterdir())  # (and the run's temporary directory is gone)
