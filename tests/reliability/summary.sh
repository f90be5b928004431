#!/usr/bin/env bash
# Reliability summary table. Reads the counts the tests themselves recorded during this run
# (<target dir>/reliability/*.json, written by kiln_testkit::record_reliability) and the
# fuzz smoke's summary; it runs no test. A row whose record is missing, or whose count is short
# of what the suite holds, fails the table.
#
#   tests/reliability/summary.sh            # what .ci/run calls after the tests and fuzz smoke
#   KILN_FUZZ_SECS=600 tests/fuzz/run.sh && tests/reliability/summary.sh   # long fuzz, then table
#
# Exit status: 0 only when every row is present and at 100% / 0 crashes / 0 hits.
set -uo pipefail
cd "$(dirname "$0")/../.."
tdir=${CARGO_TARGET_DIR:-$PWD/target}
exec python3 - "$tdir" <<'PY'
import glob, json, os, re, sys

tdir = sys.argv[1]
logs = os.path.join(tdir, "reliability")
rows, bad = [], False


def row(name, value, ok):
    global bad
    rows.append("%-50s %-40s %s" % (name, value, "ok" if ok else "FAIL"))
    bad |= not ok


def rec(name):
    try:
        with open(os.path.join(logs, name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tests_in(path):
    with open(path) as f:
        return len(re.findall(r"^#\[test\]", f.read(), re.M))


def missing(name, what):
    row(name, "missing: " + what + " did not record a result", False)


# 1. Crash injection on the host (SIGKILL at every step boundary and mid-download).
d = rec("crash-host")
if d:
    row("crash injection (SIGKILL, host): converged",
        "%d / %d" % (d["converged"], d["points_tried"]),
        d["points_tried"] >= 13 and d["converged"] == d["points_tried"])
else:
    missing("crash injection (SIGKILL, host)", "firstboot/tests/crash.rs")

# 2. Mirror faults: every case of firstboot/tests/download.rs passed this run.
want = tests_in("firstboot/tests/download.rs")
got = len(glob.glob(os.path.join(logs, "mirror-faults", "*.json")))
row("mirror fault cases: verified or refused", "%d / %d" % (got, want), want > 0 and got == want)

# 3a. Bad profiles: each names file:line:col, matches its .expected, writes nothing.
want = len(glob.glob("tests/profiles/bad/*.yaml"))
d = rec("bad-profiles")
if d:
    row("bad profiles rejected with file:line:col",
        "%d / %d" % (d["refused_with_file_line_col"], want),
        want >= 30 and d["cases"] == want and d["refused_with_file_line_col"] == want)
else:
    missing("bad profiles rejected with file:line:col", "builder/tests/bad_profiles.rs")

# 3b. Tampered bundle or plan on the node: refused before any step runs (real daemon binary).
d = rec("tamper")
if d:
    row("tampered bundle/plan refused before any step", "%d / %d" % (d["refused"], d["tried"]),
        d["tried"] >= 13 and d["refused"] == d["tried"])
else:
    missing("tampered bundle/plan refused", "firstboot/tests/tamper.rs")

# 4. Fuzzing (the fuzz smoke of this run, or the last tests/fuzz/run.sh).
fz = os.path.join(tdir, "fuzz", "fuzz-summary.txt")
if os.path.getsize(fz) if os.path.exists(fz) else 0:
    for line in open(fz):
        parts = line.split()
        if len(parts) < 6:
            continue
        t, secs, inputs, crashes = parts[1].rstrip(":"), parts[2].rstrip(","), parts[3], parts[5]
        row("fuzz %s (%s)" % (t, secs), "%s crashes, %s inputs" % (crashes, inputs), crashes == "0")
else:
    missing("fuzz", "tests/fuzz/run.sh")

# 5. Secret canaries (host run over all steps: output, status, journal, world-readable files).
d = rec("canaries-host")
if d:
    row("secret canary hits (host, %d sources)" % d["sources_scanned"], "%d hits" % d["hits"],
        d["sources_scanned"] > 0 and d["hits"] == 0)
else:
    missing("secret canary hits (host)", "firstboot/tests/crash.rs")

# 6. In a real VM (qemu/tests/chaos.rs): SIGKILL under systemd at every step boundary and inside
# every step, QMP system_reset at random moments, and the secret scan of the guest disk.
d = rec("vm-chaos")
if d:
    kt, kc = d["sigkill_points_tried"], d["sigkill_points_converged"]
    rt, rc = d["resets_tried"], d["resets_converged"]
    inside = d["sigkill_inside_step_as_intended"]
    diffs = len(d["sigkill_differences"]) + len(d["reset_differences"])
    row("crash injection in VM (SIGKILL + %d resets)" % rt,
        "%d / %d converged (%d kills, %d/6 in-step)" % (kc + rc, kt + rt, kt, inside),
        kt > 0 and kt == kc and rt > 0 and rt == rc and diffs == 0 and inside == 6)
else:
    missing("crash injection in VM", "qemu/tests/chaos.rs (KILN_VM_TESTS=1)")
for name, label in [("vm-secrets", "secret scan in VM")] + sorted(
        (os.path.basename(p)[:-5], "secret scan in VM (%s)" % os.path.basename(p)[11:-5])
        for p in glob.glob(os.path.join(logs, "vm-secrets-*.json"))):
    d = rec(name)
    if d:
        row("%s (%d files)" % (label, d["files_scanned"]), "%d hits" % len(d["hits"]),
            d["files_scanned"] > 0 and not d["hits"])
    else:
        missing(label, "qemu/tests/chaos.rs (KILN_VM_TESTS=1)")

print()
print("kiln reliability summary (records: %s)" % logs)
print("%-50s %-40s" % ("check", "result"))
print("\n".join(rows))
sys.exit(1 if bad else 0)
PY
