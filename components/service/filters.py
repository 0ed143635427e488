"""Category filters and facets over a release's index labels.

A listing's `category` is a taxonomy path, `Animals & Nature > Animal Mammal`. A filter
value is a prefix of whole path parts (`Animals & Nature` matches the path above,
`Animals` does not), compared without regard to case or the spaces around `>`; several
values match a listing that any of them matches.

How a filtered search runs depends on the share of listings the filter keeps (its
selectivity): a broad filter over-fetches from the unfiltered index and keeps the hits
that match (one ordinary search, a few more neighbours); a selective one searches only
the matching labels (FAISS `IDSelector` through `SearchParameters`, with IVF's probes
widened as the share shrinks, since the matching neighbours lie farther out). Both fall
back to the restricted search when the over-fetch comes back short.
"""

from __future__ import annotations

import difflib
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import faiss
import numpy as np

SEPARATOR = ">"
# strategies by name, as /metrics counts them
OVERFETCH, RESTRICTED = "overfetch", "restricted"


class FilterError(ValueError):
    """A filter the service cannot apply; the message names the value and why."""


def parts(path: str) -> tuple[str, ...]:
    """The normalised parts of a taxonomy path (case-folded, runs of spaces as one)."""
    return tuple(" ".join(p.split()).casefold() for p in path.split(SEPARATOR) if p.strip())


@dataclass
class Filter:
    """A resolved category filter: the labels it keeps and their share of the index."""

    values: tuple[str, ...]  # the canonical category prefixes asked for
    labels: np.ndarray  # sorted int64 labels that match
    selectivity: float  # matching labels / labelled listings
    _mask: np.ndarray | None = field(default=None, repr=False)
    _bitmap: np.ndarray | None = field(default=None, repr=False)

    @property
    def mask(self) -> np.ndarray:
        """A boolean per label up to the largest matching one (made once)."""
        if self._mask is None:
            mask = np.zeros(int(self.labels[-1]) + 1 if len(self.labels) else 0, dtype=bool)
            mask[self.labels] = True
            self._mask = mask
        return self._mask

    def keeps(self, labels: np.ndarray) -> np.ndarray:
        """Which of `labels` (any shape; -1 for none) the filter keeps."""
        mask = self.mask
        inside = (labels >= 0) & (labels < len(mask))
        kept = np.zeros(labels.shape, dtype=bool)
        kept[inside] = mask[labels[inside]]
        return kept

    def selector(self) -> faiss.IDSelector:
        """A FAISS selector of the matching labels (a bitmap: one bit per label; FAISS
        takes its length in bytes)."""
        if self._bitmap is None:
            self._bitmap = np.packbits(self.mask, bitorder="little")
        return faiss.IDSelectorBitmap(len(self._bitmap), faiss.swig_ptr(self._bitmap))


class Taxonomy:
    """The categories of a release's listings, by index label."""

    def __init__(self, categories: dict[int, str | None], max_values: int = 20) -> None:
        """`categories`: label -> the listing's category path (None: uncategorised)."""
        self.max_values = max_values
        self.size = max(1, len(categories))
        by_prefix: dict[tuple[str, ...], list[int]] = {}
        self.names: dict[tuple[str, ...], str] = {}  # normalised prefix -> as written
        top: dict[int, str] = {}
        for label, path in categories.items():
            if not path:
                continue
            written = [p.strip() for p in path.split(SEPARATOR) if p.strip()]
            key = parts(path)
            for depth in range(1, len(key) + 1):
                by_prefix.setdefault(key[:depth], []).append(label)
                self.names.setdefault(key[:depth], " > ".join(written[:depth]))
            if key:
                top[label] = written[0]
        self._labels = {k: np.unique(np.asarray(v, dtype=np.int64)) for k, v in by_prefix.items()}
        self.top_of = top
        self.resolve = lru_cache(maxsize=256)(self._resolve)

    def _resolve(self, values: tuple[str, ...]) -> Filter:
        """The filter of `values` (category prefixes).

        Raises:
            FilterError: no value, too many, a blank or overlong one, or a category that
                no listing of the release has (with the nearest known ones).
        """
        if not values:
            raise FilterError("category: no value given")
        if len(values) > self.max_values:
            raise FilterError(
                f"category: {len(values)} values, at most {self.max_values} are accepted"
            )
        found, canonical = [], []
        for value in values:
            if len(value) > 200:
                raise FilterError(f"category: a value of {len(value)} characters (at most 200)")
            key = parts(value)
            if not key:
                raise FilterError("category: a blank value")
            if key not in self._labels:
                raise FilterError(
                    f"category {value!r} is not a category here{self._nearest(value)}"
                )
            found.append(self._labels[key])
            canonical.append(self.names[key])
        labels = np.unique(np.concatenate(found)) if len(found) > 1 else found[0]
        return Filter(tuple(canonical), labels, len(labels) / self.size)

    def _nearest(self, value: str) -> str:
        names = list(self.names.values())
        close = difflib.get_close_matches(value, names, n=3, cutoff=0.5)
        if not close:  # a part of a path, a different case: the top-level ones then
            lowered = {n.casefold(): n for n in names}
            close = [
                lowered[c] for c in difflib.get_close_matches(value.casefold(), lowered, 3, 0.5)
            ]
        if not close:
            close = sorted({n for k, n in self.names.items() if len(k) == 1})[:5]
        return "; nearest: " + ", ".join(repr(c) for c in close) if close else ""

    def facets(self, labels: list[int]) -> dict[str, int]:
        """Counts per top-level category over `labels`, largest first."""
        counts = Counter(self.top_of[label] for label in labels if label in self.top_of)
        return dict(counts.most_common())


def search_params(index: faiss.Index, selectivity: float, k: int, where: Filter | None = None):
    """`SearchParameters` for a filtered search of k on this kind of index: IVF probes
    widened by 1/sqrt(selectivity) (capped at every list: a filter's neighbours lie
    farther out), HNSW's breadth by 1/selectivity (its walk meets matching nodes at that
    rate), and with `where`, the search kept to its labels; a re-ranking index
    (`...,Refine(...)`) gets them for the index it re-ranks, inside its own parameters
    (FAISS refuses any other kind); None when nothing differs from a plain search."""
    selector = None if where is None else where.selector()
    inner = index
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexRefine):
        # the base sees row numbers: an IDMap translates only the outer parameters' selector
        inside = selector
        if selector is not None and inner is not index:
            inside = faiss.IDSelectorTranslated(index.id_map, selector)
        base = _params_of(faiss.downcast_index(inner.base_index), selectivity, k, inside)
        if base is None:
            return None
        params = faiss.IndexRefineSearchParameters(k_factor=inner.k_factor, base_index_params=base)
        params.base_ref = (base, inside)  # the base's parameters, kept alive with these
    else:
        params = _params_of(inner, selectivity, k, selector)
        if params is None:
            return None
    if selector is not None:
        params.sel = selector
        params.selector_ref = (selector, where)  # raw pointers inside: keep them alive
    return params


def _params_of(inner: faiss.Index, selectivity: float, k: int, selector):
    """The search parameters of an IVF or HNSW index (or plain ones when a selector needs
    them), widened for `selectivity`; None when a plain search does."""
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        widened = math.ceil(ivf.nprobe / math.sqrt(max(selectivity, 1e-6)))
        params = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, widened))
    elif isinstance(inner, faiss.IndexHNSW):
        breadth = math.ceil(max(inner.hnsw.efSearch, k) / max(selectivity, 1e-6))
        params = faiss.SearchParametersHNSW(efSearch=min(max(1, inner.ntotal), breadth))
    elif selector is None:
        return None
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    return params
