#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser and state machine that reads untrusted bytes
# (fuzz/fuzz_targets, cargo-fuzz + libFuzzer on the nightly toolchain).
#
#   ci/fuzz.sh smoke [SECONDS]          each target SECONDS (default 30): the test command's run
#   ci/fuzz.sh campaign [RUNS] [SECONDS] each target until RUNS executions (default 10
#                                        million) or SECONDS (default 3600), whichever first
#   FUZZ_TARGETS="pdu cdb" ci/fuzz.sh ...  only those targets
#
# Before fuzzing, every target replays its regression inputs (testdata/fuzz-regressions/
# TARGET/, crashes found and fixed); any crash fails the script. Corpora are seeded from the
# testdata vectors (ci/fuzz-seeds.py) and kept in fuzz/corpus (not committed).
#
# FUZZ_SANITIZER (default none): the targets exercise safe Rust (the simulated file system
# stands in for the mmap'd cache), where libFuzzer catches panics and the debug assertions
# cargo-fuzz turns on catch overflows; without AddressSanitizer they ran 3-6x faster here
# (recovery_cache 86 -> 563 exec/s, scsi 366 -> 1,297).
# Set it to `address` for a run that also checks memory.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-smoke}
shift || true
case $mode in
smoke) seconds=${1:-30}; runs=0 ;;
campaign) runs=${1:-10000000}; seconds=${2:-3600} ;;
*) echo "usage: ci/fuzz.sh smoke [SECONDS] | campaign [RUNS] [SECONDS]" >&2; exit 2 ;;
esac
sanitizer=${FUZZ_SANITIZER:-none}

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

targets=${FUZZ_TARGETS:-$(cd fuzz/fuzz_targets && ls ./*.rs | sed 's#^\./##; s#\.rs$##' | sort)}
echo "== build (sanitizer: $sanitizer)"
(cd fuzz && cargo +nightly fuzz build -s "$sanitizer" >/dev/null)
bin=fuzz/target/x86_64-unknown-linux-gnu/release
python3 ci/fuzz-seeds.py

fail=0
summary=()
for t in $targets; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    reg="testdata/fuzz-regressions/$t"
    if [ -d "$reg" ] && [ -n "$(ls -A "$reg")" ]; then
        if ! "$bin/$t" -rss_limit_mb=4096 "$reg"/* >"fuzz/artifacts/$t.regress.log" 2>&1; then
            echo "FAIL $t: a regression input crashes again (fuzz/artifacts/$t.regress.log)"
            fail=1
            continue
        fi
    fi
    log="fuzz/artifacts/$t.log"
    limit=(-max_total_time="$seconds")
    [ "$runs" -gt 0 ] && limit+=(-runs="$runs")
    set +e
    "$bin/$t" "${limit[@]}" -rss_limit_mb=4096 -max_len=8192 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" "fuzz/corpus/$t" >"$log" 2>&1
    rc=$?
    set -e
    execs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
    rate=$(grep -oE '^stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
    corp=$(sed -nE 's#.* corp: ([0-9]+)/.*#\1#p' <<<"$last")
    mkdir -p "fuzz/artifacts/$t" # a campaign outlives hand cleanups of this directory
    crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
    line=$(printf '%-20s %12s %8s %6s %7s %6s %3s' "$t" "$execs" "$rate" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crashes")
    summary+=("$line")
    if [ $rc -ne 0 ] || [ "$crashes" -ne 0 ]; then
        echo "FAIL $t (exit $rc): see $log and fuzz/artifacts/$t/"
        grep -m3 -A4 'panicked' "$log" || tail -20 "$log"
        fail=1
    else
        echo "ok   $line"
    fi
done
echo
printf '%-20s %12s %8s %6s %7s %6s %3s\n' target executions exec/s cov feat corpus crash
printf '%s\n' "${summary[@]}"
exit $fail
