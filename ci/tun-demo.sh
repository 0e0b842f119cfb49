#!/usr/bin/env bash
# The packet conversion unit, shown: two network namespaces whose only path to each other
# is ftss. Each has a TUN interface fed by `ftss tun` (running outside the namespace, over
# its own iSCSI session to the target on 127.0.0.1; the interface is moved into the
# namespace after it is created). Then: ping, a 100 MiB TCP transfer checked by sha256,
# and the same transfer while the target is killed with SIGKILL and restarted (TCP may
# stall, must not break). The same two measurements over a plain veth pair, beside.
# Needs root (namespaces, TUN); prints SKIP with the reason otherwise. Writes
# ci/out/tun-demo.figures (key=value, for ci/bench.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
if [ "$(id -u)" != 0 ] || [ ! -c /dev/net/tun ] || ! command -v ip >/dev/null; then
  echo "SKIP tun-demo: needs root, /dev/net/tun and iproute2"
  exit 0
fi
need ping iputils-ping
MIB=${MIB:-100}
work=$(mktemp -d)
tag=$$
A=ftssA$tag B=ftssB$tag C=vethC$tag D=vethD$tag
cleanup() {
  # The restarted target was started in a subshell, whose CI_PIDS the parent never sees.
  if [ -f "$work/target.pids" ]; then
    while read -r p; do kill "$p" 2>/dev/null || true; done <"$work/target.pids"
  fi
  ci_cleanup
  for n in "$A" "$B" "$C" "$D"; do ip netns del "$n" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
ftss_build
(cd "$CI_ROOT" && cargo build --release --bin ftss -q)
port=$(free_port)
cat >"$work/ftss.toml" <<CONF
[server]
portals = ["127.0.0.1:$port"]
data_dir = "$work/data"
[media]
cache_size = "256MiB"
[[target]]
iqn = "iqn.2026-11.org.ftss:tun"
[[target.lun]]
lun = 0
mirrors = ["lun-a.mirror", "lun-b.mirror"]
size = "16MiB"
[packets]
size = "1GiB"
CONF
target_start() {
  RUST_LOG=warn "$CI_ROOT/target/release/ftss-target" --config "$work/ftss.toml" >>"$CI_OUT/tun-demo-ftss.log" 2>&1 &
  target_pid=$!
  CI_PIDS+=($target_pid)
  echo "$target_pid" >>"$work/target.pids"
  wait_port "$port"
}
target_start
F="$CI_ROOT/target/release/ftss --portal 127.0.0.1:$port --target iqn.2026-11.org.ftss:tun"
fails=0
check() { # name, command...
  local name=$1
  shift
  if "$@"; then echo "PASS  $name"; else echo "FAIL  $name"; fails=$((fails + 1)); fi
}

# One side: namespace $1, address $2, TUN name $3.
side() {
  local ns=$1 addr=$2 dev=$3
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  # Emptied first, here: the unit's own redirection runs in the background, and until
  # it does a "ready" left by an earlier run would pass the wait below.
  : >"$CI_OUT/tun-demo-$addr.log"
  RUST_LOG=info $F -a "$addr" --initiator "iqn.2026-11.org.ftss:tun-$addr" tun --name "$dev" \
    >"$CI_OUT/tun-demo-$addr.log" 2>&1 &
  CI_PIDS+=($!)
  for _ in $(seq 1 100); do
    grep -q "ready" "$CI_OUT/tun-demo-$addr.log" 2>/dev/null && break
    sleep 0.1
  done
  ip link set "$dev" netns "$ns"
  ip -n "$ns" addr add "$addr/24" dev "$dev"
  ip -n "$ns" link set "$dev" up
}
side "$A" 10.99.0.1 "ta$tag"
side "$B" 10.99.0.2 "tb$tag"

# A veth pair between two other namespaces, for comparison.
ip netns add "$C"
ip netns add "$D"
ip link add "vc$tag" type veth peer name "vd$tag"
ip link set "vc$tag" netns "$C"
ip link set "vd$tag" netns "$D"
ip -n "$C" addr add 10.98.0.1/24 dev "vc$tag"
ip -n "$D" addr add 10.98.0.2/24 dev "vd$tag"
for n in "$C" "$D"; do ip -n "$n" link set lo up; done
ip -n "$C" link set "vc$tag" up
ip -n "$D" link set "vd$tag" up

head -c $((MIB << 20)) /dev/urandom >"$work/blob"
want=$(sha256sum "$work/blob" | cut -d' ' -f1)

rtt() { # namespace, address, file -> "min/avg/max/mdev ms"; the replies go to the file
  ip netns exec "$1" ping -c 20 -i 0.2 -W 5 "$2" | tee "$3" | awk -F'= ' '/rtt/ {print $2}'
}
p50() { # file of rtt -> the median reply time in ms (the summary has no median)
  # shellcheck disable=SC2046 # one reply time a word
  median $(grep -oE 'time=[0-9.]+' "$1" | cut -d= -f2)
}

echo "== ping"
ftss_rtt=$(rtt "$A" 10.99.0.2 "$work/ping-ftss")
veth_rtt=$(rtt "$C" 10.98.0.2 "$work/ping-veth")
ftss_p50=$(p50 "$work/ping-ftss")
veth_p50=$(p50 "$work/ping-veth")
check "ping through ftss ($ftss_rtt)" test -n "$ftss_rtt"

echo "== TCP, $MIB MiB"
tcp_server "$B" 10.99.0.2 "$work/got1"
ftss_mbs=$(tcp_client "$A" 10.99.0.2 "$work/blob")
wait "$server_pid"
check "TCP through ftss: sha256 matches ($ftss_mbs MB/s)" test "$(cat "$work/got1")" = "$want"
tcp_server "$D" 10.98.0.2 "$work/got2"
veth_mbs=$(tcp_client "$C" 10.98.0.2 "$work/blob")
wait "$server_pid"
check "TCP over veth: sha256 matches ($veth_mbs MB/s)" test "$(cat "$work/got2")" = "$want"

echo "== TCP, $MIB MiB, target killed with SIGKILL and restarted during the transfer"
tcp_server "$B" 10.99.0.2 "$work/got3"
(
  # Kill once a sixth of the data has arrived, however fast this machine is.
  for _ in $(seq 1 3000); do
    got=$(cat "$work/got3.bytes" 2>/dev/null || echo 0)
    [ "${got:-0}" -ge $(((MIB << 20) / 6)) ] && break
    sleep 0.01
  done
  date +%s.%N >"$work/killed_at"
  kill -9 "$target_pid"
  sleep 1
  target_start
  echo "restarted" >"$work/restarted"
) &
killer=$!
crash_mbs=$(tcp_client "$A" 10.99.0.2 "$work/blob" || echo failed)
date +%s.%N >"$work/done_at"
wait "$killer" || true
wait "$server_pid" || true
check "target was killed and restarted mid-transfer" \
  python3 -c "import sys; sys.exit(not float(open('$work/killed_at').read()) < float(open('$work/done_at').read()))"
check "target restarted" test -f "$work/restarted"
check "TCP across the crash: sha256 matches ($crash_mbs MB/s)" test "$(cat "$work/got3" 2>/dev/null)" = "$want"
check "ping after the restart" test -n "$(rtt "$A" 10.99.0.2 "$work/ping-after")"

{
  echo "TUN demo: two namespaces joined only by ftss (mirrored, nonvolatile packet queue) vs a veth pair"
  printf '%-34s %-28s %s\n' "" "ftss" "veth"
  printf '%-34s %-28s %s\n' "ping rtt min/avg/max/mdev" "$ftss_rtt" "$veth_rtt"
  printf '%-34s %-28s %s\n' "ping rtt median (ms)" "$ftss_p50" "$veth_p50"
  printf '%-34s %-28s %s\n' "TCP $MIB MiB throughput (MB/s)" "$ftss_mbs" "$veth_mbs"
  printf '%-34s %-28s\n' "same, SIGKILL + restart mid-way" "$crash_mbs"
} | tee "$CI_OUT/tun-demo.txt"
figs="$CI_OUT/tun-demo.figures"
: >"$figs"
figure "$figs" mib "$MIB"
figure "$figs" ftss_ping_p50_ms "$ftss_p50"
figure "$figs" veth_ping_p50_ms "$veth_p50"
# A transfer that failed printed nothing or "failed": n/a, not a number.
num_or_na() { [[ $1 =~ ^[0-9.]+$ ]] && echo "$1" || echo n/a; }
figure "$figs" ftss_tcp_mbs "$(num_or_na "$ftss_mbs")"
figure "$figs" veth_tcp_mbs "$(num_or_na "$veth_mbs")"
echo "tun-demo: $fails failed"
[ "$fails" = 0 ]
