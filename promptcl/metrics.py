"""Pure continual-learning metrics over an accuracy matrix.

``acc[t, i]`` is the accuracy (in %) on task ``i``'s test set after training through task ``t``;
entries with ``i > t`` are ignored. Every function takes a square ``T x T`` array-like.
"""

from __future__ import annotations

import numpy as np


def _matrix(acc) -> np.ndarray:
    m = np.asarray(acc, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {m.shape}")
    return m


def final_average_accuracy(acc) -> float:
    """FA: mean over tasks of the accuracy after the last task (unweighted)."""
    m = _matrix(acc)
    return float(m[-1].mean())


def average_accuracy_curve(acc) -> np.ndarray:
    """Mean accuracy over the tasks seen so far, after each task."""
    m = _matrix(acc)
    return np.array([m[t, : t + 1].mean() for t in range(m.shape[0])])


def cumulative_average_accuracy(acc) -> float:
    """CA: mean over time of the average accuracy over seen tasks."""
    return float(average_accuracy_curve(acc).mean())


def forgetting(acc) -> float:
    """FM: mean over old tasks of (best accuracy at any time, last row included) − final accuracy.

    The max runs over every row up to the last, as in the HiDe/NoRGa reference (whose tables the
    reproduction manifest's FM rows come from), so FM >= 0: a task that only improved counts as 0.
    With a single task there is nothing to forget and FM is 0.
    """
    m = _matrix(acc)
    T = m.shape[0]
    if T == 1:
        return 0.0
    drops = [m[i:, i].max() - m[-1, i] for i in range(T - 1)]
    return float(np.mean(drops))


def forgetting_canonical(acc) -> float:
    """Average forgetting as Chaudhry et al. (2018) define it: mean over old tasks of (best accuracy
    before the last task) − final accuracy. Negative when old tasks improved (e.g. through a head
    realigned at the end of a task), which :func:`forgetting` floors at 0 per task.
    With a single task there is nothing to forget and it is 0.
    """
    m = _matrix(acc)
    T = m.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([m[i:-1, i].max() - m[-1, i] for i in range(T - 1)]))


def backward_transfer(acc) -> float:
    """BWT: mean over old tasks of final accuracy − accuracy right after learning the task."""
    m = _matrix(acc)
    T = m.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([m[-1, i] - m[i, i] for i in range(T - 1)]))


def summarize(acc) -> dict[str, float]:
    """All the scalar metrics of an accuracy matrix."""
    return {
        "final_average_accuracy": final_average_accuracy(acc),
        "cumulative_average_accuracy": cumulative_average_accuracy(acc),
        "forgetting": forgetting(acc),
        "forgetting_canonical": forgetting_canonical(acc),
        "backward_transfer": backward_transfer(acc),
    }
