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
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(tensor), dim=0)
