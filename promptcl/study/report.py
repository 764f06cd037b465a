"""A study's report: one tidy Parquet table, figures, and a self-contained HTML page.

The table has one row per (trial, train_task, eval_task) with the accuracy, plus the trial-level
columns (method, dataset, backbone, protocol, seed, hyperparameters, final metrics, cost, Pareto
status, method state as JSON) repeated on each row, so pandas, polars or duckdb read it without
joins. It is built from the finished child runs of one study run of an MLflow experiment (their
``summary.json`` artifacts) and can be written and read back, so a report can be made from the
Parquet file alone.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from promptcl.study.tradeoff import study_front

TRIAL_METRICS = ("final_average_accuracy", "cumulative_average_accuracy", "forgetting", "backward_transfer",
                 "trainable_params", "train_flops_per_image", "test_flops_per_image", "backbone_flops_per_image")


SELECTED_ON = "validation_final_average_accuracy"  # FA on the held-out training images

# each trial's run settings (MLflow params run/*), so a table says what it compared
RUN_COLUMNS = ("dataset", "backbone", "protocol", "seed")


def export_study(tracking_uri: str, experiment: str, *, parent_run_id: Optional[str] = None) -> list[dict[str, Any]]:
    """Tidy rows of every finished trial of one study run of ``experiment``: ``parent_run_id``, by
    default the latest (a fresh run of a study name starts a new study run beside the old ones,
    whose trials and fronts are not this run's)."""
    return _export(tracking_uri, experiment, parent_run_id)[1]


def _export(tracking_uri: str, experiment: str, parent_run_id: Optional[str]) -> tuple[str, list[dict[str, Any]]]:
    """(the study run's id, its tidy rows)."""
    from promptcl.study.tracking import client, finished_trials

    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per trial otherwise
    parent_run_id, runs = finished_trials(tracking_uri, experiment, parent_run_id)
    c = client(tracking_uri)
    rows: list[dict[str, Any]] = []
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            summary = json.loads(Path(c.download_artifacts(run.info.run_id, "summary.json", tmp)).read_text())
        params = run.data.params
        trial = {"study_run_id": parent_run_id, "run_id": run.info.run_id, "trial": run.info.run_name,
                 "method": run.data.tags.get("method", ""),
                 **{key: params.get(f"run/{key}", "") for key in RUN_COLUMNS},
                 "pareto": run.data.tags.get("pareto", ""),
                 "config": json.dumps({k.split("/", 1)[1]: v for k, v in params.items()
                                       if k.startswith("method_config/")}, sort_keys=True),
                 "method_state": json.dumps(summary.get("method_state", {})),
                 **{k: float(summary[k]) for k in TRIAL_METRICS},
                 # what a study with a validation split selected on (absent without one)
                 SELECTED_ON: float(summary.get(SELECTED_ON, math.nan)),
                 # runs made before the engine counted training work have no per-run figure
                 "train_flops_per_run": float(summary.get("train_flops_per_run", math.nan))}
        rows.extend(_matrix_rows(trial, np.asarray(summary["accuracy_matrix"])))
    return parent_run_id, rows


def _matrix_rows(trial: dict[str, Any], acc: np.ndarray) -> list[dict[str, Any]]:
    return [{**trial, "train_task": t, "eval_task": i, "accuracy": float(acc[t, i])}
            for t in range(len(acc)) for i in range(t + 1)]


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


TABLE_COLUMNS = ("run_id", "trial", "method", "pareto", "config", "method_state", *TRIAL_METRICS,
                 "train_task", "eval_task", "accuracy")


def read_table(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise ValueError(f"no report table at {str(path)!r}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{str(path)!r} is not a Parquet file ({' '.join(str(err).split())})") from None
    missing = [c for c in TABLE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{str(path)!r} is not a study table written by a report (no column {missing[0]!r})")
    return table.to_pylist()


def trials(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per trial (the trial-level columns, ``accuracy_matrix`` rebuilt), best first: by FA on
    the held-out images where every trial has it (what the study selected on), else by FA."""
    by_run: dict[str, dict[str, Any]] = {}
    for row in rows:
        trial = by_run.setdefault(row["run_id"], {k: v for k, v in row.items()
                                                  if k not in ("train_task", "eval_task", "accuracy")} | {"cells": []})
        trial["cells"].append((row["train_task"], row["eval_task"], row["accuracy"]))
    out = []
    for trial in by_run.values():
        size = 1 + max(t for t, _, _ in trial["cells"])
        acc = np.full((size, size), np.nan)
        for t, i, a in trial.pop("cells"):
            acc[t, i] = a
        out.append({**trial, "accuracy_matrix": acc, "config": json.loads(trial["config"]),
                    "method_state": json.loads(trial["method_state"])})
    key = SELECTED_ON if out and all(_held_out(t) for t in out) else "final_average_accuracy"
    return sorted(out, key=lambda t: -t[key])


def _held_out(trial: dict[str, Any]) -> bool:
    """Whether the trial has FA on held-out images (tables of older versions have no such column)."""
    return not math.isnan(trial.get(SELECTED_ON, math.nan))


FIGURES = ("tradeoff.png", "forgetting.png", "task_curves.png", "accuracy_matrix.png", "expert_usage.png")
TABLE = "study.parquet"


def build_report(rows: list[dict[str, Any]], out_dir: Path, *, title: str, with_table: bool = False,
                 upload: Optional[Callable[[Path], None]] = None) -> Path:
    """Figures (PNG) and ``index.html`` (figures embedded, a sortable trial table) in ``out_dir``,
    with ``study.parquet`` if ``with_table``. They are written in a temporary sibling directory
    (``upload`` gets it, holding the report's files only) and then moved in: a failure leaves
    ``out_dir`` as it was, other files in it stay, and a figure of an earlier report that this one
    has no data for (e.g. SMoPE's expert usage) is removed."""
    import matplotlib

    matplotlib.use("Agg")
    items = trials(rows)
    if not items:
        raise ValueError("the study has no finished trials to report")
    owned = ("index.html", *FIGURES, *((TABLE,) if with_table else ()))
    for name in owned:
        if (out_dir / name).exists() and not (out_dir / name).is_file():
            raise ValueError(f"--out {str(out_dir)!r}: its {name} exists and is not a file")
    front, front_label = study_front(items)
    figures = {
        "tradeoff.png": tradeoff_figure(items, front, front_label),
        "forgetting.png": _forgetting_figure(items),
        "task_curves.png": _curves_figure(items),
        "accuracy_matrix.png": _heatmap_figure(items[0]),
    }
    smope = next((t for t in items if "expert_usage" in t["method_state"]), None)
    if smope is not None:
        figures["expert_usage.png"] = _usage_figure(smope)
    import matplotlib.pyplot as plt

    # the stage lies beside out_dir (in its nearest existing ancestor), so the files move in by rename
    ancestor = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=ancestor))
    try:
        for name, fig in figures.items():
            fig.savefig(stage / name, dpi=110)
        (stage / "index.html").write_text(_html(title, items, front, front_label, stage, list(figures)))
        if with_table:
            write_table(rows, stage / TABLE)
        if upload is not None:
            upload(stage)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in owned:
            if not (stage / name).exists():
                (out_dir / name).unlink(missing_ok=True)
        for f in stage.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        plt.close("all")
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir / "index.html"


def _label(trial: dict[str, Any]) -> str:
    keys = ("num_experts", "top_k", "prompt_length", "prompt_layers", "pool_size")
    hp = ", ".join(f"{k}={trial['config'][k]}" for k in keys if k in trial["config"])
    return f"{trial['method']}" + (f" ({hp})" if hp else "")


def _colours(items) -> dict[str, Any]:
    """One distinct colour per method (tab20: up to 20 methods)."""
    import matplotlib.pyplot as plt

    return {m: plt.cm.tab20(i % 20) for i, m in enumerate(sorted({t["method"] for t in items}))}


def _log_if_wide(ax, values, axis: str) -> None:
    """A log axis when the positive values span more than a factor 20; symmetric-log (linear up to
    the smallest positive value) when some are 0, so a trial with none (SimpleCIL) stays drawn."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 20:
        scale = ax.set_xscale if axis == "x" else ax.set_yscale
        if any(v <= 0 for v in values):
            scale("symlog", linthresh=min(positive))
        else:
            scale("log")


def _train_flops(trial: dict[str, Any]) -> float:
    """The trial's training FLOPs per run, NaN where it has none (older runs and tables)."""
    value = trial.get("train_flops_per_run")
    return math.nan if value is None else float(value)


def tradeoff_figure(items, front, front_label: str):
    """FA against trainable parameters, test FLOPs per image and (trials that report it) training
    FLOPs per run; ``front`` marks the trials to star and label. ``items``: one dict per trial with
    its ``method``, ``config`` and final metrics (also what ``dashboards/tradeoff.py`` draws)."""
    import matplotlib.pyplot as plt

    panels = [("trainable_params", "trainable parameters"), ("test_flops_per_image", "test FLOPs per image")]
    if any(math.isfinite(_train_flops(t)) for t in items):
        panels.append(("train_flops_per_run", "training FLOPs per run"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), sharey=True)
    colours = _colours(items)
    for ax, (key, label) in zip(axes, panels):
        value = _train_flops if key == "train_flops_per_run" else (lambda t, key=key: t[key])
        shown = [(t, on_front) for t, on_front in zip(items, front) if math.isfinite(value(t))]
        for method, colour in colours.items():
            pts = [t for t, _ in shown if t["method"] == method]
            ax.scatter([value(t) for t in pts], [t["final_average_accuracy"] for t in pts], s=30, alpha=0.8,
                       color=colour, label=method)
        on = [t for t, on_front in shown if on_front]
        ax.scatter([value(t) for t in on], [t["final_average_accuracy"] for t in on], marker="*", s=220,
                   facecolors="none", edgecolors="black", label=front_label)
        for t in on:
            ax.annotate(_label(t), (value(t), t["final_average_accuracy"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        if key == "test_flops_per_image":
            ax.axvline(items[0]["backbone_flops_per_image"], color="grey", ls="--", lw=1)
            ax.text(items[0]["backbone_flops_per_image"], ax.get_ylim()[0], " one plain backbone pass",
                    fontsize=7, color="grey", va="bottom")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0), useOffset=False)
        _log_if_wide(ax, [value(t) for t, _ in shown], "x")
        ax.set_xlabel(label)
    axes[0].set_ylabel("final average accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _forgetting_figure(items):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, colour in _colours(items).items():
        pts = [t for t in items if t["method"] == method]
        ax.scatter([t["trainable_params"] for t in pts], [t["forgetting"] for t in pts], color=colour, label=method)
    _log_if_wide(ax, [t["trainable_params"] for t in items], "x")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("forgetting (FM, %)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _curves_figure(items):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colours = _colours(items)
    for t in items:
        acc = t["accuracy_matrix"]
        curve = [np.nanmean(acc[k, : k + 1]) for k in range(len(acc))]
        ax.plot(range(1, len(acc) + 1), curve, color=colours[t["method"]], alpha=0.7, marker=".")
    for method, colour in colours.items():
        ax.plot([], [], color=colour, label=method)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy on seen tasks (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _heatmap_figure(trial):
    import matplotlib.pyplot as plt

    acc = trial["accuracy_matrix"]
    fig, ax = plt.subplots(figsize=(5, 4))
    image = ax.imshow(np.ma.masked_invalid(acc), vmin=0, vmax=100, cmap="viridis")
    for (t, i), value in np.ndenumerate(acc):
        if not np.isnan(value):
            ax.text(i, t, f"{value:.0f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training task")
    ax.set_title(f"best trial: {_label(trial)}", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    return fig


def _usage_figure(trial):
    import matplotlib.pyplot as plt

    usage = np.asarray(trial["method_state"]["expert_usage"])  # [layer, head, expert]
    layers = trial["method_state"].get("prompt_layers", list(range(len(usage))))
    fig, axes = plt.subplots(1, len(usage), figsize=(3.2 * len(usage), 3), squeeze=False)
    for ax, counts, layer in zip(axes[0], usage, layers):
        share = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
        ax.imshow(share, aspect="auto", cmap="magma", vmin=0)
        ax.set_title(f"block {layer}", fontsize=8)
        ax.set_xlabel("expert")
        ax.set_ylabel("head")
    fig.suptitle(f"SMoPE expert usage (share of routed samples), {_label(trial)}", fontsize=8)
    fig.tight_layout()
    return fig


SORT_SCRIPT = """
document.querySelectorAll('th').forEach(th => th.addEventListener('click', () => {
  const col = th.cellIndex;  // the column within its own table
  const body = th.closest('table').tBodies[0];
  const rows = Array.from(body.rows);
  const asc = th.dataset.asc !== 'true';
  th.dataset.asc = asc;
  const key = r => {
    const cell = r.cells[col], v = cell.dataset.v ?? cell.textContent;
    return isNaN(parseFloat(v)) ? v : parseFloat(v);
  };
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1));
  rows.forEach(r => body.appendChild(r));
}));
"""


def _html(title: str, items, front, front_label: str, figure_dir: Path, figures: list[str]) -> str:
    def image(name: str) -> str:
        data = base64.b64encode((figure_dir / name).read_bytes()).decode()
        return f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'

    columns = [("trial", lambda t: t["trial"], str), ("method", lambda t: t["method"], str),
               ("seed", lambda t: t.get("seed", ""), str), ("settings", _label, str),
               *([("val FA", lambda t: t.get(SELECTED_ON, math.nan), _percent)] if any(map(_held_out, items))
                 else []),
               ("FA", lambda t: t["final_average_accuracy"], _percent),
               ("CA", lambda t: t["cumulative_average_accuracy"], _percent),
               ("FM", lambda t: t["forgetting"], _percent),
               ("trainable params", lambda t: t["trainable_params"], _count),
               ("test FLOPs/img", lambda t: t["test_flops_per_image"], _count),
               ("train FLOPs/run", _train_flops, _count)]
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _, _ in columns) + "<th>Pareto</th>"
    body = []
    for t, on_front in zip(items, front):
        cells = "".join(f'<td data-v="{html.escape(_sort_key(value(t)))}">{html.escape(fmt(value(t)))}</td>'
                        for _, value, fmt in columns)
        mark = "yes" if on_front else ""
        body.append(f'<tr>{cells}<td data-v="{mark}">{mark}</td></tr>')
    settings = "; ".join(f"{key}: {', '.join(values)}" for key in ("dataset", "backbone", "protocol")
                         if (values := sorted({str(t[key]) for t in items if t.get(key)})))
    gates = [t for t in items if "alpha" in t["method_state"]]
    gate_rows = "".join(
        f"<tr><td>{html.escape(t['trial'])}</td><td>{html.escape(str(t['method_state']['gate_activation']))}</td>"
        f"<td>{', '.join(f'{a:.3f}' for a in t['method_state']['alpha'])}</td>"
        f"<td>{', '.join(f'{a:.3f}' for a in t['method_state']['tau'])}</td></tr>" for t in gates)
    gate_table = (f"<h2>NoRGa gates after training</h2><table id=\"gates\"><thead><tr><th>trial</th><th>activation</th>"
                  f"<th>&alpha; per prompted block</th><th>&tau; per prompted block</th></tr></thead>"
                  f"<tbody>{gate_rows}</tbody></table>") if gates else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<link rel="icon" href="data:,">
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px}} img{{max-width:100%}}
table{{border-collapse:collapse;font-size:13px}} td,th{{border:1px solid #ccc;padding:3px 6px}}
th{{cursor:pointer;background:#eee}} figure{{display:inline-block;margin:0 1em 1em 0}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(items)} finished trial{"" if len(items) == 1 else "s"}{html.escape(f" ({settings})" if settings else "")};
stars and the Pareto column: {html.escape(front_label)}. Click a column header to sort.</p>
{''.join(image(name) for name in figures)}
<h2>Trials</h2><table id="trials"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
{gate_table}
<script>{SORT_SCRIPT}</script></body></html>
"""


def _sort_key(value: Any) -> str:
    """A cell's value for the table's sort script: a missing number sorts below every number."""
    return "-Infinity" if isinstance(value, float) and math.isnan(value) else str(value)


def _percent(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f}"


def _count(value: float) -> str:
    """Parameters and FLOPs: whole numbers with thousands separators."""
    return "–" if math.isnan(value) else f"{value:,.0f}"


def report_from_mlflow(tracking_uri: str, experiment: str, out_dir: Path, *,
                       log_to_parent: bool = True, parent_run_id: Optional[str] = None) -> Path:
    """Export, build, and log the report back to the study run. ``parent_run_id``: that study run's
    report; default: the experiment's latest study run."""
    from promptcl.study.tracking import client

    latest = parent_run_id is None
    parent_run_id, rows = _export(tracking_uri, experiment, parent_run_id)
    if not rows:  # before anything is written
        raise ValueError(f"study run {parent_run_id} of {experiment!r} has no finished trials to report"
                         + (" (the latest; --study-run RUN_ID picks another)" if latest else ""))

    def upload(stage: Path) -> None:  # the report's own files only, never the rest of out_dir
        client(tracking_uri).log_artifacts(parent_run_id, str(stage), "report")

    return build_report(rows, out_dir, title=f"Study {experiment}", with_table=True,
                        upload=upload if log_to_parent else None)


def report_from_table(path: Path, out_dir: Path, *, title: Optional[str] = None) -> Path:
    return build_report(read_table(path), out_dir, title=title or f"Study report ({Path(path).name})")
