"""Accuracy vs trainable parameters and test FLOPs for every finished trial of a study run.

    python dashboards/tradeoff.py --experiment smope_topk [--study-run ID] [--mlflow-uri URI] [--out runs/tradeoff.png]

Prints the trials with their Pareto status and saves the report's trade-off figure (FA against
trainable parameters, test FLOPs per image and, for runs that report it, training FLOPs per run).
The front is the report's: the one the study searched for (its ``pareto`` tags) where every trial
has one, else that of test FA, parameters and test FLOPs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from promptcl.storage import check_writable_file
from promptcl.study.tracking import default_runs_dir, tracking_uri
from promptcl.study.tradeoff import ACCURACY_KEY, load_trials, study_front


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="smope_topk")
    p.add_argument("--study-run", default=None, metavar="RUN_ID",
                   help="the study's MLflow parent run (default: the experiment's latest)")
    p.add_argument("--mlflow-uri", default=None,
                   help="default: $MLFLOW_TRACKING_URI, else mlflow.db in $PROMPTCL_RUNS_DIR (else runs)")
    p.add_argument("--out", type=Path, default=default_runs_dir() / "tradeoff.png")
    args = p.parse_args(argv)
    try:
        check_figure_path(args.out)
        rows = load_trials(tracking_uri(args.mlflow_uri), args.experiment, args.study_run)
    except ValueError as err:
        print(f"tradeoff: error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(f"tradeoff: error: no finished trials in {args.experiment!r}", file=sys.stderr)
        return 2
    front, label = study_front(rows)
    print(label)
    print("pareto | FA | trainable params | test MFLOPs/img | top_k | num_experts | run")
    for row, on_front in sorted(zip(rows, front), key=lambda rf: -rf[0][ACCURACY_KEY]):
        print(f"{'*' if on_front else ' '} | {row[ACCURACY_KEY]:.2f} | {int(row['trainable_params']):,} | "
              f"{row['test_flops_per_image'] / 1e6:.3f} | {row.get('top_k', '-')} | {row.get('num_experts', '-')} | "
              f"{row['run_id'][:8]}")
    _plot(rows, front, label, args.out)
    print(f"saved {args.out}")
    return 0


def check_figure_path(out: Path) -> None:
    """A file matplotlib can write, named with the format it is written in."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise ValueError(f"--out {str(out)!r} must end in the figure's format: {', '.join('.' + f for f in formats)}")
    check_writable_file("--out", out)


def _plot(rows, front, label: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from promptcl.study.report import tradeoff_figure

    # a run's flattened method_config params are its config (what the front's labels name)
    fig = tradeoff_figure([{**row, "config": row} for row in rows], front, label)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
