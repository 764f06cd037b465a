"""The benchmark scripts still run against the library (tiny settings; no timing asserted)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_prefix_overhead_prints_a_ratio_row(capsys):
    import prefix_overhead

    prefix_overhead.main(["--backbones", "vit_digits", "--batch-sizes", "4", "--repeats", "1"])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("vit_digits | 4 |") and row.count("x)") == 2


def test_embedded_methods_prints_a_row_per_method(capsys):
    import embedded_methods

    embedded_methods.main(["--seeds", "0", "--methods", "smope"])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("smope | digits preset |") and "| 1 |" in row
