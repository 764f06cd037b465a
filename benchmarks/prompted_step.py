"""Prompted vs plain ViT, per method: the test forward and the train step, per prefix-attention path.

    python benchmarks/prompted_step.py [--backbone vit_base_patch16_224] [--batch 16] [--repeats 2]
                                       [--methods smope norga ...] [--json runs/benchmarks/prompted_step.json]
                                       [--device cuda] [--bf16]

Every variant is timed in this one run, interleaved (each repeat times every variant of every method
once, so drift hits all alike), median of ``--repeats`` after a warm-up; random-init weights (speed does not depend
on them). Ratios:

- ``test FLOPs``: the method's counted test FLOPs per image ÷ one plain backbone pass (no timing).
- ``forward``: the method's test forward (``logits``, inference mode) ÷ a plain frozen forward,
  and ``per pass``: the same ÷ (its backbone passes × the plain forward) (query-based methods make
  a frozen query pass before the prompted one).
- ``train step``: the method's first-task loss and backward (the backbone frozen) ÷ a plain timm
  fine-tuning step (forward, cross-entropy, backward into every weight) on the same batch.
- For gated or token-shared prefixes (NoRGa, SMoPE) one row per path: ``eager`` (the explicit
  softmax, the reference), ``fused`` (one SDPA call over widened heads) and ``merged`` (the token
  columns through the flash kernel, merged exactly with the prefix columns); ``auto``, the default,
  is ``merged`` on the CPU and ``fused`` elsewhere. Methods whose prompts are plain prefixes (linear
  gate) take the same SDPA path in all, so they are timed once (``sdpa``).
- ``--clock kernels`` (CUDA): each call is timed as the GPU's summed kernel time (profiler) instead
  of wall time; at small batches a GPU waits on the host's kernel launches, and wall-time ratios
  then count kernels rather than arithmetic.
- ``--bf16``: each method's test forward and train step also under bf16 autocast on each row's path
  (not ``eager``), and ``bf16 speed-up`` = the fp32 eager step ÷ that bf16 step (the GPU target is at
  least 2×);
  the bf16 forward and step are also divided by a plain forward and fine-tuning step under the same
  autocast (the GPU target for the forward: at most 1.10× per pass); for NoRGa and SMoPE a
  ``verdict:`` line says which path is fastest there and whether it meets that target.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from report_table import argument_errors, check_arguments, print_table, write_json

from promptcl.core import attention
from promptcl.core.backbone import build_backbone, encode, input_shape
from promptcl.cost import measure_cost
from promptcl.engine import precision_context
from promptcl.methods import get_method, method_names
from promptcl.methods.base import TaskInfo


def uses_gated_prefix(forward: Callable[[], object]) -> bool:
    """Whether a forward goes through the gated / token-shared prefix path (where the paths
    differ), found by counting calls of that path's reference function under ``eager``."""
    calls = []
    real = attention._eager_prefix_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    attention._eager_prefix_attention = counting
    try:
        with torch.inference_mode(), attention.prefix_attention_impl("eager"):
            forward()
    finally:
        attention._eager_prefix_attention = real
    return bool(calls)


