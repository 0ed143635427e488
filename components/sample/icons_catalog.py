"""A second sample catalog, structurally unlike the emoji one: Font Awesome Free icons.

One listing per icon, from PyPI `fontawesomefree` (icons CC BY 4.0, fonts SIL OFL 1.1):
- image views: the glyph drawn from the solid font, and from the regular font where the
  icon has that style (most listings have one photo, so view-to-listing evaluation is
  mostly absent);
- title: the icon's label ("Circle Info"); category: `Icons > <its first category>`;
  tags: its search terms; description: none.
- queries: search terms held out of every listing (a term is held out everywhere or
  nowhere, by a hash), relevant to every icon that lists it; English only.
Deterministic: same params, same bytes.
"""

from __future__ import annotations

import functools
import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageDraw, ImageFont

from components.config import CatalogConfig
from components.contract import IMAGES, LISTINGS, QUERIES
from components.io.catalog_reader import LISTING_SCHEMA
from components.io.feature_store import unit_hash
from components.io.manifest import package_versions
from components.sample.emoji_catalog import QUERIES_SCHEMA, BuiltCatalog, query_id

PACKAGE = "fontawesomefree"
_ROOT = "static/fontawesomefree/js-packages/@fortawesome/fontawesome-free"
STYLES = {
    "solid": "fa-solid-900.ttf",
    "regular": "fa-regular-400.ttf",
    "brands": "fa-brands-400.ttf",
}
MAX_RELEVANT = 10  # a query relevant to more icons than this stays a tag
LICENCE = "Font Awesome Free by Fonticons, Inc: icons CC BY 4.0, fonts SIL OFL 1.1"
LISTINGS_SCHEMA = LISTING_SCHEMA.append(pa.field("icon", pa.string()))  # extra: passed through

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Icon:
    name: str
    label: str
    terms: tuple[str, ...]
    styles: tuple[str, ...]  # in view order: solid, regular, brands
    unicode: str
    category: str | None


def package_root() -> Path:
    """The installed Font Awesome files."""
    import fontawesomefree

    return Path(fontawesomefree.__file__).parent / _ROOT


def load_icons(root: Path) -> list[Icon]:
    """Every icon of the metadata, in name order, with its first category."""
    icons = yaml.safe_load((root / "metadata/icons.yml").read_text())
    categories = yaml.safe_load((root / "metadata/categories.yml").read_text())
    first_category: dict[str, str] = {}
    for key in sorted(categories):
        for name in categories[key].get("icons", []):
            first_category.setdefault(name, categories[key]["label"])
    found = []
    for name in sorted(icons, key=str):
        entry = icons[name]
        terms = (entry.get("search") or {}).get("terms") or []
        styles = tuple(s for s in STYLES if s in entry.get("styles", []))
        found.append(
            Icon(
                name=str(name),
                label=str(entry["label"]),
                terms=tuple(dict.fromkeys(str(t).strip().lower() for t in terms if str(t).strip())),
                styles=styles,
                unicode=str(entry["unicode"]),
                category=first_category.get(str(name)),
            )
        )
    return found


def held_out_terms(icons: list[Icon], fraction: float) -> set[str]:
    """Search terms held out of every listing, as queries, chosen per term by a hash.
    String matching must not solve retrieval: a held-out term is never part of the label,
    the category or a kept term of an icon that lists it (such a term stays a tag), and a term
    listed by more than MAX_RELEVANT icons is too broad to judge recall by and stays."""
    listing_count: dict[str, int] = {}
    for icon in icons:
        for term in icon.terms:
            listing_count[term] = listing_count.get(term, 0) + 1
    held = {
        term
        for term, count in listing_count.items()
        if count <= MAX_RELEVANT and unit_hash("icon-query:" + term) < fraction
    }
    changed = True
    while changed:  # keeping a term can expose another held term inside it
        changed = False
        for icon in icons:
            visible = [icon.label.lower(), (icon.category or "").lower()]
            visible += [t for t in icon.terms if t not in held]
            for term in [t for t in icon.terms if t in held]:
                if any(term in text or text in term for text in visible):
                    held.discard(term)
                    changed = True
    return held


