"""Model and objectives on tiny seeded tensors, against plain references."""

from __future__ import annotations

import dataclasses

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from components.core.batching import (
    ListingViews,
    choose_views,
    drop_modalities,
    pad_views,
    swap_primary_photos,
)
from components.core.distillation import DistillationLoss, EmaTeacher
from components.core.model import (
    KIND,
    ListingModel,
    Outputs,
    Views,
    init_residual,
    marginal_weights,
    sphere_barycenter,
    weighted_mean,
)
from components.core.objectives import (
    Batch,
    Pairwise,
    TransportRegularizer,
    build_objective,
    entropic_ot_cost,
    info_nce,
    sinkhorn_plan,
)

IMAGE_DIM, TEXT_DIM = 12, 8


def _views(batch: int, width: int, dim: int, seed: int) -> Views:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, width, dim, generator=generator)
    counts = torch.randint(1, width + 1, (batch,), generator=generator)
    mask = torch.arange(width)[None, :] < counts[:, None]
    kinds = torch.full((batch, width), KIND["image"])
    kinds[:, 0] = KIND["primary_image"]
    return Views(features, mask, kinds)


def _batch(seed: int = 0, batch: int = 6) -> Batch:
    generator = torch.Generator().manual_seed(seed + 100)
    return Batch(
        images=_views(batch, 3, IMAGE_DIM, seed),
        texts=_views(batch, 4, TEXT_DIM, seed + 1),
        query_features=torch.randn(5, TEXT_DIM, generator=generator),
        query_targets=torch.tensor([0, 1, 1, 4, 5]),
    )


