# Sourced by scripts/bench-*.sh. `bench_setup OUT_DIR` makes OUT_DIR, builds the release
# binary and copies it there as $bin (so a rebuild during the run cannot change what is
# measured), and writes OUT_DIR/machine.txt: when, which commit (marked when the tree has
# changes), kernel, cores, CPU.
bench_setup() {
  out="$1"
  mkdir -p "$out"
  cargo build --release --locked
  cp target/release/ringtrain "$out/ringtrain"
  bin="$out/ringtrain"
  local commit
  commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    commit="$commit with uncommitted changes"
  fi
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $commit"
    echo "kernel: $(uname -r); cores: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  } > "$out/machine.txt"
}
