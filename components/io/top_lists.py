"""The evaluate step's exact top lists on disk (`exact_top.npz`, published with each
release), for the next refresh to carry forward (core/carried_top.py).

A list is keyed by its query's content (the task and the query's features), not by its
position: a refresh whose test split lost or gained a query still finds the others'."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from components.core.carried_top import TopLists
from components.core.retrieval import QuerySet
from components.io import atomic

MODEL = "model_sha256"


def query_keys(queries: QuerySet) -> np.ndarray:
    """A 16-byte digest per query of its task and features [Q, 16] uint8."""
    features = np.ascontiguousarray(queries.features, dtype=np.float32)
    digests = [
        hashlib.blake2b(queries.task.encode() + row.tobytes(), digest_size=16).digest()
        for row in features
    ]
    return np.frombuffer(b"".join(digests), np.uint8).reshape(len(digests), 16)


def write(path: Path, model_sha256: str, lists: dict[str, tuple[np.ndarray, TopLists]]) -> None:
    """Per task its query keys and top lists, with the model they were searched under."""
    arrays: dict[str, np.ndarray] = {MODEL: np.array(model_sha256)}
    for task, (keys, top) in lists.items():
        arrays |= {
            f"{task}/keys": keys,
            f"{task}/rows": top.rows,
            f"{task}/scores": top.scores,
            f"{task}/floor": top.floor,
        }
    with atomic.writing(path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(handle, **arrays)


def read(path: Path, model_sha256: str) -> dict[str, dict[bytes, tuple]] | None:
    """Per task, query key -> (rows, scores, floor) of its list, when the file holds lists
    searched under `model_sha256`; None when it does not (another model, or no file)."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as stored:
        if str(stored[MODEL]) != model_sha256:
            return None
        tasks = {name.split("/")[0] for name in stored.files if name != MODEL}
        out = {}
        for task in tasks:
            keys, rows = stored[f"{task}/keys"], stored[f"{task}/rows"]
            scores, floor = stored[f"{task}/scores"], stored[f"{task}/floor"]
            out[task] = {
                keys[i].tobytes(): (rows[i], scores[i], floor[i]) for i in range(len(keys))
            }
        return out


def for_queries(found: dict[bytes, tuple], keys: np.ndarray, width: int) -> TopLists | None:
    """The lists of these queries (`keys`, in order) from `read`'s; None when a query has
    none or the lists are not `width` wide (another deepest K)."""
    picked = [found.get(key.tobytes()) for key in keys]
    if any(p is None or len(p[0]) != width for p in picked):
        return None
    if not picked:
        empty = np.zeros((0, width))
        return TopLists(empty.astype(np.int64), empty.astype(np.float32), np.zeros(0, np.float32))
    rows, scores, floor = (np.stack([p[i] for p in picked]) for i in range(3))
    return TopLists(rows.astype(np.int64), scores.astype(np.float32), floor.astype(np.float32))
