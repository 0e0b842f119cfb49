#!/usr/bin/env bash
# Backlog benchmark: a node stays logged in but stops receiving while another sends it
# PACKETS (default 10 million) 64-byte packets; the daemon's resident memory is printed as
# the backlog grows, then the node drains it (RECEIVE and ACK) and its queue statistics
# must show nothing left. Shows that memory
# stays bounded (a fixed per-node index, the dedup window and the write cache's index)
# however far the backlog outgrows RAM. Needs about PACKETS x 1.1 KiB of disk (two mirrors
# of 512 bytes a packet), in BENCH_DIR (default /var/tmp). DRAIN=0 skips the drain (ci/bench.sh
# wants only the memory). Writes ci/out/bench-backlog.figures (key=value, for ci/bench.sh).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
PACKETS=${PACKETS:-10000000}
STEP=${STEP:-1000000}
DRAIN=${DRAIN:-1}
CACHE_MIB=${CACHE_MIB:-256}
work=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
trap 'ci_cleanup; rm -rf "$work"' EXIT
ftss_build
(cd "$CI_ROOT" && cargo build --release --bin ftss -q)
port=$(free_port)
# 512 bytes a record (one block): 10 M packets need 5 GiB of queue.
qsize=$(( (PACKETS * 512 + (256 << 20)) / (1 << 20) ))MiB
cat >"$work/ftss.toml" <<CONF
[server]
portals = ["127.0.0.1:$port"]
data_dir = "$work"
[media]
cache_size = "${CACHE_MIB}MiB"
${CACHE_WRITES:+cache_writes = \"$CACHE_WRITES\"}
[[target]]
iqn = "iqn.2026-11.org.ftss:backlog"
[[target.lun]]
lun = 0
mirrors = ["lun-a.mirror", "lun-b.mirror"]
size = "16MiB"
[packets]
size = "$qsize"
# One destination takes the whole backlog: its default quota (a quarter of the queue)
# would refuse most of it, and the figure would be of a smaller backlog.
node_quota_bytes = "$qsize"
node_quota_records = $PACKETS
CONF
RUST_LOG=warn ftss_start "$work/ftss.toml" "$CI_OUT/bench-backlog-ftss.log" "$port"
pid=${CI_PIDS[-1]}
F="$CI_ROOT/target/release/ftss --portal 127.0.0.1:$port"
# Resident memory, split into the write cache's map (the cache file mapped private: pages
# read from the file, and the process's own copy of each page written since, at most
# media.cache_size) and everything else (heap: indexes, dedup window; stacks; code).
# rss_parts: "total cache other" in KiB.
rss_parts() {
  local t c
  t=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
  c=$(awk -v f="$work/write-cache" '
        /^[0-9a-f]+-[0-9a-f]+ / {m = ($NF == f)}
        m && /^Rss:/ {s += $2}
        END {print s + 0}' "/proc/$pid/smaps")
  echo "$t $c $((t - c))"
}
# rss_csv: "total,other,cache map" MiB, for the CSV.
rss_csv() {
  rss_parts | awk '{printf "%.0f,%.0f,%.0f", $1 / 1024, $3 / 1024, $2 / 1024}'
}
csv="$CI_OUT/bench-backlog.csv"
echo "test,daemon RSS MiB,beside the cache MiB,write cache map MiB" >"$csv"
rss() {
  rss_parts | awk '{printf "%.0f MiB (write cache map %.0f MiB, beside it %.0f MiB)", $1 / 1024, $2 / 1024, $3 / 1024}'
}
# The destination: logged in (available), not receiving.
$F -a 10.0.0.2 --initiator iqn.2026-11.org.ftss:away hold 86400 >/dev/null 2>&1 &
CI_PIDS+=($!)
tx="$F -a 10.0.0.1 --initiator iqn.2026-11.org.ftss:sender"
# ROUTING TABLE answers registered nodes only: the sender asks.
for _ in $(seq 1 50); do
  $tx nodes 2>/dev/null | grep -q "10.0.0.2 .*available" && break
  sleep 0.1
done
echo "backlog benchmark: $PACKETS packets of 64 bytes to a node that does not receive"
echo "start: daemon RSS $(rss)"
sent=0
t_start=$SECONDS
while [ "$sent" -lt "$PACKETS" ]; do
  n=$(( PACKETS - sent < STEP ? PACKETS - sent : STEP ))
  out=$($tx bench 10.0.0.2 --size 64 --count "$n" --inflight 8 --batch 512 | sed -n 1p)
  sent=$(( sent + n ))
  echo "$sent queued: daemon RSS $(rss)  ($out)"
  echo "$sent queued,$(rss_csv)" >>"$csv"
done | tee "$CI_OUT/bench-backlog.txt"
# Every packet must be queued, or the memory figure is of a smaller backlog.
queued=$($F -a 10.0.0.2 --initiator iqn.2026-11.org.ftss:away stats | awk '/queued records/ {print $3}')
echo "queued records of the away node: $queued" | tee -a "$CI_OUT/bench-backlog.txt"
[ "$queued" = "$PACKETS" ] || { echo "only $queued of $PACKETS packets queued" >&2; exit 1; }
figs="$CI_OUT/bench-backlog.figures"
: >"$figs"
figure "$figs" packets "$PACKETS"
figure "$figs" queue_seconds $((SECONDS - t_start))
figure "$figs" cache_mib "$CACHE_MIB"
# The memory with the whole backlog queued (the last row; the daemon keeps running).
figure "$figs" rss_mib "$(tail -1 "$csv" | grep "^$PACKETS queued," | cut -d, -f2)"
# RSS beside the write cache's map (heap, stacks, code): what the packets cost.
figure "$figs" anon_mib "$(tail -1 "$csv" | grep "^$PACKETS queued," | cut -d, -f3)"
if [ "$DRAIN" = 0 ]; then
  python3 "$CI_ROOT/ci/chart.py" "$csv" "$CI_OUT/bench-backlog.svg" "Memory with a packet backlog"
  exit 0
fi
echo "stats of the away node: $($F -a 10.0.0.2 --initiator iqn.2026-11.org.ftss:away stats | tr '\n' ' ')"
t0=$(date +%s.%N)
$F -a 10.0.0.2 --initiator iqn.2026-11.org.ftss:away recv --quiet --wait 5 --count "$PACKETS" >/dev/null
t1=$(date +%s.%N)
left=$($F -a 10.0.0.2 --initiator iqn.2026-11.org.ftss:away stats | awk '/queued records/ {print $3}')
echo "drained $PACKETS packets in $(python3 -c "print(round($t1 - $t0, 1))") s; left queued: $left; daemon RSS $(rss)" | tee -a "$CI_OUT/bench-backlog.txt"
[ "$left" = 0 ]
python3 "$CI_ROOT/ci/chart.py" "$csv" "$CI_OUT/bench-backlog.svg" "Memory with a packet backlog"
echo "chart: $CI_OUT/bench-backlog.svg (data $csv)"
