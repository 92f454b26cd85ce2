#!/usr/bin/env bash
# Builds molora's libFuzzer targets with clang++-14 in build-fuzz/ and runs each for SECONDS
# seconds (default 60) on a scratch copy of its committed seed corpus. Exits non-zero if a
# fuzzer finds a crash, leak, sanitizer report or an escaping exception.
#   tools/run_fuzz.sh 600            # all three targets, 10 minutes each, one after another
#   tools/run_fuzz.sh 60 fuzz_json_config
set -euo pipefail

seconds="${1:-60}"
shift || true
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${MOLORA_FUZZ_BUILD_DIR:-$root/build-fuzz}"
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then targets=(fuzz_safetensors fuzz_json_config fuzz_checkpoints); fi

# Ninja when there is one (and the folder is not a Make build already): it builds the targets
# side by side, where Make's top level takes them one after another.
generator=()
if command -v ninja >/dev/null && { [ ! -f "$build/CMakeCache.txt" ] || grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$build/CMakeCache.txt"; }; then
  generator=(-G Ninja)
fi
cmake "${generator[@]}" -S "$root" -B "$build" -DCMAKE_CXX_COMPILER="${CXX_FUZZ:-clang++-14}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMOLORA_BUILD_FUZZERS=ON -DMOLORA_BUILD_TESTS=ON -DMOLORA_BUILD_EXAMPLES=OFF -DMOLORA_BUILD_BENCH=OFF \
  -DMOLORA_NATIVE=OFF > "$build.configure.log"
cmake --build "$build" --target "${targets[@]}" -j2

status=0
for t in "${targets[@]}"; do
  work="$build/run-$t"
  rm -rf "$work"
  mkdir -p "$work/corpus" "$work/artifacts"
  cp "$root/tests/fuzz/corpus/$t/"* "$work/corpus/" 2>/dev/null || true
  echo "== $t: ${seconds}s"
  # fuzz_checkpoints' seeds are whole fixture checkpoints (config + tensors, up to 38 KB).
  max_len=4096
  if [ "$t" = fuzz_checkpoints ]; then max_len=40960; fi
  dict=()
  if [ -f "$root/tests/fuzz/$t.dict" ]; then dict=(-dict="$root/tests/fuzz/$t.dict"); fi
  set +e
  "$build/tests/$t" "$work/corpus" "${dict[@]}" -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$work/artifacts/" -print_final_stats=1 > "$work/log.txt" 2>&1
  rc=$?
  set -e
  execs="$(grep -m1 'stat::number_of_executed_units' "$work/log.txt" | awk '{print $2}' || true)"
  cov="$(grep -E '^#[0-9]+' "$work/log.txt" | tail -n 1 | grep -oE '(cov|ft): [0-9]+' | tr '\n' ' ' || true)"
  echo "$t: exit $rc, executions ${execs:-?}, ${cov:-cov ?}, corpus $(ls "$work/corpus" | wc -l) files"
  if [ "$rc" -ne 0 ]; then
    status=1
    tail -n 40 "$work/log.txt"
    ls -l "$work/artifacts"
  fi
done
exit "$status"
