"""Fine-tuning the end of the image backbone (`train.finetune_blocks` = N > 0).

The frozen part of the backbone runs once per image content: its activations at the cut
(the input of the last N blocks) are kept in a content-addressed store under
`<workdir>/train/activations/` (`contract.ACTIVATIONS`), so a rerun, a resumed run or a
run with other params recomputes nothing. Training then runs only the tail (the last N
blocks and the head) on those activations, with its own learning rate, and the tail's
weights are saved with the model: the serving model and the embed step run the same
frozen part and tail.

Memory is one activation row per distinct image (C*H*W floats; 192*7*7 at 224 px for
N <= 4 on EfficientNet-Lite0), held in RAM for the run: fine for catalogs of up to about
a million photos on a GPU node, not beyond.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from components.core import encoders
from components.io.catalog_reader import CatalogRoot, ImageRefError, open_trusted_image
from components.io.feature_store import FeatureStore
from components.io.progress import progress
from components.io.training_data import TrainingData

log = logging.getLogger(__name__)


def image_encoder(spec: dict, blocks: int, device: torch.device) -> encoders.ImageEncoder:
    """The featurize step's image encoder, stopping before its last `blocks` blocks."""
    factory = encoders.image_factory(spec["image_encoder"], spec.get("colour_histogram", 0))
    return factory(device, spec["image_size"], tuned_blocks=blocks)


def with_activations(
    data: TrainingData,
    encoder: encoders.ImageEncoder,
    catalog: str,
    store_root: Path,
    batch_size: int = 64,
    workers: int = 8,
) -> TrainingData:
    """`data` with every image row (views and held-out views) replaced by the backbone's
    activations at the cut, computed for contents not in the store yet."""
    store = activation_store(encoder, store_root)
    computed = ensure_activations(
        store, encoder, data.image_keys, data.image_refs, catalog, batch_size, workers
    )
    log.info(
        "train: backbone activations for %d images (%d computed, %d values each)",
        len(data.image_keys),
        computed,
        encoder.dim,
    )
    table = store.get(data.image_keys)
    held_out = {
        split: replace(views, features=table[np.asarray(views.rows, dtype=np.int64)])
        for split, views in data.held_out_views.items()
    }
    return replace(data, image_features=table, held_out_views=held_out)


def activation_store(encoder: encoders.ImageEncoder, store_root: Path) -> FeatureStore:
    """The content-addressed store of `encoder`'s activations under `store_root`."""
    return FeatureStore(store_root, encoder.id, encoder.dim)


def ensure_activations(
    store: FeatureStore,
    encoder: encoders.ImageEncoder,
    keys: list[str],
    refs: list[str],
    catalog: str,
    batch_size: int = 64,
    workers: int = 8,
) -> int:
    """Compute and store the activations of the images (content `keys`, catalog `refs`)
    not in `store` yet; returns how many were computed."""
    todo = list({k: r for k, r in zip(keys, refs, strict=True) if k not in store}.items())
    if todo:
        _encode(todo, encoder, CatalogRoot(catalog), store, batch_size, workers)
    return len(todo)


def _encode(todo, encoder, root: CatalogRoot, store: FeatureStore, batch_size, workers) -> None:
    bar = progress(total=len(todo), desc="train: backbone", unit="img", mininterval=2)
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = list(pool.map(lambda item: _read(root, item[1], encoder.image_size), chunk))
            store.add([key for key, _ in chunk], encoder.encode(images))
            bar.update(len(chunk))
    bar.close()
    store.flush()


def _read(root: CatalogRoot, ref: str, fit: int):
    try:
        return open_trusted_image(root, ref, fit)
    except (ImageRefError, OSError) as err:
        raise ValueError(
            f"train.finetune_blocks: image {ref!r} was featurized but cannot be read now: {err}"
        ) from err
