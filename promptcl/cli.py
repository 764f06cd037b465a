"""The promptcl command line: run a CL sequence, the cost of a method without training, the report of a
study, pretrain a project-made backbone, probe a backbone's frozen features against raw pixels, reproduce
the rows of the published-numbers manifest."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

from promptcl.data import CLASS_ORDERS
from promptcl.data.preprocessing import PROTOCOLS

USAGE_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptcl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train and evaluate one continual-learning sequence")
    run.add_argument("--method", required=True)
    run.add_argument("--dataset", required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--class-order", choices=CLASS_ORDERS, default="seeded",
                     help="seeded: random.seed(seed); random.shuffle(range(C)), the rule of the reference code that "
                          "shuffles (default; every method sees the same task sequences); natural: the dataset's own "
                          "class (or source) order at every seed, as HiDe-Prompt's scripts run; seeded-except-0: "
                          "seeded, but natural at seed 0, as CODA-Prompt's, VQ-Prompt's and OVOR's trainers")
    run.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    run.add_argument("--backbone", default=None,
                     help="timm ViT name (full tag), a seed alias or a local preset "
                          "(default: the method's for the dataset)")
    run.add_argument("--random-init", dest="pretrained", action="store_false",
                     help="a random-init backbone instead of its pretrained weights (a control)")
    run.add_argument("--checkpoint-file", default=None, help="backbone weights from a local file")
    run.add_argument("--data-dir", default=None, help="root of the benchmarks read from disk (default: $PROMPTCL_DATA)")
    run.add_argument("--split-file", default=None,
                     help="ImageNet-R's train/test split: promptcl's list format or CODA-Prompt's "
                          "imagenet-r_train.yaml (its _test.yaml beside it); default: the shipped HiDe/NoRGa split")
    run.add_argument("--protocol", choices=PROTOCOLS, default=None,
                     help="input pipeline of a disk benchmark: the method's reference code base's (default), "
                          "a named one, or one common to every method")
    run.add_argument("--loader-workers", type=int, default=None,
                     help="DataLoader worker processes (default: 4 for disk benchmarks, 0 for the offline ones)")
    run.add_argument("--compile-backbone", action="store_true",
                     help="torch.compile the frozen backbone's un-prompted pass (task identity, queries); off by "
                          "default: compiling costs seconds to minutes and pays off on long GPU runs")
    run.add_argument("--validation-fraction", type=float, default=0.0,
                     help="hold out this seeded, stratified fraction of each class's training images (at most "
                          "0.5) and evaluate it after every task like the test sets (validation_* metrics)")
    run.add_argument("--increment", type=int, default=None, help="classes per task")
    run.add_argument("--preset", default=None, help="a named hyperparameter preset of the method")
    run.add_argument("--eval-batch-size", type=int, default=256)
    run.add_argument("--device", default="auto")
    run.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                     help="bf16: autocast on the run's device (CUDA or CPU)")
    run.add_argument("--feature-cache", default=None, metavar="DIR",
                     help="store of un-prompted backbone features shared by runs (a directory or URI)")
    dist = run.add_argument_group("Ray Train (data-parallel across workers; starts or joins a local Ray)")
    dist.add_argument("--num-workers", type=int, default=None,
                      help="run on N Ray Train workers; the method's batch size is the global one")
    dist.add_argument("--use-gpu", action="store_true", help="GPUs for the workers (NCCL between them)")
    dist.add_argument("--gpus-per-worker", type=float, default=None, help="with --use-gpu (default 1)")
    dist.add_argument("--cpus-per-worker", type=float, default=None)
    dist.add_argument("--max-failures", type=int, default=0,
                      help="restart the workers from the last task checkpoint up to K times (-1: no limit)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a method hyperparameter (repeatable)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar per epoch (default: when stderr is a terminal)")

    cost = sub.add_parser("cost", help="parameters and FLOPs of a method, without training")
    cost.add_argument("--method", required=True)
    cost.add_argument("--backbone", required=True)
    cost.add_argument("--num-classes", type=int, required=True)
    cost.add_argument("--num-tasks", type=int, default=10, help="tasks in the sequence (per-task prompts)")
    cost.add_argument("--dataset", default=None, help="pick the dataset's preset (default: the paper's)")
    cost.add_argument("--preset", default=None, help="a named hyperparameter preset of the method")
    cost.add_argument("--img-size", type=int, default=None, help="default: the backbone's")
    cost.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cost.add_argument("--json", action="store_true")

    report = sub.add_parser("report", help="a study's report: tidy Parquet table, figures, HTML page")
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument("--experiment", help="MLflow experiment of the study (its finished child runs)")
    source.add_argument("--from-parquet", type=Path, metavar="FILE", help="a study.parquet written by a report")
    report.add_argument("--mlflow-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI, else mlflow.db in $PROMPTCL_RUNS_DIR (else runs)")
    report.add_argument("--out", required=True, help="local directory for study.parquet, PNGs, index.html")
    report.add_argument("--study-run", default=None, metavar="RUN_ID",
                        help="with --experiment: the study's MLflow parent run (default: the experiment's latest)")
    report.add_argument("--no-log", action="store_true", help="do not log the report to the study's parent run")

    pretrain = sub.add_parser("pretrain", help="(re)make a project-made backbone's weights, offline, deterministically")
    pretrain.add_argument("name", help="a local backbone (vit_glyphs28, vit_digits)")
    pretrain.add_argument("--out", type=Path, default=None,
                          help="weights file to write (+ .json manifest); default: under $PROMPTCL_CACHE")
    pretrain.add_argument("--steps", type=int, default=None, help="fewer steps than the recipe (a smoke test)")

    probe = sub.add_parser("probe", help="linear probe of a frozen backbone's features vs raw pixels")
    probe.add_argument("--dataset", required=True)
    probe.add_argument("--backbone", default=None, help="default: the dataset's")
    probe.add_argument("--checkpoint-file", type=Path, default=None, help="backbone weights from a local file")
    probe.add_argument("--data-dir", type=Path, default=None)
    probe.add_argument("--json", action="store_true")

    reproduce = sub.add_parser("reproduce", help="list, print or run the rows of the published-numbers manifest")
    reproduce.add_argument("row_id", nargs="?", metavar="ID", help="a manifest row to run (see --list)")
    reproduce.add_argument("--list", action="store_true", help="the manifest with each row's status")
    reproduce.add_argument("--json", action="store_true", help="with --list: a JSON list of the rows")
    reproduce.add_argument("--dry-run", action="store_true", help="print the row's commands (one per seed)")
    reproduce.add_argument("--manifest", type=Path, default=None, help="default: the packaged reproduction.json")
    reproduce.add_argument("--results", type=Path, default=None,
                           help="default: $PROMPTCL_RUNS_DIR (else runs)/reproduce/results.json")
    return parser


def _fail(message: str) -> int:
    print(f"promptcl: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "report":
        return _report(args)
    if args.command == "pretrain":
        return _pretrain(args)
    if args.command == "probe":
        return _probe(args)
    if args.command == "reproduce":
        return _reproduce(args)
    return _cost(args)


def _pretrain(args) -> int:
    import time

    from promptcl.core import pretrain
    from promptcl.storage import check_writable_location

    try:
        spec = pretrain.local_backbone(args.name)
        if args.steps is not None and args.steps < 1:
            raise ValueError("--steps must be >= 1")
        spec.check_sources()  # e.g. a missing font package fails now, with the install command
        if args.out is not None:
            out = args.out
        elif spec.delivery == "cached" and args.steps is None:
            out = pretrain.cached_checkpoint(args.name)  # the file runs load
        else:  # never where runs look: a shortened run or a remake to compare with the shipped file
            steps = args.steps or spec.recipe.steps
            out = pretrain.cache_dir() / f"{args.name}_{spec.version}_remade_steps{steps}.safetensors"
        if args.out is not None and (args.out.exists() or not args.out.parent.is_dir()):
            raise ValueError(f"--out {str(args.out)!r} exists or its directory does not")
        if args.out is not None:
            check_writable_location(f"--out {str(args.out)!r}: its directory", args.out.parent)
    except ValueError as err:
        return _fail(str(err))
    started = time.perf_counter()

    def progress(step: int, total: int, loss: float) -> None:
        if step % 100 == 0 or step == total:
            print(f"pretrain {args.name}: step {step}/{total}  loss {loss:.3f}  {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)

    manifest = pretrain.write_checkpoint(*pretrain.pretrain(args.name, steps=args.steps, progress=progress), out)
    print(f"weights: {out}  sha256 {manifest['sha256']}")
    if spec.delivery == "shipped" and args.steps is None:
        shipped = json.loads(pretrain.shipped_checkpoint(args.name).with_suffix(".json").read_text())["sha256"]
        if shipped != manifest["sha256"]:
            print(f"differs from the shipped weights (sha256 {shipped}): see the manifests for torch, "
                  "fonts and machine", file=sys.stderr)
            return 1
        print("identical to the shipped weights, bit for bit")
    return 0


def _probe(args) -> int:
    from promptcl.probe import PRETRAINED_MARGIN, probe

    try:  # probe() checks the dataset, its data and the backbone before any work
        result = probe(args.dataset, backbone=args.backbone, checkpoint_file=args.checkpoint_file,
                       data_dir=args.data_dir)
    except (ValueError, ImportError) as err:
        return _fail(str(err))
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    verdict = "pretrained for" if result.pretrained else "NOT pretrained for"
    print(f"{result.dataset}: backbone {result.backbone} {result.backbone_accuracy:.2f} %  "
          f"pixels {result.pixel_accuracy:.2f} %  margin {result.margin:+.2f}  -> {verdict} {result.dataset} "
          f"(needs >= +{PRETRAINED_MARGIN:.1f})")
    return 0


def _report(args) -> int:
    from mlflow.exceptions import MlflowException

    from promptcl.storage import check_writable_location
    from promptcl.study.report import report_from_mlflow, report_from_table
    from promptcl.study.tracking import tracking_uri

    try:
        if "://" in args.out:  # (the report reaches MLflow's artifact store through --mlflow-uri)
            raise ValueError(f"--out {args.out!r}: the report is written to a local directory, not a URI")
        check_writable_location("--out", args.out)
        out = Path(args.out)
        if args.experiment is not None:
            if not args.experiment.strip():
                raise ValueError("--experiment names no MLflow experiment")
            uri = tracking_uri(args.mlflow_uri)
            page = report_from_mlflow(uri, args.experiment, out, log_to_parent=not args.no_log,
                                      parent_run_id=args.study_run)
        elif args.study_run:
            return _fail("--study-run selects a study run of --experiment; a Parquet table is one study already")
        else:
            page = report_from_table(args.from_parquet, out)
    except (ValueError, OSError, MlflowException) as err:  # (a failed write or upload leaves --out as it was)
        return _fail(" ".join(str(err).split()))
    print(f"report: {page}")
    return 0


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM (a scheduler's or ``timeout``'s stop) unwinds like Ctrl-C, so a stopped run removes
    what it had written; a handler can only be set in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def terminate(signum, frame):
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is terminate:  # not if Ray (ray.init) installed its own since
            signal.signal(signal.SIGTERM, previous)


def run_spec(args):
    """The RunSpec of parsed ``promptcl run`` arguments; its paths absolute, as Ray Train workers
    run in directories of their own."""
    from promptcl.config import parse_overrides
    from promptcl.engine import RunSpec

    def absolute(path: Optional[str]) -> Optional[str]:
        return None if path is None else str(Path(path).resolve())

    return RunSpec(method=args.method, dataset=args.dataset, seed=args.seed, class_order=args.class_order,
                   backbone=args.backbone,
                   pretrained=args.pretrained, checkpoint_file=absolute(args.checkpoint_file),
                   data_dir=absolute(args.data_dir), split_file=absolute(args.split_file),
                   eval_batch_size=args.eval_batch_size,
                   device=args.device,
                   precision=args.precision, increment=args.increment, preset=args.preset,
                   protocol=args.protocol, loader_workers=args.loader_workers,
                   compile_backbone=args.compile_backbone, validation_fraction=args.validation_fraction,
                   overrides=parse_overrides(args.overrides))


def _run(args) -> int:
    from promptcl.core.feature_store import check_root
    from promptcl.data.benchmarks import EmptyTaskError
    from promptcl.engine import check_local_resources, resolve_run, run_sequence
    from promptcl.storage import check_writable_location, default_mode
    from promptcl.study.trainer import Scaling, fault_from_env

    try:
        spec = run_spec(args)
        run = resolve_run(spec)
        scaling = None
        if args.num_workers is not None:
            from promptcl.study.tuner import check_fits_local_ray, starts_local_ray  # (Tune loads only here)

            scaling = Scaling(num_workers=args.num_workers, use_gpu=args.use_gpu,
                              cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                              max_failures=args.max_failures)
            scaling.check(run)
            fault_from_env()
            if not os.environ.get("RAY_ADDRESS"):  # a local Ray: its workers read this machine's cache
                check_local_resources(run, device=False)
            if starts_local_ray():
                check_fits_local_ray(scaling.group_resources(), f"--num-workers {scaling.num_workers}")
        elif args.use_gpu or args.max_failures or args.cpus_per_worker is not None or args.gpus_per_worker is not None:
            raise ValueError("--use-gpu, --cpus-per-worker, --gpus-per-worker and --max-failures need --num-workers")
        else:
            check_local_resources(run)
        if args.feature_cache is not None:
            check_root(args.feature_cache)
            if "://" not in args.feature_cache:
                args.feature_cache = str(Path(args.feature_cache).resolve())
        if args.out.exists():
            raise ValueError(f"output directory {str(args.out)!r} already exists")
        if not args.out.parent.is_dir():
            state = "is not a directory" if args.out.parent.exists() else "does not exist"
            raise ValueError(f"parent of output directory {str(args.out)!r} {state}")
        check_writable_location("--out", args.out)
    except (ValueError, ImportError) as err:
        return _fail(str(err))
    args.out = args.out.absolute()  # Ray's storage paths must be absolute

    # Work in a sibling temporary directory; only a finished run appears under --out.
    try:
        with _terminate_as_exit():
            tmp = None
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
                tmp.chmod(default_mode(directory=True))  # what --out will be
                progress = sys.stderr.isatty() if args.progress is None else args.progress
                if scaling is None:
                    summary = run_sequence(run, tmp, progress=progress, feature_cache=args.feature_cache)
                else:
                    summary = _run_on_ray(spec, scaling, tmp, progress=progress, feature_cache=args.feature_cache)
                os.replace(tmp, args.out)
            except BaseException:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
    except EmptyTaskError as err:  # found as the run sets up, when the data are read
        return _fail(f"{err}: the data hold only some of {spec.dataset}'s classes")
    print(f"FA {summary['final_average_accuracy']:.2f}  CA {summary['cumulative_average_accuracy']:.2f}  "
          f"FM {summary['forgetting']:.2f}  trainable {summary['trainable_params']:,}  "
          f"test GFLOPs/img {summary['test_flops_per_image'] / 1e9:.4f}"
          + (f"  train TFLOPs/run {summary['train_flops_per_run'] / 1e12:.3f}" if "train_flops_per_run" in summary
             else "") + f"  -> {args.out}")
    return 0


def _run_on_ray(spec, scaling, out: Path, *, progress: bool, feature_cache: Optional[str]) -> dict:
    """The run on Ray Train workers; the reported checkpoints become ``out``'s files."""
    from ray.train import WorkerGroupError

    from promptcl.study.trainer import fault_from_env, make_trainer
    from promptcl.study.tuner import ensure_ray

    ensure_ray()
    storage = out / "ray_storage"
    try:
        result = make_trainer(spec, scaling, name="run", storage_path=str(storage), progress=progress,
                              fault=fault_from_env(), feature_cache=feature_cache).fit()
    except WorkerGroupError as err:  # data short of some classes: the one line the in-process run gives
        raise _data_error(err) or err
    (out / "checkpoints").mkdir()
    for checkpoint, _metrics in result.best_checkpoints:
        with checkpoint.as_directory() as d:
            for f in Path(d).iterdir():
                shutil.copy2(f, out / ("checkpoints" if f.name.startswith("task_") else "") / f.name)
    shutil.rmtree(storage)
    return json.loads((out / "summary.json").read_text())


