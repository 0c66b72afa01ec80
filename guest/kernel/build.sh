#!/usr/bin/env bash
# Builds the matchlock guest kernel from Debian's linux-source-6.1 with our config fragment.
# Usage: build.sh <config-fragment> <kernels-dir>
# Output: <kernels-dir>/<source-version>-<config-hash>/kernel (an uncompressed, stripped
# vmlinux with a PVH entry: QEMU microvm and Firecracker both boot it directly).
# Idempotent: an existing output is reused; the build tree is cached next to it.
set -euo pipefail

fragment=$(realpath "$1")
kernels_dir=$2
tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || { echo "missing $tarball: install the linux-source-6.1 package" >&2; exit 1; }
version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
config_hash=$(sha256sum "$fragment" | cut -c1-12)
out="$kernels_dir/$version-$config_hash"
if [ -f "$out/kernel" ]; then
  echo "$out/kernel"
  exit 0
fi

build_root="$kernels_dir/.build"
src="$build_root/linux-source-$version"
mkdir -p "$build_root"
if [ ! -f "$src/.extracted" ]; then
  rm -rf "$src" "$build_root/linux-source-6.1"
  echo "extracting $tarball" >&2
  tar -C "$build_root" -xf "$tarball"
  mv "$build_root/linux-source-6.1" "$src"
  touch "$src/.extracted"
fi

cd "$src"
make -s ARCH=x86_64 KCONFIG_ALLCONFIG="$fragment" allnoconfig
# Every option the fragment asks for must have survived dependency resolution.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=n) ! grep -qE "^${line%=n}=[ym]" .config || { echo "config: $line did not apply" >&2; missing=1; } ;;
    CONFIG_*) grep -qxF "$line" .config || { echo "config: $line did not apply" >&2; missing=1; } ;;
  esac
done < "$fragment"
[ $missing -eq 0 ] || { echo "kernel config fragment does not apply cleanly" >&2; exit 1; }

echo "building kernel $version (config $config_hash) with $(nproc) jobs" >&2
make -s ARCH=x86_64 -j"$(nproc)" vmlinux
tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
strip -o "$tmp/kernel" vmlinux
cp .config "$tmp/config"
rm -rf "$out"
mv "$tmp" "$out"
echo "$out/kernel"
