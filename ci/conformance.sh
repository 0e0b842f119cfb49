#!/usr/bin/env bash
# Conformance scoreboard: libiscsi's iscsi-test-cu against ftss-target (or Debian's tgt
# with `ci/conformance.sh tgt`, report only). One line per distinct Suite.Test: FAIL if it
# failed in any run, else PASS if it passed clean (no skip) in any run, else SKIP. Fails on
# a FAIL not listed in ci/known-failures.txt and on a listed test that no longer fails, so
# the list can only shrink. Each run's own counts are printed too.
#
# ftss runs two daemons: one with plain-file LUNs and their variants (read-only,
# removable, CHAP), and the embedded default configuration (`--print-default-config`:
# a mirrored 1 GiB LUN behind the nonvolatile write cache, and the packet queue) with only
# its portal and data directory moved and the suite's initiators allowed to reset it. The
# full suite runs against both LUNs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
kind=${1:-ftss}
need iscsi-test-cu libiscsi-bin
need python3 python3
work=$(mktemp -d)
trap 'ci_cleanup; rm -rf "$work"' EXIT
p1=$(free_port); p2=$(free_port)
I1=iqn.2026-11.org.ftss:init1
I2=iqn.2026-11.org.ftss:init2
T=iqn.2026-11.org.ftss:conf
CHAP_USER=confuser
CHAP_SECRET=conf-secret-1234
start=$(date +%s)

if [ "$kind" = ftss ]; then
  ftss_build
  # The suite's reset tests (PreventAllow.*Reset, Reserve6.Target*Reset) send TARGET
  # WARM/COLD RESET, which ftss answers only to the initiators a target names.
  cat >"$work/ftss.toml" <<CONF
[server]
portals = ["127.0.0.1:$p1", "127.0.0.1:$p2"]
data_dir = "$work"
[[target]]
iqn = "$T"
reset_initiators = ["$I1", "$I2"]
[[target.lun]]
lun = 0
path = "conf.img"
size = "256MiB"
[[target]]
iqn = "$T-ro"
reset_initiators = ["$I1", "$I2"]
[[target.lun]]
lun = 0
path = "ro.img"
size = "64MiB"
read_only = true
[[target]]
iqn = "$T-rm"
reset_initiators = ["$I1", "$I2"]
[[target.lun]]
lun = 0
path = "rm.img"
size = "64MiB"
removable = true
[[target]]
iqn = "$T-chap"
reset_initiators = ["$I1", "$I2"]
[target.chap]
username = "$CHAP_USER"
secret = "$CHAP_SECRET"
[[target.lun]]
lun = 0
path = "chap.img"
size = "64MiB"
CONF
  ftss_start "$work/ftss.toml" "$CI_OUT/conformance-ftss-daemon.log" "$p1"
  # The default configuration, as shipped: what `ftss-target` alone serves.
  p3=$(free_port)
  DEFAULT_T=$("$CI_ROOT/target/release/ftss-target" --print-default-config |
    sed -n 's/^iqn = "\(.*\)"$/\1/p' | head -1)
  "$CI_ROOT/target/release/ftss-target" --print-default-config |
    sed -e "s|^portals = .*|portals = [\"127.0.0.1:$p3\"]|" \
      -e "s|^data_dir = .*|data_dir = \"$work/default\"|" \
      -e "/^iqn = /a reset_initiators = [\"$I1\", \"$I2\"]" >"$work/default.toml"
  "$CI_ROOT/target/release/ftss-target" --config "$work/default.toml" --check-config >/dev/null
  ftss_start "$work/default.toml" "$CI_OUT/conformance-ftss-default-daemon.log" "$p3"
elif [ "$kind" = tgt ]; then
  need tgtd tgt
  cp=$(tgt_control_index)
  # One portal: the MultipathIO run opens its second session on the same one.
  p2=$p1
  tgtd_start "$p1" "$cp" "$CI_OUT/conformance-tgt-daemon.log"
  ta() { tgtadm -C "$cp" --lld iscsi "$@"; }
  tid=1
  for suffix in "" -ro -rm -chap; do
    truncate -s 256M "$work/lun$tid.img"
    ta --op new --mode target --tid $tid -T "$T$suffix"
    ta --op new --mode logicalunit --tid $tid --lun 1 -b "$work/lun$tid.img"
    ta --op bind --mode target --tid $tid -I ALL
    tid=$((tid + 1))
  done
  ta --op update --mode logicalunit --tid 2 --lun 1 --params readonly=1
  ta --op update --mode logicalunit --tid 3 --lun 1 --params removable=1
  ta --op new --mode account --user "$CHAP_USER" --password "$CHAP_SECRET"
  ta --op bind --mode account --tid 4 --user "$CHAP_USER"
else
  echo "usage: $0 [ftss|tgt]" >&2
  exit 2
fi
lun=0
[ "$kind" = tgt ] && lun=1

