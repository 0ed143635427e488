"""`catalog` step: build a sample catalog from artwork and names shipped in packages.

`catalog.source`: one listing per emoji concept (components/sample/emoji_catalog.py), or
per Font Awesome icon (components/sample/icons_catalog.py). Writes the data
contract of any catalog under `<workdir>/catalog/`: `listings.parquet`,
`queries.parquet`, `images/`, and the manifest (with the sources' versions and
licences). Deterministic: same params, same bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from components.config import CatalogConfig, StepPaths
from components.contract import STEPS
from components.io.manifest import Timer, describe_files, write_manifest
from components.sample import emoji_catalog, icons_catalog

STEP = STEPS["catalog"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogResult:
    out_dir: Path
    counts: dict[str, int | float]
    summary: str


def run(config: CatalogConfig, paths: StepPaths) -> CatalogResult:
    """Build the sample catalog under `<workdir>/catalog/`."""
    timer = Timer()
    out = paths.step_dir(STEP.name)
    builder = icons_catalog if config.source == "icons" else emoji_catalog
    built = builder.build(config, out)
    write_manifest(
        out,
        step=STEP.name,
        params=config,
        timer=timer,
        outputs=describe_files(out, [artifact.name for artifact in STEP.writes]),
        counts=built.counts,
        extra={"sources": built.sources, "licences": built.licences},
        run={"summary": built.summary},
    )
    log.info("%s", built.summary)
    return CatalogResult(out_dir=out, counts=built.counts, summary=built.summary)
