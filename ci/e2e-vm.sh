#!/usr/bin/env bash
# End to end with the real Linux kernel initiator: a QEMU guest (../shared/vm-initiator's
# run-guest: open-iscsi + sg3-utils) logs in to ftss-target on the host loopback and runs
# ci/e2e-guest.sh: ext4 on the mirrored, write-cached LUN 0, the docs/vendor-commands.md
# sg_raw examples by hand, and `ftss --device` (SG_IO) both ways with a host node that
# uses the userspace initiator.
#
#   guest node 192.0.2.7 (kernel session, registered by sg_raw)  <->  host node 192.0.2.8
#
# The host node is two `ftss` processes of one initiator name that both register
# 192.0.2.8, so they are one node: `hold` keeps it available for the whole run (a SEND
# to a node with no session is undeliverable), and a loop of `recv` runs takes the
# guest's packets, then answers with "from-host" to 192.0.2.7.
#
# Environment: VM_INITIATOR (the vm-initiator directory), E2E_TIMEOUT (guest seconds, 300).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

VM=${VM_INITIATOR:-}
if [[ -z $VM ]]; then
  for d in "$CI_ROOT/../shared/vm-initiator" "$CI_ROOT/../../shared/vm-initiator" /work/shared/vm-initiator; do
    if [[ -x $d/run-guest ]]; then
      VM=$(cd "$d" && pwd)
      break
    fi
  done
fi
[[ -n $VM && -x $VM/run-guest ]] || {
  echo "vm-initiator not found (set VM_INITIATOR)" >&2
  exit 2
}
need_qemu

IQN=iqn.2026-11.org.ftss:e2e
HOST_IQN=iqn.2026-11.org.ftss:host-node
GUEST_ADDR=192.0.2.7
HOST_ADDR=192.0.2.8
# The guest's packets the host node waits for: the sg_raw "ping", the mixed batch's
# "hello" and broadcast "all", and ftss "from-guest".
GUEST_PACKETS=4

work=$(mktemp -d)
trap 'ci_cleanup; rm -rf "$work"' EXIT
t0=$SECONDS

echo "== build (release)"
(cd "$CI_ROOT" && cargo build --release --bin ftss-target --bin ftss -q)
# The guest gets a stripped copy: the release profile keeps line tables, which only
# make the guest's initramfs bigger.
strip -o "$work/ftss" "$CI_ROOT/target/release/ftss" 2>/dev/null ||
  cp "$CI_ROOT/target/release/ftss" "$work/ftss"

port=$(free_port)
cat >"$work/ftss.toml" <<CONF
[server]
portals = ["127.0.0.1:$port"]
data_dir = "$work"
[media]
cache_size = "64MiB"
cache = "volatile"
[[target]]
iqn = "$IQN"
[[target.lun]]
lun = 0
mirrors = ["lun0-a.mirror", "lun0-b.mirror"]
size = "256MiB"
[packets]
mirrors = ["packets-a.mirror", "packets-b.mirror"]
size = "64MiB"
CONF
log_target="$CI_OUT/e2e-vm-ftss.log"
console="$CI_OUT/e2e-vm-console.log"
host_recv="$CI_OUT/e2e-vm-host-recv.txt"
host_send="$CI_OUT/e2e-vm-host-send.txt"
: >"$host_recv"
: >"$host_send"
ftss_start "$work/ftss.toml" "$log_target" "$port"
echo "== ftss-target on 127.0.0.1:$port (log $log_target)"

HF="$CI_ROOT/target/release/ftss --portal 127.0.0.1:$port --target $IQN --initiator $HOST_IQN -a $HOST_ADDR"
$HF hold 900 >"$work/hold.out" 2>&1 &
CI_PIDS+=($!)
# ROUTING TABLE answers registered nodes only: an observer node of its own asks (not the
# host node, whose own session would make it look available before `hold` is in).
for _ in $(seq 1 100); do
  $CI_ROOT/target/release/ftss --portal "127.0.0.1:$port" --target "$IQN" \
    --initiator iqn.2026-11.org.ftss:e2e-observer -a 192.0.2.254 nodes 2>/dev/null |
    grep -q "^$HOST_ADDR .*available" && break
  sleep 0.1
done

# The host node: receive until the guest's packets are in, then send one back.
host_node() {
  local got need
  while [[ ! -e $work/stop ]]; do
    got=$(grep -c '^seq=' "$host_recv" || true)
    need=$((GUEST_PACKETS - got))
    if ((need <= 0)); then
      $HF send "$GUEST_ADDR" from-host >>"$host_send" 2>&1 || true
      return
    fi
    $HF recv --wait 20 --count "$need" >>"$host_recv" 2>>"$work/recv.err" || sleep 1
  done
}
host_node &
host_pid=$!
CI_PIDS+=($host_pid)

echo "== run-guest (console $console)"
g0=$SECONDS
set +e
"$VM/run-guest" --portal "127.0.0.1:$port" --target "$IQN" \
  --guest-script "$CI_ROOT/ci/e2e-guest.sh" --extra-file "$work/ftss" \
  --timeout "${E2E_TIMEOUT:-300}" >"$console" 2>&1
guest_rc=$?
set -e
guest_secs=$((SECONDS - g0))
touch "$work/stop"

# ---------------------------------------------------------------------------------------
passes=0
failures=0
result() {
  if [[ $1 == ok ]]; then
    echo "PASS: $2"
    passes=$((passes + 1))
  else
    echo "FAIL: $2"
    failures=$((failures + 1))
  fi
}
echo "== guest (exit $guest_rc, ${guest_secs} s)"
grep -E '^(PASS|FAIL|GUEST)' "$console" | sed 's/^/  guest /' || true
guest_fails=$(grep -c '^FAIL' "$console" || true)
if ((guest_rc == 0 && guest_fails == 0)); then
  result ok "guest script: every check passed, clean logout (run-guest exit 0)"
else
  result fail "guest script: run-guest exit $guest_rc, $guest_fails guest checks failed (see $console)"
  tail -n 30 "$console" | sed 's/^/  console: /'
fi
echo "== host node"
sed 's/^/  recv: /' "$host_recv"
sed 's/^/  send: /' "$host_send"
if grep -q "^seq=[0-9]* from=$GUEST_ADDR .* len=4 \"ping\"" "$host_recv"; then
  result ok "host node got the sg_raw 'ping' (70696e67) from $GUEST_ADDR"
else
  result fail "host node did not get 'ping' from $GUEST_ADDR"
fi
if grep -q "^seq=[0-9]* from=$GUEST_ADDR .*\"from-guest\"" "$host_recv"; then
  result ok "host node got 'from-guest' (ftss --device) from $GUEST_ADDR"
else
  result fail "host node did not get 'from-guest' from $GUEST_ADDR"
fi
if grep -q ": delivered" "$host_send"; then
  result ok "host node's 'from-host' to $GUEST_ADDR delivered"
else
  result fail "host node's 'from-host' to $GUEST_ADDR not delivered"
fi
if grep -qiE "panicked|ERROR" "$log_target"; then
  result fail "ftss-target log has errors ($log_target)"
  grep -iE "panicked|ERROR" "$log_target" | head -n 5 | sed 's/^/  target: /'
else
  result ok "ftss-target log: no errors or panics"
fi

echo "== e2e-vm: $passes passed, $failures failed (guest ${guest_secs} s, total $((SECONDS - t0)) s)"
((failures == 0))
