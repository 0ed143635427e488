"""The embed step's output on disk: unit float32 embeddings in part files, in row order,
and the listing id of each row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from components.config import StepPaths
from components.contract import EMBEDDED_IDS, EMBEDDINGS


def embedding_parts(embed_dir: Path) -> list[Path]:
    """The embed step's embedding files, in row order."""
    parts = sorted((embed_dir / EMBEDDINGS.name).glob("part-*.npy"))
    if not parts:
        raise FileNotFoundError(f"{embed_dir / EMBEDDINGS.name}: no embeddings; run the embed step")
    return parts


def read_embeddings(paths: StepPaths) -> tuple[list[str], np.ndarray]:
    """The embed step's listing ids and their embeddings [n, dim], in memory."""
    ids = pq.read_table(paths.path(EMBEDDED_IDS)).column("listing_id").to_pylist()
    parts = embedding_parts(paths.step_dir("embed"))
    return ids, np.concatenate([np.load(part) for part in parts])
