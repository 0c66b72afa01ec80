#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer through cargo-fuzz) of the parsers that read guest or
# client bytes: host<->guest frames and messages, the host end of the host<->guest pipe, the
# real VFS server over a real directory,
# the guest DNS path, JSON-RPC create parameters (fuzz/fuzz_targets/). Runs on the stable
# toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz's unstable flags through (nightly cannot be
# downloaded here); without a sanitizer (its runtimes need nightly's build of them), so a
# crash is a panic, an abort, a timeout or running out of the memory limit.
# Corpora accumulate in ~/.cache/matchlock/fuzz/<target> across runs. A crash fails the run
# and leaves its input in fuzz/artifacts/<target>/ (make it a unit test).
#
#   scripts/fuzz.sh [seconds per target] [target ...]     (default: 60 s, every target)
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_FUZZ_VERSION=0.13.2
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frames mux_pipe vfs_requests dns_queries rpc_create stack_frames http_requests scrub_stream image_archives)
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "==> installing cargo-fuzz $CARGO_FUZZ_VERSION (one time)" >&2
  cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
export RUSTC_BOOTSTRAP=1
corpora="${XDG_CACHE_HOME:-$HOME/.cache}/matchlock/fuzz"
cargo fuzz build --sanitizer none -O >/dev/null 2>&1 || cargo fuzz build --sanitizer none -O
# The targets keep their directories (a VFS root, a VM directory) in statics, which are
# never dropped: they run with a temporary directory of their own, removed at the end.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
  mkdir -p "$corpora/$target"
  log="$scratch/$target.log"
  if ! TMPDIR="$scratch" cargo fuzz run --sanitizer none -O "$target" "$corpora/$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz: $target FAILED (input in fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  execs=$(awk '/stat::number_of_executed_units/ {print $NF}' "$log")
  rate=$(awk '/stat::average_exec_per_sec/ {print $NF}' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  echo "fuzz: $target ${seconds}s: $execs execs ($rate/s), coverage $cov edges, corpus $(ls "$corpora/$target" | wc -l) inputs, 0 crashes"
  rm -f "$log"
done
