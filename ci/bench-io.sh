#!/usr/bin/env bash
# LUN I/O against the goals of issue 14: ftss-target with its embedded default
# configuration (a mirrored 1 GiB LUN behind the nonvolatile write cache; portal and data
# directory moved) beside Debian's tgt in the same run, on the same disk: tgt on the page
# cache (acks before the disk has the data) and tgt with --bsoflags sync (O_SYNC: durable
# before the ack, the fair peer of ftss). All with qemu-img bench, host cache off,
# consecutive offsets:
#   4 KiB writes -d 32 (ftss, tgt, tgt-sync); 4 KiB writes -d 1 with a flush after each
#   (ftss, tgt); 128 KiB writes -d 8; 4 KiB reads -d 32; 128 KiB reads -d 8 (ftss, tgt);
#   and, first, on the fresh daemon, the 4 KiB -d 32 write test for SUSTAINED_X times the
#   cache size, so destage is part of the figure, with the longest commit and ring-space
#   waits the daemon saw (admin status commit_wait_max_us / space_wait_max_us).
# Every test runs RUNS times, the systems alternating, and the medians are kept. Writes
# ci/out/bench-io.csv, ci/out/bench-io.txt and ci/out/bench-io.figures (key=value for
# ci/bench.sh). BENCH_QUICK=1 shortens everything (checks the script, not the figures).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need tgtd tgt
need_qemu
if [ "${BENCH_QUICK:-0}" = 1 ]; then
  RUNS=${RUNS:-1} W4=${W4:-3000} FLUSH1=${FLUSH1:-200} W128=${W128:-128} R4=${R4:-5000}
  R128=${R128:-256} FILL_MIB=${FILL_MIB:-64} SUSTAINED_X=${SUSTAINED_X:-0.25}
fi
W4=${W4:-50000}           # 4 KiB writes -d 32: 195 MiB, a burst the 256 MiB cache holds
FLUSH1=${FLUSH1:-2000}    # 4 KiB writes -d 1 + flush: tgt pays a disk flush for each
W128=${W128:-2048}        # 128 KiB writes -d 8: 256 MiB
R4=${R4:-100000}          # 4 KiB reads -d 32: 391 MiB, inside the filled part
R128=${R128:-4096}        # 128 KiB reads -d 8: 512 MiB, the filled part
FILL_MIB=${FILL_MIB:-512} # written before the reads, so they read data, not holes
SUSTAINED_X=${SUSTAINED_X:-4}
RUNS=${RUNS:-3}
work=$(mktemp -d)
trap 'ci_cleanup; rm -rf "$work"' EXIT
ftss_build
figs="$CI_OUT/bench-io.figures"
: >"$figs"

fp=$(free_port)
tp=$(free_port)
cp=$(tgt_control_index)
ftss_default_config "$fp" "$work/ftss" >"$work/ftss.toml"
"$CI_ROOT/target/release/ftss-target" --config "$work/ftss.toml" --check-config >/dev/null
RUST_LOG=info ftss_start "$work/ftss.toml" "$CI_OUT/bench-io-ftss.log" "$fp"
T=$(ftss_default_iqn)
lun_bytes=$(awk '/^size = / {gsub(/"/, "", $3); print $3; exit}' "$work/ftss.toml")
# tgt's LUNs get the size of ftss's (the default configuration's "1GiB").
truncate -s "${lun_bytes/iB/}" "$work/tgt.img"
truncate -s "${lun_bytes/iB/}" "$work/tgt-sync.img"
tgtd_start "$tp" "$cp" "$CI_OUT/bench-io-tgtd.log"
tgtadm -C "$cp" --lld iscsi --op new --mode target --tid 1 -T "$T"
tgtadm -C "$cp" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$work/tgt.img"
tgtadm -C "$cp" --lld iscsi --op bind --mode target --tid 1 -I ALL
tgtadm -C "$cp" --lld iscsi --op new --mode target --tid 2 -T "$T-sync"
tgtadm -C "$cp" --lld iscsi --op new --mode logicalunit --tid 2 --lun 1 -b "$work/tgt-sync.img" --bsoflags sync
tgtadm -C "$cp" --lld iscsi --op bind --mode target --tid 2 -I ALL
declare -A url=(
  [ftss]="iscsi://127.0.0.1:$fp/$T/0"
  [tgt]="iscsi://127.0.0.1:$tp/$T/1"
  [tgt-sync]="iscsi://127.0.0.1:$tp/$T-sync/1"
)

# settle: no write-back left over from the previous test (tgt's dirty pages, ftss's ring).
settle() {
  sync
  wait_cache_clean "$work/ftss.toml"
}
# rate SECONDS COUNT SIZE UNIT: IOPS or MB/s; n/a when qemu-img bench failed.
rate() {
  [ -n "$1" ] || { echo n/a; return; }
  if [ "$4" = MB/s ]; then
    python3 -c "print(round($2 * $3 / $1 / 1e6))"
  else
    python3 -c "print(int($2 / $1))"
  fi
}

