"""What every benchmark script ends with: a Markdown table on stdout, the figures as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


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
