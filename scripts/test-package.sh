#!/usr/bin/env bash
# The package test: the .deb installed where nothing of matchlock is. A fresh Debian 12 root
# (debootstrap minbase, cached as a tarball), bookworm-backports enabled, `apt-get install
# ./matchlock_….deb` with its dependencies from Debian's registry (downloads cached), then
# inside that root: `matchlock diagnose` finds the packaged kernel and guest-init, and a
# real sandbox runs. Needs root (chroot, mounts).
# Usage: scripts/test-package.sh [deb=built by scripts/package-deb.sh]
set -euo pipefail
cd "$(dirname "$0")/.."
deb=${1:-$(scripts/package-deb.sh)}
cache="${XDG_CACHE_HOME:-$HOME/.cache}/matchlock/package-test"
base="$cache/bookworm-minbase.tar"
log() { printf '==> %s\n' "$*" >&2; }
mkdir -p "$cache/apt-archives/partial"
work=$(mktemp -d)
root="$work/root"
cleanup() {
  for m in var/cache/apt/archives dev sys proc; do
    mountpoint -q "$root/$m" 2>/dev/null && umount -R "$root/$m"
  done
  rm -rf "$work"
}
trap cleanup EXIT

if [ ! -f "$base" ]; then
  log "debootstrap of a minimal Debian 12 root (once, cached in $base)"
  debootstrap --variant=minbase bookworm "$work/bootstrap" http://deb.debian.org/debian >&2
  tar -C "$work/bootstrap" -cf "$base.partial-$$" . && mv "$base.partial-$$" "$base"
  rm -rf "$work/bootstrap"
fi
mkdir "$root"
tar -C "$root" -xf "$base"
cat > "$root/etc/apt/sources.list.d/backports.sources" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
cp /etc/resolv.conf "$root/etc/resolv.conf"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount --bind "$cache/apt-archives" "$root/var/cache/apt/archives"
cp "$deb" "$root/tmp/matchlock.deb"
python3 tests/fixtures/make_images.py "$work/fixtures" >/dev/null
cp "$work/fixtures/busybox.tar" "$root/tmp/busybox.tar"

in_root() { chroot "$root" env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
log "apt-get install ./matchlock.deb in the fresh root"
in_root apt-get update -qq >&2
in_root apt-get install -y -qq -t bookworm-backports /tmp/matchlock.deb >&2
log "matchlock diagnose in the fresh root"
diagnose=$(in_root matchlock diagnose --json) || { echo "$diagnose" >&2; exit 1; }
for check in kernel guest-init; do
  where=$(echo "$diagnose" | jq -r ".checks[] | select(.name == \"$check\") | .message")
  case "$where" in
    /usr/lib/matchlock/*) ;;
    *) echo "diagnose: $check is not the packaged one: $where" >&2; exit 1 ;;
  esac
done
log "the containerd runtime is installed"
shim=$(in_root containerd-shim-matchlock-v1 -v) || { echo "containerd-shim-matchlock-v1 -v failed" >&2; exit 1; }
case "$shim" in
  "containerd-shim-matchlock-v1 "*io.containerd.matchlock.v1*) ;;
  *) echo "containerd-shim-matchlock-v1 -v: $shim" >&2; exit 1 ;;
esac
log "a sandbox in the fresh root"
out=$(in_root sh -c 'matchlock image import busybox < /tmp/busybox.tar >/dev/null && matchlock run --image busybox -- sh -c "echo hello from \$(uname -r)"')
case "$out" in
  "hello from "*matchlock*) echo "package test passed: $out" ;;
  *) echo "package test: unexpected output: $out" >&2; exit 1 ;;
esac