@pytest.mark.parametrize("name", ["single_view", "pairwise", "sinkhorn", "factorized"])
def test_each_objective_gives_finite_loss_and_gradients(name):
    torch.manual_seed(0)
    model = ListingModel(IMAGE_DIM, TEXT_DIM, dim=16, hidden=32)
    objective = build_objective(name, aux_samples=1, epsilon=0.1, iterations=10)

    batch = _batch()
    terms = objective(model(batch.images, batch.texts, batch.query_features), batch)
    total = sum(terms.values())
    total.backward()

    assert "query_loss" in terms and len(terms) >= 2
    assert torch.isfinite(total)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_marginal_weights_put_alpha_on_the_primary():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])

    weights = marginal_weights(mask, alpha=0.6)

    torch.testing.assert_close(weights, torch.tensor([[0.6, 0.2, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_fusion_of_a_single_view_is_that_view():
    torch.manual_seed(1)
    model = ListingModel(IMAGE_DIM, TEXT_DIM, dim=16, hidden=32, image_share=1.0).eval()
    images = _views(3, 1, IMAGE_DIM, seed=2)
    texts = _views(3, 2, TEXT_DIM, seed=3)

    fused = model.embed_listings(images, texts)

    torch.testing.assert_close(fused, model.image(images.features, images.kinds)[:, 0])


def test_factorized_sampling_is_unbiased():
    """The mean over many draws of (primary + k sampled auxiliary views) equals the full
    marginal-weighted mean."""
    rng = np.random.default_rng(0)
    embeddings = torch.randn(1, 7, 5, generator=torch.Generator().manual_seed(0))
    listing = ListingViews(rows=tuple(range(7)), kinds=(KIND["primary_image"],) + (5,) * 6)
    full = weighted_mean(embeddings, marginal_weights(torch.ones(1, 7, dtype=torch.bool), 0.4))

    draws = []
    for _ in range(4000):
        views = pad_views(embeddings[0], [listing], aux=2, rng=rng)
        draws.append(weighted_mean(views.features, marginal_weights(views.mask, 0.4)))
    estimate = torch.stack(draws).mean(dim=0)

    torch.testing.assert_close(estimate, full, atol=0.02, rtol=0)
    assert views.features.shape[1] == 3  # constant cost: primary + k, whatever V


def test_factorized_is_pairwise_under_the_product_plan():
    """With equal marginals (two views per modality, alpha 0.5) the product plan weighs
    every pair the same: factorized is the pairwise loss. With alpha elsewhere it weighs
    the pairs of primaries more, and a listing's weight scales its pairs alone."""
    torch.manual_seed(0)
    model = ListingModel(IMAGE_DIM, TEXT_DIM, dim=16, hidden=32, alpha=0.5)
    batch = _batch()
    every = torch.ones(6, 2, dtype=torch.bool)  # every listing has both views of each
    batch = Batch(
        Views(batch.images.features[:, :2], every, batch.images.kinds[:, :2]),
        Views(batch.texts.features[:, :2], every, batch.texts.kinds[:, :2]),
    )
    out = model(batch.images, batch.texts)
    factorized = build_objective("factorized", 1, 0.1, 10).terms(out, batch)["transport_loss"]
    pairwise = build_objective("pairwise", 1, 0.1, 10).terms(out, batch)["pairwise_loss"]
    torch.testing.assert_close(factorized, pairwise)

    primaries = dataclasses.replace(out, alpha=0.9)
    weighted = build_objective("factorized", 1, 0.1, 10).terms(primaries, batch)
    assert not torch.isclose(weighted["transport_loss"], pairwise)
    one = torch.zeros(6)
    one[3] = 1.0  # listing 3 alone: its pairs' weighted mean, whatever the others do
    alone = build_objective("factorized", 1, 0.1, 10).terms(out, batch, one)["transport_loss"]
    shuffled = out.image_emb.clone()
    shuffled[[0, 1]] = shuffled[[1, 0]]  # other listings' positives change, not listing 3's
    moved = build_objective("factorized", 1, 0.1, 10).terms(
        dataclasses.replace(out, image_emb=shuffled), batch, one
    )["transport_loss"]
    torch.testing.assert_close(alone, moved)


def test_choose_views_keeps_the_primary_and_respects_k_and_cap():
    rng = np.random.default_rng(3)

    assert choose_views(1, aux=3, rng=rng) == [0]
    assert len(choose_views(10, aux=3, rng=rng)) == 4
    assert choose_views(10, aux=None, rng=rng, cap=4) == [0, 1, 2, 3]
    assert choose_views(10, aux=0, rng=rng) == [0]


def test_entropic_ot_cost_matches_pot():
    generator = torch.Generator().manual_seed(4)
    cost = torch.rand(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.7, 0.3, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor(
        [[0.5, 0.5, 0.0, 0.0, 0.0], [0.4, 0.2, 0.2, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]],
        dtype=torch.float64,
    )

    ours = entropic_ot_cost(cost, p, q, epsilon=0.1, iterations=500)

    for i in range(2):
        for j in range(3):
            a, b = p[i][p[i] > 0].numpy(), q[j][q[j] > 0].numpy()
            c = cost[i, j][: len(a), : len(b)].numpy()
            plan = ot.sinkhorn(a, b, c, reg=0.1, numItermax=5000, stopThr=1e-12)
            assert ours[i, j].item() == pytest.approx(float((plan * c).sum()), abs=1e-6)


def test_pairwise_loss_matches_a_plain_loop():
    torch.manual_seed(5)
    model = ListingModel(IMAGE_DIM, TEXT_DIM, dim=8, hidden=16).eval()
    batch = _batch(seed=7, batch=4)
    out = model(batch.images, batch.texts)
    image_emb, text_emb = out.image_emb, out.text_emb

    ours = Pairwise().terms(out, batch)["pairwise_loss"]

    views = torch.cat([image_emb, text_emb], dim=1)
    mask = torch.cat([batch.images.mask, batch.texts.mask], dim=1)
    losses = []
    for a in range(views.shape[1]):
        for b in range(views.shape[1]):
            if a == b:
                continue
            columns = mask[:, b].nonzero().flatten()
            for i in range(views.shape[0]):
                if mask[i, a] and mask[i, b]:
                    logits = model.scale * views[i, a] @ views[columns, b].T
                    target = (columns == i).nonzero().item()
                    losses.append(F.cross_entropy(logits[None], torch.tensor([target])))
    torch.testing.assert_close(ours, torch.stack(losses).mean())


def test_residual_adapters_start_from_the_frozen_geometry():
    """At init the text tower is a projection onto the text's principal directions (text
    cosines kept, queries where their text is), and a photo lands by its own title."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(24, 24)).Q[:6]  # texts live in a 6-d subspace
    titles = torch.randn(200, 6) @ basis
    photos = titles @ torch.randn(24, 40)  # a photo is a view of its title
    model = ListingModel(image_dim=40, text_dim=24, dim=8, hidden=16, dropout=0.0, residual=True)
    model.eval()

    init_residual(model, titles, photos, titles, ridge=1e-3)

    embedded = model.text(titles, torch.full((200,), KIND["title"]))
    unit = torch.nn.functional.normalize(titles, dim=-1)
    torch.testing.assert_close(embedded @ embedded.T, unit @ unit.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.embed_text_queries(titles[:5]), embedded[:5])
    nearest = (model.embed_image_queries(photos) @ embedded.T).argmax(dim=1)
    assert (nearest == torch.arange(200)).float().mean() > 0.9


def test_the_sinkhorn_plan_has_uniform_marginals():
    cost = torch.rand(5, 7)

    plan = sinkhorn_plan(cost, epsilon=0.1, iterations=200)

    torch.testing.assert_close(plan.sum(dim=1), torch.full((5,), 1 / 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(dim=0), torch.full((7,), 1 / 7), atol=1e-4, rtol=0)


def _outputs(images: torch.Tensor, texts: torch.Tensor) -> Outputs:
    return Outputs(
        image_emb=images[:, None],
        text_emb=texts[:, None],
        image_mean=images,
        text_mean=texts,
        fused=torch.nn.functional.normalize(images + texts, dim=-1),
        queries=None,
        scale=torch.tensor(10.0),
        alpha=0.5,
    )


def test_the_transport_regulariser_down_weights_a_listing_whose_photo_is_another_items():
    texts = torch.eye(6)
    aligned = texts.clone()
    swapped = texts.clone()
    swapped[0] = texts[1]  # listing 0 carries listing 1's photo
    regularizer = TransportRegularizer(weight=1.0, epsilon=0.05, iterations=50)

    clean_terms, clean_weights = regularizer(_outputs(aligned, texts))
    terms, weights = regularizer(_outputs(swapped, texts))

    assert clean_weights.min() > 0.99 and clean_terms["ot_identity_loss"] < 0.01
    assert weights[0] < 0.6 and weights[2:].min() > 0.99
    assert terms["ot_identity_loss"] > clean_terms["ot_identity_loss"]
    assert terms["ot_loop_loss"] >= clean_terms["ot_loop_loss"]


def test_weights_scale_each_rows_contrastive_terms():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(5.0)

    plain = info_nce(a, b, scale)
    ones = info_nce(a, b, scale, torch.ones(4))
    first_only = info_nce(a, b, scale, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    half = info_nce(a, b, scale, torch.tensor([0.0, 1.0, 1.0, 1.0]))

    torch.testing.assert_close(plain, ones)
    assert not torch.isclose(first_only, plain) and not torch.isclose(half, plain)
    torch.testing.assert_close(first_only + 3 * half, 4 * plain)


def test_swapping_primary_photos_changes_that_share_of_listings_only():
    images = [ListingViews(rows=(10 * i, 10 * i + 1), kinds=(4, 5)) for i in range(10)]

    swapped = swap_primary_photos(images, 0.3, np.random.default_rng(0))

    changed = [i for i in range(10) if swapped[i].rows[0] != images[i].rows[0]]
    assert len(changed) == 3
    assert all(swapped[i].rows[1:] == images[i].rows[1:] for i in range(10))
    assert all(swapped[i].rows[0] % 10 == 0 for i in changed)  # another listing's primary
    assert swap_primary_photos(images, 0.0, np.random.default_rng(0)) == images


def test_an_objective_built_with_the_regulariser_adds_its_terms():
    texts = torch.eye(4)
    out = _outputs(texts.clone(), texts)
    batch = Batch(
        Views(
            out.image_emb, torch.ones(4, 1, dtype=torch.bool), torch.zeros(4, 1, dtype=torch.long)
        ),
        Views(
            out.text_emb, torch.ones(4, 1, dtype=torch.bool), torch.zeros(4, 1, dtype=torch.long)
        ),
    )
    regularizer = TransportRegularizer(weight=0.5, epsilon=0.05, iterations=20)

    with_it = build_objective("factorized", 1, 0.05, 20, regularizer)(out, batch)
    without = build_objective("factorized", 1, 0.05, 20)(out, batch)

    assert {"ot_identity_loss", "ot_loop_loss"} <= set(with_it)
    assert not {"ot_identity_loss", "ot_loop_loss"} & set(without)


def _log_map_sum(points: torch.Tensor, weights: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The weighted sum of the sphere's log maps at `at`: zero at the Karcher mean."""
    cos = (points @ at).clamp(-1, 1)
    angle = torch.acos(cos)
    along = points - cos[:, None] * at[None, :]
    return (weights * angle / torch.sin(angle))[:, None].mul(along).sum(dim=0)


def test_the_sphere_barycenter_is_the_weighted_karcher_mean():
    points = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.3, 0.2, 1.0]]), dim=-1)
    weights = torch.tensor([0.6, 0.3, 0.1])
    padded = torch.cat([points, torch.tensor([[0.0, 0.0, -1.0]])])  # a padding view, weight 0

    center = sphere_barycenter(padded[None], torch.cat([weights, torch.zeros(1)])[None], 20)[0]

    assert center.norm() == pytest.approx(1.0, abs=1e-6)
    assert _log_map_sum(points, weights, center).norm() < 1e-5
    mean = F.normalize(weights @ points, dim=-1)  # the `mean` fusion: a different point
    assert _log_map_sum(points, weights, mean).norm() > 1e-3
    one = sphere_barycenter(points[None, :1], torch.ones(1, 1))[0]
    torch.testing.assert_close(one, points[0])


def _one_view_each(views: Views, listings: int) -> Views:
    """The views with only the primary kept for the first `listings` listings."""
    mask = views.mask.clone()
    mask[:listings, 1:] = False
    return Views(views.features, mask, views.kinds)


def test_barycenter_fusion_is_the_mean_fusion_at_two_views_and_near_it_otherwise():
    torch.manual_seed(0)
    mean = ListingModel(IMAGE_DIM, TEXT_DIM, dim=16, hidden=32, fusion="mean").eval()
    barycenter = ListingModel(IMAGE_DIM, TEXT_DIM, dim=16, hidden=32, fusion="barycenter").eval()
    barycenter.load_state_dict(mean.state_dict())
    batch = _batch()
    images, texts = _one_view_each(batch.images, 3), _one_view_each(batch.texts, 3)

    with torch.no_grad():
        by_mean = mean.embed_listings(images, texts)
        by_barycenter = barycenter.embed_listings(images, texts)

    # one photo and one text weighted 0.5 / 0.5: the midpoint of their arc, either way
    torch.testing.assert_close(by_barycenter[:3], by_mean[:3], atol=1e-5, rtol=0)
    # more views: two centres of the same weighted points, near but not the same
    cosine = (by_barycenter[3:] * by_mean[3:]).sum(dim=-1)
    assert (cosine > 0.9).all() and (cosine < 1 - 1e-6).any()


def test_barycenter_fusion_trains_with_unit_embeddings_and_finite_gradients():
    torch.manual_seed(0)
    model = ListingModel(IMAGE_DIM, TEXT_DIM, dim=16, hidden=32, fusion="barycenter")
    batch = _batch()

    out = model(batch.images, batch.texts, batch.query_features)
    terms = build_objective("factorized", 1, 0.1, 10)(out, batch)
    sum(terms.values()).backward()

    torch.testing.assert_close(out.fused.norm(dim=-1), torch.ones(6))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="fusion"):
        ListingModel(IMAGE_DIM, TEXT_DIM, fusion="median")