echo "== sustained: 4 KiB writes -d 32 for $SUSTAINED_X x the write cache, on the fresh daemon"
st0=$(cache_status "$work/ftss.toml")
ring=$(kv "$st0" ring_bytes)
ns=$(python3 -c "print(int($SUSTAINED_X * $ring / 4096))")
t0=$SECONDS
secs=$(qemu_bench "${url[ftss]}" "$ns" 32 4096 -w)
st1=$(cache_status "$work/ftss.toml")
sustained=$(rate "$secs" "$ns" 4096 IOPS)
wait_ms=$(python3 -c "print(round($(kv "$st1" commit_wait_max_us) / 1000, 1))")
space_ms=$(python3 -c "print(round($(kv "$st1" space_wait_max_us) / 1000, 1))")
commits=$(python3 -c "
a, b = '''$st0''', '''$st1'''
import re
a, b = (dict(re.findall(r'(\w+)=(\d+)', x)) for x in (a, b))
d = lambda k: int(b[k]) - int(a[k])
r, n, us = d('records'), d('commit_flushes'), d('commit_flush_us')
print(f'{r} records in {n} commits ({r / max(n, 1):.1f} per commit), commit avg {us // max(n, 1)} us')")
echo "   $ns writes ($((ns * 4096 >> 20)) MiB) in ${secs:-n/a} s: $sustained IOPS; longest commit wait $wait_ms ms, longest ring-space wait $space_ms ms ($((SECONDS - t0)) s)"
echo "   $commits"
figure "$figs" runs "$RUNS"
figure "$figs" cache_mib $((ring >> 20))
figure "$figs" sustained_x "$SUSTAINED_X"
figure "$figs" sustained_iops "$sustained"
figure "$figs" commit_wait_max_ms "$wait_ms"
figure "$figs" space_wait_max_ms "$space_ms"

echo "== fill: $FILL_MIB MiB of random data into ftss's and tgt's LUNs, so reads read data"
head -c $((FILL_MIB << 20)) /dev/urandom >"$work/fill"
for s in ftss tgt; do
  qemu-img convert -n -f raw -O raw "$work/fill" "${url[$s]}"
done
rm -f "$work/fill"

# The tests: key, label, unit, count, depth, size, systems, extra qemu-img bench arguments.
tests=(
  "w4|4 KiB write -d 32|IOPS|$W4|32|4096|ftss tgt tgt-sync|-w"
  "w4flush|4 KiB write -d 1 + flush after each|IOPS|$FLUSH1|1|4096|ftss tgt|-w --flush-interval=1"
  "w128|128 KiB write -d 8|MB/s|$W128|8|131072|ftss tgt|-w"
  "r4|4 KiB read -d 32|IOPS|$R4|32|4096|ftss tgt|"
  "r128|128 KiB read -d 8|MB/s|$R128|8|131072|ftss tgt|"
)
declare -A got
for r in $(seq 1 "$RUNS"); do
  for t in "${tests[@]}"; do
    IFS='|' read -r key label unit count depth size systems extra <<<"$t"
    line="run $r: $label ($unit):"
    for s in $systems; do
      settle
      # shellcheck disable=SC2086 # extra holds several arguments
      v=$(rate "$(qemu_bench "${url[$s]}" "$count" "$depth" "$size" $extra)" "$count" "$size" "$unit")
      got[$key.$s]+="$v "
      line+=" $s $v"
    done
    echo "$line"
  done
done

csv="$CI_OUT/bench-io.csv"
echo "test,ftss (default configuration),tgt,tgt --bsoflags sync" >"$csv"
{
  echo "LUN I/O: ftss default configuration (mirrored LUN, nonvolatile write cache) vs tgt and tgt-sync,"
  echo "qemu-img bench -t none over iSCSI on loopback, $(nproc) cores, median of $RUNS run(s)"
  printf '%-38s %6s %9s %9s %9s\n' test unit ftss tgt tgt-sync
  for t in "${tests[@]}"; do
    IFS='|' read -r key label unit _ <<<"$t"
    row=()
    for s in ftss tgt tgt-sync; do
      # shellcheck disable=SC2086 # the runs' values, one word each
      m=$(median ${got[$key.$s]:-})
      [ -n "${got[$key.$s]:-}" ] || m=-
      row+=("$m")
      [ "$m" = - ] || figure "$figs" "$key.$s" "$m"
    done
    printf '%-38s %6s %9s %9s %9s\n' "$label" "$unit" "${row[@]}"
    # The chart shares one axis: IOPS rows only.
    [ "$unit" = IOPS ] && echo "$label,${row[0]/-/},${row[1]/-/},${row[2]/-/}" >>"$csv"
  done
  printf '%-38s %6s %9s\n' "4 KiB write -d 32, ${SUSTAINED_X}x cache" IOPS "$sustained"
  echo "longest commit wait in it: $wait_ms ms; longest ring-space wait: $space_ms ms"
  echo "its commits: $commits"
} | tee "$CI_OUT/bench-io.txt"
python3 "$CI_ROOT/ci/chart.py" "$csv" "$CI_OUT/bench-io.svg" \
  "LUN IOPS, ftss default vs tgt, loopback, $(nproc) cores ($(date -u +%Y-%m-%d))"
echo "chart: $CI_OUT/bench-io.svg (data $csv)"
