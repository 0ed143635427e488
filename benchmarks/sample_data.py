"""The sample catalog as `make run` builds it: with the optional Debian data (CLDR
keywords, Noto's emoji as a third image vendor) wherever it can be fetched.

Without that data the catalog step builds a different catalog (two vendors: one photo left
per listing once a view is held out), and a benchmark's numbers stop being comparable with
`make run`'s: a benchmark that builds the sample catalog calls `ensure_optional_data` first.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FETCHED = ROOT / ".cache" / "debian" / ".fetched"  # the Makefile's OPTIONAL_DATA


def ensure_optional_data() -> None:
    """Fetch it as `make run` does, once (never fatal: the script says what it could not)."""
    if not FETCHED.exists():
        script = ROOT / "scripts" / "fetch_optional_data.sh"
        subprocess.run(["bash", str(script), str(FETCHED.parent)], cwd=ROOT, check=False)
