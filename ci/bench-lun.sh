#!/usr/bin/env bash
# LUN I/O benchmark, ftss-target beside Debian's tgt in one run, same LUN size on the same
# disk: 4 KiB random reads at queue depth 32 (iscsi-perf -m 32 -b 8) and 4 KiB writes and
# reads at depth 32 (qemu-img bench). ftss runs five ways: mirrored LUN behind the write
# cache in nonvolatile mode (GOOD only after the commit msync), the same with records
# stored through the map instead of pwrite (media.cache_writes = "map", the DAX setting),
# the same map setting with the cache file on tmpfs (nv-mem: a memory-speed stand-in for a
# persistent-memory cache device; it survives kill -9 but not power loss, so it shows what
# the commit costs on this machine's disk, not a durable configuration), the nonvolatile
# setup in volatile mode, and a plain file (page cache, like tgt). The mirrors are on the
# disk in every case. tgt runs twice: on the page cache, and with --bsoflags sync (O_SYNC:
# durable before the ack, the fair peer of ftss-nv). Prints IOPS, the ratios to tgt, the
# commit figures of ftss-nv, and writes ci/out/bench-lun.csv and a chart of it (ci/chart.py).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need iscsi-perf libiscsi-bin
need tgtd tgt
need_qemu
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
COUNT=${COUNT:-200000}
work=$(mktemp -d)
shm=$(mktemp -d /dev/shm/ftss-bench.XXXXXX)
trap 'ci_cleanup; rm -rf "$work" "$shm"' EXIT
ftss_build
fp=$(free_port)
mp=$(free_port)
xp=$(free_port)
vp=$(free_port)
tp=$(free_port)
cp=$(tgt_control_index)
T=iqn.2026-11.org.ftss:bench
for mode in nonvolatile nvmap nvmem volatile; do
  port=$fp writes=write cache=$mode cpath="$work/$mode/cache.bin"
  [ "$mode" = nvmap ] && port=$mp writes=map cache=nonvolatile
  [ "$mode" = nvmem ] && port=$xp writes=map cache=nonvolatile cpath="$shm/cache.bin"
  [ "$mode" = volatile ] && port=$vp
  mkdir -p "$work/$mode"
  cat >"$work/$mode.toml" <<CONF
[server]
portals = ["127.0.0.1:$port"]
data_dir = "$work/$mode"
[media]
cache_size = "256MiB"
cache_path = "$cpath"
cache = "$cache"
cache_writes = "$writes"
[[target]]
iqn = "$T"
[[target.lun]]
lun = 0
mirrors = ["a.mirror", "b.mirror"]
size = "1GiB"
[[target.lun]]
lun = 1
path = "file.img"
size = "1GiB"
CONF
done
RUST_LOG=info ftss_start "$work/nonvolatile.toml" "$CI_OUT/bench-ftss-nonvolatile.log" "$fp"
RUST_LOG=info ftss_start "$work/nvmap.toml" "$CI_OUT/bench-ftss-nvmap.log" "$mp"
RUST_LOG=info ftss_start "$work/nvmem.toml" "$CI_OUT/bench-ftss-nvmem.log" "$xp"
RUST_LOG=info ftss_start "$work/volatile.toml" "$CI_OUT/bench-ftss-volatile.log" "$vp"
truncate -s 1G "$work/tgt.img"
tgtd_start "$tp" "$cp" "$CI_OUT/bench-tgtd.log"
tgtadm -C "$cp" --lld iscsi --op new --mode target --tid 1 -T "$T"
tgtadm -C "$cp" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$work/tgt.img"
tgtadm -C "$cp" --lld iscsi --op bind --mode target --tid 1 -I ALL
# tgt with O_SYNC on its backing file: every write durable before the ack, as ftss-nv.
truncate -s 1G "$work/tgt-sync.img"
tgtadm -C "$cp" --lld iscsi --op new --mode target --tid 2 -T "$T-sync"
tgtadm -C "$cp" --lld iscsi --op new --mode logicalunit --tid 2 --lun 1 -b "$work/tgt-sync.img" --bsoflags sync
tgtadm -C "$cp" --lld iscsi --op bind --mode target --tid 2 -I ALL
nurl="iscsi://127.0.0.1:$fp/$T/0"
murl="iscsi://127.0.0.1:$mp/$T/0"
xurl="iscsi://127.0.0.1:$xp/$T/0"
vurl="iscsi://127.0.0.1:$vp/$T/0"
furl="iscsi://127.0.0.1:$fp/$T/1"
turl="iscsi://127.0.0.1:$tp/$T/1"
surl="iscsi://127.0.0.1:$tp/$T-sync/1"
# Fill the first 256 MiB of every LUN so reads hit written blocks, not holes.
head -c $((256 << 20)) /dev/urandom >"$work/fill"
for u in "$nurl" "$murl" "$xurl" "$vurl" "$furl" "$turl" "$surl"; do
  qemu-img convert -n -f raw -O raw "$work/fill" "$u"
