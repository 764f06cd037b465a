"""The method-comparison table (the shape of the seeds' Table 1): per method, FA / CA / FM as
mean ± std over seeds, with trainable parameters and test FLOPs per image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ACCURACY_COLUMNS = (("final_average_accuracy", "FA"), ("cumulative_average_accuracy", "CA"), ("forgetting", "FM"))


def method_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method from one row per finished trial (with ``method`` and ``seed``), sorted
    by mean FA, best first. ``std`` is the sample standard deviation (0 with one seed)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    table = []
    for method, runs in by_method.items():
        entry: dict[str, Any] = {"method": method, "seeds": sorted(int(r["seed"]) for r in runs)}
        for key, _ in ACCURACY_COLUMNS:
            values = np.array([r[key] for r in runs], dtype=float)
            entry[f"{key}_mean"] = float(values.mean())
            entry[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        for key in ("trainable_params", "test_flops_per_image", "train_flops_per_image", "backbone_flops_per_image"):
            entry[key] = int(runs[0][key])  # the same for every seed of a method
        table.append(entry)
    return sorted(table, key=lambda e: -e["final_average_accuracy_mean"])


def format_method_table(table: list[dict[str, Any]]) -> str:
    """Markdown: method, FA, CA, FM (mean ± std), seeds, trainable parameters, test FLOPs per image
    (and as a multiple of one backbone pass)."""
    head = ["method", "FA", "CA", "FM", "seeds", "trainable params", "test MFLOPs/img", "test FLOPs ÷ backbone pass"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        cells = [e["method"]]
        cells += [f"{e[f'{key}_mean']:.2f} ± {e[f'{key}_std']:.2f}" for key, _ in ACCURACY_COLUMNS]
        cells += [str(len(e["seeds"])), f"{e['trainable_params']:,}", f"{e['test_flops_per_image'] / 1e6:.2f}",
                  f"{e['test_flops_per_image'] / e['backbone_flops_per_image']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_method_table(table: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``methods.parquet`` (pyarrow) and ``methods.md`` in ``out_dir``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    parquet, markdown = out_dir / "methods.parquet", out_dir / "methods.md"
    pq.write_table(pa.Table.from_pylist(table), parquet)
    markdown.write_text(format_method_table(table) + "\n")
    return [parquet, markdown]
