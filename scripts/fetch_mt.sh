#!/usr/bin/env bash
# Fetches the German–English parallel text of the translation task: Debian's trans-de-en
# (the Ding dictionary, GPL-2+), version and sha256 pinned below, downloaded as a .deb
# without installing it and unpacked with dpkg-deb. Writes data/mt/de-en (206,238 lines:
# `German :: English` entries; common::ding reads them) and data/mt/copyright.
# Idempotent via a stamp file.
set -euo pipefail
cd "$(dirname "$0")/.."
STAMP=data/.mt-done-v1
if [ -f "$STAMP" ]; then exit 0; fi
VERSION=1.9-6
SHA256=45f6b4cf1c434776fba6811d7bc522efabb5425c43ba8afd0e289bf9e2e53df4
DEB=trans-de-en_${VERSION}_all.deb
mkdir -p .cache/debs data
if [ ! -f ".cache/debs/$DEB" ]; then
  echo "fetch_mt: downloading trans-de-en $VERSION (6.3 MB)" >&2
  (cd .cache/debs && apt-get download -q "trans-de-en=$VERSION" >&2) || {
    echo "fetch_mt: apt-get download trans-de-en=$VERSION failed; run apt-get update, or fetch $DEB into .cache/debs/ by hand" >&2
    exit 1
  }
fi
echo "$SHA256  .cache/debs/$DEB" | sha256sum --check --quiet - || {
  echo "fetch_mt: .cache/debs/$DEB does not have the pinned sha256; delete it and run again" >&2
  exit 1
}
tmp=$(mktemp -d data/mt.tmp.XXXXXX)
dpkg-deb -x ".cache/debs/$DEB" "$tmp/deb"
mkdir -p "$tmp/mt"
mv "$tmp/deb/usr/share/trans/de-en" "$tmp/mt/de-en"
mv "$tmp/deb/usr/share/doc/trans-de-en/copyright" "$tmp/mt/copyright"
rm -rf data/mt "$tmp/deb"
mv "$tmp/mt" data/mt
rmdir "$tmp"
touch "$STAMP"
