"""Reproduction of published numbers: a manifest of rows (one published number each) and their results.

A row names the paper's value, a tolerance and the exact ``promptcl run`` command with a ``{seed}``
placeholder; a published number is a mean over seeds, so running a row runs one command per seed,
averages the seeds' ``summary.json`` metric and judges the mean against the published value.
Measured values go to a results file, never into the manifest, so the manifest stays what the
papers say. REPRODUCIBILITY.md explains the data, checkpoints and the tolerance rule.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional

from promptcl.storage import default_mode

DEFAULT_MANIFEST = Path(__file__).with_name("reproduction.json")

REPRODUCED, GAP, NOT_RUN = "reproduced", "gap", "not run"
# summary.json key of each metric a row can name
METRIC_KEYS = {"FA": "final_average_accuracy", "CA": "cumulative_average_accuracy", "FM": "forgetting"}
REQUIRED_FIELDS = ("id", "source", "method", "benchmark", "tasks", "backbone", "metric", "published",
                   "published_std", "tolerance", "seeds", "preset", "command", "status", "notes")
SEED_PLACEHOLDER = "{seed}"
_ENV_REFERENCE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def load_manifest(path: Path = DEFAULT_MANIFEST) -> list[dict]:
    """The manifest's rows, checked enough that a bad edit fails here rather than mid-run."""
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the reproduction manifest {str(path)!r}: {err}") from err
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"the reproduction manifest {str(path)!r} must hold {{\"rows\": [<row object>, ...]}}")
    seen: set[str] = set()
    for row in rows:
        missing = [key for key in REQUIRED_FIELDS if key not in row]
        if missing:
            raise ValueError(f"manifest row {row.get('id', '?')!r} lacks {', '.join(missing)}")
        _check_row(row)
        if row["id"] in seen:
            raise ValueError(f"manifest row id {row['id']!r} appears twice")
        seen.add(row["id"])
    return rows


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_row(row: dict) -> None:
    """The fields a row's run and judgement read, with the types they are read as."""
    def bad(message: str) -> ValueError:
        return ValueError(f"manifest row {row['id']!r}: {message}")

    if not isinstance(row["id"], str) or not row["id"]:
        raise ValueError(f"manifest row id {row['id']!r} must be a non-empty string")
    if row["metric"] not in METRIC_KEYS:
        raise bad(f"metric {row['metric']!r} is not one of {list(METRIC_KEYS)}")
    if not _is_number(row["published"]):
        raise bad(f"published must be a number, got {row['published']!r}")
    if row["published_std"] is not None and not (_is_number(row["published_std"]) and row["published_std"] >= 0):
        raise bad(f"published_std must be a number >= 0 or null, got {row['published_std']!r}")
    if not (_is_number(row["tolerance"]) and row["tolerance"] >= 0):
        raise bad(f"tolerance must be a number >= 0, got {row['tolerance']!r}")
    seeds = row["seeds"]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds)):
        raise bad(f"seeds must be a non-empty list of integers in [0, 2**32 - 1], got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise bad(f"seeds {seeds} repeat a seed (the published mean is over distinct runs)")
    if not isinstance(row["command"], str) or SEED_PLACEHOLDER not in row["command"]:
        raise bad(f"the command must be a string with {SEED_PLACEHOLDER}")
    try:
        out = _option(shlex.split(row["command"]), "--out")
    except ValueError as err:
        raise bad(str(err)) from None
    if len(seeds) > 1 and SEED_PLACEHOLDER not in out:
        raise bad(f"--out {out!r} lacks {SEED_PLACEHOLDER}: every seed's run needs its own output directory")


def find_row(rows: list[dict], row_id: str) -> dict:
    for row in rows:
        if row["id"] == row_id:
            return row
    raise ValueError(f"unknown row id {row_id!r}; `promptcl reproduce --list` shows the ids")


def seed_commands(row: dict) -> list[str]:
    """One shell command per seed, environment variables left for the shell (or the runner) to expand."""
    return [row["command"].replace(SEED_PLACEHOLDER, str(seed)) for seed in row["seeds"]]


def dry_run_script(row: dict) -> str:
    """A shell script for the row: ``promptcl run`` needs the parent of ``--out`` to exist, hence the mkdir."""
    commands = seed_commands(row)
    parents = dict.fromkeys(str(Path(_option(shlex.split(c), "--out")).parent) for c in commands)
    return "\n".join([f"mkdir -p {' '.join(shlex.quote(p) for p in parents)}", *commands])


def _option(tokens: list[str], name: str) -> str:
    """The value of ``name`` in ``tokens``, given as ``name value`` or ``name=value``."""
    for i, token in enumerate(tokens):
        if token == name and i + 1 < len(tokens):
            return tokens[i + 1]
        if token.startswith(f"{name}="):
            return token[len(name) + 1:]
    raise ValueError(f"command {' '.join(tokens)!r} has no {name} value")


def parse_run_command(tokens: list[str]):
    """The ``promptcl run`` arguments of a command, parsed by promptcl's own parser."""
    from promptcl.cli import _parser

    if tokens[:2] != ["promptcl", "run"]:
        raise ValueError(f"command {shlex.join(tokens)!r} is not a `promptcl run` command")
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return _parser().parse_args(tokens[1:])
    except SystemExit:
        message = errors.getvalue().strip().splitlines()
        raise ValueError(f"command {shlex.join(tokens)!r} does not parse: {message[-1] if message else ''}") from None


def plan_row(row: dict) -> list[tuple[int, list[str], Path]]:
    """(seed, argv with the environment expanded, output dir) per seed, after checking the
    environment variables the commands name and resolving every seed's run as ``promptcl run``
    does (method, preset, the benchmark's files, the backbone and its checkpoint file), so a row
    fails in seconds, not after hours of another seed."""
    from promptcl.cli import run_spec
    from promptcl.engine import check_local_resources, resolve_run, same_configuration

    plan = []
    for seed, command in zip(row["seeds"], seed_commands(row)):
        tokens = shlex.split(command)
        for token in tokens:
            for name in _ENV_REFERENCE.findall(token):
                if not os.environ.get(name):
                    raise ValueError(f"row {row['id']!r} needs ${name}, which is not set (see REPRODUCIBILITY.md)")
        argv = [os.path.expandvars(token) for token in tokens]
        args = parse_run_command(argv)
        if args.seed != seed:
            raise ValueError(f"row {row['id']!r}: the command runs --seed {args.seed}, not the row's seed {seed} "
                             f"(give --seed {SEED_PLACEHOLDER})")
        if args.data_dir is not None and not Path(args.data_dir).is_dir():
            raise ValueError(f"row {row['id']!r}: data directory {args.data_dir!r} does not exist")
        try:
            resolved = resolve_run(run_spec(args))
            check_local_resources(resolved)  # (the device, the backbone's weights)
        except ValueError as err:
            raise ValueError(f"row {row['id']!r}, seed {seed}: {err}") from None
        summary = Path(args.out) / "summary.json"
        if summary.is_file():  # a seed already run is reused only if it ran this very configuration
            if not same_configuration(json.loads(summary.read_text()).get("config") or {}, resolved):
                raise ValueError(f"row {row['id']!r}: {summary} holds a run of another configuration than the "
                                 "row's command; remove its directory to rerun that seed")
        elif Path(args.out).exists():  # `promptcl run` would refuse it, after the seeds before it
            raise ValueError(f"row {row['id']!r}, seed {seed}: {args.out} exists and holds no finished run "
                             "(no summary.json); remove it to run that seed")
        plan.append((seed, argv, Path(args.out)))
    return plan


def same_run_rows(rows: list[dict], row: dict) -> list[dict]:
    """The other rows of ``row``'s run (its other metrics): the same command, hence the same output."""
    return [r for r in rows if r["command"] == row["command"] and r["id"] != row["id"]]


def run_row(row: dict, plan: list[tuple[int, list[str], Path]], results_path: Path,
            same_run: Iterable[dict] = ()) -> list[tuple[dict, dict]]:
    """Run each seed whose output has no summary.json yet (so an interrupted row resumes), then
    record the per-seed metric, their mean and the status in the results file, for the row and for
    the rows of the same run (``same_run``: its other metrics). Returns (row, record) pairs."""
    summaries: dict[str, dict] = {}
    error = None
    for seed, argv, out in plan:
        summary = out / "summary.json"
        if summary.is_file():
            print(f"{row['id']}: seed {seed}: reusing {summary}", file=sys.stderr, flush=True)
        else:
            print(f"{row['id']}: seed {seed}: {shlex.join(argv)}", file=sys.stderr, flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            # The same program as the command's `promptcl`, with this interpreter (PATH may lack the venv).
            code = _run_child([sys.executable, "-m", "promptcl.cli", *argv[1:]])
            if code != 0 or not summary.is_file():
                error = f"seed {seed} exited with code {code} without {summary}"
                break
        summaries[str(seed)] = json.loads(summary.read_text())
    recorded = []
    for judged in (row, *same_run):
        per_seed = {seed: float(s[METRIC_KEYS[judged["metric"]]]) for seed, s in summaries.items()}
        record = judge(judged, per_seed, error)
        write_result(results_path, judged["id"], record)
        recorded.append((judged, record))
    return recorded


def _run_child(argv: list[str]) -> int:
    """Run a seed's ``promptcl run``; if this process is stopped meanwhile (Ctrl-C, SIGTERM), the
    child gets SIGTERM, so it removes its unfinished output as a stopped run does, and is waited for."""
    child = subprocess.Popen(argv)
    try:
        return child.wait()
    except BaseException:
        child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise


def judge(row: dict, per_seed: dict[str, float], error: Optional[str] = None) -> dict:
    """The row's result: a published number is a mean over all its seeds, so fewer seeds is ``not run``."""
    complete = error is None and len(per_seed) == len(row["seeds"])
    measured = statistics.fmean(per_seed.values()) if complete else None
    if measured is None:
        status = NOT_RUN
    else:
        status = REPRODUCED if abs(measured - row["published"]) <= row["tolerance"] + 1e-9 else GAP
    record = {
        "metric": row["metric"], "per_seed": per_seed, "measured": measured,
        "measured_std": statistics.stdev(per_seed.values()) if complete and len(per_seed) > 1 else None,
        "published": row["published"], "tolerance": row["tolerance"], "status": status,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {name: _version(name) for name in ("promptcl", "torch", "timm")},
    }
    if error is not None:
        record["error"] = error
    return record


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def default_results() -> Path:
    """The results file under the runs directory ($PROMPTCL_RUNS_DIR, else ./runs)."""
    from promptcl.study.tracking import default_runs_dir

    return default_runs_dir() / "reproduce" / "results.json"


def load_results(path: Path) -> dict[str, dict]:
    """Recorded results by row id; none yet is an empty dict."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["rows"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the results file {str(path)!r}: {err}") from err


def write_result(path: Path, row_id: str, record: dict) -> None:
    """Replace the row's record; written to a temporary file and renamed so a crash never leaves half a file."""
    path = Path(path)
    results = load_results(path)
    results[row_id] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, default_mode(directory=False))
        with os.fdopen(fd, "w") as f:
            json.dump({"schema": 1, "rows": results}, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def listing(rows: list[dict], results: dict[str, dict]) -> list[dict]:
    """The manifest rows with their concrete commands and, where recorded, the measured result."""
    entries = []
    for row in rows:
        result = results.get(row["id"], {})
        commands = seed_commands(row)
        entries.append({**row, "command": commands[0], "commands": commands,
                        "status": result.get("status", row["status"]), "measured": result.get("measured"),
                        "measured_per_seed": result.get("per_seed"), "date": result.get("date")})
    return entries


def format_table(entries: list[dict]) -> str:
    width = max([len("id")] + [len(e["id"]) for e in entries])
    lines = [f"{'id':<{width}}  metric  {'published':<14}  {'tol':>4}  {'measured':>8}  status"]
    for e in entries:
        std = e["published_std"]
        published = f"{e['published']:.2f}" + ("" if std is None else f" +- {std:.2f}")
        measured = "-" if e["measured"] is None else f"{e['measured']:.2f}"
        lines.append(f"{e['id']:<{width}}  {e['metric']:<6}  {published:<14}  {e['tolerance']:>4.2f}  "
                     f"{measured:>8}  {e['status']}")
    counts = {status: sum(e["status"] == status for e in entries) for status in (REPRODUCED, GAP, NOT_RUN)}
    lines.append(f"{len(entries)} rows: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    return "\n".join(lines)


def format_record(row: dict, record: dict) -> str:
    seeds = "  ".join(f"seed {seed} {value:.2f}" for seed, value in record["per_seed"].items())
    if record["measured"] is None:
        finished = f"; finished: {seeds}" if seeds else ""
        return f"{row['id']}: {record['status']} ({record.get('error', 'incomplete')}){finished}"
    return (f"{row['id']}: {row['metric']} {record['measured']:.2f} ({seeds}); published {row['published']:.2f}, "
            f"tolerance {row['tolerance']:.2f} -> {record['status']}")
