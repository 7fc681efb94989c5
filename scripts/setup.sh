#!/usr/bin/env bash
# `npm run setup`: installs what the tests need from the system (the Debian
# packages in scripts/requirements.txt) and the package lists the qemu tests
# download Debian's kernel with. Idempotent: what is there is left alone.
# `.ci/run` runs it too. Needs root (or sudo) only when something is missing.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive

if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
  echo "npm run setup: this is not a Debian-like system; install what scripts/requirements.txt lists by hand" >&2
  exit 1
fi
as_root=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null; then
    echo "npm run setup: run it as root (or install sudo): it installs Debian packages" >&2
    exit 1
  fi
  as_root=(sudo)
fi

mapfile -t packages < <(awk '!/^#/ && NF { print $1 }' requirements.txt)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# The qemu tests fetch Debian's kernel package (apt-get download): the lists
# must name it, and apt-get install needs them too.
updated=no
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  echo "npm run setup: apt-get update"
  "${as_root[@]}" apt-get update -qq
  updated=yes
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "npm run setup: installing ${missing[*]}"
  "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "npm run setup: ${#packages[@]} packages present (${#missing[@]} installed now; package lists updated: $updated)"
