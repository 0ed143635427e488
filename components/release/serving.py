"""The trained model as an MLflow pyfunc that embeds raw listings and queries.

`mlflow.pyfunc.load_model("models:/listing-encoder@champion").predict(frame)` takes a
DataFrame with a `kind` column and returns one unit embedding per row:

- `listing`: title, description, tags, category, image_uris (file:// or s3:// URIs, or
  absolute local paths; the first is the primary photo);
- `query`: query (text);
- `image_query`: image_uri.

The frozen encoders load from their installed packages (declared as the model's pip
requirements); the trained adapters come from the model's artifacts.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from components.core.batching import pad_views
from components.core.query_embedder import QueryEmbedder
from components.core.views import group_views, view_text
from components.io import atomic
from components.io.manifest import sha256_file
from components.release.registry import WEIGHTS_TAG

_REQUIREMENTS = (
    "torch",
    "numpy",
    "pandas",
    "pyarrow",
    "pillow",
    "boto3",
    "pydantic",
    "pyyaml",
    "tqdm",
)


class ListingEncoder(mlflow.pyfunc.PythonModel):
    """Frozen encoders + trained adapters: raw listing/query rows in, embeddings out."""

    def load_context(self, context) -> None:
        from components.core import encoders
        from components.release import registry

        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.device = encoders.pick_device("auto")
        self.model = registry.build_model(spec, Path(context.artifacts["weights"]), self.device)
        self.embedder = QueryEmbedder(self.model, spec, self.device)
        self.image_encoder = self.embedder.image_encoder
        self.text_encoder = self.embedder.text_encoder
        self.text_views = spec["text_views"]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        if "kind" not in model_input.columns:
            raise ValueError("input needs a 'kind' column: listing, query or image_query")
        unknown = set(model_input["kind"]) - {"listing", "query", "image_query"}
        if unknown:
            raise ValueError(f"unknown kind(s) {sorted(unknown)}: use listing, query, image_query")
        out = np.zeros((len(model_input), self.model.dim), np.float32)
        for kind, embed in (
            ("listing", self._listings),
            ("query", self._queries),
            ("image_query", self._image_queries),
        ):
            rows = np.flatnonzero(model_input["kind"].to_numpy() == kind)
            if len(rows):
                out[rows] = embed(model_input.iloc[rows])
        return out

    def _load_image(self, uri: str):
        """A photo by path or URI, judged by its header (the validate defaults) and
        decoded within the process's decode budget, no smaller than the encoder needs."""
        from components.io.catalog_reader import TRUSTED_MAX_BYTES, CatalogRoot, read_image_bytes
        from components.io.images import ImageBounds, decode_image

        location = CatalogRoot("/").resolve_image(uri, ["file", "s3"], None)
        data = read_image_bytes(location, TRUSTED_MAX_BYTES)
        return decode_image(data, uri, ImageBounds(), fit=self.image_encoder.image_size)

    def _queries(self, frame: pd.DataFrame) -> np.ndarray:
        return self.embedder.texts(frame["query"].tolist())

    def _image_queries(self, frame: pd.DataFrame) -> np.ndarray:
        return self.embedder.images([self._load_image(uri) for uri in frame["image_uri"]])

    @torch.no_grad()
    def _listings(self, frame: pd.DataFrame) -> np.ndarray:
        grouped = group_views(_view_rows(frame, self.text_views))
        if grouped.left_out:
            row, why = next(iter(grouped.left_out.items()))
            raise ValueError(
                f"listing row {row}: {why} ({len(grouped.left_out)} row(s) without a title "
                "or an image); a listing needs a text view and an image"
            )
        images = [self._load_image(uri) for uri in grouped.image_refs]
        texts = grouped.text_keys  # a text view's key is its text
        rng = np.random.default_rng(0)  # unused: every view is taken
        image_views = pad_views(self.image_encoder.encode(images), grouped.images, None, rng)
        text_views = pad_views(self.text_encoder.encode(texts), grouped.texts, None, rng)
        fused = self.model.embed_listings(image_views.to(self.device), text_views.to(self.device))
        return fused.cpu().numpy()


def _view_rows(frame: pd.DataFrame, text_views: list[str]) -> list[dict]:
    """The view rows (as the featurize step writes them) of raw listing rows, keyed by
    their text or image URI; a row's position in `frame` is its listing id."""
    rows = []
    for number, listing in enumerate(frame.to_dict("records")):
        for position, view in enumerate(text_views):
            text = view_text(listing.get(view))
            if text:
                rows.append(_view_row(number, "text", view, position, text))
        for position, uri in enumerate(listing["image_uris"]):
            rows.append(_view_row(number, "image", "image", position, uri))
    return rows


def _view_row(number: int, modality: str, view: str, position: int, ref: str) -> dict:
    return {
        "listing_id": str(number),
        "modality": modality,
        "view": view,
        "position": position,
        "ref": ref,
        "key": ref,
    }


def register(weights: Path, spec: dict, name: str, alias: str, spec_path: Path) -> dict:
    """Log the pyfunc in the active MLflow run and register it as a new version of model
    `name`, tagged with its weights' sha256 in the same write, then point `alias` at it.
    When a version with these very weights is registered already (a rerun after a kill, or
    of a finished run whose records are gone) that version is reused: running again never
    registers the same model twice. `spec` is written to `spec_path` and logged with the
    weights. Returns name, version, alias and URIs."""
    atomic.write_text(spec_path, json.dumps(spec, indent=2) + "\n")
    digest = sha256_file(weights)
    client = mlflow.MlflowClient()
    same = client.search_model_versions(f"name = '{name}' and tags.{WEIGHTS_TAG} = '{digest}'")
    if same:
        version = max(same, key=lambda v: int(v.version))
        model_uri = version.source
    else:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ListingEncoder(),
            artifacts={"weights": str(weights), "spec": str(spec_path)},
            code_paths=[str(Path(__file__).resolve().parents[1])],
            pip_requirements=[_pinned(package) for package in _requirements(spec)],
        )
        # the tag (what a later download must hash to, checked in registry.load_model) is
        # written with the version, so no version ever lacks it
        version = mlflow.register_model(info.model_uri, name, tags={WEIGHTS_TAG: digest})
        model_uri = info.model_uri
    client.set_registered_model_alias(name, alias, str(version.version))
    return {
        "name": name,
        "version": str(version.version),
        "alias": alias,
        "uri": f"models:/{name}@{alias}",
        "model_uri": model_uri,
    }


def _requirements(spec: dict) -> list[str]:
    """The packages the served model needs: the common ones and its encoders'."""
    from components.core.encoders import PACKAGES

    return [*_REQUIREMENTS, *PACKAGES[spec["image_encoder"]], *PACKAGES[spec["text_encoder"]]]


def _pinned(name: str) -> str:
    try:
        return f"{name}=={metadata.version(name).split('+')[0]}"
    except metadata.PackageNotFoundError:
        return name
