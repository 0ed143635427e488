"""Turning listings' view features into padded training batches.

Which views enter a batch is the objective's choice: the primary view only
(single_view), the primary plus k auxiliary views drawn at random (factorized), or all of
them (pairwise, sinkhorn). Drawing k of the n auxiliary views uniformly without
replacement makes the sampled marginal mean an unbiased estimate of the full one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from components.core.model import Views


@dataclass(frozen=True)
class ListingViews:
    """One modality of one listing: rows into a feature matrix (primary first) and kinds."""

    rows: tuple[int, ...]
    kinds: tuple[int, ...]


def choose_views(
    n_views: int, aux: int | None, rng: np.random.Generator, cap: int | None = None
) -> list[int]:
    """Slots to use: 0 (the primary) and `aux` distinct others at random (all if None),
    at most `cap` slots in all; none for a listing without views of the modality."""
    if n_views == 0:
        return []
    others = np.arange(1, n_views)
    if aux is not None and aux < len(others):
        others = np.sort(rng.choice(others, size=aux, replace=False))
    chosen = [0, *others.tolist()]
    return chosen[:cap] if cap is not None else chosen


def pad_views(
    features: np.ndarray | torch.Tensor,
    listings: list[ListingViews],
    aux: int | None,
    rng: np.random.Generator,
    cap: int | None = None,
) -> Views:
    """Gather the chosen views of each listing into padded [B, V, F] tensors (a listing
    without views of the modality is all padding: its mask row is False)."""
    slots = [choose_views(len(item.rows), aux, rng, cap) for item in listings]
    chosen = [[item.rows[s] for s in picked] for picked, item in zip(slots, listings, strict=True)]
    kinds = [[item.kinds[s] for s in picked] for picked, item in zip(slots, listings, strict=True)]
    width = max(1, *(len(rows) for rows in chosen))
    index = np.zeros((len(listings), width), dtype=np.int64)
    kind = np.zeros((len(listings), width), dtype=np.int64)
    mask = np.zeros((len(listings), width), dtype=bool)
    for i, (rows, row_kinds) in enumerate(zip(chosen, kinds, strict=True)):
        index[i, : len(rows)] = rows
        kind[i, : len(rows)] = row_kinds
        mask[i, : len(rows)] = True
    table = torch.as_tensor(features)
    gathered = table[torch.from_numpy(index)]
    return Views(gathered.float(), torch.from_numpy(mask), torch.from_numpy(kind))


def fuse_listings(
    model,
    image_table: np.ndarray,
    images: list[ListingViews],
    text_table: np.ndarray,
    texts: list[ListingViews],
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Fused unit embeddings [n, dim] float32 of listings given as rows into two feature
    tables, every view taken, `batch_size` listings per forward pass."""
    from components.core.encoders import autocast

    model.eval()
    rng = np.random.default_rng(0)  # unused: aux=None takes every view
    out = [np.zeros((0, model.dim), np.float32)]
    with torch.inference_mode(), autocast(device):
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            image_views = pad_views(image_table, images[start:stop], None, rng)
            text_views = pad_views(text_table, texts[start:stop], None, rng)
            fused = model.embed_listings(image_views.to(device), text_views.to(device))
            out.append(torch.nn.functional.normalize(fused.float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def swap_primary_photos(
    images: list[ListingViews], fraction: float, rng: np.random.Generator
) -> list[ListingViews]:
    """A copy of `images` where `fraction` of the listings have another listing's primary
    photo in place of their own (`train.corrupt.swap_fraction`: a partially aligned
    catalog, made on purpose to measure robustness; only training batches see it)."""
    chosen = rng.choice(len(images), size=round(fraction * len(images)), replace=False)
    out = list(images)
    for i in chosen:
        donor = (i + rng.integers(1, len(images))) % len(images)  # any listing but i
        rows = (images[donor].rows[0], *images[i].rows[1:])
        out[i] = ListingViews(rows=rows, kinds=images[i].kinds)
    return out


def drop_modalities(
    images: list[ListingViews],
    texts: list[ListingViews],
    fraction: float,
    rng: np.random.Generator,
) -> tuple[list[ListingViews], list[ListingViews]]:
    """Copies of `images` and `texts` where `fraction` of the listings have lost every view
    of one modality, photos or texts at random (`train.corrupt.drop_fraction`: listings
    missing a modality; only training batches see it)."""
    chosen = rng.choice(len(images), size=round(fraction * len(images)), replace=False)
    lose_photos = rng.random(len(chosen)) < 0.5
    images, texts = list(images), list(texts)
    for i, photos in zip(chosen, lose_photos, strict=True):
        side = images if photos else texts
        side[i] = ListingViews(rows=(), kinds=())
    return images, texts
