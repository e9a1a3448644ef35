#!/usr/bin/env bash
# Runs every fuzz target (or those named) for a number of executions each, at the lowest
# CPU priority, seeded with the committed seeds/<target> (new inputs go to the
# git-ignored corpus/<target>), and prints executions, time and crashes per target.
# Called by `make fuzz`; stops at the first crash (libFuzzer leaves it in artifacts/).
set -euo pipefail
cd "$(dirname "$0")"
# Executions per target: FUZZ_RUNS for all, or these defaults, weighted by speed
# (the store-backed targets run ~1-2k exec/s, the parsers 10-100k) to 12.8M in all.
declare -A DEFAULT_RUNS=(
    [admin_route]=4000000 [credential]=3000000 [plugin_config]=2000000
    [key_entry]=2000000 [keyset_document]=1000000 [keyset_stream]=300000 [delta]=300000 [upload]=200000
)
TARGETS=${*:-$(cargo +nightly fuzz list)}
# Build first, so a compile error is never mistaken for a crash (and the runs below
# do not rebuild).
cargo +nightly fuzz build -s none
echo "fuzzing $(git describe --always --dirty 2>/dev/null || echo '?')"
summary=()
total=0
for t in $TARGETS; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="artifacts/$t/last-run.log"
    RUNS=${FUZZ_RUNS:-${DEFAULT_RUNS[$t]:-1000000}}
    echo "== fuzz $t: $RUNS runs (log: fuzz/$log)"
    start=$(date +%s)
    status=0
    nice -n 19 cargo +nightly fuzz run -s none "$t" "corpus/$t" "seeds/$t" -- \
        -runs="$RUNS" -max_len=8192 -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
    secs=$(( $(date +%s) - start ))
    execs=$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)
    if [ "$status" != 0 ]; then
        tail -40 "$log"
        summary+=("$t | ${execs:-?} | ${secs} s | CRASH (see fuzz/$log)")
        printf '%s\n' "${summary[@]}"
        exit 1
    fi
    total=$(( total + execs ))
    summary+=("$t | $execs | ${secs} s | 0")
done
echo
echo "| target | executions | time | crashes |"
echo "|---|---|---|---|"
for line in "${summary[@]}"; do echo "| $line |"; done
echo "| total | $total | | 0 |"
