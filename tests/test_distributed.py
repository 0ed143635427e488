"""Two CPU processes (gloo) give the same loss and gradients as one process on the same
global batch: embeddings are gathered across ranks and DDP averages the gradients, also
when the ranks hold different numbers of queries (or none) or batches of different widths
(each rank pads its views to its own widest listing)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components.core import distributed
from components.core.model import KIND, ListingModel, Views
from components.core.objectives import Batch, build_objective

pytestmark = pytest.mark.integration
GLOBAL_BATCH = 8
# Queries per rank; each rank's queries point at listings of its own half of the batch.
QUERY_TARGETS = {
    "even": ([0, 1, 3], [4, 6, 7]),
    "uneven": ([0, 1, 2, 3], [5, 6]),
    "one rank has none": ([0, 1, 2, 3, 1, 2], []),
    "ranks of different widths": ([0, 1, 3], [4, 6, 7]),
}
NARROW = "ranks of different widths"  # rank 1's listings have one photo: its batch is 1 wide


def _global_batch(queries: str) -> Batch:
    generator = torch.Generator().manual_seed(11)
    image_mask = torch.ones(GLOBAL_BATCH, 3, dtype=torch.bool)
    if queries == NARROW:
        image_mask[GLOBAL_BATCH // 2 :, 1:] = False
    images = Views(
        torch.randn(GLOBAL_BATCH, 3, 12, generator=generator),
        image_mask,
        torch.full((GLOBAL_BATCH, 3), KIND["image"]),
    )
    texts = Views(
        torch.randn(GLOBAL_BATCH, 2, 8, generator=generator),
        torch.ones(GLOBAL_BATCH, 2, dtype=torch.bool),
        torch.full((GLOBAL_BATCH, 2), KIND["title"]),
    )
    targets = torch.tensor([t for rank_targets in QUERY_TARGETS[queries] for t in rank_targets])
    features = torch.randn(len(targets), 8, generator=generator)
    return Batch(images, texts, features, targets)


def _model() -> ListingModel:
    torch.manual_seed(5)
    return ListingModel(12, 8, dim=16, hidden=32, dropout=0.0)


def _loss_and_grads(model, objective, batch):
    out = model(batch.images, batch.texts, batch.query_features)
    loss = sum(objective(out, batch).values())
    loss.backward()
    module = model.module if hasattr(model, "module") else model
    return loss.detach(), {
        n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None
    }


def _worker(rank: int, world: int, port: int, name: str, queries: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = _global_batch(queries)
        narrow = queries == NARROW and rank == 1
        half = GLOBAL_BATCH // world
        rows = slice(rank * half, (rank + 1) * half)
        before = sum(len(t) for t in QUERY_TARGETS[queries][:rank])
        queries = slice(before, before + len(QUERY_TARGETS[queries][rank]))
        width = 1 if narrow else 3  # as pad_views would pad it
        local = Batch(
            Views(
                full.images.features[rows, :width],
                full.images.mask[rows, :width],
                full.images.kinds[rows, :width],
            ),
            Views(full.texts.features[rows], full.texts.mask[rows], full.texts.kinds[rows]),
            full.query_features[queries],
            full.query_targets[queries] - rank * half,
        )
        model = distributed.wrap(_model(), torch.device("cpu"))
        objective = build_objective(name, aux_samples=2, epsilon=0.1, iterations=10)
        loss, grads = _loss_and_grads(model, objective, local)
        dist.all_reduce(loss)
        if rank == 0:
            results.put((float(loss) / world, {k: v.numpy() for k, v in grads.items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("name", "queries"),
    [
        ("factorized", "even"),
        ("factorized", "uneven"),
        ("factorized", "one rank has none"),
        ("factorized", NARROW),
        ("pairwise", NARROW),
        ("single_view", "even"),
        ("pairwise", "even"),
        ("sinkhorn", "uneven"),
    ],
)
def test_two_processes_match_one_on_the_same_global_batch(name, queries):
    objective = build_objective(name, aux_samples=2, epsilon=0.1, iterations=10)
    single_loss, single_grads = _loss_and_grads(_model(), objective, _global_batch(queries))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()

    mp.start_processes(
        _worker, args=(2, port, name, queries, results), nprocs=2, join=True, start_method="spawn"
    )
    loss, grads = results.get()

    assert loss == pytest.approx(float(single_loss), rel=1e-5)
    assert set(grads) == set(single_grads)
    for key, grad in grads.items():
        torch.testing.assert_close(torch.from_numpy(grad), single_grads[key], rtol=1e-4, atol=1e-6)
