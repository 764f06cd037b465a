"""The benchmark scripts still run against the library (tiny settings; no timing asserted)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_prompted_step_times_every_method_and_every_path_where_they_differ(tmp_path, capsys):
    import prompted_step

    out = tmp_path / "prompted_step.json"
    report = prompted_step.main(["--backbone", "vit_digits", "--batch", "4", "--repeats", "1",
                                 "--methods", "smope", "hide", "simplecil", "--json", str(out)])
    assert json.loads(out.read_text()) == report
    paths = [(r["method"], r["path"]) for r in report["rows"]]
    # SMoPE's token-shared logits differ between the paths; HiDe's linear prefix is one SDPA
    assert paths == [("smope", "eager"), ("smope", "fused"), ("smope", "merged"), ("hide", "sdpa"),
                     ("simplecil", "sdpa")]
    hide, times = report["rows"][3], report["times_ms"]
    assert hide["passes"] == 2 and hide["per_pass_ratio"] == hide["forward_ratio"] / 2
    # each ratio divides the right pair of timings (the method's on its path, the plain pass's)
    assert hide["forward_ratio"] == pytest.approx(times["hide auto forward"] / times["plain forward"])
    assert report["rows"][1]["step_ratio"] == pytest.approx(times["smope fused step"] / times["plain step"])
    assert report["rows"][4]["step_ratio"] is None  # SimpleCIL does not train
    assert all(r["forward_ratio"] > 0 for r in report["rows"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("simplecil | sdpa | 1 |")
    # counted test FLOPs: HiDe two passes, SimpleCIL one, SMoPE's experts under 1 % of a pass
    flops = {r["method"]: r["test_flops_ratio"] for r in report["rows"]}
    assert flops["hide"] == pytest.approx(2, abs=0.05) and flops["simplecil"] == pytest.approx(1, abs=0.01)
    assert 1 < flops["smope"] < 1.1


def test_prompted_step_bf16_columns_compare_fp32_eager_with_each_path_in_bf16(tmp_path, capsys):
    """The GPU figure's script path (fp32 eager step ÷ each path's bf16 step), run here on the CPU."""
    import prompted_step

    report = prompted_step.main(["--backbone", "vit_digits", "--batch", "4", "--repeats", "1", "--methods", "smope",
                                 "simplecil", "--bf16", "--device", "cpu"])
    times = report["times_ms"]
    for smope in report["rows"][1:3]:
        assert smope["method"] == "smope" and smope["path"] in ("fused", "merged")
        # the speed-up: fp32 eager over this path in bf16
        bf16 = f"smope {smope['path']} bf16"
        assert smope["bf16_step_speedup"] == pytest.approx(times["smope eager step"] / times[f"{bf16} step"])
        assert smope["bf16_forward_speedup"] == pytest.approx(times["smope eager forward"] / times[f"{bf16} forward"])
        # bf16 prompted ÷ bf16 plain: per pass is the forward ratio over the method's passes (one)
        assert smope["bf16_forward_ratio"] == pytest.approx(times[f"{bf16} forward"] / times["plain bf16 forward"])
        assert smope["bf16_step_ratio"] == pytest.approx(times[f"{bf16} step"] / times["plain bf16 step"])
        assert smope["bf16_per_pass_ratio"] == smope["bf16_forward_ratio"]
    assert "bf16_step_speedup" not in report["rows"][0]  # the eager row is the fp32 reference
    assert report["rows"][3]["bf16_step_speedup"] is None  # SimpleCIL does not train
    assert report["rows"][3]["bf16_step_ratio"] is None and report["plain_bf16_step_ms"] > 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].endswith("| –")
    assert "\nverdict: smope bf16 forward per pass: fused " in out and "verdict: simplecil" not in out


def test_bf16_verdict_names_the_fastest_gated_path_and_whether_it_meets_the_gpu_target():
    from prompted_step import bf16_verdicts

    rows = [{"method": "norga", "path": "eager"},  # the fp32 reference row has no bf16 figures
            {"method": "norga", "path": "fused", "bf16_per_pass_ratio": 1.14},
            {"method": "norga", "path": "merged", "bf16_per_pass_ratio": 1.1},
            {"method": "smope", "path": "fused", "bf16_per_pass_ratio": 1.28},
            {"method": "smope", "path": "merged", "bf16_per_pass_ratio": 1.11},
            {"method": "hide", "path": "sdpa", "bf16_per_pass_ratio": 1.05}]  # one path: nothing to choose
    assert bf16_verdicts(rows) == [
        "verdict: norga bf16 forward per pass: fused 1.14x, merged 1.10x; fastest merged (meets <= 1.10x)",
        "verdict: smope bf16 forward per pass: fused 1.28x, merged 1.11x; fastest merged (misses <= 1.10x)"]


def test_profile_prints_the_costliest_operators_of_each_forward(capsys):
    import prompted_step

    prompted_step.main(["--backbone", "vit_digits", "--batch", "2", "--repeats", "1", "--methods", "smope",
                        "--profile", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "\nplain forward\n" in out and "aten::addmm" in out
    assert "\nsmope fused forward\n" in out and "\nsmope merged forward\n" in out
    assert "flash_attention_for_cpu" in out.split("\nsmope merged forward\n")[1]  # the merged path's kernel


def test_kernel_clock_needs_a_cuda_device(capsys):
    import prompted_step

    with pytest.raises(SystemExit) as exit_info:
        prompted_step.main(["--backbone", "vit_digits", "--device", "cpu", "--clock", "kernels"])
    assert exit_info.value.code == 2 and "--clock kernels needs a CUDA device" in capsys.readouterr().err


def test_method_table_prints_and_writes_a_row_per_method(capsys, tmp_path):
    import method_table

    report = method_table.main(["--dataset", "digits", "--seeds", "0", "--methods", "simplecil", "smope",
                                "--json", str(tmp_path / "t.json")])
    rows = capsys.readouterr().out.strip().splitlines()[-2:]
    assert rows[0].startswith("simplecil | preset |") and rows[1].startswith("smope | preset |")
    assert "| 1 |" in rows[1]
    written = json.loads((tmp_path / "t.json").read_text())
    assert written == report and [r["method"] for r in written["rows"]] == ["simplecil", "smope"]
    assert written["rows"][0]["backbone"] == "vit_digits" and written["rows"][1]["runs"][0]["seed"] == 0
    assert 0 < written["rows"][1]["runs"][0]["final_average_accuracy"] <= 100


def test_method_table_validates_every_row_before_training(capsys):
    import method_table

    with pytest.raises(SystemExit) as stop:
        method_table.main(["--dataset", "digits", "--seeds", "0", "--methods", "simplecil",
                           "--set", "smope:top_k=99"])
    assert stop.value.code == 2
    out, err = capsys.readouterr()
    assert "simplecil |" not in out and "top_k=99" in err  # nothing ran


@pytest.mark.ray
def test_feature_cache_benchmark_counts_passes_with_and_without_the_store(local_ray, tmp_path, capsys):
    """Two SimpleCIL seeds one after the other. Without the store every prototype and query pass is
    made (test images again after every task); with it each of the 1,797 digits images passes the
    backbone once in the whole study, and every accuracy is the same."""

    import feature_cache

    report = feature_cache.main(["--methods", "simplecil", "--seeds", "0", "1", "--json", str(tmp_path / "f.json")])
    assert json.loads((tmp_path / "f.json").read_text()) == report
    without, with_store = report["without"], report["with"]
    assert without["frozen_images_reused"] == 0 and with_store["frozen_images_computed"] == 1797
    requests = with_store["frozen_images_computed"] + with_store["frozen_images_reused"]
    assert requests == without["frozen_images_computed"]
    assert report["same_accuracy"]
    assert "with ÷ without: un-prompted passes" in capsys.readouterr().out


@pytest.mark.ray
def test_study_overhead_benchmark_reports_wall_against_ideal(local_ray, tmp_path):

    import study_overhead

    report = study_overhead.main(["--smoke", "--num-samples", "1", "--max-concurrent", "1", "--runners", "inline",
                                  "--json", str(tmp_path / "o.json")])
    assert json.loads((tmp_path / "o.json").read_text()) == report
    (row,) = report["rows"]
    assert row["runner"] == "inline" and row["trials"] == 1
    assert row["wall_s"] > row["trial_compute_s"] > 0 and row["wall_over_ideal"] > 1


def test_the_ideal_wall_time_is_the_concurrency_the_trials_can_use_and_at_least_the_longest_trial():
    from study_overhead import ideal_schedule

    # one trial of 10 s, up to 2 at a time: the ideal is 10 s, not 5; 12 s of wall is 2 s of fixed cost
    assert ideal_schedule([10.0], 2, 12.0) == {"trials": 1, "concurrency": 1, "trial_compute_s": 10.0,
                                               "ideal_s": 10.0, "wall_over_ideal": 1.2, "fixed_cost_per_trial_s": 2.0}
    # three trials, 2 at a time: 4 + 4 + 10 s cannot finish before the 10-s one; 18 ÷ 2 = 9 is not reachable
    three = ideal_schedule([4.0, 4.0, 10.0], 2, 13.0)
    assert three["ideal_s"] == 10.0 and three["fixed_cost_per_trial_s"] == 2.0
    # many short trials: compute ÷ concurrency ((wall × concurrency − compute) ÷ trials, as before)
    even = ideal_schedule([5.0] * 12, 2, 40.0)
    assert even["ideal_s"] == 30.0 and even["fixed_cost_per_trial_s"] == (40.0 * 2 - 60.0) / 12


def test_compiled_backbone_benchmark_compares_compiled_and_eager(tmp_path, capsys):
    import compiled_backbone

    out = tmp_path / "compiled.json"
    report = compiled_backbone.main(["--backbone", "vit_digits", "--batch", "4", "--repeats", "1",
                                     "--json", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["ratio"] == pytest.approx(report["compiled_ms"] / report["eager_ms"])
    # the compiled variant was compiled: its first call took far longer than an eager pass
    assert report["compile_seconds"] * 1e3 > 10 * report["eager_ms"]
    assert report["max_abs_difference"] < 1e-4  # the same features
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("vit_digits | cpu | fp32 | 4 |")


@pytest.mark.parametrize("script, argv, message", [
    ("method_table", ["--methods", "nope"], "unknown method 'nope'"),
    ("method_table", ["--methods", "smope", "smope"], "--methods names smope more than once"),
    ("method_table", ["--seeds", "-1"], "seed must be in [0, 2**32 - 1], got -1"),
    ("method_table", ["--set", "top_k=3"], "--set 'top_k=3' is not METHOD:KEY=VALUE"),
    ("method_table", ["--json", "FILE/x.json"], "its directory 'FILE' exists and is not a directory"),
    ("prompted_step", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    ("prompted_step", ["--backbone", "nope"], "unknown backbone 'nope'"),
    ("prompted_step", ["--device", "gpu"], "device must be cpu or cuda[:N], got 'gpu'"),
    ("compiled_backbone", ["--device", "auto"], "device must be cpu or cuda[:N], got 'auto'"),
    ("compiled_backbone", ["--batch", "0"], "--batch must be >= 1, got 0"),
    ("feature_cache", ["--methods", "nope"], "unknown method 'nope'"),
    ("study_overhead", ["--max-concurrent", "0"], "--max-concurrent must be >= 1, got 0"),
])
def test_bad_benchmark_arguments_exit_2_before_any_work(tmp_path, capsys, monkeypatch, script, argv, message):
    """Checked before a backbone is built, a run trains or Ray starts (both would fail here)."""
    import importlib

    from promptcl.study import tuner

    module = importlib.import_module(script)
    monkeypatch.setattr(tuner, "ensure_ray", lambda *a, **k: pytest.fail("Ray started"))
    for name in ("build_backbone", "run_sequence", "ensure_ray"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail(f"{name} called"))
    (tmp_path / "file").write_text("a file")
    argv = [a.replace("FILE", str(tmp_path / "file")) for a in argv]
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage, then its one error line
    assert ": error: " in last and message.replace("FILE", str(tmp_path / "file")) in last, last
