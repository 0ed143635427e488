"""Fused listing embeddings from the featurize step's cached features, chunk by chunk.

The featurize step writes `views.parquet` one row group per chunk of whole listings, so
embedding row group by row group keeps memory bounded at any catalog size. Used by the
embed step (every listing, written to disk) and evaluate (a champion's embeddings, the
frozen encoders' features for the no-training baseline, the diagnostics' view sample).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from components.config import StepPaths
from components.contract import ACTIVATIONS, VIEWS
from components.core.batching import fuse_listings, pad_views
from components.core.model import ListingModel
from components.core.shards import Shard
from components.core.views import GroupedViews, group_views
from components.io import activations
from components.io.feature_store import FeatureStore
from components.io.id_sets import IdSet
from components.io.manifest import read_manifest
from components.io.training_data import modality_store


def held_out_refs(splits: Path) -> set[tuple[str, str]]:
    """(listing_id, image ref) of every view the train step held out for evaluation
    (`splits`: its splits.parquet, or a copy)."""
    table = pq.read_table(splits, columns=["kind", "id", "listing_id"]).to_pylist()
    return {(r["listing_id"], r["id"]) for r in table if r["kind"] == "held_out_view"}


class FeatureStores:
    """The featurize step's feature store of each modality, opened on first use: opening
    one reads the keys of every shard (seconds at millions of views), which a refresh's
    evaluation of a few changed listings may not need at all."""

    def __init__(self, featurize_dir: Path) -> None:
        self.dir = featurize_dir
        self._open: dict[str, FeatureStore] = {}

    def __getitem__(self, modality: str) -> FeatureStore:
        if modality not in self._open:
            self._open[modality] = modality_store(self.dir, read_manifest(self.dir), modality)
        return self._open[modality]

    def open(self) -> None:
        """Open both now (a step that embeds every listing reads from both anyway)."""
        for modality in ("text", "image"):
            self[modality]

    def dims(self) -> tuple[int, int]:
        """(image, text) feature dimensions, from the manifest (no store opened)."""
        encoders = read_manifest(self.dir)["encoders"]
        return encoders["image"]["dim"], encoders["text"]["dim"]


class ListingEmbedder:
    """A model's fused listing embeddings from the featurize step's outputs. Without a
    model (`frozen`), the frozen encoders' own features of the same listings and views."""

    def __init__(
        self,
        model: ListingModel | None,
        spec: dict,
        paths: StepPaths,
        device: torch.device,
        stores: FeatureStores | None = None,
    ):
        """`stores`: the featurize step's feature stores, shared with another embedder."""
        self.model = model
        self.device = device
        self.views_path = paths.path(VIEWS)
        self._views_file: pq.ParquetFile | None = None
        self.features = stores or FeatureStores(paths.step_dir("featurize"))
        self.left_out: dict[str, str] = {}  # listing_id -> why it has no embedding
        self.encoder = None
        self._activations = None
        tuned = spec.get("finetune_blocks", 0)
        if tuned:  # the model's tail takes backbone activations, not pooled features
            self.encoder = activations.image_encoder(spec, tuned, device)
            self._activations = activations.activation_store(self.encoder, paths.path(ACTIVATIONS))
        self.catalog = paths.catalog

    @property
    def text_store(self) -> FeatureStore:
        return self.features["text"]

    @property
    def image_store(self):
        """The model's image inputs: cached features, or backbone activations."""
        return self._activations if self._activations is not None else self.features["image"]

    @classmethod
    def frozen(cls, paths: StepPaths, device: torch.device) -> ListingEmbedder:
        """The featurize step's features as they are: the no-training baseline's inputs."""
        return cls(None, {}, paths, device)

    def for_model(self, model: ListingModel, spec: dict, paths: StepPaths) -> ListingEmbedder:
        """An embedder of `model` over this one's feature stores (not opened again)."""
        return ListingEmbedder(model, spec, paths, self.device, self.features)

    def chunks(
        self,
        held_out: set[tuple[str, str]],
        shard: Shard | None = None,
        only: set[str] | None = None,
    ) -> Iterator[GroupedViews]:
        """The listings of each row group of views.parquet (featurize writes whole
        listings per group), those of `shard` only if given, those in `only` if given
        (picked out by Arrow before any row becomes a Python object); a listing without a
        usable view of each modality goes to `left_out`."""
        wanted = None if only is None else pa.array(sorted(only), pa.string())
        groups = None if wanted is None else self._groups_holding(wanted)
        for table in self.tables(shard, groups):
            if wanted is not None:
                table = table.filter(pc.is_in(table["listing_id"], value_set=wanted))
            chunk = group_views(table.to_pylist(), held_out)
            self.left_out.update(chunk.left_out)
            yield chunk

    def _groups_holding(self, wanted: pa.Array) -> list[int]:
        """The row groups of views.parquet holding views of the listings `wanted` (found in
        its id column alone: a few listings read a few groups, not the file)."""
        parquet = pq.ParquetFile(self.views_path)
        ids = parquet.read(columns=["listing_id"]).column("listing_id")
        rows = np.flatnonzero(pc.is_in(ids, value_set=wanted).to_numpy(zero_copy_only=False))
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        starts = np.cumsum([0, *sizes])
        return np.unique(np.searchsorted(starts, rows, side="right") - 1).tolist()

    def tables(
        self, shard: Shard | None = None, groups: list[int] | None = None
    ) -> Iterator[pa.Table]:
        """The view rows of each row group of views.parquet (of `shard`'s listings only, if
        given; of the row groups `groups` only, if given), every listing's in one group.

        Raises:
            ValueError: a listing has views in two row groups (a views file not written
                by featurize)."""
        parquet = pq.ParquetFile(self.views_path)
        seen = IdSet()  # 8 bytes per listing, not a Python string: catalogs of 10^8 fit
        for group in range(parquet.num_row_groups) if groups is None else groups:
            table = parquet.read_row_group(group)
            if shard is not None:
                ids = table.column("listing_id").to_pylist()
                table = table.filter(pa.array([shard.owns(i) for i in ids], pa.bool_()))
            seen.add(pc.unique(table.column("listing_id")))
            yield table
        self.one_group_each(seen)

    def one_group_each(self, seen: IdSet) -> None:
        """Raise ValueError if a listing of `seen` (the listings of each row group, added
        group by group) was in two row groups (a views file not written by featurize)."""
        if (repeated := seen.first_repeated()) is not None:
            raise ValueError(
                f"{self.views_path}: a listing has views in more than one row group (id hash "
                f"{repeated:#018x}); re-run featurize"
            )

    def row_groups(self) -> int:
        return pq.ParquetFile(self.views_path).num_row_groups

    def table(self, group: int) -> pa.Table:
        """The view rows of one row group of views.parquet."""
        if self._views_file is None:
            self._views_file = pq.ParquetFile(self.views_path)
        return self._views_file.read_row_group(group)

    def image_features(self, keys: list[str], refs: list[str]) -> np.ndarray:
        """The model's image inputs for these contents: cached features, or backbone
        activations (computed if missing) when the model fine-tuned its backbone."""
        if self.encoder is not None:
            activations.ensure_activations(self.image_store, self.encoder, keys, refs, self.catalog)
        return self.image_store.get(keys)

    def text_features(self, keys: list[str]) -> np.ndarray:
        return self.text_store.get(keys)

    def embed(self, chunk: GroupedViews, batch_size: int) -> np.ndarray:
        image_table = self.image_features(chunk.image_keys, chunk.image_refs)
        text_table = self.text_features(chunk.text_keys)
        return fuse_listings(
            self.model, image_table, chunk.images, text_table, chunk.texts, batch_size, self.device
        )

    @torch.inference_mode()
    def view_sample(self, held_out: set[tuple[str, str]], size: int):
        """Unit embeddings of up to `size` image views and text views (all views of the
        first listings of the catalog), and the (primary photo, title) pairs of those
        listings: the diagnostics' sample."""
        image_views, text_views, photos, titles = [], [], [], []
        for _, iv, tv in self.padded_batches(held_out):
            image_emb, text_emb, _, _ = self.model.modality_means(iv, tv)
            image_views.append(image_emb[iv.mask].float().cpu().numpy())
            text_views.append(text_emb[tv.mask].float().cpu().numpy())
            photos.append(image_emb[:, 0].float().cpu().numpy())
            titles.append(text_emb[:, 0].float().cpu().numpy())
            if min(sum(map(len, image_views)), sum(map(len, text_views))) >= size:
                break
        pairs = (_first(photos, size), _first(titles, size))
        return _first(image_views, size), _first(text_views, size), pairs

    def padded_batches(self, held_out: set[tuple[str, str]], batch_size: int = 1024):
        """(listing ids, image views, text views) of the model's inputs for every listing,
        in listing order, `batch_size` listings at a time."""
        rng = np.random.default_rng(0)  # unused: every view is taken
        for chunk in self.chunks(held_out):
            images = self.image_features(chunk.image_keys, chunk.image_refs)
            texts = self.text_features(chunk.text_keys)
            for start in range(0, len(chunk.listing_ids), batch_size):
                members = slice(start, start + batch_size)
                yield (
                    chunk.listing_ids[members],
                    pad_views(images, chunk.images[members], None, rng).to(self.device),
                    pad_views(texts, chunk.texts[members], None, rng).to(self.device),
                )

    @torch.inference_mode()
    def profiles(
        self, held_out: set[tuple[str, str]], wanted: set[str], projection: np.ndarray
    ) -> tuple[list[str], np.ndarray]:
        """The profile of each listing in `wanted` that has views (in views order, its id
        with it): its normalised mean unit image feature and mean unit text feature,
        concatenated, times `projection` (core/drift.py). Reads the features as they are
        (a `frozen` embedder's), of the wanted listings only, from the row groups that
        hold them: the cost follows the sample, not the catalog."""
        ids, rows = [], []
        rng = np.random.default_rng(0)  # unused: every view is taken
        for chunk in self.chunks(held_out, only=wanted):
            if not chunk.listing_ids:
                continue
            images = self.image_features(chunk.image_keys, chunk.image_refs)
            texts = self.text_features(chunk.text_keys)
            padded = [
                pad_views(features, views, None, rng).to(self.device)
                for features, views in ((images, chunk.images), (texts, chunk.texts))
            ]
            everyone = list(range(len(chunk.listing_ids)))
            means = [_unit_mean(views, everyone) for views in padded]
            rows.append(np.concatenate(means, axis=1) @ projection)
            ids += chunk.listing_ids
        if not rows:
            return [], np.zeros((0, projection.shape[1]), np.float32)
        return ids, np.concatenate(rows).astype(np.float32)

    def embed_all(self, held_out: set[tuple[str, str]], batch_size: int):
        """Every listing's embedding in memory: (listing ids, [n, dim] array)."""
        ids, parts = [], []
        for chunk in self.chunks(held_out):
            ids += chunk.listing_ids
            parts.append(self.embed(chunk, batch_size))
        return ids, np.concatenate(parts)


def _unit_mean(views, keep: list[int]) -> np.ndarray:
    features = torch.nn.functional.normalize(views.features[keep].float(), dim=-1)
    summed = (features * views.mask[keep][..., None]).sum(dim=1)
    return torch.nn.functional.normalize(summed, dim=-1).cpu().numpy()


def _first(parts: list[np.ndarray], size: int) -> np.ndarray:
    return np.concatenate(parts)[:size]
