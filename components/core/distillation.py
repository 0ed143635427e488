"""Teacher-student distillation (`train.distill`), after MEDAL; their code is not public,
this is our formulation.

The teacher is an exponential moving average of the model (`momentum`, updated after
every optimiser step) that embeds each listing from **all** its views: the fused
embedding the index will hold. The student is the model being trained, which sees what
the objective samples (for `factorized`, the primary view plus k auxiliary views). A KL
term pulls the student's similarity distributions within the batch toward the teacher's:
each listing's distribution over the batch's other listings, and each training query's
distribution over the batch's listings, both at `temperature`. The sampled student so
learns what the full-view listing knows (a local-to-global curriculum) while its
backward pass stays at the objective's cost; the teacher's pass is a forward over every
view without gradients. Distributions are per process (no gather across ranks).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from components.core.model import ListingModel, Outputs, Views


class EmaTeacher:
    """A momentum copy of a model, never trained by gradients."""

    def __init__(self, student: ListingModel, momentum: float) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"train.distill.momentum must be in [0, 1), got {momentum}")
        self.model = copy.deepcopy(student).eval().requires_grad_(False)
        self.momentum = momentum

    @torch.no_grad()
    def update(self, student: ListingModel) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (buffers copied)."""
        for mine, theirs in zip(self.model.parameters(), student.parameters(), strict=True):
            mine.lerp_(theirs.detach(), 1.0 - self.momentum)
        for mine, theirs in zip(self.model.buffers(), student.buffers(), strict=True):
            mine.copy_(theirs)

    @torch.no_grad()
    def targets(
        self, images: Views, texts: Views, query_features: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's fused listings from every view, and its query embeddings."""
        fused = self.model.embed_listings(images, texts)
        queries = None
        if query_features is not None:
            queries = self.model.embed_text_queries(query_features)
        return fused, queries


class DistillationLoss(nn.Module):
    """KL(teacher || student) of the batch's listing-to-listing and query-to-listing
    similarity distributions (module docstring), each scaled by `weight`."""

    def __init__(self, weight: float, temperature: float) -> None:
        super().__init__()
        self.weight, self.temperature = weight, temperature

    def forward(
        self, out: Outputs, teacher_fused: torch.Tensor, teacher_queries: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        student = out.fused.float()
        teacher = teacher_fused.float()
        terms = {
            "distill_listing_loss": self.weight
            * self._kl(_off_diagonal(teacher @ teacher.T), _off_diagonal(student @ student.T))
        }
        if out.queries is not None and teacher_queries is not None:
            terms["distill_query_loss"] = self.weight * self._kl(
                teacher_queries.float() @ teacher.T, out.queries.float() @ student.T
            )
        return terms

    def _kl(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """Mean over rows of KL(softmax(teacher / T) || softmax(student / T)); 0 for none."""
        teacher = F.log_softmax(teacher_logits / self.temperature, dim=-1)
        student = F.log_softmax(student_logits / self.temperature, dim=-1)
        per_row = (teacher.exp() * (teacher - student)).sum(dim=-1)
        return per_row.sum() / max(1, per_row.shape[0])


def _off_diagonal(square: torch.Tensor) -> torch.Tensor:
    """[B, B] -> [B, B - 1]: each row without its diagonal entry (a listing's similarity
    to itself says nothing about the others)."""
    n = square.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool, device=square.device)
    return square[keep].reshape(n, n - 1)