done

perf() { # url -> IOPS of 4 KiB random reads, depth 32
  timeout $((SECONDS_PER_RUN + 30)) iscsi-perf -m 32 -b 8 -r -t "$SECONDS_PER_RUN" "$1" 2>&1 |
    tr '\r' '\n' | grep -oE 'iops average [0-9]+' | tail -1 | grep -oE '[0-9]+$' || echo 0
}
qbench() { # url, extra args -> IOPS
  local url=$1
  shift
  local out secs
  out=$(qemu-img bench -f raw -t none -c "$COUNT" -d 32 -s 4096 -S 4096 "$@" "$url" 2>&1)
  secs=$(echo "$out" | grep -oE 'completed in [0-9.]+' | grep -oE '[0-9.]+$')
  python3 -c "print(int($COUNT / $secs))"
}
csv="$CI_OUT/bench-lun.csv"
echo "test,ftss-nv (default),ftss nv-map,ftss nv-mem (not durable),ftss volatile,ftss plain file,tgt,tgt --bsoflags sync" >"$csv"
row() { # label, nonvolatile, nonvolatile-map, nonvolatile-mem, volatile, file, tgt, tgt sync
  echo "$1,$2,$3,$4,$5,$6,$7,$8" >>"$csv"
  python3 -c "
n, m, x, v, f, t, s = $2, $3, $4, $5, $6, $7, $8
r = lambda a, b: f'{a / b:.2f}' if b else 'n/a'
print(f'{\"$1\":36} {n:>9} {m:>9} {x:>9} {v:>9} {f:>9} {t:>9} {s:>9} {r(n, t):>7} {r(n, s):>7} {r(x, t):>7}')"
}
all() { # label, function, args -> one row over the seven LUNs
  local label=$1 fn=$2
  shift 2
  row "$label" "$($fn "$nurl" "$@")" "$($fn "$murl" "$@")" "$($fn "$xurl" "$@")" \
    "$($fn "$vurl" "$@")" "$($fn "$furl" "$@")" "$($fn "$turl" "$@")" "$($fn "$surl" "$@")"
}
commits() { # status line before, after -> the group commits between them
  python3 -c "
import re, sys
a, b = (dict(re.findall(r'(\w+)=(\d+)', x)) for x in sys.argv[1:3])
d = lambda k: int(b[k]) - int(a[k])
r, n, us = d('records'), d('commit_flushes'), d('commit_flush_us')
print(f'{r} records in {n} commit msyncs ({r / max(n, 1):.1f} per msync), msync avg {us // max(n, 1)} us')" "$1" "$2"
}
{
  echo "LUN benchmark: 1 GiB LUNs, 4 KiB I/O at queue depth 32, loopback, $(nproc) cores"
  echo "ftss-nv: mirrored + write cache, nonvolatile; nv-map: same, records stored through the map;"
  echo "nv-mem: nv-map with the cache file on tmpfs (stand-in for persistent memory, not durable"
  echo "across power loss); ftss-vol: same as ftss-nv, volatile; ftss-file: plain file"
  echo "tgt: page cache (acks before the disk has it); tgt-sync: --bsoflags sync (O_SYNC, durable)"
  printf '%-36s %9s %9s %9s %9s %9s %9s %9s %7s %7s %7s\n' "test (IOPS)" "ftss-nv" "nv-map" "nv-mem" "ftss-vol" "ftss-file" "tgt" "tgt-sync" "nv/tgt" "nv/sync" "mem/tgt"
  all "iscsi-perf random read -m 32 -b 8" perf
  before=$(cache_status "$work/nonvolatile.toml")
  all "qemu-img bench write -d 32 -s 4k" qbench -w
  after=$(cache_status "$work/nonvolatile.toml")
  all "qemu-img bench read -d 32 -s 4k" qbench
  echo "ftss-nv commits in its write test: $(commits "$before" "$after")"
  echo "fsync limit of this disk (one 4 KiB msync): $(fsync_limit "$work")"
} | tee "$CI_OUT/bench-lun.txt"
# The chart README shows: copy it to docs/bench/ and commit it with the figures.
python3 "$CI_ROOT/ci/chart.py" "$csv" "$CI_OUT/bench-lun.svg" \
  "LUN IOPS, 4 KiB at queue depth 32, 1 GiB LUNs, loopback, $(nproc) cores ($(date -u +%Y-%m-%d))"
echo "chart: $CI_OUT/bench-lun.svg (data $csv)"
