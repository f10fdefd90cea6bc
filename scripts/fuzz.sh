#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz/ with clang and
# -fsanitize=fuzzer,address,undefined, and runs each for a time or a number
# of executions, starting from the seed corpus in tests/fuzz/corpus/<target>.
#
#   scripts/fuzz.sh                    every target for 60 s (what CI runs)
#   scripts/fuzz.sh --time 300 csv     one target for 300 s
#   scripts/fuzz.sh --runs 1000000     every target for 10^6 executions
#
# Targets: idx_plain idx_gzip csv params engine_state. New inputs that reach new code go
# to build-fuzz/corpus/<target> (the repository's corpus is only read); a
# crash is saved as build-fuzz/artifacts/<target>/crash-* and makes the
# script fail (build-fuzz is $HYPERTAPE_FUZZ_DIR when set). Prints one line
# per target: executions, crashes, seconds.
set -euo pipefail
B=${HYPERTAPE_FUZZ_DIR:-build-fuzz} # build directory
cd "$(dirname "$0")/.."
limit=(-max_total_time=60)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
  --time) limit=(-max_total_time="$2"); shift 2 ;;
  --runs) limit=(-runs="$2"); shift 2 ;;
  *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -eq 0 ] && targets=(idx_plain idx_gzip csv params engine_state)

# libFuzzer's runtime is in libclang-rt-14-dev, which clang does not pull in.
scripts/deps.sh clang libclang-rt-14-dev

# The library once, instrumented for coverage and both sanitizers; then one
# small executable per target.
san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
cmake -S . -B $B -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_FLAGS="-fsanitize=fuzzer-no-link $san" -DHYPERTAPE_TESTS=OFF \
  -DHYPERTAPE_EXAMPLES=OFF -DHYPERTAPE_BENCH=OFF >/dev/null
cmake --build $B -j"$(nproc)" --target hypertape_static >/dev/null
blis=$(sed -n 's/^BLIS_STATIC_LIBRARY:FILEPATH=//p' $B/CMakeCache.txt)
for t in "${targets[@]}"; do
  clang -O1 -g -fsanitize=fuzzer $san -Wall -Wextra -Werror -I. -Iautodiff \
    "tests/fuzz/fuzz_$t.c" $B/libhypertape.a "$blis" -lgomp -lz -lm -lpthread \
    -o "$B/fuzz_$t"
done

status=0
for t in "${targets[@]}"; do
  mkdir -p "$B/corpus/$t" "$B/artifacts/$t"
  log="$B/fuzz_$t.log"
  start=$(date +%s)
  rc=0
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
    "$B/fuzz_$t" "${limit[@]}" -max_len=4096 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$B/artifacts/$t/" "$B/corpus/$t" "tests/fuzz/corpus/$t" \
    >"$log" 2>&1 || rc=$?
  secs=$(($(date +%s) - start))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  crashes=$(find "$B/artifacts/$t" -type f | wc -l)
  echo "fuzz $t: ${execs:-?} executions, $crashes crashes, ${secs} s (log: $log)"
  if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    status=1
    tail -40 "$log"
  fi
done
exit $status
