"""Progress of long work: a tqdm bar on a terminal; anywhere else (an Airflow task, a pod,
CI, a test) the same bar as an INFO log line every `LOGGED_EVERY_S` seconds, so progress
reads as progress in task logs and never lands on stderr, which task logs show as errors.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

LOGGED_EVERY_S = 30.0
log = logging.getLogger("components.progress")


class _LogLines:
    """A file for tqdm that logs each refresh of the bar as one line."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            log.info("%s", line)

    def flush(self) -> None:
        pass


def progress(iterable=None, **options) -> tqdm:
    """`tqdm(iterable, **options)` on a terminal, else logged (see the module doc)."""
    if sys.stderr.isatty():
        return tqdm(iterable, **options)
    options["mininterval"] = max(options.get("mininterval", 0.1), LOGGED_EVERY_S)
    return tqdm(iterable, file=_LogLines(), ascii=True, **options)
