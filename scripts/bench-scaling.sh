#!/usr/bin/env bash
# Runs the measurements behind the README's Scaling section and keeps every output
# (tables, JSON, CSV, Markdown, SVG chart, the commands and the machine's load).
#
#   scripts/bench-scaling.sh [OUT_DIR]      # default: target/bench-results/DATE
#   QUICK=1 scripts/bench-scaling.sh        # fewer sizes and steps, about a minute
#
# Builds the release binary and copies it into OUT_DIR first, so a rebuild during the run
# cannot change what is measured. The emulated-cluster runs (--link) need root, `ip` and
# `tc`; without them they are skipped with a note. Takes about 4 minutes on 2 cores.
# Not part of .ci/run: benchmarks are for people, and their numbers depend on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/bench-setup.sh
. scripts/bench-setup.sh
bench_setup "${1:-target/bench-results/$(date +%Y%m%d-%H%M%S)}"

sizes="1M,4M,16M,64M"
steps=200
if [ "${QUICK:-0}" = 1 ]; then
  sizes="1M,4M"
  steps=50
fi

# Runs one benchmark, keeping its table and the load average before and after it.
run() {
  local name="$1"
  shift
  echo "== $name: ringtrain $*" | tee -a "$out/commands.txt"
  echo "$name: load before $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/machine.txt"
  "$bin" "$@" | tee "$out/$name.txt"
  echo "$name: load after $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/machine.txt"
}

emulation=1
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
  emulation=0
  echo "note: not root or no ip/tc: skipping the emulated-cluster runs" | tee -a "$out/commands.txt"
fi

for n in 2 4; do
  run "allreduce-loopback-n$n" bench allreduce --np "$n" --sizes "$sizes" \
    --json "$out/allreduce-loopback-n$n.json"
done
if [ "$emulation" = 1 ]; then
  for n in 2 4; do
    run "allreduce-1gbit-n$n" bench allreduce --np "$n" --sizes "$sizes" --link 1gbit \
      --json "$out/allreduce-1gbit-n$n.json"
  done
  run "allreduce-200mbit-n8" bench allreduce --np 8 --sizes "$sizes" --iters 5 --warmup 1 \
    --link 200mbit --json "$out/allreduce-200mbit-n8.json"
fi

train=(--hidden 512,512 --batch-size 64 --steps "$steps")
run scaling-loopback bench scaling --nodes 1,2,4 --modes ring,ps "${train[@]}" \
  --json "$out/scaling-loopback.json" --csv "$out/scaling-loopback.csv" \
  --markdown "$out/scaling-loopback.md" --plot "$out/scaling-loopback.svg"
if [ "$emulation" = 1 ]; then
  run scaling-1gbit bench scaling --nodes 1,2,4 --modes ring,ps "${train[@]}" \
    --link 1gbit --cpu 0.5 \
    --json "$out/scaling-1gbit.json" --csv "$out/scaling-1gbit.csv" \
    --markdown "$out/scaling-1gbit.md" --plot "$out/scaling-1gbit.svg"
fi
echo "results in $out"
