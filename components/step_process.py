"""Run one step in a process of its own, and give back its result, its logs and its errors.

`python -m components refresh` runs six steps in a row. In one process the memory a step
leaves behind (Arrow and allocator pools, torch's caches, fragmented heaps) stays with the
next: at 1M listings the refresh grew past 23 GB by embed, while each step alone peaks at
3-5 GB. A step run here ends with its process, which hands everything back to the system,
as `dvc repro`, the DAGs and the pipelines already do by running each step as a command.

The processes come from a fork server that imported the steps' libraries once (torch,
MLflow, Great Expectations, FAISS), so a step starts in a fraction of a second rather than
the seconds a fresh interpreter takes to import them. What the caller set after that
server started travels with each call: the environment, the working directory and the
log levels. The step's log records come back to the caller's loggers; its exception is
raised in the caller (as itself when it pickles, otherwise as `StepProcessFailed` with the
traceback). The step process ends when its caller ends, so a refresh killed with -9 never
leaves a step writing behind its back once the workdir's lock is gone.

As with any `multiprocessing` start method but fork, a script (not a `-m` module) that
calls this guards its top level with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import pickle
import queue
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from components.errors import StepFailed

# imported once by the fork server, so no step process pays for them
PRELOAD = [
    "components.validate",
    "components.featurize",
    "components.embed",
    "components.index",
    "components.evaluate",
    "components.promote",
    "torch",
    "mlflow",
    "faiss",
    "great_expectations",
]
_preloading = []  # not empty once the fork server's preload is set


class StepProcessFailed(StepFailed):
    """A step's process died (killed, out of memory) or raised what cannot cross back."""


def call(name: str, function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a process of its own; its return value (which must pickle).

    `name` says which step, in errors. Raises what `function` raised, or
    StepProcessFailed when its process died without an answer.
    """
    context = multiprocessing.get_context("forkserver")
    if not _preloading:
        context.set_forkserver_preload(PRELOAD)
        _preloading.append(True)
    messages = context.Queue()
    setting = _Setting.now()
    process = context.Process(
        target=_child,
        args=(os.getpid(), setting, messages, function, args),
        name=f"step-{name}",
        daemon=False,
    )
    process.start()
    try:
        return _answer(name, process, messages)
    finally:
        if process.is_alive():  # the caller was interrupted: the step goes with it
            process.kill()
        process.join()
        messages.close()


def _answer(name: str, process, messages) -> Any:
    """Pass the step's log records on until its result or error comes; raise the error."""
    while True:
        try:
            kind, payload = messages.get(timeout=0.5)
        except queue.Empty:
            if process.is_alive():
                continue
            try:  # it may have put its answer just before it ended
                kind, payload = messages.get(timeout=1)
            except queue.Empty:
                raise StepProcessFailed(_death(name, process.exitcode)) from None
        if kind == "log":
            logger = logging.getLogger(payload.name)
            if logger.isEnabledFor(payload.levelno):
                logger.handle(payload)
        elif kind == "result":
            return payload
        elif kind == "error":
            raise payload
        else:  # "failed": an exception that would not pickle, as text
            raise StepProcessFailed(f"{name}: {payload}")


def _death(name: str, exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        signame = signal.Signals(-exitcode).name
        why = " (out of memory?)" if exitcode == -signal.SIGKILL else ""
        return f"{name}: its process was killed by {signame}{why} before it finished"
    return f"{name}: its process ended with exit code {exitcode} before it finished"


class _Setting:
    """What the caller set that a process forked from the server would not see."""

    def __init__(self, environ: dict, cwd: str, path: list, levels: dict, root: int):
        self.environ, self.cwd, self.path, self.levels, self.root = environ, cwd, path, levels, root

    @classmethod
    def now(cls) -> _Setting:
        manager = logging.root.manager
        levels = {
            name: logger.level
            for name, logger in manager.loggerDict.items()
            if isinstance(logger, logging.Logger) and logger.level
        }
        return cls(dict(os.environ), os.getcwd(), list(sys.path), levels, logging.root.level)

    def apply(self, messages) -> None:
        os.environ.clear()
        os.environ.update(self.environ)
        os.chdir(self.cwd)
        sys.path[:] = self.path
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(_Forward(messages))
        root.setLevel(self.root)
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)


class _Forward(logging.handlers.QueueHandler):
    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", record))


def _die_with(caller: int) -> None:
    """End this process the moment its caller ends. The fork server outlives the caller
    while any process it forked runs, so the step watches the caller itself: a thread that
    waits on a pidfd of the caller (Linux 5.3+; elsewhere it polls every second)."""
    try:
        handle = os.pidfd_open(caller)
    except (AttributeError, OSError):
        handle = None
    if handle is None and not _alive(caller):
        os._exit(1)

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])  # readable once the caller has ended
        else:
            while _alive(caller):
                time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="caller-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _child(caller: int, setting: _Setting, messages, function, args) -> None:
    _die_with(caller)
    setting.apply(messages)
    try:
        result = function(*args)
    except BaseException as err:  # every failure goes back to the caller
        _send_error(messages, err)
        return
    messages.put(("result", result))


def _send_error(messages, err: BaseException) -> None:
    try:
        pickle.loads(pickle.dumps(err))
        messages.put(("error", err))
    except Exception:  # it does not cross back as itself: as text
        trace = "".join(traceback.format_exception(err)).rstrip()
        messages.put(("failed", f"{type(err).__name__}: {err}\n{trace}"))
