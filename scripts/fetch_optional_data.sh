#!/usr/bin/env bash
# Fetch optional Debian data for the sample catalog into DEST, without root:
#   unicode-cldr-core       CLDR keyword annotations (more tags and queries)
#   fonts-noto-color-emoji  Google's emoji drawings (a third image vendor)
# Files already installed system-wide are used as they are. Any failure (no apt, no
# network) only logs a line: the catalog step then builds without these sources.
set -u
dest=${1:-.cache/debian}
mkdir -p "$dest"
need=()
[ -f /usr/share/unicode/cldr/common/annotations/en.xml ] || need+=(unicode-cldr-core)
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need+=(fonts-noto-color-emoji)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download "${need[@]}" >/dev/null 2>&1); then
      for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$dest"; done
      echo "optional data: extracted ${need[*]} into $dest"
    else
      echo "optional data: could not download ${need[*]} (no Debian mirror?); the sample catalog is built without them"
    fi
    rm -rf "$tmp"
  else
    echo "optional data: apt-get not available; the sample catalog is built without ${need[*]}"
  fi
fi
touch "$dest/.fetched"
