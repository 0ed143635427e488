"""Queries embedded by a trained model: the frozen encoders of its spec, then its adapters.

Apart from `components.release.serving` (the MLflow pyfunc), so that a process that only
embeds queries (the service's photo encoder) does not import MLflow.
"""

from __future__ import annotations

import numpy as np
import torch


class QueryEmbedder:
    """A trained model with the frozen encoders of its spec: text and photo queries in,
    unit embeddings out (the model's pyfunc, the search service and its photo encoder
    process use it)."""

    def __init__(self, model, spec: dict, device: torch.device) -> None:
        from components.core import encoders

        self.model, self.spec, self.device = model, spec, device
        # with a fine-tuned backbone, the encoder stops where the model's own tail begins
        factory = encoders.image_factory(spec["image_encoder"], spec.get("colour_histogram", 0))
        self.image_encoder = factory(
            device, spec["image_size"], tuned_blocks=spec.get("finetune_blocks", 0)
        )
        self.text_encoder = encoders.TEXT_ENCODERS[spec["text_encoder"]](device)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        features = torch.from_numpy(self.text_encoder.encode_queries(texts))
        return self.model.embed_text_queries(features.to(self.device)).float().cpu().numpy()

    @torch.no_grad()
    def images(self, images: list) -> np.ndarray:
        features = torch.from_numpy(self.image_encoder.encode(images))
        return self.model.embed_image_queries(features.to(self.device)).float().cpu().numpy()
