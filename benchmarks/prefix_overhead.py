"""Prompted vs plain forward: the cost of SMoPE's sparse prefix experts, measured side by side.

    python benchmarks/prefix_overhead.py [--backbones vit_digits vit_base_patch16_224] [--repeats 15]

For each backbone, times (interleaved, median of --repeats) a plain frozen forward, SMoPE's sparse
forward (top-k experts) and its dense forward (all experts), in inference mode, and prints the
ratios to the plain pass. Random-init weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from promptcl.core.backbone import build_backbone, encode, input_shape
from promptcl.core.experts import Routing
from promptcl.methods import get_method


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["vit_digits", "vit_base_patch16_224"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 8])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    smope = get_method("smope")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print("backbone | batch | plain ms | sparse ms (ratio) | dense ms (ratio)")
    for name, batch in zip(args.backbones, args.batch_sizes):
        torch.manual_seed(0)
        vit = build_backbone(name)
        preset = smope.PRESETS["digits" if name == "vit_digits" else "paper"]
        method = smope(preset, backbone=vit, num_classes=10, num_tasks=5).eval()
        x = torch.randn(batch, *input_shape(name))
        runs = {
            "plain": lambda: encode(vit, x),
            "sparse": lambda: method.features(x, mode="sparse", routing=Routing()),
            "dense": lambda: method.features(x, mode="dense", routing=Routing()),
        }
        times = {k: [] for k in runs}
        with torch.inference_mode():
            for fn in runs.values():
                fn()  # warm-up
            for _ in range(args.repeats):
                for key, fn in runs.items():  # interleaved, so drift hits every variant alike
                    start = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - start)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{name} | {batch} | {med['plain']:.1f} | {med['sparse']:.1f} ({med['sparse'] / med['plain']:.2f}x) | "
              f"{med['dense']:.1f} ({med['dense'] / med['plain']:.2f}x)")


if __name__ == "__main__":
    main()
