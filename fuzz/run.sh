#!/usr/bin/env bash
# Run every fuzz target, one after another, for RUNS executions each (default 10 million), and
# print libFuzzer's final statistics. Needs cargo-fuzz (`cargo install cargo-fuzz`); on a stable
# toolchain RUSTC_BOOTSTRAP=1 lets rustc accept the -Z flags cargo-fuzz passes.
#
#   fuzz/run.sh                 # all targets, 10M runs each
#   RUNS=100000 fuzz/run.sh peft  # one target, a quick check
#
# New corpus entries go to fuzz/work/<target> (git-ignored); the committed seeds in
# fuzz/corpus/<target> are only read. Crashes land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
RUNS=${RUNS:-10000000}
MAX_TIME=${MAX_TIME:-0}
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(header index canonical peft canonical_structured verify)
cargo fuzz build -a -s none
for t in "${targets[@]}"; do
    mkdir -p "fuzz/work/$t"
    echo "=== $t: $(date -u +%FT%TZ) runs=$RUNS"
    start=$(date +%s)
    cargo fuzz run -a -s none "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
        -max_len=65536 -timeout=30 -runs="$RUNS" -max_total_time="$MAX_TIME" \
        -print_final_stats=1 2>&1 | grep -E '^(#[0-9]+[[:space:]]+(DONE|pulse)|Done|stat::|==|SUMMARY|.*panicked)' || true
    echo "=== $t: finished $(date -u +%FT%TZ) after $(( $(date +%s) - start )) s"
done
