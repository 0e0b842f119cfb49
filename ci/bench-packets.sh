#!/usr/bin/env bash
# Packet benchmark: guaranteed-delivery SENDs of 1 KiB packets with 1 and with 32 in
# flight, and send-to-receive latency at 1000 packets/s, against ftss-target with its
# packet queue on the mirrored, nonvolatile write-cached media (every packet msync'd
# before GOOD). Printed beside the fsync limit of the same disk: one msync'd 4 KiB
# write at a time, the rate a store-then-acknowledge design gets without group commit.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
COUNT1=${COUNT1:-3000}
COUNT32=${COUNT32:-50000}
LAT_COUNT=${LAT_COUNT:-5000}
work=$(mktemp -d)
trap 'ci_cleanup; rm -rf "$work"' EXIT
ftss_build
(cd "$CI_ROOT" && cargo build --release --bin ftss -q)
port=$(free_port)
cat >"$work/ftss.toml" <<CONF
[server]
portals = ["127.0.0.1:$port"]
data_dir = "$work"
[media]
cache_size = "256MiB"
cache = "nonvolatile"
[[target]]
iqn = "iqn.2026-11.org.ftss:bench"
[[target.lun]]
lun = 0
mirrors = ["lun-a.mirror", "lun-b.mirror"]
size = "64MiB"
[packets]
mirrors = ["packets-a.mirror", "packets-b.mirror"]
size = "1GiB"
CONF
RUST_LOG=warn ftss_start "$work/ftss.toml" "$CI_OUT/bench-packets-ftss.log" "$port"
F="$CI_ROOT/target/release/ftss --portal 127.0.0.1:$port"
# The destination node takes and acknowledges everything.
$F -a 10.0.0.2 --initiator iqn.2026-11.org.ftss:bench-rx recv --wait 25 --count 1000000000 >/dev/null 2>&1 &
CI_PIDS+=($!)
tx="$F -a 10.0.0.1 --initiator iqn.2026-11.org.ftss:bench-tx"
# ROUTING TABLE answers registered nodes only: the sender asks.
for _ in $(seq 1 50); do
  $tx nodes 2>/dev/null | grep -q "10.0.0.2 .*available" && break
  sleep 0.1
done
{
  echo "packet benchmark: 1 KiB guaranteed-delivery packets, loopback, $(nproc) cores"
  echo "-- 1 SEND in flight"
  $tx bench 10.0.0.2 --size 1024 --count "$COUNT1" --inflight 1
  echo "-- 32 SENDs in flight"
  $tx bench 10.0.0.2 --size 1024 --count "$COUNT32" --inflight 32
  echo "-- send-to-receive latency at 1000 packets/s"
  $F -a 10.0.0.3 --initiator iqn.2026-11.org.ftss:bench-lat latency 10.0.0.4 \
    --peer-initiator iqn.2026-11.org.ftss:bench-lat-rx --rate 1000 --count "$LAT_COUNT" --size 1024
  echo "fsync limit of this disk (one 4 KiB msync at a time): $(fsync_limit "$work")"
} | tee "$CI_OUT/bench-packets.txt"