def test_dropping_a_modality_empties_it_for_that_share_of_listings_only():
    images = [ListingViews(rows=(10 * i, 10 * i + 1), kinds=(4, 5)) for i in range(10)]
    texts = [ListingViews(rows=(i,), kinds=(0,)) for i in range(10)]

    kept_images, kept_texts = drop_modalities(images, texts, 0.4, np.random.default_rng(1))

    lost = [i for i in range(10) if not kept_images[i].rows or not kept_texts[i].rows]
    assert len(lost) == 4
    assert all(bool(kept_images[i].rows) != bool(kept_texts[i].rows) for i in lost)  # one side
    assert all(
        kept_images[i] == images[i] and kept_texts[i] == texts[i]
        for i in set(range(10)) - set(lost)
    )
    padded = pad_views(
        np.ones((100, 3)), [ListingViews((), ()), images[1]], 1, np.random.default_rng(0)
    )
    assert padded.mask.tolist() == [[False, False], [True, True]]


def test_a_listing_without_one_modality_has_no_contrastive_terms():
    torch.manual_seed(0)
    model = ListingModel(IMAGE_DIM, TEXT_DIM, dim=16, hidden=32)
    objective = build_objective("factorized", 1, 0.1, 10)
    batch = _batch()
    batch.images.mask[2] = False  # listing 2 lost its photos
    batch = dataclasses.replace(batch, complete=None)  # as if made so: the batch sees it
    assert not batch.complete

    out = model(batch.images, batch.texts)
    terms = objective(out, batch)
    alone = objective.terms(out, batch, torch.tensor([1.0, 1, 0, 1, 1, 1]))

    assert torch.isfinite(sum(terms.values()))
    torch.testing.assert_close(terms["transport_loss"], alone["transport_loss"])


