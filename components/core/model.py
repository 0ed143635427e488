"""The trainable multi-view model: adapters from frozen view features onto one unit sphere,
marginal-weighted fusion of a listing's views, and the query tower. Pure torch.

A batch of listings is padded per modality: `features[B, V, F]` with `mask[B, V]` (True =
a real view) and `kinds[B, V]` (the view type, an index into `VIEW_KINDS`). Slot 0 of each
modality is its primary view (primary photo, title).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VIEW_KINDS = (
    "title",
    "description",
    "tags",
    "category",  # text views
    "primary_image",
    "image",  # image views
    "query_text",  # query tower input
)
KIND = {name: index for index, name in enumerate(VIEW_KINDS)}
FUSIONS = ("mean", "barycenter")
TEXT_VIEW_KINDS = {name: KIND[name] for name in VIEW_KINDS[:4]}


@dataclass
class Views:
    """One modality of a batch of listings, padded to V views each."""

    features: torch.Tensor  # [B, V, F] float
    mask: torch.Tensor  # [B, V] bool; slot 0 is the primary view
    kinds: torch.Tensor  # [B, V] long

    def __post_init__(self) -> None:
        if self.features.dim() != 3 or self.mask.shape != self.features.shape[:2]:
            raise ValueError(
                f"expected features [B, V, F] with mask/kinds [B, V], got "
                f"{tuple(self.features.shape)} and {tuple(self.mask.shape)}"
            )

    def rows(self, keep: list[int]) -> Views:
        """The views of the listings `keep` (positions in the batch) only."""
        return Views(self.features[keep], self.mask[keep], self.kinds[keep])

    def to(self, device: torch.device) -> Views:
        return Views(self.features.to(device), self.mask.to(device), self.kinds.to(device))


@dataclass
class Outputs:
    """Everything an objective needs from one forward pass over a batch."""

    image_emb: torch.Tensor  # [B, Vi, d] unit view embeddings
    text_emb: torch.Tensor  # [B, Vt, d]
    image_mean: torch.Tensor  # [B, d] marginal-weighted means (not normalised)
    text_mean: torch.Tensor  # [B, d]
    fused: torch.Tensor  # [B, d] unit listing embeddings
    queries: torch.Tensor | None  # [Q, d] unit text-query embeddings
    scale: torch.Tensor  # inverse temperature
    alpha: float


class Adapter(nn.Module):
    """MLP from one modality's frozen features to the shared d-dim space, plus a learned
    embedding of the view type (title vs tags, primary vs other photo, query).

    `residual`: a linear map of the unit features (`skip`, set by `init_residual`) plus
    the MLP, whose last layer starts at zero, so that training starts from the frozen
    encoder's own geometry instead of a random space."""

    def __init__(
        self, in_dim: int, dim: int, hidden: int, dropout: float, residual: bool = False
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.inp = nn.Linear(in_dim, hidden)
        self.kind = nn.Embedding(len(VIEW_KINDS), hidden)
        self.out = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.skip = nn.Linear(in_dim, dim, bias=False) if residual else None
        if residual:
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)

    def forward(self, features: torch.Tensor, kinds: torch.Tensor, normalize: bool = True):
        hidden = self.inp(self.norm(features)) + self.kind(kinds)
        out = self.out(hidden)
        if self.skip is not None:
            out = out + self.skip(F.normalize(features, dim=-1))
        return F.normalize(out, dim=-1) if normalize else out


