"""A study's console: one line per trial event and a progress bar; Ray's own output to a log file.

Ray Tune prints a status table every few seconds and Ray forwards every worker's stdout and stderr
to the driver, so a 12-trial study printed hundreds of lines. While a study runs,
:func:`study_console` sends everything written to the process's stdout and stderr (Python streams
and file descriptors, so Ray's C++ messages too) to the study's log file, and gives the study a
:class:`StudyConsole` that writes to the terminal the study started on. :class:`TrialEvents` is the
Tune callback that feeds it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

from ray.tune import Callback

BAR_WIDTH = 24


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def describe_config(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={_value(v)}" for k, v in sorted(config.items()))


class StudyConsole:
    """Trial events as lines, plus (on a terminal) a live bar of trials done, running and time left.

    Off a terminal (a pipe, ``ray job logs``) there is no bar: every event, per-task ones included,
    is a line. On a terminal the per-task events only update the bar, so a 12-trial study fits in
    about a screen."""

    def __init__(self, stream: TextIO, *, total: int, num_tasks: int, live: Optional[bool] = None,
                 clock=time.monotonic) -> None:
        self.stream, self.total, self.num_tasks = stream, total, num_tasks
        self.live = stream.isatty() if live is None else live
        self.clock = clock
        self.start = clock()
        self.started: dict[str, float] = {}
        self.done = self.running = 0
        self.latest = ""  # the last per-task event, shown in the bar
        self.bar_shown = False

    # -- events -----------------------------------------------------------------------------------
    def trial_started(self, trial_id: str, config: dict[str, Any]) -> None:
        self.started.setdefault(trial_id, self.clock())
        self._line(f"trial {trial_id} started" + (f"   {describe_config(config)}" if config else ""))

    def task_done(self, trial_id: str, task: int, average_accuracy: float) -> None:
        text = f"trial {trial_id} task {task}/{self.num_tasks}  avg acc {average_accuracy:.2f}"
        if self.live:
            self.latest = text
            self._bar()
        else:
            self._line(text)

    def trial_finished(self, trial_id: str, metrics: dict[str, Any]) -> None:
        self._forget(trial_id)
        held_out = metrics.get("validation_final_average_accuracy")  # what the study selects on, when it has it
        self._line(f"trial {trial_id} finished  " + (f"val FA {held_out:.2f}  " if held_out is not None else "")
                   + f"FA {metrics['final_average_accuracy']:.2f}  "
                   f"FM {metrics.get('forgetting', float('nan')):.2f}  "
                   f"params {int(metrics['trainable_params']):,}  "
                   f"test FLOPs {metrics['test_flops_per_image'] / 1e6:.2f}M  ({self._took(trial_id)})")

    def trial_stopped(self, trial_id: str, task: int) -> None:
        self._forget(trial_id)
        self._line(f"trial {trial_id} stopped   by the scheduler after task {task}/{self.num_tasks} "
                   f"({self._took(trial_id)})")

    def trial_restarting(self, trial_id: str, task: int) -> None:
        self._line(f"trial {trial_id} restarts  from its checkpoint after task {task}/{self.num_tasks} (a failure)")

    def trial_failed(self, trial_id: str, error: str) -> None:
        self._forget(trial_id)
        self._line(f"trial {trial_id} FAILED    {error}")

    def note(self, text: str) -> None:
        """A line that is not a trial event (the study's plan, where its log is)."""
        if self.bar_shown:
            self.stream.write("\r\x1b[K")
            self.bar_shown = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar_shown:
            self.stream.write("\r\x1b[K")
            self.bar_shown = False
        self.stream.flush()

    def _forget(self, trial_id: str) -> None:
        if self.latest.startswith(f"trial {trial_id} "):
            self.latest = ""

    # -- drawing ----------------------------------------------------------------------------------
    def _took(self, trial_id: str) -> str:
        return _duration(self.clock() - self.started.get(trial_id, self.start))

    def _prefix(self) -> str:
        width = len(str(self.total))
        return f"[{self.done:>{width}}/{self.total}]"

    def _line(self, text: str) -> None:
        if self.bar_shown:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"{self._prefix()} {text}\n")
        self.bar_shown = False
        if self.live:
            self._bar()
        self.stream.flush()

    def status(self) -> str:
        """The bar's text: trials done and running, time so far and left."""
        filled = BAR_WIDTH * self.done // max(1, self.total)
        elapsed = self.clock() - self.start
        left = (f"~{_duration(elapsed / self.done * (self.total - self.done))} left" if 0 < self.done < self.total
                else "")
        parts = [f"{self.done}/{self.total} trials", f"{self.running} running", _duration(elapsed), left, self.latest]
        return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] " + " · ".join(p for p in parts if p)

    def _bar(self) -> None:
        self.stream.write("\r\x1b[K" + self.status())
        self.bar_shown = True
        self.stream.flush()