def test_the_ema_teacher_follows_the_student_at_its_momentum():
    torch.manual_seed(0)
    student = ListingModel(IMAGE_DIM, TEXT_DIM, dim=16, hidden=32)
    teacher = EmaTeacher(student, momentum=0.75)
    before = [p.clone() for p in teacher.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)

    teacher.update(student)

    for old, new, theirs in zip(
        before, teacher.model.parameters(), student.parameters(), strict=True
    ):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * theirs)
        assert not new.requires_grad
    with pytest.raises(ValueError, match="momentum"):
        EmaTeacher(student, momentum=1.0)


def test_distillation_is_zero_when_the_student_agrees_and_pulls_it_toward_the_teacher():
    torch.manual_seed(0)
    student = ListingModel(IMAGE_DIM, TEXT_DIM, dim=16, hidden=32).eval()
    teacher = EmaTeacher(student, momentum=0.9)
    batch = _batch()
    loss = DistillationLoss(weight=1.0, temperature=0.1)

    out = student(batch.images, batch.texts, batch.query_features)
    same = loss(out, *teacher.targets(batch.images, batch.texts, batch.query_features))
    sampled = Views(
        batch.images.features, batch.images.mask & (torch.arange(3) == 0), batch.images.kinds
    )
    partial = student(sampled, batch.texts, batch.query_features)  # the primary photo only
    apart = loss(partial, *teacher.targets(batch.images, batch.texts, batch.query_features))
    sum(apart.values()).backward()

    assert set(same) == {"distill_listing_loss", "distill_query_loss"}
    assert all(abs(float(v.detach())) < 1e-5 for v in same.values())
    assert all(float(v.detach()) > 1e-4 for v in apart.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.model.parameters())
