"""Featurize throughput of every registered encoder, in one run (compare the ratios).

Images: the same synthetic 72x72 RGB images (the sample catalog's size) through each
image encoder at its input size, in the featurize step's batch size. Texts: emoji-like
titles and tags in three languages through each text encoder (views and queries).

    .venv/bin/python benchmarks/encoders.py [--images 256] [--texts 1024]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from components.config import FeaturizeConfig
from components.core.encoders import IMAGE_ENCODERS, TEXT_ENCODERS
from components.io.allocator import keep_freed_memory

IMAGE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite2": 260}
WORDS = ["red", "heart", "corazón", "rojo", "cœur", "smiling", "face", "cat", "Weihnachtsmann"]


def _rate(encode, items: list, batch: int) -> float:
    encode(items[:batch])  # warm-up (loads lazily built parts)
    start = time.perf_counter()
    for first in range(0, len(items), batch):
        encode(items[first : first + batch])
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--texts", type=int, default=1024)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8))
        for _ in range(args.images)
    ]
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) for _ in range(args.texts)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keep_freed_memory()  # as featurize runs them
    defaults = FeaturizeConfig()
    print(f"on {device}, torch threads {torch.get_num_threads()}")
    print("| encoder | input | dim | items/s |\n|---|---|---|---|")
    for name, factory in IMAGE_ENCODERS.items():
        size = IMAGE_SIZES.get(name, defaults.image_size)
        start = time.perf_counter()
        encoder = factory(device, size)
        load = time.perf_counter() - start
        rate = _rate(encoder.encode, images, defaults.image_batch_size)
        print(f"| {name} | {size} px images (load {load:.1f} s) | {encoder.dim} | {rate:.1f} |")
    for name, factory in TEXT_ENCODERS.items():
        start = time.perf_counter()
        encoder = factory(device, defaults.text_batch_size)
        load = time.perf_counter() - start
        rate = _rate(encoder.encode, texts, defaults.text_batch_size)
        queries = _rate(encoder.encode_queries, texts, defaults.text_batch_size)
        print(
            f"| {name} | texts (load {load:.1f} s; queries {queries:.0f}/s) | {encoder.dim} "
            f"| {rate:.1f} |"
        )


if __name__ == "__main__":
    main()
