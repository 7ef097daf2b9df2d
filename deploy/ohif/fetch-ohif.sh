#!/usr/bin/env bash
# Fetch OHIF's prebuilt viewer (npm @ohif/app, pinned) and install our app-config.js.
#
#   deploy/ohif/fetch-ohif.sh [DEST]     (default DEST: deploy/ohif/vendor/dist)
#
# Idempotent: does nothing when DEST/index.html exists for the pinned version.
# Needs npm and the npm registry; nothing else is downloaded.
set -euo pipefail
OHIF_VERSION="${OHIF_VERSION:-3.13.2}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-$here/vendor/dist}"
stamp="$dest/.tessera-ohif-version"
if [ -f "$dest/index.html" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$OHIF_VERSION" ]; then
  cp "$here/app-config.js" "$dest/app-config.js"
  echo "ohif: $OHIF_VERSION already in $dest"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "ohif: fetching @ohif/app@$OHIF_VERSION"
(cd "$work" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
tar -xzf "$work"/ohif-app-"$OHIF_VERSION".tgz -C "$work"
[ -f "$work/package/dist/index.html" ] || { echo "ohif: no dist/index.html in the package" >&2; exit 1; }
# Source maps are not needed to run the viewer (and are most of the size).
find "$work/package/dist" -name '*.map' -delete
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$work/package/dist" "$dest"
cp "$here/app-config.js" "$dest/app-config.js"
echo "$OHIF_VERSION" > "$stamp"
echo "ohif: $OHIF_VERSION installed in $dest"
