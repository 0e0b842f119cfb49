#!/usr/bin/env bash
# A real power cut (issue 13): ftss-target runs inside a QEMU guest (../shared/vm-initiator's
# run-guest, --no-login) with its data directory on ext4 on a virtio disk backed by a host
# file (cache=none: what the guest wrote to the disk is on the host file, its page cache
# lives only in guest memory). Host clients write blocks (qemu-io, QEMU's libiscsi) and
# send packets (the ftss CLI) through a forwarded port and log each acknowledgement; at a
# seeded random moment the host kills QEMU with SIGKILL, so the guest loses its page cache
# and everything else in memory, as in a power cut. The next boot mounts the disk again
# (ext4 replays its journal), ftss-target recovers, and ci/power-cut/client.py checks
# every acknowledged write and packet so far; then that boot takes the next load and cut.
# One last boot checks the last cut.
#
#   ci/power-cut.sh [--cycles N] [--seed S] [--mode nonvolatile|volatile] [--out DIR]
#                   [--min-load-ms MS] [--max-load-ms MS]
#
# It prints a line per cut: the boot before it (seconds until the daemon answered), the
# load's length before the cut, the write cache records the next boot's recovery
# replayed, the writes and packets acknowledged before the cut, the packets the check
# drained, the acknowledged writes and packets lost (must be 0), packets received a
# second time (RECEIVE is at-least-once), the verdict; then a summary. The seed picks
# the cut moments and the slots written; TCG and the scheduler decide the rest, so a
# seed does not replay a run exactly. Logs, events and the disk image stay in --out
# (default ci/out/power-cut-MODE-seedS).
#
# --mode volatile is the negative control: the same load and checker on `cache =
# "volatile"`, where GOOD means "reached the (volatile) cache" and no client ever sends
# SYNCHRONIZE CACHE, so acknowledged writes are lost at a cut and the checker must fail.
# Not part of ci/test.sh: under TCG a cut takes 45-55 s (a boot, the load, the check).
#
# Environment: VM_INITIATOR (the vm-initiator directory).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

CYCLES=20
SEED=1
MODE=nonvolatile
OUT=
MIN_LOAD_MS=3000
MAX_LOAD_MS=20000
while (($#)); do
  case $1 in
    --cycles) CYCLES=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --mode) MODE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --min-load-ms) MIN_LOAD_MS=$2; shift 2 ;;
    --max-load-ms) MAX_LOAD_MS=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $MODE == nonvolatile || $MODE == volatile ]] || { echo "--mode nonvolatile|volatile" >&2; exit 2; }

VM=${VM_INITIATOR:-}
if [[ -z $VM ]]; then
  for d in "$CI_ROOT/../shared/vm-initiator" "$CI_ROOT/../../shared/vm-initiator" /work/shared/vm-initiator; do
    if [[ -x $d/run-guest ]]; then
      VM=$(cd "$d" && pwd)
      break
    fi
  done
fi
[[ -n $VM && -x $VM/run-guest ]] || { echo "vm-initiator not found (set VM_INITIATOR)" >&2; exit 2; }
need_qemu

OUT=${OUT:-$CI_OUT/power-cut-$MODE-seed$SEED}
rm -rf "$OUT"
mkdir -p "$OUT"
RUN_ID="s$SEED-$MODE-$(date +%s)"
EVENTS=$OUT/events.log
DISK=$OUT/disk.img
truncate -s 512M "$DISK"
IQN=iqn.2026-11.org.ftss:powercut
RANDOM=$SEED

echo "== build (release)"
(cd "$CI_ROOT" && nice cargo build --release --bin ftss-target --bin ftss -q)
strip -o "$OUT/ftss-target" "$CI_ROOT/target/release/ftss-target" 2>/dev/null ||
  cp "$CI_ROOT/target/release/ftss-target" "$OUT/ftss-target"
FTSS=$CI_ROOT/target/release/ftss
CLIENT=(python3 "$CI_ROOT/ci/power-cut/client.py" --log "$EVENTS" --run "$RUN_ID" --seed "$SEED" --ftss "$FTSS")

RG_PID=
LOAD_PID=
cleanup() {
  [[ -n $LOAD_PID ]] && kill "$LOAD_PID" 2>/dev/null
  [[ -n $RG_PID ]] && kill_qemu
  ci_cleanup
}
trap cleanup EXIT

# The QEMU process run-guest started (its child).
qemu_pid() {
  ps -o pid=,comm= --ppid "$RG_PID" 2>/dev/null | awk '$2 ~ /^qemu-system/ { print $1; exit }'
}

kill_qemu() {
  local q
  q=$(qemu_pid)
  [[ -n $q ]] && kill -KILL "$q"
  wait "$RG_PID" 2>/dev/null || true
  RG_PID=
}

