"""A step in a process of its own (components/step_process.py, how `refresh` runs its
steps): its result, errors and logs come back; what the caller set since the fork server
started reaches it; its death is reported; it dies with its caller."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from components import step_process
from components.errors import StepFailed
from components.step_process import StepProcessFailed

ROOT = Path(__file__).resolve().parents[1]


def _answer(x: int) -> dict:
    return {"pid": os.getpid(), "double": 2 * x}


def _fails() -> None:
    raise StepFailed("1 gate(s) failed", report="| gate | value |")


def _unpicklable() -> None:
    class Local(Exception):
        pass

    raise Local("made here")


def _logs() -> None:
    logging.getLogger("components.somewhere").info("from the step, %d", 7)
    logging.getLogger("components.somewhere").debug("below the caller's level")


def _environ(name: str) -> str | None:
    return os.environ.get(name)


def _killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_step_s_result_comes_back_from_another_process():
    answer = step_process.call("double", _answer, 21)
    assert answer["double"] == 42 and answer["pid"] != os.getpid()


def test_a_step_s_error_is_raised_in_the_caller_as_itself():
    with pytest.raises(StepFailed, match="1 gate") as raised:
        step_process.call("evaluate", _fails)
    assert raised.value.report == "| gate | value |"


def test_an_error_that_cannot_cross_back_comes_as_its_traceback():
    with pytest.raises(StepProcessFailed, match="^embed: Local: made here\n"):
        step_process.call("embed", _unpicklable)


def test_a_step_s_log_records_reach_the_caller_s_loggers_at_its_levels(caplog):
    caplog.set_level(logging.INFO, logger="components")
    step_process.call("validate", _logs)
    messages = [r.getMessage() for r in caplog.records if r.name == "components.somewhere"]
    assert messages == ["from the step, 7"]


def test_the_environment_set_after_the_server_started_reaches_the_step(monkeypatch):
    step_process.call("warm", _answer, 1)  # the server runs before the variable exists
    monkeypatch.setenv("STEP_PROCESS_PROBE", "set later")
    assert step_process.call("probe", _environ, "STEP_PROCESS_PROBE") == "set later"


def test_a_killed_step_is_reported_by_name_and_signal():
    with pytest.raises(StepProcessFailed, match="embed: its process was killed by SIGKILL"):
        step_process.call("embed", _killed)


def test_a_step_dies_with_its_caller(tmp_path):
    """A refresh killed with -9 must not leave its step writing after the workdir's lock
    is gone."""
    pid_file = tmp_path / "step.pid"
    caller = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from components import step_process
        from tests.harness.sleepers import sleep_writing_pid
        step_process.call("embed", sleep_writing_pid, {str(pid_file)!r}, 120)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", caller], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert process.poll() is None and time.monotonic() < deadline, "no step started"
            time.sleep(0.1)
        step = int(pid_file.read_text())
        process.send_signal(signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 30
        while _alive(step) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(step), f"the step (pid {step}) outlived its killed caller"
    finally:
        process.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (ended, not yet reaped by whoever adopted it) is not running
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")
