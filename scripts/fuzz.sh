#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a bounded time each, with cargo-fuzz.
#
#   scripts/fuzz.sh                 # every target, 60 s each
#   FUZZ_SECONDS=300 scripts/fuzz.sh frame_decode hosts_parse
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a compiler that accepts nightly flags:
# a nightly toolchain if rustup has one, otherwise the installed one with RUSTC_BOOTSTRAP=1
# (this script sets it). The corpus grows in fuzz/corpus/TARGET, starting from the seeds
# in fuzz/seeds/TARGET; a crash is saved in fuzz/artifacts/TARGET and fails the script.
# Not part of .ci/run: fuzzing is open-ended and needs the extra tool.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
case "$seconds" in
  '' | *[!0-9]*) echo "FUZZ_SECONDS must be a whole number of seconds, got '$seconds'" >&2; exit 2 ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is not installed; run: cargo install cargo-fuzz" >&2
  exit 2
fi

toolchain=()
if command -v rustup >/dev/null 2>&1 && rustup toolchain list | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  # libFuzzer's instrumentation needs unstable flags; allow them on a stable compiler.
  export RUSTC_BOOTSTRAP=1
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo "${toolchain[@]}" fuzz list --fuzz-dir fuzz)
fi

failed=()
for target in "${targets[@]}"; do
  corpus="fuzz/corpus/$target"
  mkdir -p "$corpus"
  seeds=()
  [ -d "fuzz/seeds/$target" ] && seeds=("fuzz/seeds/$target")
  echo "== fuzz $target for ${seconds}s"
  if ! cargo "${toolchain[@]}" fuzz run --fuzz-dir fuzz "$target" "$corpus" "${seeds[@]}" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
    failed+=("$target")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzzing found problems in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzzing done: ${targets[*]}, ${seconds}s each, no crash"
