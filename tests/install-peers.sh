#!/usr/bin/env bash
# Installs the real third-party peers the integration tests talk to (Debian packages).
# Needs root (or sudo). Does nothing when everything is already installed.
set -euo pipefail
packages=(dcmtk orthanc orthanc-dicomweb dicom3tools mricron-data invesalius-examples postgresql nodejs chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v npm >/dev/null || missing+=(npm)
[ ${#missing[@]} -eq 0 ] && { echo "peers: all installed"; exit 0; }
echo "peers: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
