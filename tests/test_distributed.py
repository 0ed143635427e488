"""Two CPU processes (gloo) give the same loss and gradients as one process on the same
global batch: embeddings are gathered across ranks and DDP averages the gradients."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components import distributed
from components.model import KIND, ListingModel, Views
from components.objectives import Batch, build_objective

pytestmark = pytest.mark.integration
GLOBAL_BATCH, QUERIES_PER_RANK = 8, 3


def _global_batch() -> Batch:
    generator = torch.Generator().manual_seed(11)
    images = Views(
        torch.randn(GLOBAL_BATCH, 3, 12, generator=generator),
        torch.ones(GLOBAL_BATCH, 3, dtype=torch.bool),
        torch.full((GLOBAL_BATCH, 3), KIND["image"]),
    )
    texts = Views(
        torch.randn(GLOBAL_BATCH, 2, 8, generator=generator),
        torch.ones(GLOBAL_BATCH, 2, dtype=torch.bool),
        torch.full((GLOBAL_BATCH, 2), KIND["title"]),
    )
    queries = torch.randn(2 * QUERIES_PER_RANK, 8, generator=generator)
    # rank r's queries point at listings of rank r's half
    targets = torch.tensor([0, 1, 3, 4, 6, 7])
    return Batch(images, texts, queries, targets)


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


def _worker(rank: int, world: int, port: int, name: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = _global_batch()
        half = GLOBAL_BATCH // world
        rows = slice(rank * half, (rank + 1) * half)
        queries = slice(rank * QUERIES_PER_RANK, (rank + 1) * QUERIES_PER_RANK)
        local = Batch(
            Views(full.images.features[rows], full.images.mask[rows], full.images.kinds[rows]),
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


@pytest.mark.parametrize("name", ["factorized", "single_view", "pairwise"])
def test_two_processes_match_one_on_the_same_global_batch(name):
    objective = build_objective(name, aux_samples=2, epsilon=0.1, iterations=10)
    single_loss, single_grads = _loss_and_grads(_model(), objective, _global_batch())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()

    mp.start_processes(
        _worker, args=(2, port, name, results), nprocs=2, join=True, start_method="spawn"
    )
    loss, grads = results.get()

    assert loss == pytest.approx(float(single_loss), rel=1e-5)
    assert set(grads) == set(single_grads)
    for key, grad in grads.items():
        torch.testing.assert_close(torch.from_numpy(grad), single_grads[key], rtol=1e-4, atol=1e-6)
