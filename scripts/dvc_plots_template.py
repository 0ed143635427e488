"""Write .dvc/plots.html, the page `dvc plots show` fills, with Vega, Vega-Lite and
Vega-Embed inline, so the plots render with no network (DVC's own page loads them from a
CDN and shows blank plots offline). `.dvc/config` names it (`plots.html_template`).

    python scripts/dvc_plots_template.py PACKAGES_DIR

PACKAGES_DIR holds the npm packages unpacked (`make plots-template` fetches the pinned
versions from the npm registry and runs this): <name>/package/build/<name>.min.js.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LIBRARIES = ("vega", "vega-lite", "vega-embed")  # in load order: embed needs the other two
TARGET = Path(__file__).resolve().parents[1] / ".dvc" / "plots.html"
# DVC fills these by plain text replacement (dvc_render.html.HTML.embed); no `{scripts}`:
# it would add the CDN tags back
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- written by scripts/dvc_plots_template.py: {versions} (BSD-3-Clause, University of
         Washington Interactive Data Lab; https://github.com/vega) -->
{scripts_inline}
    <style>
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def library(packages: Path, name: str) -> tuple[str, str]:
    """(version, minified source) of an unpacked npm package."""
    root = packages / name / "package"
    version = json.loads((root / "package.json").read_text())["version"]
    source = (root / "build" / f"{name}.min.js").read_text(encoding="utf-8")
    found = [mark for mark in (*PLACEHOLDERS, "</script") if mark in source]
    if found:
        raise ValueError(f"{name} {version} holds {found}: it cannot be inlined as it is")
    return version, source


def page(packages: Path) -> str:
    loaded = {name: library(packages, name) for name in LIBRARIES}
    scripts = "\n".join(f"<script>{source}</script>" for _, source in loaded.values())
    versions = ", ".join(f"{name} {version}" for name, (version, _) in loaded.items())
    # str.replace, not str.format: braces are literal; the sources go in last, untouched
    return PAGE.replace("{versions}", versions).replace("{scripts_inline}", scripts)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    TARGET.write_text(page(Path(sys.argv[1])), encoding="utf-8")
    print(f"wrote {TARGET} ({TARGET.stat().st_size:,} bytes)")
