"""Scaling sweep: how does accuracy scale against cost (trainable parameters, FLOPs per image)?

Ray Tune + Optuna over the method itself (SMoPE, HiDe-Prompt, NoRGa) and, per method, the knobs
that set its size: SMoPE's experts per head (num_experts) and experts routed per token (top_k,
never above num_experts), HiDe/NoRGa's prompt length, and for every method the number of
prompted layers (the first n blocks, n from 1 up to the depth of the dataset's backbone). Each
trial runs a whole CL sequence (in its Tune trial for one CPU worker, through Ray Train for several
workers or GPUs) and is logged to MLflow with its cost
(trainable_params, train/test FLOPs per image), so the study is a map of accuracy against cost.

Two modes:
  default   Optuna TPE over the define-by-run space (--num-samples trials, default 24).
  --grid    a small full grid, evaluated first as the searcher's baseline points (--num-samples
            defaults to the grid's size, to 2 with --smoke; more samples continue with TPE, fewer
            run the grid's head, which interleaves the methods, cheapest settings first).

Printed at the end: the best trials and the best trial of each method, each with its accuracy
(FA, CA, FM), trainable parameters and test FLOPs per image. The whole map (every finished trial,
with its Pareto status) is ``python dashboards/tradeoff.py --experiment expert_scaling``; every
trial's row is also in the parent MLflow run's trials.parquet. Laptop:
``python studies/expert_scaling.py --grid``; cluster: ``ray job submit -- python
studies/expert_scaling.py``.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from promptcl.study.objectives import ACCURACY_AND_COST
from promptcl.study.tuner import run_study_script, spec_from_args, study_dataset, study_parser

METHODS = ("smope", "hide", "norga")

# TPE ranges (log-uniform integers: the interesting part of each range is its small end).
NUM_EXPERTS_RANGE = (2, 32)  # experts per head; top_k is drawn from 1..num_experts
PROMPT_LENGTH_RANGE = (1, 32)  # prompt tokens per task and layer (HiDe/NoRGa)

# The grid: every (num_experts, top_k) and prompt length below, at 1, half and all of the blocks.
GRID_EXPERTS = ((4, 1), (4, 4), (16, 1), (16, 4))  # (num_experts, top_k): sparse/dense, small/large
GRID_PROMPT_LENGTHS = (2, 8)

# --smoke: short trials. Keys valid for every method go to the study's fixed overrides; the rest
# are per method and travel as define-by-run constants (fixed overrides reach every method's
# config, and e.g. ca_epochs exists only for SMoPE, tap_epochs only for HiDe/NoRGa).
SMOKE_FIXED = {"epochs": 2}
SMOKE_PER_METHOD = {
    "smope": {"ca_epochs": 5},
    "hide": {"tii_epochs": 3, "tii_ca_epochs": 3, "tap_epochs": 3},
    "norga": {"tii_epochs": 3, "tii_ca_epochs": 3, "tap_epochs": 3},
}


def backbone_depth(dataset: str, method: str) -> int:
    """Blocks of the backbone a ``method`` run on ``dataset`` uses by default (the dataset's
    default backbone unless the method names its own, as :func:`promptcl.engine.resolve_run`)."""
    from promptcl.core.backbone import LOCAL_BACKBONES, build_backbone
    from promptcl.data.benchmarks import dataset_spec
    from promptcl.methods import get_method

    name = get_method(method).DEFAULT_BACKBONES.get(dataset, dataset_spec(dataset).default_backbone)
    if name in LOCAL_BACKBONES:
        return int(LOCAL_BACKBONES[name]["depth"])
    import torch

    with torch.device("meta"):  # a timm ViT's geometry without allocating or loading weights
        return len(build_backbone(name).blocks)


def method_depths(dataset: str) -> dict[str, int]:
    return {m: backbone_depth(dataset, m) for m in METHODS}


def first_blocks(n: int) -> tuple[int, ...]:
    """``prompt_layers`` for the first ``n`` blocks."""
    return tuple(range(n))


@dataclass(frozen=True)
class ScalingSpace:
    """The define-by-run search space (``space(optuna_trial) -> constants``).

    Optuna sees integers: ``prompt_layers`` is the number of prompted blocks, so TPE can treat it
    as ordered. The returned constants replace it with the method's real setting, the tuple of
    the first n block indices (Ray's OptunaSearch merges constants over the suggested values),
    and add the per-method ``--smoke`` settings. ``top_k`` is suggested after ``num_experts``,
    with num_experts as its upper bound, so no invalid pair is ever proposed. A class rather than
    a closure: Tune pickles the searcher (and this space) with its experiment state."""

    depths: dict[str, int]  # method -> blocks of its backbone
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> constants (smoke)

    def __call__(self, trial) -> dict[str, Any]:
        method = trial.suggest_categorical("method", list(METHODS))
        layers = trial.suggest_int("prompt_layers", 1, self.depths[method])
        if method == "smope":
            num_experts = trial.suggest_int("num_experts", *NUM_EXPERTS_RANGE, log=True)
            trial.suggest_int("top_k", 1, num_experts, log=True)
        else:
            trial.suggest_int("prompt_length", *PROMPT_LENGTH_RANGE, log=True)
        return {"prompt_layers": first_blocks(layers), **self.extra.get(method, {})}


def make_search_space(dataset: str, *, smoke: bool = False) -> ScalingSpace:
    return ScalingSpace(method_depths(dataset), dict(SMOKE_PER_METHOD) if smoke else {})


def layer_counts(depth: int) -> tuple[int, ...]:
    """One block, half of them, all of them (4 blocks: 1, 2, 4; ViT-B's 12: 1, 6, 12)."""
    return tuple(sorted({1, max(1, depth // 2), depth}))


def grid_points(dataset: str) -> tuple[dict[str, Any], ...]:
    """The full grid, as points of the search space (what Optuna's ``enqueue_trial`` takes).

    Per method cheapest first (fewest layers, then smallest size), and interleaved across the
    methods, so that running only the grid's first points still covers every method."""
    depths = method_depths(dataset)
    per_method = {
        "smope": [{"method": "smope", "prompt_layers": n, "num_experts": e, "top_k": k}
                  for n in layer_counts(depths["smope"]) for e, k in GRID_EXPERTS],
        **{m: [{"method": m, "prompt_layers": n, "prompt_length": length}
               for n in layer_counts(depths[m]) for length in GRID_PROMPT_LENGTHS]
           for m in ("hide", "norga")},
    }
    rounds = itertools.zip_longest(*(per_method[m] for m in METHODS))
    return tuple(p for point_round in rounds for p in point_round if p is not None)


def main(argv: Optional[list[str]] = None) -> int:
    parser = study_parser(__doc__, name="expert_scaling", num_samples=24, objectives=ACCURACY_AND_COST)
    parser.add_argument("--grid", action="store_true",
                        help="evaluate the full grid first (default --num-samples: the grid's size; 2 with --smoke)")
    args = parser.parse_args(argv)
    try:
        space = make_search_space(study_dataset(args), smoke=args.smoke)
        grid = grid_points(study_dataset(args)) if args.grid else ()
    except ValueError as err:  # an unknown dataset or backbone: the same exit as the other checks
        print(f"expert_scaling: error: {err}", file=sys.stderr)
        return 2
    if args.grid:
        args.default_num_samples = len(grid)
    spec = spec_from_args(args, method="smope", search_space=space, smoke_overrides=SMOKE_FIXED,
                          baseline_points=grid)
    return run_study_script(spec, table_params=["method", "prompt_layers", "num_experts", "top_k", "prompt_length"],
                            best_by="method", prog="expert_scaling")


if __name__ == "__main__":
    sys.exit(main())
