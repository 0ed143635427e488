"""The GPU check: one table of what the GPU steps cost on the machine at hand.

Rows: the training step against views per listing for `factorized` and `pairwise` (bf16
autocast on CUDA, as the train step runs it; synthetic frozen features, as
benchmarks/train_views.py), image featurize throughput with the default encoder
(EfficientNet-Lite0, 224 px) and with Lite2 (260 px) on synthetic photos, and embed
throughput (every view of each listing fused, as the embed step does). Needs torch, numpy,
Pillow and the EfficientNet weights packages (benchmarks/gpu.sh brings them where they are
missing); nothing of the pipeline's orchestration.

    python3 benchmarks/gpu_check.py [--device cuda|cpu|auto] [--quick]

`--quick` shrinks every measurement (the suite's CPU smoke test runs it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

OBJECTIVES = ("factorized", "pairwise")


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rows(device_name: str, views: list[int], batch: int, steps: int) -> list[dict]:
    from train_views import default_aux_samples, measure

    aux = default_aux_samples()
    measure(OBJECTIVES[0], views[0], batch, 1, device_name, aux)  # warm-up: kernels, imports
    rows = []
    for objective in OBJECTIVES:
        for v in views:
            measured = measure(objective, v, batch, steps, device_name, aux)
            rows.append(
                {
                    "what": f"train step, {objective}",
                    "size": f"{v} views x {batch} listings",
                    "value": measured["step_ms"],
                    "unit": "ms/step",
                }
            )
        first = rows[-len(views)]["value"]
        rows[-1]["note"] = f"t({views[-1]})/t({views[0]}) = {rows[-1]['value'] / first:.2f}"
    return rows


def featurize_rows(device, images: int, batch: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    from components.core.encoders import EfficientNetLite0, EfficientNetLite2

    rng = np.random.default_rng(0)
    photos = [
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(images)
    ]
    rows = []
    for encoder_class, size in ((EfficientNetLite0, 224), (EfficientNetLite2, 260)):
        encoder = encoder_class(device, image_size=size)
        encoder.encode(photos[:batch])  # warm-up: kernels, allocator
        _synchronize(device)
        start = time.perf_counter()
        for first in range(0, images, batch):
            encoder.encode(photos[first : first + batch])
        _synchronize(device)
        rows.append(
            {
                "what": f"featurize images, {encoder.variant}",
                "size": f"{images} photos, {size} px, batch {batch}",
                "value": images / (time.perf_counter() - start),
                "unit": "images/s",
            }
        )
    return rows


def embed_rows(device, listings: int, batch: int) -> list[dict]:
    import numpy as np

    from components.core.batching import ListingViews, fuse_listings
    from components.core.model import KIND, ListingModel

    rng = np.random.default_rng(0)
    per_modality = 4
    image_table = rng.standard_normal((listings * per_modality, 1280), dtype=np.float32)
    text_table = rng.standard_normal((listings * per_modality, 512), dtype=np.float32)
    image_kinds = (KIND["primary_image"],) + (KIND["image"],) * (per_modality - 1)
    text_kinds = tuple(KIND[k] for k in ("title", "description", "tags", "category"))
    rows_of = [tuple(range(i * per_modality, (i + 1) * per_modality)) for i in range(listings)]
    images = [ListingViews(r, image_kinds) for r in rows_of]
    texts = [ListingViews(r, text_kinds) for r in rows_of]
    model = ListingModel(1280, 512, residual=True).to(device)
    fuse_listings(model, image_table, images[:batch], text_table, texts[:batch], batch, device)
    _synchronize(device)
    start = time.perf_counter()
    fuse_listings(model, image_table, images, text_table, texts, batch, device)
    _synchronize(device)
    return [
        {
            "what": "embed listings",
            "size": f"{listings} listings x {2 * per_modality} views, batch {batch}",
            "value": listings / (time.perf_counter() - start),
            "unit": "listings/s",
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args()
    import torch

    from components.core.encoders import pick_device

    device = pick_device(args.device)
    if args.quick:
        views, batch, steps, images, image_batch, listings = [2, 4], 8, 1, 4, 2, 64
    elif device.type == "cuda":
        views, batch, steps, images, image_batch, listings = [4, 8, 16], 256, 20, 2048, 256, 200_000
    else:
        views, batch, steps, images, image_batch, listings = [4, 16], 128, 5, 64, 16, 10_000
    started = time.perf_counter()
    rows = train_rows(str(device.type), views, batch, steps)
    rows += featurize_rows(device, images, image_batch)
    rows += embed_rows(device, listings, 1024)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(
        f"device {name} ({precision}), torch {torch.__version__}, Python "
        f"{sys.version.split()[0]}, {time.perf_counter() - started:.0f} s in all"
    )
    print("| what | size | value | unit | note |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['what']} | {row['size']} | {row['value']:.1f} | {row['unit']} | "
            f"{row.get('note', '')} |"
        )


if __name__ == "__main__":
    main()