def _data_error(err) -> Optional[Exception]:
    """The EmptyTaskError a worker raised as it read the data, when that is why its group failed
    (Ray keeps a worker's exception inside a wrapper that carries its traceback)."""
    from promptcl.data.benchmarks import EmptyTaskError

    for failure in err.worker_failures.values():
        cause = getattr(failure, "_base_exc", failure)
        if isinstance(cause, EmptyTaskError):
            return cause
    return None


def _reproduce(args) -> int:
    from promptcl.storage import check_writable_file
    from promptcl.study import reproduce

    results_path = args.results or reproduce.default_results()
    try:
        rows = reproduce.load_manifest(args.manifest or reproduce.DEFAULT_MANIFEST)
        if args.list:
            if args.row_id is not None or args.dry_run:
                raise ValueError("--list takes no ID and no --dry-run")
            entries = reproduce.listing(rows, reproduce.load_results(results_path))
            print(json.dumps(entries, indent=1) if args.json else reproduce.format_table(entries))
            return 0
        if args.row_id is None or args.json:
            raise ValueError("give --list [--json] or a row ID [--dry-run]; `promptcl reproduce --list` shows the ids")
        row = reproduce.find_row(rows, args.row_id)
        if args.dry_run:
            print(reproduce.dry_run_script(row))
            return 0
        plan = reproduce.plan_row(row)
        check_writable_file("--results", results_path)  # fails now, not after the runs
        reproduce.load_results(results_path)
    except ValueError as err:
        return _fail(str(err))
    with _terminate_as_exit():  # a stopped row stops its running seed too
        recorded = reproduce.run_row(row, plan, results_path, reproduce.same_run_rows(rows, row))
    for judged, record in recorded:
        print(reproduce.format_record(judged, record))
    return 1 if recorded[0][1]["status"] == reproduce.NOT_RUN else 0


