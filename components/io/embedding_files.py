"""The embed step's output on disk: unit float32 embeddings in part files, in row order,
and the listing id of each row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from components.config import StepPaths
from components.contract import EMBEDDED_IDS, EMBEDDINGS
from components.io.manifest import verify_outputs

EMBED_OUTPUTS = (EMBEDDINGS.name, EMBEDDED_IDS.name)


def embedding_parts(embed_dir: Path) -> list[Path]:
    """The embed step's embedding files, in row order."""
    parts = sorted((embed_dir / EMBEDDINGS.name).glob("part-*.npy"))
    if not parts:
        raise FileNotFoundError(f"{embed_dir / EMBEDDINGS.name}: no embeddings; run the embed step")
    return parts


def verify_embeddings(embed_dir: Path, manifest: dict | None = None) -> dict:
    """Check the embeddings and their ids against the embed step's manifest (sha256);
    returns the manifest. Raises AlteredFile naming what changed."""
    return verify_outputs(embed_dir, EMBED_OUTPUTS, manifest)


def read_embeddings(paths: StepPaths) -> tuple[list[str], np.ndarray]:
    """The embed step's listing ids and their embeddings [n, dim], in memory, checked
    against its manifest first."""
    verify_embeddings(paths.step_dir("embed"))
    ids = pq.read_table(paths.path(EMBEDDED_IDS)).column("listing_id").to_pylist()
    parts = embedding_parts(paths.step_dir("embed"))
    return ids, np.concatenate([np.load(part) for part in parts])
