"""What every benchmark script shares: its arguments checked before any work (argparse's one-line
error, exit 2), a Markdown table on stdout, the figures as JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional


@contextlib.contextmanager
def argument_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """A ValueError raised while the arguments are checked becomes the parser's error (exit 2)."""
    try:
        yield
    except (ValueError, ImportError) as err:
        parser.error(str(err))


def check_arguments(*, methods: Optional[Iterable[str]] = None, seeds: Optional[Iterable[int]] = None,
                    at_least_one: Optional[dict[str, int]] = None, backbone: Optional[str] = None,
                    device: Optional[str] = None, json_path: Optional[Path] = None) -> None:
    """ValueError for what a benchmark could only fail on later: unknown or repeated methods,
    repeated or out-of-range seeds, counts below one, an unknown backbone, a device this machine
    lacks, a JSON file that cannot be written."""
    from promptcl.core.backbone import check_backbone_name
    from promptcl.engine import check_device
    from promptcl.methods import get_method
    from promptcl.storage import check_writable_file

    for flag, value in (at_least_one or {}).items():
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for flag, values in (("--methods", methods), ("--seeds", seeds)):
        values = list(values or ())
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"{flag} names {', '.join(repeated)} more than once")
    for method in methods or ():
        get_method(method)
    for seed in seeds or ():
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32 - 1], got {seed}")
    if backbone is not None:
        check_backbone_name(backbone)
    if device is not None:  # (the scripts hand it to torch.device)
        if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
            raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
        check_device(device)
    if json_path is not None:
        check_writable_file("--json", json_path)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print(" | ".join(header))
    print(" | ".join(["---"] * len(header)))
    for row in rows:
        print(" | ".join(row))


def write_json(report: dict[str, Any], path: Optional[Path]) -> dict[str, Any]:
    """``report`` written to ``path`` (when given), and returned."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    return report
