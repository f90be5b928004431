#!/usr/bin/env bash
# Reliability summary table (issue 6). Runs the fault, crash, tamper, bad-input and secret tests
# and prints one row each, with the counts the tests themselves report; nothing is hard-coded.
# The VM rows come from the last run of qemu/tests/chaos.rs (see docs/reliability.md).
#
#   tests/reliability/summary.sh            # short variants (what .ci/run calls)
#   tests/reliability/summary.sh --fuzz     # also runs tests/fuzz/run.sh --smoke first
#   KILN_FUZZ_SECS=600 tests/fuzz/run.sh && tests/reliability/summary.sh   # long fuzz, then table
#
# Fuzz rows come from the last tests/fuzz/run.sh (its <target dir>/fuzz/fuzz-summary.txt).
# Exit status: 0 only when every row is at 100% / 0 crashes / 0 hits.
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
tdir=${CARGO_TARGET_DIR:-$repo/target}
logs=$tdir/reliability
mkdir -p "$logs"

if [ "${1:-}" = "--fuzz" ]; then
  tests/fuzz/run.sh --smoke || true
fi

rows=()
bad=0
row() { # name, value, ok(0/1)
  rows+=("$(printf '%-46s %-34s %s' "$1" "$2" "$([ "$3" = 1 ] && echo ok || echo FAIL)")")
  [ "$3" = 1 ] || bad=1
}

# run <log> <cargo test args...>: the test's own pass/fail and its output in <log>.
run() {
  local log=$logs/$1
  shift
  cargo test "$@" -- --nocapture --test-threads=1 >"$log" 2>&1
}
passed() { sed -n 's/^test result: .*ok\. \([0-9]*\) passed.*/\1/p' "$logs/$1" | awk '{s+=$1} END {print s+0}'; }
failed() { sed -n 's/^test result: .* \([0-9]*\) failed.*/\1/p' "$logs/$1" | awk '{s+=$1} END {print s+0}'; }

# 1. Crash injection (SIGKILL at every step boundary and mid-download, host --root run).
run crash.log -p kiln-firstboot --test crash
rc=$?
line=$(grep -o 'crash injection: [0-9]* points tried, [0-9]* converged' "$logs/crash.log" | tail -n 1)
tried=$(echo "$line" | sed -n 's/.*: \([0-9]*\) points tried.*/\1/p')
conv=$(echo "$line" | sed -n 's/.*tried, \([0-9]*\) converged/\1/p')
ok=0; [ "$rc" = 0 ] && [ -n "$tried" ] && [ "$tried" -gt 0 ] && [ "$tried" = "$conv" ] && ok=1
row "crash injection (SIGKILL, host): converged" "${conv:-?} / ${tried:-?}" $ok

# 2. Mirror faults (5xx bursts, hangs, truncation, bit flips, bad lengths, 404, cache rot).
run download.log -p kiln-firstboot --test download
rc=$?
p=$(passed download.log); f=$(failed download.log)
ok=0; [ "$rc" = 0 ] && [ "$p" -gt 0 ] && [ "$f" = 0 ] && ok=1
row "mirror fault cases: verified or refused" "$p / $((p + f))" $ok

# 3a. Bad profiles: each names file:line:col, matches its .expected, writes nothing.
total=$(find tests/profiles/bad -maxdepth 1 -name '*.yaml' | wc -l)
export KILN_PRINT_CORPUS=1
run bad-print.log -p kiln --test bad_profiles every_bad_profile_fails
unset KILN_PRINT_CORPUS
positioned=$(grep -cE '[^ ]+\.yaml => [^ ]+\.yaml:[0-9]+:[0-9]+: ' "$logs/bad-print.log")
run bad.log -p kiln --test bad_profiles
rc=$?
ok=0; [ "$rc" = 0 ] && [ "$positioned" = "$total" ] && [ "$total" -ge 30 ] && ok=1
row "bad profiles rejected with file:line:col" "$positioned / $total" $ok

