"""Alignment objectives (`train.objective`). Each is an nn.Module returning named loss terms;
the training step sums them.

Notation: listing i has image views x_i^1..x_i^m and text views t_i^1..t_i^n (slot 0 is
the primary view); marginals put `alpha` on the primary view, `1 - alpha` on the rest.

- single_view: symmetric InfoNCE between title and primary image only.
- pairwise: InfoNCE over every pair of a listing's views, O(V^2) per listing.
- sinkhorn: item-to-item similarity is minus the entropic OT cost between listing i's
  image views and listing j's text views (batched log-domain Sinkhorn).
- factorized (Factorized Transport): a listing is a measure over its views, mass `alpha`
  on each modality's primary view and `1 - alpha` shared by that modality's other views.
  Aligning the listing's views under the product of those marginals (the factorized
  plan, in place of an optimal one) weighs the InfoNCE term of each ordered view pair
  (a, b), image and text views alike, by w_a w_b: the pairwise objective with the
  primaries emphasised. Its terms are estimated from the primaries and k auxiliary views
  sampled per modality (`train.aux_samples`), a sampled view standing for its modality's
  auxiliary mass (uniform sampling: each pair's expected weight is the plan's), so a
  listing costs (2 + 2k)(1 + 2k) pair terms whatever its number of views V, against V^2 for
  pairwise. Pairs within a modality are what shape the photo-to-photo geometry: the
  earlier form (the marginal means' InfoNCE, 1 - <mu_img, mu_txt> under cosine cost, plus
  the primary pair) had only cross-modal terms, trailed pairwise on held-out photos
  (0.598 vs 0.686) and lost held-out-photo recall when a retrain met listings whose
  photo does not predict their text (docs/ablation.md).

Every objective adds a query-to-listing InfoNCE term when the batch carries queries.

Transport regulariser (`train.ot_regularizer`, after Zhu & Luo's partially aligned
setting; their code is not public, this is our formulation): the entropic plan P between
the batch's image means and text means (cosine cost, uniform marginals, log-domain
Sinkhorn) is pulled toward the identity plan, -mean_i log(B P_ii), plus a loop-consistency
term: going image -> text with the row-normalised plan B P and back text -> image with
B P^T should return each listing to itself, -mean_i log((B P)(B P^T))_ii. With
`downweight`, each listing's contrastive terms (factorized, single_view) are scaled by
min(1, B P_ii), detached: a listing whose photo and text do not transport onto each
other (a photo of another item) pulls less. The plan is per process (no gather).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from components.core.distributed import (
    gather_with_grad,
    global_max,
    global_sum,
    mean_over_ranks,
    rank,
    world_size,
)
from components.core.model import Outputs, Views, marginal_weights


@dataclass
class Batch:
    images: Views
    texts: Views
    query_features: torch.Tensor | None = None  # [Q, F_text]
    query_targets: torch.Tensor | None = None  # [Q] index of the relevant listing in batch
    # every view of the same listings, for the distillation teacher (train.distill)
    all_images: Views | None = None
    all_texts: Views | None = None
    # every listing has a photo and a text (None: read from the masks, where the batch is
    # made: on the host, so a training step never waits on the device for it)
    complete: bool | None = None

    def __post_init__(self) -> None:
        if self.complete is None:
            self.complete = bool(self.images.mask[:, 0].all() and self.texts.mask[:, 0].all())

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            self.images.to(device),
            self.texts.to(device),
            move(self.query_features),
            move(self.query_targets),
            move(self.all_images),
            move(self.all_texts),
            self.complete,
        )


def info_nce(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` matches row i of `b`; negatives come from every
    rank's batch when running distributed. `weights` [B]: row i's terms count that much
    (a weighted mean; None: all 1)."""
    a_all, b_all, offset = gather_with_grad(a), gather_with_grad(b), _rank_offset(a)
    labels = torch.arange(a.shape[0], device=a.device) + offset
    a_to_b = F.cross_entropy(scale * a @ b_all.T, labels, reduction="none")
    b_to_a = F.cross_entropy(scale * b @ a_all.T, labels, reduction="none")
    per_row = (a_to_b + b_to_a) / 2
    if weights is None:
        return per_row.mean()
    return (weights * per_row).sum() / weights.sum().clamp(min=1e-6)


