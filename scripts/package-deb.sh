#!/usr/bin/env bash
# Builds the Debian package with Debian's own dpkg-deb (SOURCE_DATE_EPOCH from the last
# commit for every file time and the binary's build time, root-owned files): /usr/bin/matchlock and
# /usr/bin/containerd-shim-matchlock-v1 (the containerd runtime); /usr/lib/matchlock/
# guest-init and the guest kernel (kernels/<series>-<config>/kernel, as `matchlock kernel
# build` names it); completions for bash, zsh and fish and man pages generated from the
# binary's own clap definitions. Prints the path of the .deb.
# Needs what scripts/setup.sh installs (the toolchain and the built kernel).
# Usage: scripts/package-deb.sh [out-dir=target/debian]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/debian}
log() { printf '==> %s\n' "$*" >&2; }

version=$(cargo metadata --locked --no-deps --format-version 1 | jq -r '.packages[] | select(.name == "matchlock") | .version')
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
log "building matchlock $version (release) and guest-init"
cargo build --quiet --locked --release -p matchlock >&2
bin=target/release/matchlock
guest=$(scripts/build-guest.sh 2>/dev/null)
kernel=$(env -u MATCHLOCK_KERNEL "$bin" kernel path) || { echo "no guest kernel: run scripts/setup.sh first" >&2; exit 1; }

root="$out/root"
rm -rf "$root"
mkdir -p "$root/DEBIAN" "$root/usr/bin" "$root/usr/share/man/man1" "$root/usr/share/doc/matchlock" \
  "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
  "$root/usr/share/fish/vendor_completions.d"
install -m 0755 "$bin" "$root/usr/bin/matchlock"
install -m 0755 target/release/containerd-shim-matchlock-v1 "$root/usr/bin/containerd-shim-matchlock-v1"
install -D -m 0755 "$guest" "$root/usr/lib/matchlock/guest-init"
install -D -m 0644 "$kernel" "$root/usr/lib/matchlock/kernels/$(basename "$(dirname "$kernel")")/kernel"
"$bin" completion bash > "$root/usr/share/bash-completion/completions/matchlock"
"$bin" completion zsh > "$root/usr/share/zsh/vendor-completions/_matchlock"
"$bin" completion fish > "$root/usr/share/fish/vendor_completions.d/matchlock.fish"
"$bin" man --out-dir "$root/usr/share/man/man1" >/dev/null
gzip -9n "$root"/usr/share/man/man1/*.1
cat > "$root/usr/share/doc/matchlock/copyright" <<TXT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: matchlock
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
 The guest kernel is Linux (GPL-2.0), built from Debian's linux-source-6.1 package; its
 source is that package.
TXT
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CTL
Package: matchlock
Version: $version
Architecture: amd64
Maintainer: matchlock developers <matchlock@localhost>
Installed-Size: $size
Depends: libc6 (>= 2.36), qemu-system-x86 (>= 1:10.0~), e2fsprogs (>= 1.47.1~), libext2fs2 (>= 1.47.1~), libcom-err2, libarchive13
Suggests: containerd
Section: utils
Priority: optional
Description: micro-VM sandboxes for untrusted, AI-generated code
 Each sandbox is a virtual machine booted from an OCI image. The host keeps control of
 what leaves it: HTTP(S) allow-lists, TLS interception, secrets the guest only sees as
 placeholders, and a host-programmable workspace file system. Also a containerd runtime
 (io.containerd.matchlock.v1: /usr/bin/containerd-shim-matchlock-v1). QEMU and e2fsprogs
 come from bookworm-backports on Debian 12.
CTL
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
mkdir -p "$out"
deb="$out/matchlock_${version}_amd64.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
rm -rf "$root"
log "built $deb"
echo "$deb"
