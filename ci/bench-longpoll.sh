#!/usr/bin/env bash
# LUN reads beside long polls: ftss-target with the embedded default's media (a mirrored
# 1 GiB LUN behind the write cache, default cache settings, packets on mirrors), 4 KiB
# reads at queue depth 32 with qemu-img bench on LUN 0, once alone and once while 16
# other sessions hold 1,000 long-poll RECEIVEs (initiator-lib's `longpolls` example).
# qemu-img bench reads at consecutive offsets (-S 4096), not random ones. Prints both
# IOPS and the ratio; the goal is a ratio of at least 0.90. Not part of ci/test.sh.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_qemu
COUNT=${COUNT:-60000}
SESSIONS=${SESSIONS:-16}
POLLS=${POLLS:-1000}
work=$(mktemp -d)
trap 'ci_cleanup; rm -rf "$work"' EXIT
ftss_build
(cd "$CI_ROOT" && cargo build --release -q -p ftss-initiator --example longpolls)
port=$(free_port)
T=iqn.2026-11.org.ftss:target0
P=iqn.2026-11.org.ftss:lp
{
  cat <<CONF
[server]
portals = ["127.0.0.1:$port"]
data_dir = "$work"
sessions_max = 64
cmd_window = 128
[[target]]
iqn = "$T"
[[target.lun]]
lun = 0
mirrors = ["lun0-a.mirror", "lun0-b.mirror"]
size = "1GiB"
block_size = 512
[packets]
mirrors = ["packets-a.mirror", "packets-b.mirror"]
size = "64MiB"
CONF
  for n in $(seq 1 "$SESSIONS"); do
    printf '[[node]]\ninitiator = "%s%d"\naddresses = ["10.9.0.%d"]\n' "$P" "$n" "$n"
  done
} >"$work/ftss.toml"
RUST_LOG=warn ftss_start "$work/ftss.toml" "$CI_OUT/bench-longpoll-ftss.log" "$port"
url="iscsi://127.0.0.1:$port/$T/0"
# Reads hit written blocks, not holes.
head -c $((COUNT * 4096)) /dev/urandom >"$work/fill"
qemu-img convert -n -f raw -O raw "$work/fill" "$url"
rm -f "$work/fill"

qbench() { # -> IOPS of 4 KiB reads at depth 32
  local out secs
  out=$(qemu-img bench -f raw -t none -c "$COUNT" -d 32 -s 4096 -S 4096 "$url" 2>&1)
  secs=$(echo "$out" | grep -oE 'completed in [0-9.]+' | grep -oE '[0-9.]+$')
  python3 -c "print(int($COUNT / $secs))"
}

# One pass unmeasured: the fill's writes are still being destaged to the mirrors, and
# would slow whichever run came first.
qbench >/dev/null
# Rounds alternate (alone, then with the polls) so drift in the machine's speed hits
# both sides; the figures are the medians.
ROUNDS=${ROUNDS:-5}
alone_all=()
polled_all=()
threads_all=()
for r in $(seq 1 "$ROUNDS"); do
  alone_all+=("$(qbench)")
  "$CI_ROOT/target/release/examples/longpolls" "127.0.0.1:$port" "$T" "$P" "$SESSIONS" "$POLLS" 600 \
    >"$work/polls.out" 2>"$CI_OUT/bench-longpoll-driver.log" &
  driver=$!
  CI_PIDS+=($driver)
  for _ in $(seq 1 600); do
    grep -q '^ready' "$work/polls.out" 2>/dev/null && break
    sleep 0.1
  done
  grep -q '^ready' "$work/polls.out" || { echo "the poll driver did not get ready" >&2; exit 1; }
  # The first execution of each poll runs on tokio's blocking pool; its idle threads
  # leave after 10 s. What stays is what the parked polls hold.
  sleep 12
  threads_all+=("$(ls "/proc/${CI_PIDS[0]}/task" | wc -l)")
  polled_all+=("$(qbench)")
  kill "$driver" 2>/dev/null || true
  wait "$driver" 2>/dev/null || true
  rm -f "$work/polls.out"
  echo "round $r: alone ${alone_all[-1]} IOPS, with polls ${polled_all[-1]} IOPS, threads ${threads_all[-1]}" >&2
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
alone=$(median "${alone_all[@]}")
polled=$(median "${polled_all[@]}")
{
  echo "long polls vs LUN reads: 1 GiB mirrored LUN (default cache), qemu-img bench 4 KiB reads -d 32, $COUNT reads, loopback, $(nproc) cores, $ROUNDS alternating rounds"
  echo "rounds alone (IOPS):      ${alone_all[*]}"
  echo "rounds with polls (IOPS): ${polled_all[*]}"
  printf '%-44s %9s\n' "reads alone (median IOPS)" "$alone"
  printf '%-44s %9s\n' "reads with $POLLS long polls on $SESSIONS sessions (median)" "$polled"
  python3 -c "print(f'{\"ratio of medians (goal >= 0.90)\":44} {$polled / $alone:9.2f}')"
  echo "ftss-target threads while the polls were held (after 12 s): ${threads_all[*]}"
} | tee "$CI_OUT/bench-longpoll.txt"
{
  echo "test,reads alone,reads beside $POLLS long polls"
  echo "4 KiB reads -d 32 (median IOPS),$alone,$polled"
} >"$CI_OUT/bench-longpoll.csv"
python3 "$CI_ROOT/ci/chart.py" "$CI_OUT/bench-longpoll.csv" "$CI_OUT/bench-longpoll.svg" "LUN reads and long polls"
echo "chart: $CI_OUT/bench-longpoll.svg (data $CI_OUT/bench-longpoll.csv)"
