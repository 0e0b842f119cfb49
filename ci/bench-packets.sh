#!/usr/bin/env bash
# Packet benchmark: guaranteed-delivery SENDs of 1 KiB packets with 1 and with 32 in
# flight, and send-to-receive latency at 1000 packets/s, against ftss-target with its
# packet queue on the mirrored, nonvolatile write-cached media (every packet msync'd
# before GOOD). Printed beside its peer in the same run, redis-server (Debian's) with
# `appendonly yes, appendfsync always` driven by redis-benchmark with XADD of a 1 KiB
# field (`-c 1` for 1 in flight, `-c 1 -P 32` for 32), and beside the fsync limit of the
# same disk: one msync'd 4 KiB write at a time, the rate a store-then-acknowledge design
# gets without group commit. ftss runs its embedded default configuration (portal and data
# directory moved). Writes ci/out/bench-packets.csv, a chart of it, and
# ci/out/bench-packets.figures (key=value, for ci/bench.sh). BENCH_QUICK=1 sends fewer.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
if [ "${BENCH_QUICK:-0}" = 1 ]; then
  COUNT1=${COUNT1:-300} COUNT32=${COUNT32:-3000} LAT_COUNT=${LAT_COUNT:-500}
fi
COUNT1=${COUNT1:-3000}
COUNT32=${COUNT32:-50000}
LAT_COUNT=${LAT_COUNT:-5000}
work=$(mktemp -d)
trap 'ci_cleanup; rm -rf "$work"' EXIT
ftss_build
(cd "$CI_ROOT" && cargo build --release --bin ftss -q)
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi
port=$(free_port)
# The default media: 256 MiB nonvolatile write cache, packet queue on two mirrors.
ftss_default_config "$port" "$work/ftss" >"$work/ftss.toml"
RUST_LOG=warn ftss_start "$work/ftss.toml" "$CI_OUT/bench-packets-ftss.log" "$port"
F="$CI_ROOT/target/release/ftss --portal 127.0.0.1:$port"
# The destination node takes and acknowledges everything.
$F -a 10.0.0.2 --initiator iqn.2026-11.org.ftss:bench-rx recv --quiet --wait 25 --count 1000000000 >/dev/null 2>&1 &
CI_PIDS+=($!)
tx="$F -a 10.0.0.1 --initiator iqn.2026-11.org.ftss:bench-tx"
# ROUTING TABLE answers registered nodes only: the sender asks.
for _ in $(seq 1 50); do
  $tx nodes 2>/dev/null | grep -q "10.0.0.2 .*available" && break
  sleep 0.1
done
# The peer: redis, every XADD fsync'd to its append-only file before the reply, its data
# in the same scratch directory as ftss's media.
rport=$(free_port)
mkdir -p "$work/redis"
redis-server --port "$rport" --bind 127.0.0.1 --dir "$work/redis" --appendonly yes \
  --appendfsync always --save '' --logfile "$CI_OUT/bench-packets-redis.log" &
CI_PIDS+=($!)
for _ in $(seq 1 50); do
  redis-cli -p "$rport" ping 2>/dev/null | grep -q PONG && break
  sleep 0.1
