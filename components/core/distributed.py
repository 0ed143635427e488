"""The one place that knows about torch.distributed: rank queries and gathering.

Single-process runs (CPU, one GPU) see rank 0 of world 1 and gathers are identities, so
the objectives read the same either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 logs, writes checkpoints and talks to MLflow."""
    return rank() == 0


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, keeping gradients flowing back to
    each rank's own slice, so contrastive negatives span the global batch."""
    if not is_distributed():
        return tensor
    import warnings

    import torch.distributed.nn.functional as dist_nn

    with warnings.catch_warnings():  # its replacement is still private API in torch 2.13
        warnings.simplefilter("ignore", FutureWarning)
        return _ContiguousGrad.apply(torch.cat(dist_nn.all_gather(tensor), dim=0))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: gloo's all-to-all (the
    backward of all_gather) silently mis-sums strided gradients, such as an einsum's."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def init_if_launched(prefer_cuda: bool) -> torch.device | None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo
    on CPU. Returns this rank's device, or None when not launched distributed."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    use_cuda = prefer_cuda and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not is_distributed():
        # NCCL for CUDA tensors; gloo beside it for the few CPU scalars (counts, logs)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the model when distributed, else the model itself."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def local_slice(members):
    """This rank's equal share of a global batch. The contrastive terms gather equal-sized
    blocks from every rank, so a last, short global batch is split evenly and its
    remainder (fewer than `world_size` listings, different ones each epoch) sits out."""
    share = len(members) // world_size()
    return members[rank() * share : (rank() + 1) * share]


def global_sum(count: int) -> int:
    """The sum of a per-rank count over all ranks (the count itself in one process)."""
    if not is_distributed():
        return count
    tensor = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(tensor)
    return int(tensor.item())


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """A scalar's mean over the ranks, detached (itself, detached, in one process): a
    per-rank normaliser that makes the ranks' averaged losses the global batch's mean."""
    value = value.detach().clone()
    if not is_distributed():
        return value
    dist.all_reduce(value)
    return value / world_size()


def global_max(count: int) -> int:
    """The largest of a per-rank count over all ranks (the count itself in one process)."""
    if not is_distributed():
        return count
    tensor = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalars over ranks (for logging the global batch's losses)."""
    if not is_distributed() or not values:
        return values
    names = sorted(values)
    tensor = torch.tensor([values[n] for n in names], dtype=torch.float64)
    dist.all_reduce(tensor)
    return dict(zip(names, (tensor / world_size()).tolist(), strict=True))
