#!/usr/bin/env bash
# Long run of the packet-path simulation (target-daemon/tests/packet_sim.rs): SEEDS seeds
# (default 1,000,000) from FIRST (default 0), split by seed range across JOBS processes
# (default: the CPU count), one thread each. Prints the seeds run, the failures (each
# kind's first seed with its shortest trace) and the wall time; exits 1 on any failure.
# PROFILE=release builds optimized (slower to build, several times faster to run).
# Replay one seed: SEED=N cargo test -p ftss-target --test packet_sim
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
SEEDS=${SEEDS:-1000000}
FIRST=${FIRST:-0}
JOBS=${JOBS:-$(nproc)}
PROFILE=${PROFILE:-dev}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cd "$root"
bin=$(cargo test --profile "$PROFILE" -p ftss-target --test packet_sim --no-run 2>&1 |
  sed -n 's/.*Executable tests\/packet_sim.rs (\(.*\))/\1/p' | tail -1)
[ -x "$bin" ] || { echo "sim-long: no test binary" >&2; exit 2; }
start=$(date +%s)
per=$(( (SEEDS + JOBS - 1) / JOBS ))
pids=()
for ((j = 0; j < JOBS; j++)); do
  from=$((FIRST + j * per))
  n=$per
  [ $((from + n)) -gt $((FIRST + SEEDS)) ] && n=$((FIRST + SEEDS - from))
  [ "$n" -le 0 ] && continue
  FTSS_SIM_FIRST=$from FTSS_SIM_SEEDS=$n FTSS_SIM_THREADS=1 \
    "$bin" --exact packet_sim --nocapture >"$out/$j.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
wall=$(( $(date +%s) - start ))
ran=0
failed=0
for f in "$out"/*.log; do
  line=$(grep '^packet_sim: seeds' "$f" || true)
  [ -n "$line" ] || { echo "sim-long: a job died:"; tail -20 "$f"; rc=1; continue; }
  ran=$((ran + $(sed -n 's/.*(\([0-9]*\)),.*/\1/p' <<<"$line")))
  failed=$((failed + $(sed -n 's/.*), \([0-9]*\) failed.*/\1/p' <<<"$line")))
done
echo "sim-long: $ran seeds run ($FIRST..$((FIRST + SEEDS))), $failed failed, wall ${wall}s, $JOBS jobs, profile $PROFILE"
if [ "$rc" -ne 0 ]; then
  for f in "$out"/*.log; do
    sed -n '/^  [a-z0-9-]*: [0-9]* seeds/p; /^seed [0-9]*: /,/^  replay:/p' "$f"
  done
  exit 1
fi