def _cost(args) -> int:
    import torch

    from promptcl.config import apply_overrides, parse_overrides
    from promptcl.core.backbone import build_backbone, check_backbone_name, input_shape
    from promptcl.cost import measure_cost
    from promptcl.data.benchmarks import dataset_spec
    from promptcl.methods import get_method

    try:
        method_cls = get_method(args.method)
        check_backbone_name(args.backbone)
        if args.dataset is not None:
            dataset_spec(args.dataset)  # an unknown name is an error, not the paper preset
        if args.num_classes < 1 or args.num_tasks < 1 or args.num_classes % args.num_tasks:
            raise ValueError(f"--num-tasks ({args.num_tasks}) must divide --num-classes ({args.num_classes}), "
                             "both >= 1")
        preset = method_cls.preset_for(args.dataset, args.backbone, args.preset, args.num_tasks)
        config = apply_overrides(preset, parse_overrides(args.overrides))
        if args.img_size is not None:
            with torch.device("meta"):
                patch = build_backbone(args.backbone).patch_embed.patch_size[0]
            if args.img_size < patch or args.img_size % patch:
                raise ValueError(f"--img-size must be a positive multiple of {args.backbone}'s patch size {patch}, "
                                 f"got {args.img_size}")
        image_shape = input_shape(args.backbone, args.img_size)
        result = measure_cost(method_cls, config, args.backbone, args.num_classes, image_shape,
                              num_tasks=args.num_tasks)
    except (ValueError, ImportError) as err:
        return _fail(str(err))
    if args.json:
        print(json.dumps(result))
    else:
        lines = [(key if name is None else f"{key}[{name}]", number) for key, value in result.items()
                 for name, number in (value.items() if isinstance(value, dict) else [(None, value)])]
        width = max(len(label) for label, _ in lines)
        for label, number in lines:
            print(f"{label:>{width}}: {number:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
