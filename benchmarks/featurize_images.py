"""Image-encoder throughput of the featurize step by batch size and input size.

Encodes the same synthetic 72x72 RGB images (the sample catalog's size) with the
packaged EfficientNet-Lite0 and prints images/s with the process's user and system CPU
seconds. With glibc's allocator as it comes (`--allocator as-it-comes`), large batches
spend most of their time in the kernel (page faults from freshly mapped activation
buffers), which the user/sys split shows; featurize keeps freed memory instead
(`components/io/allocator.py`), the default here.

    .venv/bin/python benchmarks/featurize_images.py [--images 256] [--allocator as-it-comes]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

from components.core.encoders import EfficientNetLite0
from components.io.allocator import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 160])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--allocator", choices=["kept", "as-it-comes"], default="kept")
    args = parser.parse_args()
    if args.allocator == "kept":
        keep_freed_memory()  # as featurize runs
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8))
        for _ in range(args.images)
    ]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"{args.images} images on {device}, torch threads {torch.get_num_threads()}, "
        f"allocator {args.allocator}"
    )
    print(f"{'size':>5} {'batch':>6} {'img/s':>8} {'user s':>7} {'sys s':>7}")
    for size in args.sizes:
        encoder = EfficientNetLite0(device, size)
        encoder.encode(images[:8])  # warm-up
        for batch in args.batches:
            before, start = os.times(), time.perf_counter()
            for first in range(0, len(images), batch):
                encoder.encode(images[first : first + batch])
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds, after = time.perf_counter() - start, os.times()
            print(
                f"{size:>5} {batch:>6} {len(images) / seconds:>8.1f} "
                f"{after.user - before.user:>7.1f} {after.system - before.system:>7.1f}"
            )


if __name__ == "__main__":
    main()