done
field=$(head -c 1024 /dev/zero | tr '\0' 'x')
# redis_xadd ARGS...: "rps p50_ms p99_ms" of XADD with a 1 KiB field.
redis_xadd() {
  redis-benchmark -p "$rport" --csv "$@" XADD ftss-bench '*' f "$field" | tail -1 |
    awk -F'","' '{gsub(/"/, "", $0); n = split($0, f, ","); print f[n-6], f[n-3], f[n-1]}'
}
num() { grep -oE "$1" | grep -oE '[0-9.]+' | head -1; }
{
  echo "packet benchmark: 1 KiB guaranteed-delivery packets, loopback, $(nproc) cores"
  latency() {
    $F -a 10.0.0.3 --initiator iqn.2026-11.org.ftss:bench-lat latency 10.0.0.4 \
      --peer-initiator iqn.2026-11.org.ftss:bench-lat-rx --rate 1000 --count "$LAT_COUNT" --size 1024
  }
  # Latency first, on a settled daemon, as redis's is measured; again right after the
  # burst of the 32-in-flight test, while its packets are still being received,
  # acknowledged, destaged and released.
  echo "-- ftss: send-to-receive latency at 1000 packets/s"
  latency | tee "$work/flat"
  echo "-- ftss: 1 SEND in flight"
  $tx bench 10.0.0.2 --size 1024 --count "$COUNT1" --inflight 1 | tee "$work/f1"
  echo "-- ftss: 32 SENDs in flight"
  $tx bench 10.0.0.2 --size 1024 --count "$COUNT32" --inflight 32 | tee "$work/f32"
  echo "-- ftss: send-to-receive latency at 1000 packets/s, right after the 32-in-flight burst"
  latency | tee "$work/flat-burst"
  read -r r1 r1p50 r1p99 < <(redis_xadd -c 1 -n "$COUNT1")
  echo "-- redis appendfsync always, XADD 1 KiB, 1 in flight: $r1 per second, p50 $r1p50 ms, p99 $r1p99 ms"
  read -r r32 _ _ < <(redis_xadd -c 1 -P 32 -n "$COUNT32")
  echo "-- redis appendfsync always, XADD 1 KiB, 32 in flight (-P 32): $r32 per second"
  fl=$(fsync_limit "$work")
  echo "fsync limit of this disk (one 4 KiB pwrite + msync at a time, the write cache's commit): $fl"
  # A rate of packets that were not delivered (a receiver behind, its queue full: the
  # SENDs answered at once) is not the figure: such a run reads n/a.
  f1=$(grep -q "not delivered" "$work/f1" && echo n/a || num '[0-9.]+ packets/s' <"$work/f1")
  f32=$(grep -q "not delivered" "$work/f32" && echo n/a || num '[0-9.]+ packets/s' <"$work/f32")
  # ms from "p50 N us" (n/a when the line is missing).
  lat() { { grep -oE "$1 [0-9]+ us" "$work/${2:-flat}" || true; } | awk '{print $2 / 1000; n++} END {if (!n) print "n/a"}' | head -1; }
  figs="$CI_OUT/bench-packets.figures"
  : >"$figs"
  figure "$figs" ftss_1 "$f1"
  figure "$figs" ftss_32 "$f32"
  figure "$figs" redis_1 "$r1"
  figure "$figs" redis_32 "$r32"
  figure "$figs" lat_p50_ms "$(lat p50)"
  figure "$figs" lat_p99_ms "$(lat p99)"
  figure "$figs" lat_burst_p50_ms "$(lat p50 flat-burst)"
  figure "$figs" lat_burst_p99_ms "$(lat p99 flat-burst)"
  figure "$figs" redis_p50_ms "$r1p50"
  figure "$figs" redis_p99_ms "$r1p99"
  printf '%-44s %10s %10s %6s\n' "1 KiB, durable before the ack" ftss redis ratio
  printf '%-44s %10.0f %10.0f %6.2f\n' "per second, 1 in flight" "$f1" "$r1" "$(awk "BEGIN { print $f1 / $r1 }")"
  printf '%-44s %10.0f %10.0f %6.2f\n' "per second, 32 in flight" "$f32" "$r32" "$(awk "BEGIN { print $f32 / $r32 }")"
  csv="$CI_OUT/bench-packets.csv"
  echo "test,ftss (default media),redis appendfsync always,fsync limit of the disk" >"$csv"
  echo "1 KiB per second / 1 in flight,$f1,$r1,${fl%% *}" >>"$csv"
  echo "1 KiB per second / 32 in flight,$f32,$r32,${fl%% *}" >>"$csv"
} | tee "$CI_OUT/bench-packets.txt"
python3 "$CI_ROOT/ci/chart.py" "$CI_OUT/bench-packets.csv" "$CI_OUT/bench-packets.svg" \
  "Durable 1 KiB packets/s"
echo "chart: $CI_OUT/bench-packets.svg (data $CI_OUT/bench-packets.csv)"