def marginal_weights(mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-view weights [B, V]: `alpha` on the primary view (slot 0), `1 - alpha` shared
    equally by the listing's other views; all mass on the primary when it is alone."""
    mask = mask.float()
    aux = mask[:, 1:]
    n_aux = aux.sum(dim=1, keepdim=True)
    primary = torch.where(n_aux > 0, torch.full_like(n_aux, alpha), torch.ones_like(n_aux))
    aux_weights = (1 - primary) * aux / n_aux.clamp(min=1)
    return torch.cat([primary * mask[:, :1], aux_weights], dim=1)


def weighted_mean(embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, V, d] x [B, V] -> [B, d]: the marginal-weighted mean (not normalised)."""
    return torch.einsum("bvd,bv->bd", embeddings, weights)


def sphere_barycenter(
    points: torch.Tensor, weights: torch.Tensor, iterations: int = 5
) -> torch.Tensor:
    """[B, V, d] unit points x [B, V] weights (rows summing to 1) -> [B, d] unit points:
    each row's weighted Karcher (Frechet) mean on the sphere.

    `train.fusion: barycenter`. A listing's views are Dirac masses on the unit sphere; the
    Wasserstein-2 barycenter of Dirac masses is a Dirac mass at their weighted Frechet mean
    under the ground cost, so with the sphere's geodesic cost the fused embedding is that
    mean. (With the squared Euclidean cost it would be the weighted mean of `fuse`;
    entropic smoothing of a barycenter of Diracs only blurs it around the same point.)
    Computed by Riemannian gradient steps (log map, weighted tangent mean, exp map) from
    the normalised weighted mean; zero-weight (padding) views do not count."""
    current = F.normalize(weighted_mean(points, weights), dim=-1)
    for _ in range(iterations):
        cos = torch.einsum("bvd,bd->bv", points, current).clamp(-1 + 1e-6, 1 - 1e-6)
        angle = torch.acos(cos)
        # log map at `current`: the tangent vector toward each point, of length `angle`
        along = points - cos[..., None] * current[:, None, :]
        ratio = angle / torch.sin(angle)
        tangent = torch.einsum("bvd,bv->bd", along, weights * ratio)
        length = tangent.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        current = F.normalize(
            torch.cos(length) * current + torch.sin(length) * tangent / length, dim=-1
        )
    return current


class ListingModel(nn.Module):
    """Adapters for images and texts, fusion of a listing's views, and the query tower."""

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        dim: int = 256,
        hidden: int = 1024,
        dropout: float = 0.1,
        alpha: float = 0.5,
        image_share: float = 0.5,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        residual: bool = False,
        fusion: str = "mean",
        image_tail: nn.Module | None = None,
    ) -> None:
        """`image_tail`, when given, is the trainable end of the image backbone: image
        inputs are then its input activations, which it turns into `image_dim` features.
        `fusion`: `mean` (the normalised weighted mean of the views) or `barycenter`
        (their weighted barycenter on the sphere, `sphere_barycenter`)."""
        super().__init__()
        if not 0.0 < alpha <= 1.0 or not 0.0 <= image_share <= 1.0:
            raise ValueError(
                f"alpha must be in (0, 1] and image_share in [0, 1], got {alpha}, {image_share}"
            )
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        self.image_tail = image_tail
        self.dim = dim  # of the shared space: every embedding the model returns
        self.image = Adapter(image_dim, dim, hidden, dropout, residual)
        self.text = Adapter(text_dim, dim, hidden, dropout, residual)
        self.alpha = alpha
        self.image_share = image_share
        self.log_scale = nn.Parameter(
            torch.tensor(1.0 / temperature).log(), requires_grad=learn_temperature
        )

    @property
    def scale(self) -> torch.Tensor:
        """Inverse temperature of every contrastive term, clamped like CLIP's at 100."""
        return self.log_scale.exp().clamp(max=100.0)

    def forward(
        self, images: Views, texts: Views, query_features: torch.Tensor | None = None
    ) -> Outputs:
        """One pass for training: view embeddings, modality means, fused listings, queries.
        (Going through forward lets DistributedDataParallel synchronise gradients.)"""
        image_emb, text_emb, image_mean, text_mean = self.modality_means(images, texts)
        queries = None if query_features is None else self.embed_text_queries(query_features)
        return Outputs(
            image_emb,
            text_emb,
            image_mean,
            text_mean,
            self._fused(images, texts, image_emb, text_emb, image_mean, text_mean),
            queries,
            self.scale,
            self.alpha,
        )

    def image_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Image view features: the inputs, or the tuned backbone tail applied to them."""
        return inputs if self.image_tail is None else self.image_tail(inputs)

    def modality_means(self, images: Views, texts: Views):
        """Unit view embeddings and the marginal-weighted mean per modality."""
        image_emb = self.image(self.image_features(images.features), images.kinds)
        text_emb = self.text(texts.features, texts.kinds)
        image_mean = weighted_mean(image_emb, marginal_weights(images.mask, self.alpha))
        text_mean = weighted_mean(text_emb, marginal_weights(texts.mask, self.alpha))
        return image_emb, text_emb, image_mean, text_mean

    def fuse(self, image_mean: torch.Tensor, text_mean: torch.Tensor) -> torch.Tensor:
        """One unit embedding per listing from its two modality means."""
        share = self.image_share
        return F.normalize(share * image_mean + (1 - share) * text_mean, dim=-1)

    def embed_listings(self, images: Views, texts: Views) -> torch.Tensor:
        """The cached listing embedding: every view fused with the marginals."""
        return self._fused(images, texts, *self.modality_means(images, texts))

    def _fused(self, images, texts, image_emb, text_emb, image_mean, text_mean) -> torch.Tensor:
        if self.fusion == "mean":
            return self.fuse(image_mean, text_mean)
        share = self.image_share
        weights = torch.cat(
            [
                share * marginal_weights(images.mask, self.alpha),
                (1 - share) * marginal_weights(texts.mask, self.alpha),
            ],
            dim=1,
        )
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)
        points = torch.cat([image_emb, text_emb], dim=1).float()
        return sphere_barycenter(points, weights.float()).to(image_emb.dtype)

    def embed_text_queries(self, features: torch.Tensor) -> torch.Tensor:
        return self.text(
            features, torch.full(features.shape[:1], KIND["query_text"], device=features.device)
        )

    def embed_image_queries(self, features: torch.Tensor) -> torch.Tensor:
        """A query photo is embedded as a primary photo: that view type is trained by every
        objective (there are no image queries to train a kind of their own on)."""
        return self.image(
            self.image_features(features),
            torch.full(features.shape[:1], KIND["primary_image"], device=features.device),
        )


@torch.no_grad()
def init_residual(
    model: ListingModel,
    texts: torch.Tensor,
    photos: torch.Tensor | None,
    titles: torch.Tensor,
    ridge: float = 1.0,
) -> None:
    """Start residual adapters from the frozen encoders' geometry: the text skip is the
    projection onto the `dim` principal directions of the unit text features `texts`
    (views and queries), so that text-to-text cosines start where the encoder has them;
    the image skip is the ridge regression of each listing's projected unit title from
    its unit primary photo (`photos[i]`, `titles[i]`), so photos start in the text space
    (None: the image skip keeps its random start).

    Raises:
        ValueError: the model's adapters are not residual.
    """
    if model.text.skip is None or model.image.skip is None:
        raise ValueError("init_residual needs a model built with residual=True")
    dim, text_dim = model.text.skip.weight.shape
    unit = F.normalize(texts.float(), dim=-1)
    directions = torch.linalg.svd(unit, full_matrices=False).Vh[:dim]  # [<=dim, text_dim]
    projection = torch.zeros(dim, text_dim)
    projection[: len(directions)] = directions
    model.text.skip.weight.copy_(projection)
    if photos is None:
        return
    x = F.normalize(photos.float(), dim=-1)
    y = F.normalize(titles.float(), dim=-1) @ projection.T
    gram = x.T @ x + ridge * torch.eye(x.shape[1])
    model.image.skip.weight.copy_(torch.linalg.solve(gram, x.T @ y).T)