run() { # name, then iscsi-test-cu arguments
  local name=$1
  shift
  echo "-- run $name"
  timeout 1200 stdbuf -oL -eL iscsi-test-cu -d --allow-sanitize -v -i "$I1" -I "$I2" "$@" >"$work/run-$name.txt" 2>&1 || true
  cp "$work/run-$name.txt" "$CI_OUT/conformance-$kind-run-$name.txt"
  tail -4 "$work/run-$name.txt" | head -2
}
run main "iscsi://127.0.0.1:$p1/$T/$lun" "iscsi://127.0.0.1:$p2/$T/$lun"
run readonly -t ALL.ReadOnly "iscsi://127.0.0.1:$p1/$T-ro/$lun"
for s in ALL.PreventAllow ALL.StartStopUnit ALL.NoMedia; do
  run "removable-${s#ALL.}" -t "$s" "iscsi://127.0.0.1:$p1/$T-rm/$lun"
done
run chap -t iSCSI "iscsi://$CHAP_USER%$CHAP_SECRET@127.0.0.1:$p1/$T-chap/$lun"
if [ "$kind" = ftss ]; then
  # The default has one portal: the MultipathIO tests open their second session on it.
  run default "iscsi://127.0.0.1:$p3/$DEFAULT_T/0" "iscsi://127.0.0.1:$p3/$DEFAULT_T/0"
fi
elapsed=$(( $(date +%s) - start ))

board="$CI_OUT/conformance-$kind.txt"
python3 - "$work" "$board" "$CI_ROOT/ci/known-failures.txt" "$kind" "$elapsed" <<'PY'
import glob, re, sys
work, board, known_path, kind, elapsed = sys.argv[1:6]
rank = {"FAIL": 3, "PASS": 2, "SKIP": 1}
result, notes, per_run = {}, {}, {}
for path in sorted(glob.glob(f"{work}/run-*.txt")):
    run_result = per_run.setdefault(re.sub(r"^.*/run-(.*)\.txt$", r"\1", path), {})
    suite, test, buf = None, None, ""
    for line in open(path, errors="replace"):
        m = re.match(r"^Suite: (\S+)", line)
        if m:
            suite, test = m.group(1), None
            continue
        m = re.match(r"^\s+Test: (\S+) \.\.\.(.*)$", line)
        if m and suite:
            test, buf = f"{suite}.{m.group(1)}", m.group(2) + "\n"
            line = ""
        if test is None:
            continue
        buf += line
        # CUnit's verdict is a bare word; tests print "[FAILED] ..." for expected errors.
        end = re.search(r"(?<!\[)\b(passed|FAILED)\b(?!\])", buf)
        if end:
            # Only what the test printed before its verdict counts: the teardown's own
            # messages (e.g. the reservation cleanup) follow it on the same line.
            pre = buf[:end.start()]
            st = "FAIL" if end.group(1) == "FAILED" else ("SKIP" if "[SKIPPED]" in pre else "PASS")
            if st == "SKIP":
                why = re.search(r"\[SKIPPED\]\s*([^\n]*)", pre)
                notes.setdefault(test, why.group(1).strip() if why else "")
            if rank[st] > rank.get(result.get(test), 0):
                result[test] = st
            if rank[st] > rank.get(run_result.get(test), 0):
                run_result[test] = st
            test, buf = None, ""
if not result:
    print("no test results parsed: did iscsi-test-cu run?", file=sys.stderr)
    sys.exit(1)
known = {}
try:
    for line in open(known_path):
        name = line.split("#")[0].strip()
        if name:
            known[name] = line.split("#", 1)[1].strip() if "#" in line else ""
except FileNotFoundError:
    pass
counts = {"PASS": 0, "SKIP": 0, "FAIL": 0}
with open(board, "w") as out:
    for t in sorted(result):
        st = result[t]
        counts[st] += 1
        extra = f"  # {notes.get(t, '')}" if st == "SKIP" else ""
        out.write(f"{st:4}  {t}{extra}\n")
    total = sum(counts.values())
    out.write("\n")
    for name, rr in sorted(per_run.items()):
        c = {st: sum(1 for v in rr.values() if v == st) for st in rank}
        out.write(f"run {name}: {len(rr)} tests: {c['PASS']} passed clean, "
                  f"{c['SKIP']} skipped, {c['FAIL']} failed\n")
    out.write(f"{kind}: {total} distinct tests: {counts['PASS']} passed clean, "
              f"{counts['SKIP']} skipped, {counts['FAIL']} failed ({elapsed} s)\n")
print(open(board).read())
if kind != "ftss":
    sys.exit(0)
bad = [t for t, st in result.items() if st == "FAIL" and t not in known]
fixed = [t for t in known if result.get(t) != "FAIL"]
for t in bad:
    print(f"NEW FAILURE: {t}")
for t in fixed:
    print(f"LISTED BUT NOT FAILING (remove it from ci/known-failures.txt): {t}")
print(f"conformance: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
sys.exit(1 if bad or fixed else 0)
PY
