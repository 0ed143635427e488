"""Training-step cost of each objective, and of each training option on `factorized`, as
the number of views per listing grows. Options: `+ot` the transport regulariser
(train.ot_regularizer, weight 0.5), `+distill` the EMA teacher over every view and its KL
term (train.distill), `+barycenter` the sphere barycenter fusion (train.fusion), `+colour`
24 more image inputs (featurize.colour_histogram: 8).

Synthetic frozen features (1280-d image, 384-d text), a fixed batch of listings, V views
per listing split evenly between images and texts. Each (objective, V) runs in its own
process so its peak memory is its own. Prints a table with t(V)/t(2). On a GPU
(`--device cuda`, the default when one is visible) steps run under the train step's bf16
autocast, are timed after a CUDA synchronise, and peak memory is the GPU's.

    .venv/bin/python benchmarks/train_views.py [--batch 128] [--steps 10] [--device cpu]
        [--objectives factorized factorized+distill ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OBJECTIVES = (
    "single_view",
    "factorized",
    "factorized+ot",
    "factorized+distill",
    "factorized+barycenter",
    "factorized+colour",
    "pairwise",
    "sinkhorn",
)
VIEWS = (2, 4, 8, 16)


def default_aux_samples() -> int:
    """`train.aux_samples` as params.yaml sets it (read without the pipeline's packages)."""
    import yaml

    return int(yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["aux_samples"])


def measure(
    objective: str, views: int, batch: int, steps: int, device_name: str, aux_samples: int = 2
) -> dict:
    """ms per training step of `objective` at `views` views per listing (factorized
    samples `aux_samples` auxiliary views per modality)."""
    import numpy as np
    import torch

    from components.core.batching import ListingViews, pad_views
    from components.core.distillation import DistillationLoss, EmaTeacher
    from components.core.encoders import autocast, pick_device
    from components.core.model import KIND, ListingModel
    from components.core.objectives import Batch, TransportRegularizer, build_objective

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    name, _, option = objective.partition("+")
    per_modality = views // 2
    image_dim = 1280 + (24 if option == "colour" else 0)
    image_table = torch.randn(batch * per_modality, image_dim)
    text_table = torch.randn(batch * per_modality, 384)
    image_kinds = (KIND["primary_image"],) + (KIND["image"],) * (per_modality - 1)
    text_kinds = tuple(KIND[k] for k in ("title", "description", "tags", "category")) * 4
    images = [
        ListingViews(tuple(range(i * per_modality, (i + 1) * per_modality)), image_kinds)
        for i in range(batch)
    ]
    texts = [
        ListingViews(
            tuple(range(i * per_modality, (i + 1) * per_modality)), text_kinds[:per_modality]
        )
        for i in range(batch)
    ]
    device = pick_device(device_name)
    fusion = "barycenter" if option == "barycenter" else "mean"
    model = ListingModel(image_dim, 384, dim=256, hidden=1024, fusion=fusion).to(device)
    teacher = EmaTeacher(model, 0.995) if option == "distill" else None
    distillation = DistillationLoss(1.0, 0.05)
    regularizer = TransportRegularizer(0.5, 0.05, 30) if option == "ot" else None
    loss_fn = build_objective(
        name,
        aux_samples=aux_samples,
        epsilon=0.05,
        iterations=20,
        regularizer=regularizer,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        data = Batch(
            pad_views(image_table, images, loss_fn.aux_views, rng),
            pad_views(text_table, texts, loss_fn.aux_views, rng),
        )
        if teacher is not None:  # the teacher sees every view
            data.all_images = pad_views(image_table, images, None, rng)
            data.all_texts = pad_views(text_table, texts, None, rng)
        data = data.to(device)
        with autocast(device):
            out = model(data.images, data.texts)
            terms = loss_fn(out, data)
            if teacher is not None:
                terms |= distillation(out, *teacher.targets(data.all_images, data.all_texts, None))
            loss = sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if teacher is not None:
            teacher.update(model)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):  # warm-up (CUDA kernels, allocator)
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    seconds = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "objective": objective,
        "views": views,
        "step_ms": seconds * 1000,
        "peak_mb": peak_mb,
        "device": str(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--one", nargs=2, metavar=("OBJECTIVE", "V"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        objective, views = args.one
        measured = measure(
            objective, int(views), args.batch, args.steps, args.device, default_aux_samples()
        )
        print(json.dumps(measured))
        return
    rows = []
    for objective in args.objectives:
        for views in VIEWS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    objective,
                    str(views),
                    "--batch",
                    str(args.batch),
                    "--steps",
                    str(args.steps),
                    "--device",
                    args.device,
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    device = rows[0]["device"]
    memory = "peak GPU MB" if device.startswith("cuda") else "peak RSS MB"
    print(
        f"batch {args.batch} listings, {args.steps} timed steps, device {device}, CPU threads: "
        f"{__import__('torch').get_num_threads()}"
    )
    print(f"{'objective':<22} {'V':>3} {'ms/step':>9} {'t(V)/t(2)':>10} {memory:>12}")
    for row in rows:
        base = next(r for r in rows if r["objective"] == row["objective"] and r["views"] == 2)
        print(
            f"{row['objective']:<22} {row['views']:>3} {row['step_ms']:>9.1f} "
            f"{row['step_ms'] / base['step_ms']:>10.2f} {row['peak_mb']:>12.0f}"
        )


if __name__ == "__main__":
    main()
