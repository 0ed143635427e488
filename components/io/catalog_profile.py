"""The catalog's profile (core/drift.py's drift test compares it with the training
catalog's): the frozen features of a sample of listings, and how a refresh carries it.

The sample is every listing whose id hashes at or below a threshold: at a retrain the
threshold that picks `size` listings, whatever the catalog's order. The evaluate step
writes the profile (`profile.npy`, rows in the embed step's listing order) and beside it
the sample (`profile_sample.npz`: the rows of those listings in the embed step's ids, and
the threshold), and both are published with the release. A refresh keeps the threshold
and the profile rows of the sampled listings whose views did not change (the same id and
fingerprint), and reads features only for the new and changed listings under the
threshold: a few listings, not a pass over the views file. Once the sample has drifted
from `size` by more than `RESAMPLE` (the catalog grew or shrank), it is drawn again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core.drift import projection
from components.io import atomic
from components.io.embedder import ListingEmbedder
from components.io.feature_store import unit_hash

RESAMPLE = 0.1  # a carried sample more than 10% off its size is drawn again


@dataclass(frozen=True)
class Profile:
    """Profile rows [n, P] of the listings at `rows` (of the embed step's ids, ascending),
    sampled by id hash at or below `threshold`."""

    vectors: np.ndarray
    rows: np.ndarray
    threshold: float


def id_hash(listing_id: str) -> float:
    return unit_hash("profile:" + listing_id)


def sampled(listing_ids: list[str], size: int) -> tuple[list[int], float]:
    """The rows of the `size` listings whose ids hash lowest, and the threshold that picks
    them (1.0, every listing, for a catalog of `size` or fewer)."""
    hashes = np.array([id_hash(i) for i in listing_ids], np.float64)
    if len(hashes) <= size:
        return list(range(len(hashes))), 1.0
    order = np.argsort(hashes, kind="stable")[:size]
    return sorted(order.tolist()), float(hashes[order[-1]])


def measure(
    frozen: ListingEmbedder, held_out, listing_ids: list[str], rows: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The profile rows of the listings at `rows`, in row order: (rows profiled, vectors);
    a listing without a usable view of each modality has none."""
    wanted = {listing_ids[r] for r in rows}
    dims = sum(frozen.features.dims())
    ids, vectors = frozen.profiles(held_out, wanted, projection(dims))
    row_of = {listing_ids[r]: r for r in rows}
    found = np.array([row_of[i] for i in ids], np.int64)
    order = np.argsort(found, kind="stable")
    return found[order], vectors[order]


def full(frozen: ListingEmbedder, held_out, listing_ids: list[str], size: int) -> Profile:
    """The profile of the `size` listings whose ids hash lowest."""
    rows, threshold = sampled(listing_ids, size)
    found, vectors = measure(frozen, held_out, listing_ids, rows)
    return Profile(vectors, found, threshold)


def carried(
    frozen: ListingEmbedder,
    held_out,
    listing_ids: list[str],
    size: int,
    then: Profile,
    kept: np.ndarray,
    new_rows: np.ndarray,
) -> Profile | None:
    """`then` (a release's profile) for today's listings: `kept` maps each of the
    release's rows to today's row of the same vector (-1: removed or changed),
    `new_rows` are today's rows of new and changed listings. None when the sample should
    be drawn again (see RESAMPLE)."""
    today = kept[then.rows]
    stays = today >= 0
    joining = [int(r) for r in new_rows if id_hash(listing_ids[r]) <= then.threshold]
    found, vectors = measure(frozen, held_out, listing_ids, joining) if joining else ([], None)
    rows = np.concatenate([today[stays], np.asarray(found, np.int64)])
    parts = [then.vectors[stays]] + ([vectors] if vectors is not None else [])
    expected = min(size, len(listing_ids))
    if abs(len(rows) - expected) > RESAMPLE * expected:
        return None
    order = np.argsort(rows, kind="stable")
    return Profile(np.concatenate(parts)[order], rows[order], then.threshold)


def write_sample(path: Path, profile: Profile) -> None:
    with atomic.writing(path) as tmp, tmp.open("wb") as handle:
        np.savez(handle, rows=profile.rows, threshold=np.float64(profile.threshold))


def read(profile_path: Path, sample_path: Path) -> Profile | None:
    """A release's profile with its sample; None when it has no sample file (a release
    from before samples were recorded) or the two disagree."""
    if not (profile_path.is_file() and sample_path.is_file()):
        return None
    vectors = np.load(profile_path)
    with np.load(sample_path, allow_pickle=False) as stored:
        rows, threshold = stored["rows"], float(stored["threshold"])
    if len(rows) != len(vectors):
        return None
    return Profile(vectors, rows.astype(np.int64), threshold)
