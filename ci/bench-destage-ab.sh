#!/usr/bin/env bash
# Two ftss-target builds side by side where destage matters: per round, each build on a
# fresh data directory (embedded default configuration) runs the sustained test of
# ci/bench-io.sh (4 KiB writes -d 32 for 4x the write cache), reports its longest commit
# and ring-space waits, waits for the cache to be clean, then runs the 50,000-write burst
# of ci/bench-io.sh. Usage: ci/bench-destage-ab.sh BEFORE_BINARY AFTER_BINARY (ROUNDS=3).
# ci/bench-ab.sh covers the other LUN and packet tests, on one daemon per build.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_qemu
A=${1:?before binary}
B=${2:?after binary}
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d)
trap 'ci_cleanup; rm -rf "$work"' EXIT
(cd "$CI_ROOT" && cargo build --release --bin ftss-target -q) # for the admin commands
declare -A bin=([before]=$A [after]=$B)
for r in $(seq 1 "$ROUNDS"); do
  for v in before after; do
    p=$(free_port)
    rm -rf "$work/data"
    ftss_default_config "$p" "$work/data" "${bin[$v]}" >"$work/c.toml"
    RUST_LOG=warn "${bin[$v]}" --config "$work/c.toml" >"$CI_OUT/bench-destage-ab-$v.log" 2>&1 &
    pid=$!
    wait_port "$p"
    T=$(ftss_default_iqn "${bin[$v]}")
    u="iscsi://127.0.0.1:$p/$T/0"
    ring=$(kv "$(cache_status "$work/c.toml")" ring_bytes)
    n=$((4 * ring / 4096))
    s=$(qemu_bench "$u" "$n" 32 4096 -w)
    st=$(cache_status "$work/c.toml")
    sync
    wait_cache_clean "$work/c.toml"
    b=$(qemu_bench "$u" 50000 32 4096 -w)
    echo "round $r $v: sustained $( [ -n "$s" ] && python3 -c "print(int($n / $s))" || echo n/a) IOPS," \
      "longest commit wait $(($(kv "$st" commit_wait_max_us) / 1000)) ms," \
      "longest ring-space wait $(($(kv "$st" space_wait_max_us) / 1000)) ms;" \
      "then burst $( [ -n "$b" ] && python3 -c "print(int(50000 / $b))" || echo n/a) IOPS"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
  done
done
