"""Category filters on real FAISS indexes: the strategy each selectivity takes, and the
results against exact filtered search."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from components.service.filters import OVERFETCH, RESTRICTED, FilterError, Taxonomy
from components.service.releases import Labels, ServedRelease

DIM, N = 16, 4000


def _release(factory: str, categories: dict[int, str], nprobe: int = 4):
    """A release of N random unit vectors in `factory`, and its vectors by label."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)
    faiss.normalize_L2(vectors)
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    labels = np.arange(N, dtype=np.int64) * 2 + 5  # labels are not row numbers
    index.add_with_ids(vectors, labels)
    if "IVF" in factory:
        faiss.extract_index_ivf(index).nprobe = nprobe
    listing_of = {int(label): f"l{label}" for label in labels}
    served = ServedRelease(
        version="v",
        index=index,
        labels=Labels(listing_of, {v: k for k, v in listing_of.items()}),
        manifest={},
        embedder=None,
        listings={},
        taxonomy=Taxonomy({int(label): categories[int(label)] for label in labels}),
    )
    return served, dict(zip(labels.tolist(), vectors, strict=True))


def _categories() -> dict[int, str]:
    """Every 100th listing in `Rare > One`, a third in `Common > Part`, the rest `Other`."""
    rng = np.random.default_rng(1)
    out = {}
    for row in range(N):
        label = row * 2 + 5
        u = rng.random()
        out[label] = "Rare > One" if row % 100 == 0 else "Common > Part" if u < 0.35 else "Other"
    return out


def _exact(vectors, categories, query, prefix: str, k: int) -> list[str]:
    keep = [label for label, c in categories.items() if c.startswith(prefix)]
    scores = np.array([vectors[label] @ query for label in keep])
    return [f"l{keep[i]}" for i in np.argsort(-scores, kind="stable")[:k]]


@pytest.mark.parametrize(
    "factory",
    ["IDMap2,Flat", "IVF32,Flat", "IVF32,SQ8", "IDMap2,HNSW16", "IDMap2,IVF32,SQ8,Refine(SQfp16)"],
)
def test_filtered_search_takes_the_strategy_of_its_selectivity_and_finds_the_exact_top(factory):
    categories = _categories()
    served, vectors = _release(factory, categories)
    queries = np.random.default_rng(2).standard_normal((40, DIM)).astype(np.float32)
    faiss.normalize_L2(queries)
    truth = np.stack(list(vectors.values())) @ queries.T
    top = np.array(list(vectors))[np.argsort(-truth, axis=0)[:10].T]
    unfiltered = np.mean(
        [
            len(set(row) & set(t)) / 10
            for row, t in zip(served.index.search(queries, 10)[1], top, strict=True)
        ]
    )
    for prefix, strategy in (("Rare", RESTRICTED), ("Common", OVERFETCH)):
        where = served.taxonomy.resolve((prefix,))
        hits, used = served.search_where(queries, 10, where, overfetch_min_share=0.25)
        assert used == strategy
        recall = []
        for query, found in zip(queries, hits, strict=True):
            ids = [listing for listing, _ in found]
            assert len(ids) == 10 and all(categories[int(i[1:])].startswith(prefix) for i in ids)
            recall.append(len(set(ids) & set(_exact(vectors, categories, query, prefix, 10))) / 10)
        # exact indexes: exact; approximate ones: no worse than their own recall unfiltered
        floor = 1.0 if factory == "IDMap2,Flat" else unfiltered - 0.05
        assert np.mean(recall) >= floor, (factory, prefix, np.mean(recall), unfiltered)


def test_a_filter_with_fewer_matches_than_k_returns_them_all_and_removed_ones_stay_out():
    categories = _categories()
    served, vectors = _release("IDMap2,Flat", categories)
    rare = [label for label, c in categories.items() if c.startswith("Rare")]
    query = vectors[rare[0]][None, :]
    where = served.taxonomy.resolve(("Rare > One",))

    hits, _ = served.search_where(query, 100, where, 0.25)
    assert sorted(i for i, _ in hits[0]) == sorted(f"l{label}" for label in rare)

    gone = served.with_removed(frozenset({f"l{rare[0]}"}))
    hits, _ = gone.search_where(query, 100, where, 0.25)
    assert f"l{rare[0]}" not in [i for i, _ in hits[0]] and len(hits[0]) == len(rare) - 1


def test_a_broad_filter_whose_over_fetch_comes_back_short_falls_back_to_restricted():
    """Matching listings all far from the query: over-fetching the unfiltered top finds
    too few of them, and the restricted search still answers k."""
    categories = {label: "Other" for label in range(5, 2 * N + 5, 2)}
    _, vectors = _release("IDMap2,Flat", categories)
    query = vectors[5][None, :]
    labels = list(vectors)
    for row in np.argsort(np.stack(list(vectors.values())) @ query[0])[: N // 3]:
        categories[labels[row]] = "Far"
    served, _ = _release("IDMap2,Flat", categories)
    where = served.taxonomy.resolve(("Far",))

    hits, strategy = served.search_where(query, 10, where, overfetch_min_share=0.25)

    assert where.selectivity >= 0.25 and strategy == RESTRICTED and len(hits[0]) == 10


def test_values_are_checked_and_unknown_ones_named_with_the_nearest():
    taxonomy = Taxonomy({1: "Animals & Nature > Animal Mammal", 2: "Food & Drink", 3: None})

    assert taxonomy.resolve(("animals &  nature",)).values == ("Animals & Nature",)
    assert taxonomy.resolve(("Animals & Nature>animal mammal",)).labels.tolist() == [1]
    assert taxonomy.facets([1, 2, 2, 3]) == {"Food & Drink": 2, "Animals & Nature": 1}
    for values, says in [
        ((), "no value"),
        (("",), "blank"),
        (("x" * 300,), "300 characters"),
        (tuple(f"v{i}" for i in range(21)), "21 values, at most 20"),
        (("Animals",), "nearest: 'Animals & Nature'"),
        (("Food & Drinks",), "nearest: 'Food & Drink'"),
    ]:
        with pytest.raises(FilterError, match=says):
            taxonomy.resolve(values)
