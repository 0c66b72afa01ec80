# Shared pieces of the benchmarks (sourced).

matchlock=${MATCHLOCK:-$(command -v matchlock || echo target/release/matchlock)}
qemu=${MATCHLOCK_QEMU:-qemu-system-x86_64}

now_ms() { date +%s%3N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# floor_setup <workdir>: a boot disk whose init powers off at once, and the accelerator
# matchlock chose (it caches its probe), unless MATCHLOCK_ACCEL overrides it.
floor_setup() {
  floor_dir=$1
  floor_kernel=$("$matchlock" kernel path)
  gcc -static -Os -o "$floor_dir/init" bench/floor-init.c
  mkdir -p "$floor_dir/root" && cp "$floor_dir/init" "$floor_dir/root/init"
  truncate -s 16M "$floor_dir/floor.ext4"
  mke2fs -q -F -t ext4 -E root_owner=0:0 -d "$floor_dir/root" "$floor_dir/floor.ext4"
  floor_accel=${MATCHLOCK_ACCEL:-$(jq -r '.accel // "tcg"' "${XDG_CACHE_HOME:-$HOME/.cache}/matchlock/accel-probe.json" 2>/dev/null || echo tcg)}
  floor_cpu=max,-erms,-fsrm  # the CPU model matchlock gives a TCG guest (matchlock-vm accel.rs)
  if [ "$floor_accel" = kvm ]; then floor_cpu=host; fi
}

# floor: QEMU boots the same kernel on the same machine type and accelerator, straight
# into the power-off init.
floor() {
  "$qemu" -M microvm,acpi=off,x-option-roms=off,rtc=off,pcie=off -accel "$floor_accel" -cpu "$floor_cpu" -smp 1 \
    -m 512M -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -nodefaults -no-user-config -nographic -no-reboot -serial "file:$floor_dir/floor.log" -kernel "$floor_kernel" \
    -append "console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda ro rootfstype=ext4 init=/init" \
    -drive "id=disk0,file=$floor_dir/floor.ext4,format=raw,if=none,readonly=on" -device virtio-blk-device,drive=disk0
}

# timed <file> <command...>: appends the wall time of the command in ms to <file>.
timed() {
  local out=$1 t0 t1
  shift
  t0=$(now_ms)
  "$@"
  t1=$(now_ms)
  echo $((t1 - t0)) >> "$out"
}