def _rank_offset(local: torch.Tensor) -> int:
    """Index of this rank's first row in the gathered batch (equal batch per rank)."""
    return rank() * local.shape[0]


def query_loss(out: Outputs, targets: torch.Tensor) -> torch.Tensor:
    """InfoNCE from each query to its relevant listing among the batch's listings.

    Ranks may hold different numbers of queries: each sums its own terms and divides by
    the global count (times the world size, which DDP's gradient averaging undoes), so the
    loss and its gradient are the mean over every query of the global batch."""
    all_listings = gather_with_grad(out.fused)
    targets = targets + _rank_offset(out.fused)
    logits = out.scale * out.queries @ all_listings.T
    total = F.cross_entropy(logits, targets, reduction="sum")  # 0 for no queries
    return total * world_size() / max(1, global_sum(out.queries.shape[0]))


class Objective(nn.Module):
    """Base: subclasses say how many auxiliary views a step needs and give the terms."""

    #: auxiliary views per modality the sampler should provide; None means all of them
    aux_views: int | None = None

    def __init__(self) -> None:
        super().__init__()
        # the transport regulariser, when `train.ot_regularizer.weight` > 0 (an instance
        # attribute: nn.Module keeps a submodule where a class attribute would shadow it)
        self.regularizer: TransportRegularizer | None = None

    def forward(self, out: Outputs, batch: Batch) -> dict[str, torch.Tensor]:
        weights, extra = None, {}
        if self.regularizer is not None:
            extra, weights = self.regularizer(out)
        if not batch.complete:
            # a listing without one modality (train.corrupt.drop_fraction) has no pair
            present = batch.images.mask[:, 0] & batch.texts.mask[:, 0]
            weights = present.float() if weights is None else weights * present
        terms = self.terms(out, batch, weights) | extra
        if out.queries is not None:  # possibly none on this rank: it still joins the gather
            terms["query_loss"] = query_loss(out, batch.query_targets)
        return terms

    def terms(
        self, out: Outputs, batch: Batch, weights: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The objective's loss terms; `weights` [B] scale each listing's contrastive
        terms where the objective has per-listing terms (factorized, single_view)."""
        raise NotImplementedError


class SingleView(Objective):
    aux_views = 0

    def terms(self, out, batch, weights=None):
        return {
            "primary_loss": info_nce(out.image_emb[:, 0], out.text_emb[:, 0], out.scale, weights)
        }


class Factorized(Objective):
    """Factorized Transport (module docstring): the pairwise objective under the product
    of the marginals, estimated from the primary views and `aux_samples` sampled
    auxiliary views per modality, so a step costs the same whatever a listing's V."""

    def __init__(self, aux_samples: int = 1) -> None:
        super().__init__()
        self.aux_views = aux_samples

    def terms(self, out, batch, weights=None):
        marginals = (
            marginal_weights(batch.images.mask, out.alpha),  # [B, 1 + k]: sums to 1 per row
            marginal_weights(batch.texts.mask, out.alpha),
        )
        return {"transport_loss": view_pairs_loss(out, batch, marginals, weights)}


class Pairwise(Objective):
    """Every ordered pair (a, b) of view slots of a listing, image and text views together:
    view a of listing i must pick view b of listing i among view b of every listing. Every
    view is taken (`train.max_views` at most), so a step costs O(V^2) per listing."""

    def terms(self, out, batch, weights=None):  # every pair counts the same
        return {"pairwise_loss": view_pairs_loss(out, batch)}


def view_pairs_loss(
    out: Outputs,
    batch: Batch,
    marginals: tuple[torch.Tensor, torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE from view a of listing i to view b of listing i, against view b of every
    listing (every rank's), for each ordered pair a != b of the batch's view slots (image
    slots first, then text slots) that both exist, averaged with the weight mass_a mass_b
    from `marginals` (p [B, Vi], q [B, Vt]; None: every existing pair the same) times the
    listing's `weights` [B] (None: 1)."""
    image_mask, text_mask = batch.images.mask, batch.texts.mask
    p, q = marginals if marginals is not None else (image_mask.float(), text_mask.float())
    # every rank's slots must line up for the gathered negatives: pad to the widest rank
    images, image_mask, p = _widest(out.image_emb, image_mask, p)
    texts, text_mask, q = _widest(out.text_emb, text_mask, q)
    views = torch.cat([images, texts], dim=1)  # [B, V, d]
    mask = torch.cat([image_mask, text_mask], dim=1)  # [B, V]
    mass = torch.cat([p, q], dim=1).T  # [V, B]
    views_all = gather_with_grad(views)  # negatives from every rank: [B', V, d]
    mask_all = gather_with_grad(mask.float()) > 0
    logits = out.scale * torch.einsum("iad,jbd->abij", views, views_all)  # [V, V, B, B']
    column_ok = mask_all.T[None, :, None, :]  # view b of listing j exists
    logits = logits.masked_fill(~column_ok, float("-inf"))
    rows = torch.arange(views.shape[0], device=views.device)
    positive = logits[:, :, rows, rows + _rank_offset(views)]  # [V, V, B]
    log_prob = positive - logits.logsumexp(dim=-1)
    n_views = mask.shape[1]
    distinct = ~torch.eye(n_views, dtype=torch.bool, device=mask.device)[:, :, None]
    valid = mask.T[:, None, :] & mask.T[None, :, :] & distinct  # both views exist
    pair_mass = mass[:, None, :] * mass[None, :, :] * valid  # the product plan [V, V, B]
    if weights is not None:
        pair_mass = pair_mass * weights[None, None, :]
    picked = torch.where(valid, log_prob, torch.zeros_like(log_prob))  # no 0 * inf
    # the global batch's weighted mean once DDP averages the ranks' gradients
    return -(picked * pair_mass).sum() / mean_over_ranks(pair_mass.sum()).clamp(min=1e-6)


def _widest(embeddings: torch.Tensor, mask: torch.Tensor, mass: torch.Tensor):
    """The view slots [B, V, ...] padded (absent views, no mass) to the most slots any rank
    has: a batch is padded to its own widest listing, and ranks' batches differ."""
    width = global_max(embeddings.shape[1])
    missing = width - embeddings.shape[1]
    if missing == 0:
        return embeddings, mask, mass
    rows = embeddings.shape[0]
    return (
        torch.cat([embeddings, embeddings.new_zeros(rows, missing, embeddings.shape[2])], 1),
        torch.cat([mask, mask.new_zeros(rows, missing)], dim=1),
        torch.cat([mass, mass.new_zeros(rows, missing)], dim=1),
    )


class Sinkhorn(Objective):
    """Similarity of listings i and j = minus the entropic OT cost between i's image views
    and j's text views (cosine cost, alpha marginals), for all B x B pairs at once."""

    def __init__(self, epsilon: float = 0.05, iterations: int = 20) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.iterations = iterations

    def terms(self, out, batch, weights=None):  # plans per pair: no per-listing weights
        offset = _rank_offset(out.image_emb)
        labels = torch.arange(out.image_emb.shape[0], device=out.image_emb.device) + offset
        p = marginal_weights(batch.images.mask, out.alpha)  # [B, Vi]
        q = marginal_weights(batch.texts.mask, out.alpha)  # [B, Vt]
        texts_all = gather_with_grad(out.text_emb)
        q_all = marginal_weights(gather_with_grad(batch.texts.mask.float()) > 0, out.alpha)
        image_to_text = self._similarity(out.image_emb, p, texts_all, q_all)  # [B, B']
        if world_size() == 1:  # one process: the other direction is the transpose
            text_to_image = image_to_text.T
        else:  # this rank's texts against every rank's images: [B, B']
            images_all = gather_with_grad(out.image_emb)
            p_all = marginal_weights(gather_with_grad(batch.images.mask.float()) > 0, out.alpha)
            text_to_image = self._similarity(images_all, p_all, out.text_emb, q).T
        return {
            "ot_loss": (
                F.cross_entropy(out.scale * image_to_text, labels)
                + F.cross_entropy(out.scale * text_to_image, labels)
            )
            / 2
        }

    def _similarity(self, images, p, texts, q) -> torch.Tensor:
        """Minus the OT cost between every listing's image views (rows) and every
        listing's text views (columns)."""
        cost = 1 - torch.einsum("ivd,jwd->ijvw", images, texts)  # [Bi, Bt, Vi, Vt]
        return -entropic_ot_cost(cost, p, q, self.epsilon, self.iterations)


def entropic_ot_cost(
    cost: torch.Tensor, p: torch.Tensor, q: torch.Tensor, epsilon: float, iterations: int
) -> torch.Tensor:
    """<P, C> for the entropic OT plan P between marginals p [B, Vi] and q [B', Vt] for every
    (i, j) cost matrix in `cost` [B, B', Vi, Vt]; log-domain Sinkhorn, zero-weight views
    (padding) take no mass."""
    log_p = p.clamp(min=1e-30).log().masked_fill(p <= 0, -1e9)[:, None, :]  # [B, 1, Vi]
    log_q = q.clamp(min=1e-30).log().masked_fill(q <= 0, -1e9)[None, :, :]  # [1, B', Vt]
    kernel = -cost / epsilon
    f = torch.zeros(cost.shape[:3], device=cost.device, dtype=cost.dtype)
    g = torch.zeros((*cost.shape[:2], cost.shape[3]), device=cost.device, dtype=cost.dtype)
    for _ in range(iterations):
        f = log_p - torch.logsumexp(kernel + g[:, :, None, :], dim=3)
        g = log_q - torch.logsumexp(kernel + f[:, :, :, None], dim=2)
    plan = torch.exp(kernel + f[..., None] + g[:, :, None, :])
    return (plan * cost).sum(dim=(2, 3))


class TransportRegularizer(nn.Module):
    """The batch-level transport regulariser (module docstring): loss terms and the
    per-listing weights [B] of the contrastive terms (None without `downweight`)."""

    def __init__(
        self,
        weight: float,
        epsilon: float,
        iterations: int,
        loop_weight: float = 1.0,
        downweight: bool = True,
    ) -> None:
        super().__init__()
        self.weight, self.epsilon, self.iterations = weight, epsilon, iterations
        self.loop_weight, self.downweight = loop_weight, downweight

    def forward(self, out: Outputs) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        images = F.normalize(out.image_mean.float(), dim=-1)
        texts = F.normalize(out.text_mean.float(), dim=-1)
        n = images.shape[0]
        plan = sinkhorn_plan(1 - images @ texts.T, self.epsilon, self.iterations)  # [B, B]
        forward_ = n * plan  # rows: image i -> text j, each row sums to 1
        diagonal = forward_.diagonal()
        back_home = (forward_ @ forward_.T).diagonal()  # image i -> text -> image i
        tiny = torch.finfo(plan.dtype).tiny
        terms = {
            "ot_identity_loss": -self.weight * diagonal.clamp(min=tiny).log().mean(),
            "ot_loop_loss": -self.weight
            * self.loop_weight
            * back_home.clamp(min=tiny).log().mean(),
        }
        weights = diagonal.detach().clamp(max=1.0) if self.downweight else None
        return terms, weights


def sinkhorn_plan(cost: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """The entropic transport plan [n, m] for `cost` with uniform marginals (log domain)."""
    n, m = cost.shape
    log_a = torch.full((n,), -math.log(n), device=cost.device, dtype=cost.dtype)
    log_b = torch.full((m,), -math.log(m), device=cost.device, dtype=cost.dtype)
    kernel = -cost / epsilon
    f = torch.zeros(n, device=cost.device, dtype=cost.dtype)
    g = torch.zeros(m, device=cost.device, dtype=cost.dtype)
    for _ in range(iterations):
        f = log_a - torch.logsumexp(kernel + g[None, :], dim=1)
        g = log_b - torch.logsumexp(kernel + f[:, None], dim=0)
    return torch.exp(kernel + f[:, None] + g[None, :])


def build_objective(
    name: str,
    aux_samples: int,
    epsilon: float,
    iterations: int,
    regularizer: TransportRegularizer | None = None,
) -> Objective:
    objective = _objective(name, aux_samples, epsilon, iterations)
    objective.regularizer = regularizer
    return objective


def _objective(name: str, aux_samples: int, epsilon: float, iterations: int) -> Objective:
    if name == "single_view":
        return SingleView()
    if name == "factorized":
        return Factorized(aux_samples)
    if name == "pairwise":
        return Pairwise()
    if name == "sinkhorn":
        return Sinkhorn(epsilon, iterations)
    raise ValueError(f"unknown train.objective {name!r}")
