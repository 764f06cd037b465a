"""Checkpoint at a task boundary and resume: the result equals an uninterrupted run."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from promptcl.data.benchmarks import load_dataset
from promptcl.engine import RunSpec, load_task_checkpoint, resolve_run, run_sequence


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("method", ["hide", "norga", "smope"])
def test_resume_after_task_2_equals_an_uninterrupted_run(tmp_path, method):
    overrides = {"epochs": "2"}
    run = resolve_run(RunSpec(method=method, dataset="digits", seed=1, overrides=overrides))
    full = run_sequence(run, tmp_path / "full")

    def stop_after_task_2(report):
        if report.task == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_sequence(run, tmp_path / "cut", on_task_end=stop_after_task_2)
    resumed = run_sequence(run, tmp_path / "resumed", resume_from=tmp_path / "cut" / "checkpoints" / "task_02.pt")
    assert pq.read_table(tmp_path / "resumed" / "results.parquet").equals(
        pq.read_table(tmp_path / "full" / "results.parquet"))
    matrices = {"hide": {"before_tap_matrix", "task_identity_matrix"},
                "norga": {"before_tap_matrix", "task_identity_matrix"},
                "smope": {"before_alignment_matrix"}}[method] | {"accuracy_matrix"}
    assert {key for key in full if key.endswith("_matrix")} == matrices and resumed.keys() == full.keys()
    for key in (*matrices, "training_work", "train_flops_per_run"):  # tasks 0-2's work comes from the checkpoint
        assert resumed[key] == full[key], key
    assert full["train_flops_per_run"] > 0


def test_hide_summary_reports_task_identity_and_before_tap_accuracy(tmp_path):
    run = resolve_run(RunSpec(method="hide", dataset="digits", overrides={"epochs": "2"}))
    summary = run_sequence(run, tmp_path)
    tii = summary["task_identity_matrix"]
    assert summary["task_identity_accuracy"] == pytest.approx(sum(tii[-1]) / 5) and run.method_cls.INFERS_TASK
    assert tii[0][0] == 100.0  # one task seen: every sample is assigned to it
    before = summary["before_tap_matrix"]
    assert before[0] == [0.0] * 5  # no TAP on the first task
    assert any(v > 0 for v in before[4])
    assert summary["test_passes"] == 2
    # training work: 2 epochs of steps over each training image, one frozen pass (task identity:
    # un-augmented images, computed once) and one prompted pass (class statistics) per image
    work = summary["training_work"]
    images = work["frozen_pass_images"]
    assert work == {"phase_images": {"wtp": 2 * images}, "frozen_pass_images": images, "prompted_pass_images": images}
    assert images == len(load_dataset("digits").train)  # the tasks partition the training set
    assert summary["train_flops_per_run"] == (2 * images * summary["train_flops_per_image"]
                                              + images * summary["backbone_flops_per_image"]
                                              + images * summary["prompted_pass_flops_per_image"])
    assert json.loads((tmp_path / "summary.json").read_text())["task_identity_accuracy"] == summary["task_identity_accuracy"]


def test_checkpoint_errors(tmp_path):
    run = resolve_run(RunSpec(method="smope", dataset="digits", overrides={"epochs": "1", "ca_epochs": "1"}))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt or not a promptcl task checkpoint"):
        run_sequence(run, tmp_path / "a", resume_from=bad)
    assert not (tmp_path / "a").exists()
    torch.save({"task": 0}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="corrupt or not a promptcl task checkpoint"):
        load_task_checkpoint(tmp_path / "partial.pt")
    run_sequence(run, tmp_path / "ok")
    other = resolve_run(RunSpec(method="smope", dataset="digits", overrides={"epochs": "1", "ca_epochs": "2"}))
    with pytest.raises(ValueError, match="different run configuration"):
        run_sequence(other, tmp_path / "b", resume_from=tmp_path / "ok" / "checkpoints" / "task_01.pt")


def test_resume_continues_the_global_random_streams_and_a_seed_fixes_them(tmp_path, monkeypatch):
    """What a method draws from torch's, numpy's and Python's global generators after a resume is
    what the uninterrupted run drew (the checkpoint's RNG state is restored), and two runs of one
    seed draw the same (every generator is seeded)."""
    import random

    import numpy as np

    from promptcl.methods.simplecil import SimpleCIL

    draws = []
    begin = SimpleCIL.begin_task

    def drawing_begin(self, task):
        draws.append((task.index, torch.rand(1).item(), float(np.random.rand()), random.random()))
        begin(self, task)

    monkeypatch.setattr(SimpleCIL, "begin_task", drawing_begin)
    run = resolve_run(RunSpec(method="simplecil", dataset="digits", seed=1))
    run_sequence(run, tmp_path / "full")
    full, draws[:] = list(draws), []
    run_sequence(run, tmp_path / "again")
    assert draws == full
    draws.clear()

    def stop_after_task_2(report):
        if report.task == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_sequence(run, tmp_path / "cut", on_task_end=stop_after_task_2)
    draws.clear()
    run_sequence(run, tmp_path / "resumed", resume_from=tmp_path / "cut" / "checkpoints" / "task_02.pt")
    # the cost measurement's copy of the method begins a task 0 of its own; its draws are undone, so
    # the run's own task 0 draws the same numpy and Python numbers (torch's moves on in between)
    assert full[0][0] == full[1][0] == 0 and full[0][2:] == full[1][2:]
    assert [d[0] for d in full[-5:]] == [0, 1, 2, 3, 4] and [d[0] for d in draws[-2:]] == [3, 4]
    assert draws[-2:] == full[-2:]
