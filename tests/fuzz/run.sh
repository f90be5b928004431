#!/usr/bin/env bash
# Fuzz kiln's parsers of untrusted input with cargo-fuzz (libFuzzer). See docs/reliability.md.
#
#   tests/fuzz/run.sh --smoke          # CI: 25 s per target (KILN_FUZZ_SMOKE_SECS overrides), dev build
#   tests/fuzz/run.sh                  # long run: 600 s (10 min) per target (KILN_FUZZ_SECS overrides)
#   tests/fuzz/run.sh [--smoke] plan   # only the named targets (profile, plan, journal_status, gitops_reader)
#
# The toolchain here is stable; cargo-fuzz needs nightly-only rustc flags (sanitizer coverage
# instrumentation, `-Z` options), which RUSTC_BOOTSTRAP=1 unlocks on a stable compiler.
# KILN_FUZZ_SANITIZER=address turns AddressSanitizer on (default none: kiln is safe Rust and
# the coverage-guided search runs ~3x more inputs per second without it).
# Seeds (in the repo): tests/fuzz/seeds/<target>/. New inputs go to a work corpus under the
# target dir, never into the repo. Exit status: 0 only when no target found a crash, a hang or
# an out-of-memory input; findings are saved under <target dir>/fuzz/artifacts/<target>/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

secs=${KILN_FUZZ_SECS:-600}
# The long run fuzzes optimized code (more inputs per second); the smoke run builds the dev
# profile, which compiles several times faster and keeps overflow checks and debug assertions.
build_profile=(-O)
if [ "${1:-}" = "--smoke" ]; then
  secs=${KILN_FUZZ_SMOKE_SECS:-25}
  build_profile=(--dev)
  shift
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(profile plan journal_status gitops_reader)
sanitizer=${KILN_FUZZ_SANITIZER:-none}

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi

tdir=${CARGO_TARGET_DIR:-$repo/target}/fuzz
# Where the instrumented build goes: KILN_FUZZ_BUILD_DIR lets CI keep it in a cache across
# runs (it shares nothing with the normal build: every crate is compiled with coverage flags).
bdir=${KILN_FUZZ_BUILD_DIR:-$tdir}
work=$tdir/work
summary=$tdir/fuzz-summary.txt
mkdir -p "$work"
: >"$summary"

cd "$here"
cargo fuzz build --fuzz-dir "$here" "${build_profile[@]}" -s "$sanitizer" --target-dir "$bdir"

failed=0
for t in "${targets[@]}"; do
  corpus=$work/corpus/$t
  artifacts=$work/artifacts/$t
  mkdir -p "$corpus" "$artifacts"
  log=$work/$t.log
  echo "== fuzz $t: ${secs}s (seeds: tests/fuzz/seeds/$t)"
  set +e
  cargo fuzz run --fuzz-dir "$here" "${build_profile[@]}" -s "$sanitizer" --target-dir "$bdir" "$t" "$corpus" "$here/seeds/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  found=$(find "$artifacts" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
  if [ "$rc" -ne 0 ] && [ "$found" -eq 0 ]; then
    found=1 # libFuzzer failed without leaving an artifact (e.g. a build or setup error)
  fi
  echo "fuzz $t: ${secs}s, ${execs:-0} inputs, $found crashes" | tee -a "$summary"
  if [ "$found" -ne 0 ]; then
    failed=1
    tail -n 40 "$log"
    find "$artifacts" -type f | sed 's/^/  finding: /'
  fi
done
exit "$failed"
