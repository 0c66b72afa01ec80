#!/usr/bin/env bash
# Installs the host dependencies of matchlock on Debian 12, idempotently: Debian packages
# (QEMU and e2fsprogs from bookworm-backports). Used by scripts/setup.sh and embedded in
# `matchlock setup linux`.
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/matchlock"
TOOLS="$CACHE/tools"

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_debian_packages() {
  local pkgs=(
    linux-source-6.1 build-essential flex bison bc cpio xz-utils libelf-dev libssl-dev
    libarchive13 busybox-static skopeo docker-registry debootstrap iproute2 python3
    apache2-utils zstd jq dnsmasq-base openssl curl buildah containerd runc
    containernetworking-plugins
  )
  # From bookworm-backports: mke2fs learned to build a filesystem from a tarball
  # (`-d file.tar`) in 1.47.1 (bookworm has 1.47.0), and QEMU 10 matches the qemu-utils
  # these machines already carry (bookworm's QEMU 7.2 conflicts with it).
  local backports=(qemu-system-x86 e2fsprogs)
  local missing=()
  for p in "${pkgs[@]}" qemu-system-x86; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  local e2fs_version
  e2fs_version=$(dpkg-query -W -f='${Version}' e2fsprogs 2>/dev/null || echo 0)
  if [ ${#missing[@]} -eq 0 ] && dpkg --compare-versions "$e2fs_version" ge 1.47.1; then
    log "Debian packages: all present"
    return
  fi
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "enabling bookworm-backports"
    as_root tee /etc/apt/sources.list.d/matchlock-backports.sources >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  log "installing Debian packages"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -t bookworm-backports "${backports[@]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}"
  # The registry package starts a system service on :5000; the tests run their own.
  as_root systemctl disable --now docker-registry >/dev/null 2>&1 || true
  # containerd's own service likewise: the containerd tests start a private one.
  as_root systemctl disable --now containerd >/dev/null 2>&1 || true
}

install_debian_packages