def wall_seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def kernel_seconds(fn: Callable[[], None]) -> float:
    """Seconds the GPU spent in kernels during ``fn`` (PyTorch's profiler, CUPTI): the device's own
    work, without the gaps while the host launches the next kernel."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    busy = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6
    if busy <= 0:
        raise RuntimeError("the profiler saw no CUDA kernel")
    return busy


def print_profile(title: str, fn: Callable[[], None], device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n{title}\n{prof.key_averages().table(sort_by=sort_by, row_limit=12)}")


def time_interleaved(variants: dict[str, Callable[[], None]], repeats: int,
                     clock: Callable[[Callable[[], None]], float] = wall_seconds) -> dict[str, float]:
    """Median seconds per call of each variant, by ``clock``."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(repeats):
        for key, fn in variants.items():
            times[key].append(clock(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="also time bf16 forwards and steps on each path but eager")
    p.add_argument("--clock", choices=("wall", "kernels"), default="wall",
                   help="kernels (CUDA only): the GPU's summed kernel time per call, without host launch gaps")
    p.add_argument("--profile", action="store_true",
                   help="also print the 12 costliest operators (kernels on CUDA) of the plain forward and of each "
                        "method's forward (bf16 with --bf16), for finding where a prompted pass spends its excess")
    args = p.parse_args(argv)
    if args.clock == "kernels" and not args.device.startswith("cuda"):
        p.error("--clock kernels needs a CUDA device")
    with argument_errors(p):
        check_arguments(methods=args.methods, at_least_one={"--batch": args.batch, "--repeats": args.repeats},
                        backbone=args.backbone, device=args.device, json_path=args.json)
    methods = args.methods or list(method_names())
    num_tasks, classes_per_task = 10, 10
    device = torch.device(args.device)

    torch.manual_seed(0)
    vit = build_backbone(args.backbone, pretrained=False).eval().to(device)
    x = torch.randn(args.batch, *input_shape(args.backbone), device=device)
    labels = torch.randint(0, classes_per_task, (args.batch,), device=device)

    tuned = build_backbone(args.backbone, pretrained=False).train().to(device)  # the plain fine-tuning step's model
    tuned.requires_grad_(True)
    head = torch.nn.Linear(tuned.num_features, num_tasks * classes_per_task).to(device)

    def plain_forward() -> None:
        with torch.inference_mode():
            encode(vit, x)

    def plain_step() -> None:
        loss = torch.nn.functional.cross_entropy(head(encode(tuned, x)), labels)
        loss.backward()
        tuned.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)

    variants: dict[str, Callable[[], None]] = {"plain forward": plain_forward, "plain step": plain_step}
    if args.bf16:  # the bf16 prompted passes are also compared with bf16 plain ones
        variants["plain bf16 forward"] = lambda: _with_impl("auto", plain_forward, device, "bf16")
        variants["plain bf16 step"] = lambda: _with_impl("auto", plain_step, device, "bf16")
    timed = []  # (method, its class, impls, trains)
    for name in methods:
        cls = get_method(name)
        torch.manual_seed(0)
        preset = cls.preset_for("digits" if args.backbone == "vit_digits" else None)  # a config that fits
        method = cls(preset, backbone=vit, num_classes=num_tasks * classes_per_task, num_tasks=num_tasks).to(device)
        task = TaskInfo(index=0, classes=range(0, classes_per_task), num_tasks=num_tasks)
        method.begin_task(task)
        phases = method.phases(task)  # none for a method that does not train (SimpleCIL)
        method.train()
        method.backbone.eval()

        def forward(method=method) -> None:
            with torch.inference_mode():
                method.logits(x)

        def step(method=method, task=task, phases=phases) -> None:
            loss, _ = method.training_loss(x, labels, task, phases[0])
            loss.backward()
            method.zero_grad(set_to_none=True)

        flops = measure_cost(cls, preset, args.backbone, num_tasks * classes_per_task, input_shape(args.backbone),
                             num_tasks=num_tasks)
        flops_ratio = flops["test_flops_per_image"] / flops["backbone_flops_per_image"]
        impls = ("eager", "fused", "merged") if uses_gated_prefix(forward) else ("auto",)
        for impl in impls:
            variants[f"{name} {impl} forward"] = lambda impl=impl, forward=forward: _with_impl(impl, forward)
            if phases:
                variants[f"{name} {impl} step"] = lambda impl=impl, step=step: _with_impl(impl, step)
            if args.bf16 and impl != "eager":
                variants[f"{name} {impl} bf16 forward"] = (
                    lambda impl=impl, forward=forward: _with_impl(impl, forward, device, "bf16"))
                if phases:
                    variants[f"{name} {impl} bf16 step"] = (
                        lambda impl=impl, step=step: _with_impl(impl, step, device, "bf16"))
        timed.append((name, cls, impls, bool(phases), flops_ratio))
    if device.type == "cuda":  # time the kernels, not their launch
        variants = {k: lambda fn=fn: (fn(), torch.cuda.synchronize()) for k, fn in variants.items()}
    seconds = time_interleaved(variants, args.repeats, kernel_seconds if args.clock == "kernels" else wall_seconds)
    if args.profile:
        suffix = " bf16" if args.bf16 else ""
        for key in ["plain bf16 forward" if args.bf16 else "plain forward",
                    *(f"{name} {impl}{suffix} forward" for name, _, impls, *_ in timed for impl in impls
                      if impl != "eager")]:
            print_profile(key, variants[key], device)

    rows = []
    for name, cls, impls, trains, flops_ratio in timed:
        for impl in impls:
            forward_ratio = seconds[f"{name} {impl} forward"] / seconds["plain forward"]
            row = {"method": name, "path": impl if len(impls) > 1 else "sdpa", "passes": cls.TEST_PASSES,
                   "test_flops_ratio": flops_ratio,
                   "forward_ratio": forward_ratio, "per_pass_ratio": forward_ratio / cls.TEST_PASSES,
                   "step_ratio": seconds[f"{name} {impl} step"] / seconds["plain step"] if trains else None}
            rows.append(row)
            if not args.bf16 or impl == "eager":
                continue
            # fp32 eager (the reference's arithmetic) over this path in bf16, forward and step
            bf16 = f"{name} {impl} bf16"
            row["bf16_forward_speedup"] = seconds[f"{name} {impls[0]} forward"] / seconds[f"{bf16} forward"]
            row["bf16_step_speedup"] = (seconds[f"{name} {impls[0]} step"] / seconds[f"{bf16} step"]
                                        if trains else None)
            # and the bf16 prompted pass over the bf16 plain one (the GPU forward target: at most 1.10x per pass)
            bf16_forward_ratio = seconds[f"{bf16} forward"] / seconds["plain bf16 forward"]
            row["bf16_forward_ratio"] = bf16_forward_ratio
            row["bf16_per_pass_ratio"] = bf16_forward_ratio / cls.TEST_PASSES
            row["bf16_step_ratio"] = seconds[f"{bf16} step"] / seconds["plain bf16 step"] if trains else None

    report = {"backbone": args.backbone, "batch": args.batch, "repeats": args.repeats, "device": str(device),
              "clock": args.clock,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "plain_forward_ms": seconds["plain forward"] * 1e3, "plain_step_ms": seconds["plain step"] * 1e3,
              "rows": rows, "times_ms": {variant: s * 1e3 for variant, s in seconds.items()}}  # what each ratio divides
    if args.bf16:
        report["plain_bf16_forward_ms"] = seconds["plain bf16 forward"] * 1e3
        report["plain_bf16_step_ms"] = seconds["plain bf16 step"] * 1e3
    print(f"{args.backbone}, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{device}, "
          f"{'GPU kernel time' if args.clock == 'kernels' else 'wall time'}, "
          f"median of {args.repeats}; plain forward {report['plain_forward_ms']:.1f} ms, "
          f"plain fine-tuning step {report['plain_step_ms']:.1f} ms")
    # merged without its kernel runs fused: say so where a column's precision has none (fp32 on CUDA)
    head_dim = vit.blocks[0].attn.head_dim
    fused_in = [name for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
                if (name == "fp32" or args.bf16) and not attention.merged_has_kernel(device, dtype, head_dim)]
    report["merged_runs_fused_in"] = fused_in
    if any(r["path"] == "merged" for r in rows) and fused_in:
        print(f"merged* has no flash kernel here in {' and '.join(fused_in)}: those columns of its rows time fused")
    header = ["method", "path", "passes", "test FLOPs ÷ plain", "forward ÷ plain", "per pass",
              "train step ÷ plain fine-tuning step"]
    table = [[r["method"], r["path"] + ("*" if r["path"] == "merged" and fused_in else ""), str(r["passes"]),
              f"{r['test_flops_ratio']:.3f}x",
              f"{r['forward_ratio']:.2f}x", f"{r['per_pass_ratio']:.2f}x",
              f"{r['step_ratio']:.2f}x" if r["step_ratio"] is not None else "– (no training)"] for r in rows]
    if args.bf16:
        print(f"bf16 autocast: plain forward {report['plain_bf16_forward_ms']:.1f} ms, "
              f"plain fine-tuning step {report['plain_bf16_step_ms']:.1f} ms")
        header += ["bf16: forward ÷ bf16 plain", "per pass", "step ÷ bf16 plain step",
                   "bf16 speed-up: forward", "step (fp32 eager ÷ this path in bf16)"]
        for r, cells in zip(rows, table):
            figures = [r.get(k) for k in ("bf16_forward_ratio", "bf16_per_pass_ratio", "bf16_step_ratio",
                                          "bf16_forward_speedup", "bf16_step_speedup")]
            cells += [f"{f:.2f}x" if f is not None else "–" for f in figures]
        for line in bf16_verdicts(rows):
            print(line)
    print_table(header, table)
    return write_json(report, args.json)


GPU_FORWARD_TARGET = 1.10  # the bound on a bf16 prompted pass ÷ a bf16 plain pass, on a GPU


def bf16_verdicts(rows: list[dict]) -> list[str]:
    """One line per method timed on several prefix paths in bf16: each path's bf16 forward per pass,
    the fastest, and whether it meets the GPU target (which path ``auto`` should take there)."""
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        figures = {r["path"]: r["bf16_per_pass_ratio"] for r in rows
                   if r["method"] == method and r.get("bf16_per_pass_ratio") is not None}
        if len(figures) < 2:
            continue
        fastest = min(figures, key=figures.get)
        meets = "meets" if figures[fastest] <= GPU_FORWARD_TARGET else "misses"
        lines.append(f"verdict: {method} bf16 forward per pass: "
                     + ", ".join(f"{path} {ratio:.2f}x" for path, ratio in figures.items())
                     + f"; fastest {fastest} ({meets} <= {GPU_FORWARD_TARGET:.2f}x)")
    return lines


def _with_impl(impl: str, fn: Callable[[], None], device: torch.device = torch.device("cpu"),
               precision: str = "fp32") -> None:
    with attention.prefix_attention_impl(impl), precision_context(device, precision):
        fn()


if __name__ == "__main__":
    main()
