"""A stand-in step for tests of step processes: one that says where it runs, then waits."""

from __future__ import annotations

import os
import time
from pathlib import Path


def sleep_writing_pid(pid_file: str, seconds: float) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