# boot N: starts the guest on the disk; returns once ftss-target answers an INQUIRY
# through the forwarded port (recovery is done before it listens).
boot() {
  local n=$1 i
  PORT=$(free_port)
  "$VM/run-guest" --no-login --disk "$DISK" --hostfwd "$PORT:3260" \
    --extra-file "$OUT/ftss-target" --guest-script "$CI_ROOT/ci/power-cut/guest.sh" \
    --timeout 900 -- "$MODE" >"$OUT/console-$n.log" 2>&1 &
  RG_PID=$!
  for i in $(seq 1 1200); do
    if "$FTSS" --portal "127.0.0.1:$PORT" --target "$IQN" --timeout 5 inquiry >/dev/null 2>&1; then
      return 0
    fi
    kill -0 "$RG_PID" 2>/dev/null || break
    sleep 0.25
  done
  echo "boot $n: ftss-target did not answer (see $OUT/console-$n.log)" >&2
  return 1
}

printf '%-5s %-8s %-7s %-9s %-8s %-8s %-8s %-6s %-6s %-5s %s\n' cycle boot_s load_ms recov_r acked_w acked_p drained lost_w lost_p dups check
fails=0
total_w=0
total_p=0
lost_w=0
lost_p=0
dups=0
last_check=
checked=0
t_start=$SECONDS
for ((c = 1; c <= CYCLES + 1; c++)); do
  t0=$SECONDS
  boot "$c" || { fails=$((fails + 1)); kill_qemu; break; }
  boot_s=$((SECONDS - t0))
  line=
  if ((c > 1)); then
    # what the previous cycle's cut left: check everything acknowledged so far
    set +e
    out=$("${CLIENT[@]}" check --port "$PORT" --last-cycle $((c - 1)) 2>&1)
    rc=$?
    set -e
    echo "$out" >"$OUT/check-$((c - 1)).log"
    chk=$(grep '^CHECK ' <<<"$out" || true)
    get() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$chk"; }
    aw=$(get acked_writes_cycle) ap=$(get acked_packets_cycle) dr=$(get drained)
    lw=$(get lost_writes) lp=$(get lost_packets) du=$(get dup_packets)
    verdict=ok
    ((rc == 0)) || { verdict="FAIL(rc=$rc)"; fails=$((fails + 1)); }
    total_w=$((total_w + ${aw:-0})) total_p=$((total_p + ${ap:-0}))
    lost_w=$((lost_w + ${lw:-0})) lost_p=$((lost_p + ${lp:-0}))
    # dup_packets counts over the whole run: this cut's are the difference
    new_dups=$((${du:-0} - dups)) dups=${du:-0}
    last_check=$chk
    checked=$((checked + 1))
    # how many write cache records the daemon's recovery replayed at this boot
    rr=$(sed 's/\x1b\[[0-9;]*m//g' "$OUT/console-$c.log" | sed -n 's/.*write cache recovered records=\([0-9]*\).*/\1/p' | tail -n1)
    printf '%-5s %-8s %-7s %-9s %-8s %-8s %-8s %-6s %-6s %-5s %s\n' $((c - 1)) "$prev_boot_s" "$load_ms" "${rr:-?}" \
      "${aw:-?}" "${ap:-?}" "${dr:-?}" "${lw:-?}" "${lp:-?}" "$new_dups" "$verdict"
    ((rc == 0)) || grep -E '^  (LOST|GARBAGE|PHANTOM)' <<<"$out" | head -5 || true
  fi
  ((c <= CYCLES)) || { kill_qemu; break; }
  # the load, then the cut after a seeded random time
  load_ms=$((MIN_LOAD_MS + (RANDOM * 32768 + RANDOM) % (MAX_LOAD_MS - MIN_LOAD_MS + 1)))
  # odd cycles also receive (and acknowledge) during the load; even cycles leave every
  # packet queued, so all of them must survive the cut
  live=()
  ((c % 2)) && live=(--live-receiver)
  "${CLIENT[@]}" load --port "$PORT" --cycle "$c" "${live[@]}" >"$OUT/load-$c.log" 2>&1 &
  LOAD_PID=$!
  sleep "$(printf '%d.%03d' $((load_ms / 1000)) $((load_ms % 1000)))"
  kill_qemu # the power cut
  kill "$LOAD_PID" 2>/dev/null || true
  wait "$LOAD_PID" 2>/dev/null || true
  LOAD_PID=
  prev_boot_s=$boot_s
done

wall=$((SECONDS - t_start))
echo
echo "== summary ($MODE, seed $SEED, run $RUN_ID)"
printf '%-34s %s\n' "cycles (power cuts checked)" "$checked" \
  "acknowledged writes checked" "$total_w" \
  "acknowledged packets checked" "$total_p" \
  "acknowledged writes lost" "$lost_w" \
  "acknowledged packets lost" "$lost_p" \
  "packets received twice" "$dups" \
  "failed checks or boots" "$fails" \
  "wall time" "${wall}s ($((wall / (c > 1 ? c - 1 : 1)))s per boot)"
echo "last check: $last_check"
echo "logs: $OUT"
((fails == 0))
