"""Pareto front of accuracy vs cost."""

from promptcl.study.tradeoff import pareto_front


def row(fa, params, flops):
    return {"final_average_accuracy": fa, "trainable_params": params, "test_flops_per_image": flops}


def test_pareto_front_by_hand():
    rows = [
        row(80, 100, 10),  # front: cheapest
        row(90, 200, 10),  # front: more accurate
        row(85, 300, 10),  # dominated by the second (less accurate, more params)
        row(90, 200, 20),  # dominated by the second (same accuracy and params, more FLOPs)
        row(95, 500, 50),  # front: most accurate
    ]
    assert pareto_front(rows) == [True, True, False, False, True]


def test_identical_rows_do_not_dominate_each_other():
    rows = [row(90, 100, 10), row(90, 100, 10)]
    assert pareto_front(rows) == [True, True]
