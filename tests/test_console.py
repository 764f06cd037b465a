"""The study console: trial events as lines, a live bar on terminals, everything else to the log."""

import io
import subprocess
import sys
import textwrap

from promptcl.study.console import StudyConsole


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


COST = {"final_average_accuracy": 81.234, "forgetting": 4.5, "trainable_params": 12345.0,
        "test_flops_per_image": 4.78e6}


def test_off_a_terminal_every_event_is_one_line_with_the_count_of_finished_trials():
    clock, out = Clock(), io.StringIO()
    console = StudyConsole(out, total=3, num_tasks=5, live=False, clock=clock)
    console.trial_started("a", {"top_k": 2, "noise_scale": 0.123456})
    clock.now = 10
    console.task_done("a", 1, 97.5)
    clock.now = 75
    console.done = 1
    console.trial_finished("a", COST)
    console.trial_stopped("b", 2)
    console.trial_failed("c", "RuntimeError: boom  (traceback: /x/error.txt)")
    console.trial_finished("d", {**COST, "validation_final_average_accuracy": 79.5})
    console.close()
    assert out.getvalue().splitlines() == [
        "[0/3] trial a started   noise_scale=0.123 top_k=2",
        "[0/3] trial a task 1/5  avg acc 97.50",
        "[1/3] trial a finished  FA 81.23  FM 4.50  params 12,345  test FLOPs 4.78M  (1m15s)",
        "[1/3] trial b stopped   by the scheduler after task 2/5 (1m15s)",
        "[1/3] trial c FAILED    RuntimeError: boom  (traceback: /x/error.txt)",
        "[1/3] trial d finished  val FA 79.50  FA 81.23  FM 4.50  params 12,345  test FLOPs 4.78M  (1m15s)",
    ]
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()  # a log file stays readable


def test_on_a_terminal_task_events_only_redraw_the_bar_which_estimates_the_time_left():
    clock, out = Clock(), io.StringIO()
    console = StudyConsole(out, total=4, num_tasks=5, live=True, clock=clock)
    console.running = 2
    console.trial_started("a", {"top_k": 1})
    console.task_done("a", 1, 97.5)
    assert "trial a task 1/5" in console.status() and "2 running" in console.status()
    clock.now = 120
    console.done, console.running = 1, 1
    console.trial_finished("a", COST)
    # one of four done in two minutes: six more minutes at that pace; the finished trial's task
    # event is gone from the bar
    assert console.status() == "[######..................] 1/4 trials · 1 running · 2m00s · ~6m00s left"
    console.close()
    lines = [line.rsplit("\x1b[K", 1)[-1] for line in out.getvalue().split("\n")]
    assert [line for line in lines if line.startswith("[1/4]") or line.startswith("[0/4]")] == [
        "[0/4] trial a started   top_k=1", "[1/4] trial a finished  FA 81.23  FM 4.50  params 12,345  "
        "test FLOPs 4.78M  (2m00s)"]
    assert out.getvalue().endswith("\r\x1b[K")  # the bar is cleared when the study ends


def test_study_console_sends_python_and_descriptor_output_to_the_log_and_restores_both(tmp_path):
    """In a real process: print(), sys.stderr and raw writes to descriptors 1 and 2 (as Ray's C++
    logging does) go to the log; the console's lines go to the original stdout; afterwards stdout
    is back."""
    log = tmp_path / "study.log"
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from promptcl.study.console import study_console
        print("before")
        with study_console(Path({str(log)!r}), total=1, num_tasks=2) as console:
            print("python stdout")
            print("python stderr", file=sys.stderr)
            os.write(1, b"fd one\\n")
            os.write(2, b"fd two\\n")
            console.note("the plan")
            console.trial_started("t1", {{}})
        print("after")
        os.write(1, b"fd after\\n")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["before", "the plan", "[0/1] trial t1 started", "after", "fd after"]
    assert done.stderr == ""
    logged = log.read_text()
    for text in ("python stdout", "python stderr", "fd one", "fd two"):
        assert text in logged
    assert "the plan" not in logged and "after" not in logged


def test_verbose_leaves_the_output_on_the_console_and_writes_no_log(tmp_path):
    log = tmp_path / "study.log"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from promptcl.study.console import study_console
        with study_console(Path({str(log)!r}), total=1, num_tasks=2, verbose=True) as console:
            print("ray table")
            console.note("the plan")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["ray table", "the plan"]
    assert not log.exists()
