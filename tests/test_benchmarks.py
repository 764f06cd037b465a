"""The benchmark scripts still run against the library (tiny settings; no timing asserted)."""

import sys
from pathlib import Path

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


def test_embedded_methods_prints_a_row_per_method(capsys):
    import embedded_methods

    embedded_methods.main(["--seeds", "0", "--methods", "smope"])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("smope | digits preset |") and "| 1 |" in row