# The console of the study running in this process. Tune pickles its callbacks with the study's
# state (a resumed study gets them back), so the callback finds the console here, not in a field.
_ACTIVE: Optional[StudyConsole] = None


class TrialEvents(Callback):
    """Feeds Tune's trial events to the active :class:`StudyConsole` (if any)."""

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trials, lambda c: c.trial_started(trial.trial_id, trial.config), starting=trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "final_average_accuracy" not in result and "average_accuracy" in result:
            self._update(trials, lambda c: c.task_done(trial.trial_id, int(result["task"]),
                                                      result["average_accuracy"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if "final_average_accuracy" in last:
            self._update(trials, lambda c: c.trial_finished(trial.trial_id, last), finished=trial)
        else:
            self._update(trials, lambda c: c.trial_stopped(trial.trial_id, int(last.get("task", 0))),
                         finished=trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        task = int((trial.last_result or {}).get("task", 0))
        self._update(trials, lambda c: c.trial_restarting(trial.trial_id, task))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trials, lambda c: c.trial_failed(trial.trial_id, _error_summary(trial.error_file)),
                     finished=trial)

    @staticmethod
    def _update(trials, event, finished=None, starting=None) -> None:
        console = _ACTIVE
        if console is None:
            return
        # Tune calls back before it sets the trial's new status: count it as started or done already.
        done = sum(t.status in ("TERMINATED", "ERROR") or t is finished for t in trials)
        running = sum((t.status == "RUNNING" or t is starting) and t is not finished for t in trials)
        console.done, console.running = done, running
        event(console)


def _error_summary(error_file: Optional[str]) -> str:
    """The exception line of a failed trial's traceback, and where the whole traceback is."""
    if not error_file:
        return "(no error file)"
    try:
        lines = [line for line in Path(error_file).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return f"{lines[-1].strip() if lines else ''}  (traceback: {error_file})"


def _fileno(stream) -> Optional[int]:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


@contextlib.contextmanager
def study_console(log_path: Path, *, total: int, num_tasks: int, verbose: bool = False) -> Iterator[StudyConsole]:
    """Run a study's body with a :class:`StudyConsole` on the current stdout, and (unless
    ``verbose``) everything else the process writes to stdout and stderr appended to ``log_path``."""
    global _ACTIVE
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    out_fd = None if verbose else _fileno(sys.stdout)
    # The console writes where stdout pointed before the redirection: a copy of its descriptor
    # (a terminal, a pipe), or the Python stream itself when it has none (e.g. a test's capture)
    # or is not redirected.
    console_stream = os.fdopen(os.dup(out_fd), "w", buffering=1) if out_fd is not None else sys.stdout
    console = StudyConsole(console_stream, total=total, num_tasks=num_tasks)
    saved_streams = (sys.stdout, sys.stderr)
    saved_fds: list[tuple[int, int]] = []
    log = None
    try:
        if not verbose:
            log = open(log_path, "a", buffering=1)
            log.write(f"\n===== study started {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
            for fd in (1, 2):  # what C/C++ code (Ray's core) writes there, whatever sys.stdout is
                with contextlib.suppress(OSError):  # a closed descriptor has nothing to redirect
                    saved_fds.append((fd, os.dup(fd)))
                    os.dup2(log.fileno(), fd)
            sys.stdout = sys.stderr = log
            _ray_worker_logs(True)  # an earlier study in this process turned them off
        _ACTIVE = console
        yield console
    finally:
        _ACTIVE = None
        console.close()
        if log is not None:
            _ray_worker_logs(False)
            sys.stdout, sys.stderr = saved_streams
            for fd, copy in saved_fds:
                os.dup2(copy, fd)
                os.close(copy)
            log.close()
        if console_stream is not saved_streams[0]:
            console_stream.close()


def _ray_worker_logs(enabled: bool) -> None:
    """Worker lines still in flight when a study ends would land after its final table; Ray's own
    switch (the one its debugger uses) keeps them in Ray's session logs instead, until the next study."""
    import ray._private.worker

    ray._private.worker._worker_logs_enabled = enabled
