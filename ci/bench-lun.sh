#!/usr/bin/env bash
# LUN I/O benchmark, ftss-target beside Debian's tgt in one run, same LUN size on the same
# disk: 4 KiB random reads at queue depth 32 (iscsi-perf -m 32 -b 8) and 4 KiB writes and
# reads at depth 32 (qemu-img bench). Prints a table with the ratio ftss / tgt.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need iscsi-perf libiscsi-bin
need tgtd tgt
need qemu-img qemu-utils
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
COUNT=${COUNT:-200000}
work=$(mktemp -d)
trap 'ci_cleanup; rm -rf "$work"' EXIT
ftss_build
fp=$(free_port)
tp=$(free_port)
cp=$(tgt_control_index)
T=iqn.2026-11.org.ftss:bench
cat >"$work/ftss.toml" <<CONF
[server]
portals = ["127.0.0.1:$fp"]
data_dir = "$work"
[[target]]
iqn = "$T"
[[target.lun]]
lun = 0
path = "ftss.img"
size = "1GiB"
CONF
RUST_LOG=warn ftss_start "$work/ftss.toml" "$CI_OUT/bench-ftss.log" "$fp"
truncate -s 1G "$work/tgt.img"
tgtd_start "$tp" "$cp" "$CI_OUT/bench-tgtd.log"
tgtadm -C "$cp" --lld iscsi --op new --mode target --tid 1 -T "$T"
tgtadm -C "$cp" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$work/tgt.img"
tgtadm -C "$cp" --lld iscsi --op bind --mode target --tid 1 -I ALL
furl="iscsi://127.0.0.1:$fp/$T/0"
turl="iscsi://127.0.0.1:$tp/$T/1"
# Fill both LUNs so reads hit allocated blocks, not holes.
qemu-img convert -n -f raw -O raw <(head -c $((256 << 20)) /dev/urandom) "$furl" 2>/dev/null ||
  dd if=/dev/urandom of="$work/fill" bs=1M count=256 status=none
for u in "$furl" "$turl"; do
  [ -f "$work/fill" ] || head -c $((256 << 20)) /dev/urandom >"$work/fill"
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
row() { # label, ftss value, tgt value
  python3 -c "
f, t = $2, $3
r = f'{f / t:.2f}' if t else 'n/a'
print(f'{\"$1\":44} {f:>10} {t:>10} {r:>7}')"
}
{
  echo "LUN benchmark: 1 GiB LUNs, 4 KiB I/O at queue depth 32, loopback, $(nproc) cores"
  printf '%-44s %10s %10s %7s\n' "test (IOPS)" "ftss" "tgt" "ratio"
  row "iscsi-perf random read -m 32 -b 8" "$(perf "$furl")" "$(perf "$turl")"
  row "qemu-img bench write -d 32 -s 4k" "$(qbench "$furl" -w)" "$(qbench "$turl" -w)"
  row "qemu-img bench read -d 32 -s 4k" "$(qbench "$furl")" "$(qbench "$turl")"
} | tee "$CI_OUT/bench-lun.txt"
