"""The method-comparison table from trial rows, checked by hand."""

import math

import pytest

from promptcl.study.comparison import format_method_table, method_table


def row(method, seed, fa, ca, fm, params=100):
    return {"method": method, "seed": seed, "final_average_accuracy": fa, "cumulative_average_accuracy": ca,
            "forgetting": fm, "trainable_params": params, "test_flops_per_image": 2_000_000,
            "train_flops_per_image": 3_000_000, "backbone_flops_per_image": 1_000_000}


def test_mean_and_sample_std_per_method_sorted_by_fa():
    rows = [row("a", 1, 80.0, 85.0, 10.0), row("b", 0, 95.0, 96.0, 1.0, params=7), row("a", 0, 90.0, 91.0, 4.0)]
    table = method_table(rows)
    assert [e["method"] for e in table] == ["b", "a"]
    a = table[1]
    assert a["seeds"] == [0, 1]
    assert a["final_average_accuracy_mean"] == 85.0
    assert a["final_average_accuracy_std"] == pytest.approx(math.sqrt(50))  # (5^2 + 5^2) / (2 - 1)
    assert a["cumulative_average_accuracy_mean"] == 88.0 and a["forgetting_std"] == pytest.approx(math.sqrt(18))
    assert table[0]["final_average_accuracy_std"] == 0.0  # one seed
    text = format_method_table(table)
    assert "| a | 85.00 ± 7.07 | 88.00 ± 4.24 | 7.00 ± 4.24 | 2 | 100 | 2.00 | 2.00 |" in text and "÷" in text
