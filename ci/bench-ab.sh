#!/usr/bin/env bash
# Two ftss-target builds side by side in one run, on the embedded default configuration
# (mirrored LUN behind the nonvolatile cache, packet queue on mirrors): the LUN tests of
# ci/bench-io.sh (qemu-img bench) and the packet tests of ci/bench-packets.sh (ftss bench,
# 1 KiB, 1 and 32 in flight), the two daemons alternating, ROUNDS rounds, medians.
# Usage: ci/bench-ab.sh BEFORE_BINARY AFTER_BINARY. For "did this change make it slower";
# for the goals and the peers, ci/bench.sh.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_qemu
A=${1:?before binary}
B=${2:?after binary}
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d)
trap 'ci_cleanup; rm -rf "$work"' EXIT
(cd "$CI_ROOT" && cargo build --release --bin ftss-target --bin ftss -q)
declare -A port bin=([before]=$A [after]=$B)
for v in before after; do
  p=$(free_port)
  port[$v]=$p
  ftss_default_config "$p" "$work/$v" "${bin[$v]}" >"$work/$v.toml"
  RUST_LOG=warn "${bin[$v]}" --config "$work/$v.toml" >"$CI_OUT/bench-ab-$v.log" 2>&1 &
  CI_PIDS+=($!)
  wait_port "$p"
  F="$CI_ROOT/target/release/ftss --portal 127.0.0.1:$p"
  # The destination registers now (a node the sender can see); each packet test starts
  # its receiver below.
  $F -a 10.0.0.2 --initiator iqn.2026-11.org.ftss:ab-rx recv --wait 0.1 >/dev/null 2>&1 || true
  for _ in $(seq 1 50); do
    $F -a 10.0.0.1 --initiator iqn.2026-11.org.ftss:ab-tx nodes 2>/dev/null | grep -q "10.0.0.2 .*available" && break
    sleep 0.1
  done
done
T=$(ftss_default_iqn "$B")
rate() { [ -n "$1" ] && python3 -c "print(int($2 / $1))" || echo n/a; }
mbs() { [ -n "$1" ] && python3 -c "print(round($2 * $3 / $1 / 1e6))" || echo n/a; }
declare -A got
tests=(
  "w4|4 KiB write -d 32 (IOPS)|${W4:-60000}|32|4096|-w"
  "w4flush|4 KiB write -d 1 + flush (IOPS)|${FLUSH1:-4000}|1|4096|-w --flush-interval=1"
  "w128|128 KiB write -d 8 (MB/s)|${W128:-2048}|8|131072|-w"
  "r4|4 KiB read -d 32 (IOPS)|${R4:-100000}|32|4096|"
  "r128|128 KiB read -d 8 (MB/s)|${R128:-4096}|8|131072|"
)
for r in $(seq 1 "$ROUNDS"); do
  for v in before after; do
    u="iscsi://127.0.0.1:${port[$v]}/$T/0"
    for t in "${tests[@]}"; do
      IFS='|' read -r key label count depth size extra <<<"$t"
      # Both daemons start each test with an empty write cache, as in ci/bench-io.sh:
      # destage left over from one test must not land in the next, or on the other build.
      sync
      wait_cache_clean "$work/before.toml"
      wait_cache_clean "$work/after.toml"
      # shellcheck disable=SC2086 # extra holds several arguments
      s=$(qemu_bench "$u" "$count" "$depth" "$size" $extra)
      if [ "$size" = 131072 ]; then val=$(mbs "$s" "$count" "$size"); else val=$(rate "$s" "$count"); fi
      got[$key.$v]+="$val "
    done
    F="$CI_ROOT/target/release/ftss --portal 127.0.0.1:${port[$v]}"
    tx="$F -a 10.0.0.1 --initiator iqn.2026-11.org.ftss:ab-tx"
    for k in 1 32; do
      # Fewer packets than the destination's quota holds (a quarter of the 256 MiB
      # queue), and the receiver takes them all before the next test: a receiver behind
      # would turn SENDs into refusals, answered at once.
      n=$([ "$k" = 1 ] && echo "${P1:-6000}" || echo "${P32:-30000}")
      $F -a 10.0.0.2 --initiator iqn.2026-11.org.ftss:ab-rx recv --quiet --wait 20 --count "$n" >/dev/null 2>&1 &
      rx=$!
      sleep 0.5
      out=$($tx bench 10.0.0.2 --size 1024 --count "$n" --inflight "$k")
      wait "$rx" || true
      # Refusals (a receiver gone or behind) are answered at once: not a figure.
      if echo "$out" | grep -q "not delivered"; then
        pps=n/a
      else
        pps=$(echo "$out" | grep -oE '[0-9]+ packets/s' | grep -oE '[0-9]+' || true)
      fi
      got[p$k.$v]+="${pps:-n/a} "
    done
    echo "round $r $v done"
  done
done
printf '%-36s %12s %12s %7s\n' test before after ratio
for key in w4 w4flush w128 r4 r128 p1 p32; do
  case $key in
    p1) label="1 KiB packets, 1 in flight (/s)" ;;
    p32) label="1 KiB packets, 32 in flight (/s)" ;;
    *) for t in "${tests[@]}"; do IFS='|' read -r k l _ <<<"$t"; [ "$k" = "$key" ] && label=$l; done ;;
  esac
  # shellcheck disable=SC2086 # the values are separate words
  b=$(median ${got[$key.before]}) a=$(median ${got[$key.after]})
  ratio=$(python3 -c "print(f'{$a / $b:.2f}')" 2>/dev/null || echo n/a)
  printf '%-36s %12s %12s %7s\n' "$label" "$b" "$a" "$ratio"
done
echo "medians of $ROUNDS rounds; raw: $(for k in "${!got[@]}"; do echo -n "$k=[${got[$k]% }] "; done)"
