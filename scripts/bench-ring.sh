#!/usr/bin/env bash
# The measurements behind the README's "Performance of the ring" table: ringtrain's
# all-reduce against gloo's on loopback in the same run, and on emulated clusters of
# tbf-shaped links (MTU 1500 and 9000), with and without --compress bf16.
#
#   scripts/bench-ring.sh [OUT_DIR]     # default: target/bench-results/ring-DATE
#   QUICK=1 scripts/bench-ring.sh       # 1M and 16M only, fewer iterations
#
# gloo needs Debian's python3-torch (skipped with a note without it); the emulated runs
# need root, ip and tc (skipped without them). About 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/bench-setup.sh
. scripts/bench-setup.sh
bench_setup "${1:-target/bench-results/ring-$(date +%Y%m%d-%H%M%S)}"

sizes="1M,16M,64M"
iters=10
link_iters=5
if [ "${QUICK:-0}" = 1 ]; then
  sizes="1M,16M"
  iters=5
  link_iters=3
fi

run() {
  local name="$1"
  shift
  echo "== $name: $*" | tee -a "$out/commands.txt"
  echo "$name: load before $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/machine.txt"
  "$@" | tee "$out/$name.txt"
}

gloo=1
if ! /usr/bin/python3 -c 'import torch.distributed' 2>/dev/null; then
  gloo=0
  echo "note: no python3-torch: skipping gloo" | tee -a "$out/commands.txt"
fi

for n in 2 4 8; do
  run "ring-loopback-n$n" "$bin" bench allreduce --np "$n" --sizes "$sizes" \
    --iters "$iters" --warmup 2 --json "$out/ring-loopback-n$n.json"
  if [ "$gloo" = 1 ]; then
    run "gloo-loopback-n$n" /usr/bin/python3 scripts/gloo-allreduce.py --np "$n" \
      --sizes "$sizes" --iters "$iters" --warmup 2
  fi
done

if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
  echo "note: not root or no ip/tc: skipping the emulated clusters" | tee -a "$out/commands.txt"
  exit 0
fi
link() {
  local name="$1" n="$2"
  shift 2
  run "$name" "$bin" bench allreduce --np "$n" --sizes "$sizes" --iters "$link_iters" \
    --warmup 1 --json "$out/$name.json" "$@"
}
for n in 2 4 8; do
  link "ring-1gbit-n$n" "$n" --link 1gbit
  link "ring-1gbit-mtu9000-n$n" "$n" --link 1gbit --mtu 9000
done
link "ring-200mbit-n8" 8 --link 200mbit
link "ring-1gbit-bf16-n4" 4 --link 1gbit --compress bf16
echo "results in $out"
