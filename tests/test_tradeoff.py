"""Pareto front of accuracy vs cost."""

from promptcl.study.tradeoff import pareto_front, study_front


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


def test_the_front_is_the_one_the_study_tagged_where_every_trial_has_a_tag():
    """The study's front (held-out FA in its objectives) may star a trial the test-FA front would
    not; a trial without a tag (an older run) makes the map fall back to test FA and say so."""
    rows = [{**row(85, 3500, 1), "pareto": "false"}, {**row(83, 4000, 1), "pareto": "true"},
            {**row(80, 3000, 1), "pareto": "false"}]
    assert study_front(rows) == ([False, True, False], "Pareto front of the study's objectives")
    rows[0]["pareto"] = ""
    assert study_front(rows) == ([True, False, True], "Pareto front (FA, params, test FLOPs)")
