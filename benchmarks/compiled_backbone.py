"""The frozen backbone's un-prompted pass (task identity, queries): torch.compile'd vs eager.

    python benchmarks/compiled_backbone.py [--backbone vit_base_patch16_224] [--batch 16] [--repeats 5]
                                           [--precision fp32|bf16] [--device cpu|cuda] [--json FILE]

What ``promptcl run --compile-backbone`` swaps in. Both variants are timed in this one run,
interleaved, median of ``--repeats`` after the warm-up (the compiled variant's warm-up is its
compilation, reported separately); random-init weights. Prints the compiled ÷ eager ratio, the
compile seconds, and the largest feature difference between the two.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
from prompted_step import time_interleaved
from report_table import argument_errors, check_arguments, print_table, write_json

from promptcl.core.backbone import build_backbone, encode, input_shape
from promptcl.engine import precision_context


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    with argument_errors(p):
        check_arguments(at_least_one={"--batch": args.batch, "--repeats": args.repeats}, backbone=args.backbone,
                        device=args.device, json_path=args.json)
    device = torch.device(args.device)
    torch.manual_seed(0)
    vit = build_backbone(args.backbone).to(device)
    images = torch.randn(args.batch, *input_shape(args.backbone), device=device)
    eager = functools.partial(encode, vit)
    compiled = torch.compile(eager, dynamic=True)

    def timed(fn):
        def run():
            with torch.inference_mode(), precision_context(device, args.precision):
                out = fn(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out
        return run

    start = time.perf_counter()
    compiled_out = timed(compiled)()  # compilation happens here
    compile_seconds = time.perf_counter() - start
    difference = (compiled_out.float() - timed(eager)().float()).abs().max().item()
    seconds = time_interleaved({"eager": timed(eager), "compiled": timed(compiled)}, args.repeats)
    report = {"backbone": args.backbone, "batch": args.batch, "precision": args.precision, "device": str(device),
              "torch": torch.__version__, "eager_ms": 1e3 * seconds["eager"],
              "compiled_ms": 1e3 * seconds["compiled"], "ratio": seconds["compiled"] / seconds["eager"],
              "compile_seconds": compile_seconds, "max_abs_difference": difference}
    print_table(["backbone", "device", "precision", "batch", "eager ms", "compiled ms", "compiled ÷ eager",
                 "compile s", "max |Δ|"],
                [[args.backbone, str(device), args.precision, str(args.batch), f"{report['eager_ms']:.1f}",
                  f"{report['compiled_ms']:.1f}", f"{report['ratio']:.2f}", f"{compile_seconds:.0f}",
                  f"{difference:.1e}"]])
    return write_json(report, args.json)


if __name__ == "__main__":
    main()