# 3b. Tampered bundle or plan on the node: refused before any step runs (real daemon binary).
run tamper.log -p kiln-firstboot --test tamper
rc=$?
line=$(grep -o 'tampered node cases: [0-9]* refused / [0-9]* tried' "$logs/tamper.log" | tail -n 1)
ref=$(echo "$line" | sed -n 's/.*: \([0-9]*\) refused.*/\1/p')
tried=$(echo "$line" | sed -n 's/.*\/ \([0-9]*\) tried/\1/p')
ok=0; [ "$rc" = 0 ] && [ -n "$tried" ] && [ "$ref" = "$tried" ] && ok=1
row "tampered bundle/plan refused before any step" "${ref:-?} / ${tried:-?}" $ok

# 4. Fuzzing (from the last tests/fuzz/run.sh).
if [ -s "$tdir/fuzz/fuzz-summary.txt" ]; then
  while read -r _ t secs inputs _ crashes _; do
    ok=0; [ "$crashes" = 0 ] && ok=1
    row "fuzz ${t%:} (${secs%,})" "$crashes crashes, ${inputs} inputs" $ok
  done <"$tdir/fuzz/fuzz-summary.txt"
else
  row "fuzz" "not run (tests/fuzz/run.sh)" 0
fi

# 5. Secret canaries (host run over all six steps: output, status, journal, world-readable files).
line=$(grep -o 'secret canaries: [0-9]* sources scanned, [0-9]* hits' "$logs/crash.log" | tail -n 1)
scanned=$(echo "$line" | sed -n 's/.*: \([0-9]*\) sources.*/\1/p')
hits=$(echo "$line" | sed -n 's/.*scanned, \([0-9]*\) hits/\1/p')
ok=0; [ -n "$scanned" ] && [ "$scanned" -gt 0 ] && [ "$hits" = 0 ] && ok=1
row "secret canary hits (host, $scanned sources)" "${hits:-?} hits" $ok

# 6. In a real VM (qemu/tests/chaos.rs, run by `cargo test --workspace` with KILN_VM_TESTS=1 as
# .ci/run does; not re-run here, it boots three VMs): SIGKILL under systemd at every step
# boundary and inside every step, QMP system_reset at random moments, and the secret scan of
# the whole guest disk. The test writes its figures to <target dir>/reliability/vm-*.json.
vmjson() { # file, python expression over `d` -> printed
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2" 2>/dev/null
}
chaos=$logs/vm-chaos.json
if [ -s "$chaos" ]; then
  kt=$(vmjson "$chaos" 'd["sigkill_points_tried"]'); kc=$(vmjson "$chaos" 'd["sigkill_points_converged"]')
  rt=$(vmjson "$chaos" 'd["resets_tried"]'); rc_=$(vmjson "$chaos" 'd["resets_converged"]')
  inside=$(vmjson "$chaos" 'd["sigkill_inside_step_as_intended"]')
  diffs=$(vmjson "$chaos" 'len(d["sigkill_differences"]) + len(d["reset_differences"])')
  ok=0
  [ -n "$kt" ] && [ "$kt" -gt 0 ] && [ "$kt" = "$kc" ] && [ -n "$rt" ] && [ "$rt" -gt 0 ] \
    && [ "$rt" = "$rc_" ] && [ "$diffs" = 0 ] && [ "$inside" = 6 ] && ok=1
  row "crash injection in VM (SIGKILL + $rt resets)" \
    "$((kc + rc_)) / $((kt + rt)) converged ($kt kills, $inside/6 in-step; $rt resets)" $ok
else
  row "crash injection in VM (SIGKILL + resets)" "not run (KILN_VM_TESTS=1 chaos test)" 0
fi
secrets=$logs/vm-secrets.json
if [ -s "$secrets" ]; then
  files=$(vmjson "$secrets" 'd["files_scanned"]'); hits=$(vmjson "$secrets" 'len(d["hits"])')
  ok=0; [ -n "$files" ] && [ "$files" -gt 0 ] && [ "$hits" = 0 ] && ok=1
  row "secret scan in VM ($files files scanned)" "${hits:-?} hits" $ok
else
  row "secret scan in VM" "not run (KILN_VM_TESTS=1 chaos test)" 0
fi

echo
echo "kiln reliability summary (logs: $logs)"
printf '%-46s %-34s %s\n' "check" "result" ""
printf '%s\n' "${rows[@]}"
exit $bad
