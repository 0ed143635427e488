"""Listing fingerprints (`core.views.fingerprints`) from a table of view rows, in Arrow: what
a refresh's embed computes for every listing of the catalog to find the ones it can reuse,
without making a Python object per view (about 25 s of a refresh at 1M listings).

The result is the one `group_views` then `fingerprints` give, listing for listing: the same
order (first seen), the same held-out views left out, the same `left_out` reasons; a test
holds the two to each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.core.model import KIND, TEXT_VIEW_KINDS

_PAIR = "\x1f"


def held_out_pairs(held_out: Collection[tuple[str, str]]) -> pa.Array:
    """The (listing_id, ref) pairs of held-out views as `listing_fingerprints` matches
    them: made once for a run's every chunk."""
    return pa.array(sorted(f"{i}{_PAIR}{r}" for i, r in held_out), pa.string())


def listing_fingerprints(
    table: pa.Table, held_out: Collection[tuple[str, str]] | pa.Array = ()
) -> tuple[list[str], list[str], dict[str, str]]:
    """Per listing of `table` (view rows), in first-seen order: the listings that have
    views of both modalities, their fingerprints, and the others with why. `held_out`:
    the held-out views, or their `held_out_pairs`."""
    order = pc.unique(table.column("listing_id"))
    if len(held_out) and table.num_rows:
        pairs = held_out if isinstance(held_out, pa.Array) else held_out_pairs(held_out)
        pair = pc.binary_join_element_wise(table.column("listing_id"), table.column("ref"), _PAIR)
        dropped = pc.and_(pc.equal(table.column("modality"), "image"), pc.is_in(pair, pairs))
        table = table.filter(pc.invert(dropped))
    listing = pc.index_in(table.column("listing_id"), value_set=order).to_numpy()
    image = pc.equal(table.column("modality"), "image").to_numpy(zero_copy_only=False)
    position = table.column("position").to_numpy()
    rows = np.lexsort((position, ~image, listing))  # per listing: images, then texts
    listing, image = listing[rows], image[rows]
    sorted_table = table.take(pa.array(rows, pa.int64()))
    count = len(order)
    images = np.bincount(listing[image], minlength=count)
    texts = np.bincount(listing[~image], minlength=count)
    # an image's kind is its slot among its listing's images: the first is the primary
    starts = np.concatenate([[0], np.cumsum(images + texts)])[:-1]
    slot = np.arange(len(rows)) - starts[listing]
    kinds = np.where(slot == 0, KIND["primary_image"], KIND["image"])
    if (~image).any():  # a text view's kind by its name, the names looked up once
        views = pc.filter(sorted_table.column("view"), pa.array(~image))
        names = pc.unique(views)
        named = np.array([TEXT_VIEW_KINDS[name] for name in names.to_pylist()])
        kinds[~image] = named[pc.index_in(views, value_set=names).to_numpy()]
    # "i<kind>" or "t<kind>" of each row, decoded from a dictionary of them all
    heads = pa.array([f"{m}{kind}" for m in "ti" for kind in range(len(KIND))], pa.string())
    code = (image * len(KIND) + kinds).astype(np.int32)
    head = pa.DictionaryArray.from_arrays(pa.array(code), heads).dictionary_decode()
    line = pc.binary_join_element_wise(head, sorted_table.column("key"), ":")
    lines = pc.binary_join_element_wise(line, pa.scalar(""), "\n")  # each line ends in one
    offsets = np.concatenate([[0], np.cumsum(images + texts)])
    listed = pa.LargeListArray.from_arrays(pa.array(offsets), _array(lines))
    texts_of = pc.binary_join(listed, "").to_pylist()
    ids = order.to_pylist()
    kept, prints, left_out = [], [], {}
    for i, listing_id in enumerate(ids):
        if not images[i] or not texts[i]:
            left_out[listing_id] = "no_usable_image_view" if texts[i] else "no_usable_text_view"
            continue
        kept.append(listing_id)
        prints.append(hashlib.sha256(texts_of[i].encode()).hexdigest()[:32])
    return kept, prints, left_out


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
