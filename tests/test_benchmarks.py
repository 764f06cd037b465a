"""The benchmark scripts still run against the library (tiny settings; no timing asserted)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_prompted_step_times_every_method_and_both_paths_where_they_differ(tmp_path, capsys):
    import json

    import prompted_step

    out = tmp_path / "prompted_step.json"
    report = prompted_step.main(["--backbone", "vit_digits", "--batch", "4", "--repeats", "1",
                                 "--methods", "smope", "hide", "simplecil", "--json", str(out)])
    assert json.loads(out.read_text()) == report
    paths = [(r["method"], r["path"]) for r in report["rows"]]
    # SMoPE's token-shared logits differ between eager and fused; HiDe's linear prefix is one SDPA
    assert paths == [("smope", "eager"), ("smope", "fused"), ("hide", "sdpa"), ("simplecil", "sdpa")]
    hide = report["rows"][2]
    assert hide["passes"] == 2 and hide["per_pass_ratio"] == hide["forward_ratio"] / 2
    assert report["rows"][3]["step_ratio"] is None  # SimpleCIL does not train
    assert all(r["forward_ratio"] > 0 for r in report["rows"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("simplecil | sdpa | 1 |")
    # counted test FLOPs: HiDe two passes, SimpleCIL one, SMoPE's experts under 1 % of a pass
    flops = {r["method"]: r["test_flops_ratio"] for r in report["rows"]}
    assert flops["hide"] == pytest.approx(2, abs=0.05) and flops["simplecil"] == pytest.approx(1, abs=0.01)
    assert 1 < flops["smope"] < 1.1


def test_embedded_methods_prints_a_row_per_method(capsys):
    import embedded_methods

    embedded_methods.main(["--seeds", "0", "--methods", "smope"])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("smope | digits preset |") and "| 1 |" in row


@pytest.mark.ray
def test_feature_cache_benchmark_counts_passes_with_and_without_the_store(local_ray, tmp_path, capsys):
    """Two SimpleCIL seeds one after the other. Without the store every prototype and query pass is
    made (test images again after every task); with it each of the 1,797 digits images passes the
    backbone once in the whole study, and every accuracy is the same."""
    import json

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
    import json

    import study_overhead

    report = study_overhead.main(["--smoke", "--num-samples", "1", "--max-concurrent", "1", "--runners", "inline",
                                  "--json", str(tmp_path / "o.json")])
    assert json.loads((tmp_path / "o.json").read_text()) == report
    (row,) = report["rows"]
    assert row["runner"] == "inline" and row["trials"] == 1
    assert row["wall_s"] > row["trial_compute_s"] > 0 and row["wall_over_ideal"] > 1