def build(config: CatalogConfig, out: Path) -> BuiltCatalog:
    """Write the icons catalog's listings, queries and images into `out` (emptied first)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    root = package_root()
    icons = [icon for icon in load_icons(root) if icon.styles]
    icons = _select(icons, config.max_listings)
    held = held_out_terms(icons, config.query_fraction)
    rows, pairs = [], []
    for icon in icons:
        uris = _draw_views(icon, root, config.image_size, out / IMAGES.name)
        if not uris:
            continue
        rows.append(_listing_row(icon, held, uris))
        pairs += [(term, rows[-1]["listing_id"]) for term in icon.terms if term in held]
    listings = pa.Table.from_pylist(rows, schema=LISTINGS_SCHEMA)
    queries = _queries_table(pairs)
    pq.write_table(listings, out / LISTINGS.name)
    pq.write_table(queries, out / QUERIES.name)
    counts = _counts(listings, queries)
    summary = (
        f"catalog (icons): {counts['listings']} listings, {counts['image_views']} image views "
        f"({counts['share_with_2plus_image_views']:.1%} with 2+), {counts['queries']} queries "
        f"({counts['query_rows']} relevance rows)"
    )
    return BuiltCatalog(
        counts=counts,
        sources={"packages": package_versions([PACKAGE, "pillow"]), "source": "icons"},
        licences={"fontawesome": LICENCE},
        summary=summary,
    )


def _select(icons: list[Icon], limit: int | None) -> list[Icon]:
    """All icons, or `limit` of them chosen by a hash of their name (stable, spread)."""
    if limit is None:
        return icons
    return sorted(icons, key=lambda icon: unit_hash("icon:" + icon.name))[:limit]


def _draw_views(icon: Icon, root: Path, side: int, images: Path) -> list[str]:
    uris = []
    for style in icon.styles:
        data = _draw(root / "webfonts" / STYLES[style], chr(int(icon.unicode, 16)), side)
        if data is None:
            continue
        (images / style).mkdir(parents=True, exist_ok=True)
        (images / style / f"{icon.name}.png").write_bytes(data)
        uris.append(f"{IMAGES.name}/{style}/{icon.name}.png")
    return uris


@functools.cache
def _font(font_path: Path, side: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path), int(side * 0.7))


def _draw(font_path: Path, char: str, side: int) -> bytes | None:
    """The glyph, black on white, centred in a `side` px square PNG; None if the font
    has no drawing for it."""
    image = Image.new("RGB", (side, side), (255, 255, 255))
    font = _font(font_path, side)
    ImageDraw.Draw(image).text((side / 2, side / 2), char, font=font, fill=0, anchor="mm")
    if image.getextrema() == ((255, 255),) * 3:
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _listing_row(icon: Icon, held: set[str], uris: list[str]) -> dict:
    label = icon.label.lower()
    return {
        "listing_id": f"fa-{icon.name}",
        "title": icon.label,
        "description": None,
        "tags": [t for t in icon.terms if t not in held and t != label],
        "category": f"Icons > {icon.category}" if icon.category else None,
        "image_uris": uris,
        "icon": icon.name,
    }


def _queries_table(pairs: list[tuple[str, str]]) -> pa.Table:
    rows = [
        {
            "query_id": query_id(f"en:{term}"),
            "query": term,
            "listing_id": listing_id,
            "language": "en",
        }
        for term, listing_id in sorted(set(pairs))
    ]
    rows.sort(key=lambda r: (r["query_id"], r["listing_id"]))
    return pa.Table.from_pylist(rows, schema=QUERIES_SCHEMA)


def _counts(listings: pa.Table, queries: pa.Table) -> dict[str, int | float]:
    views = [len(uris) for uris in listings.column("image_uris").to_pylist()]
    multi = sum(n >= 2 for n in views)
    return {
        "listings": listings.num_rows,
        "image_views": sum(views),
        "listings_with_2plus_image_views": multi,
        "share_with_2plus_image_views": round(multi / max(listings.num_rows, 1), 4),
        "queries": len(set(queries.column("query_id").to_pylist())),
        "queries_en": len(set(queries.column("query_id").to_pylist())),
        "query_rows": queries.num_rows,
    }
