#!/usr/bin/env bash
# Builds every libFuzzer target with clang (ASan + UBSan) and runs each for a bounded time on a
# scratch copy of its committed seed corpus. Fails if any target crashes, leaks or trips a
# sanitizer. Usage: tests/fuzz/run.sh [SECONDS per target, default 20] [BUILD_DIR]
# A missing toolchain skips (exit 77) on a workstation; with CI=true in the environment it fails:
# CI must never go green without having fuzzed.
set -uo pipefail
secs="${1:-20}"
src="${KDP_SOURCE_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}"
out="${2:-$src/build/fuzz}"
cd "$src" || exit 1
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
skip() {
  if [ "${CI:-}" = true ]; then
    echo "FAIL - fuzz: $1, and CI=true: a fuzz skip in CI is a failure (run launch/setup)"
    exit 1
  fi
  echo "fuzz: $1: skipped"
  exit 77
}
if ! command -v clang >/dev/null; then
  skip "clang is missing (launch/setup installs it)"
fi
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
printf 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' >"$probe/p.c"
if ! clang -fsanitize=fuzzer,address,undefined "$probe/p.c" -o "$probe/p" 2>/dev/null; then
  skip "clang's libFuzzer or sanitizer runtime is missing (Debian: libclang-rt-14-dev)"
fi
mkdir -p "$out"
cflags=(-g -O1 "-fsanitize=fuzzer,address,undefined" -fno-sanitize-recover=undefined -D_GNU_SOURCE
  -Iinclude -Itests/fuzz -Isrc/serve)
libs=$(pkg-config --cflags --libs inih zlib msgpack json-c openblas libuv libpng)
core=(src/common.c)
# the dashboard's files, embedded by the meson build (kdp-embed) into BUILD_DIR/kdp_assets.c
assets="$(dirname "$out")/kdp_assets.c"
declare -A srcs=(
  [config]="src/config/config.c $(echo src/kd/*.c) src/nn/layers.c src/nn/layers_naive.c src/nn/par.c"
  [idx]="src/data/idx.c src/data/cifar.c src/data/batcher.c"
  [cifar]="src/data/idx.c src/data/cifar.c src/data/batcher.c"
  [npy]="src/data/npy.c src/data/idx.c src/data/batcher.c"
  [ckpt]="src/ckpt/ckpt.c"
  [model]="src/ckpt/ckpt.c src/nn/model.c src/nn/layers.c src/nn/layers_naive.c src/nn/optim.c src/nn/par.c src/infer/modelfile.c src/data/batcher.c src/data/folder.c src/data/idx.c src/data/npy.c src/kd/losses.c"
  [http]="src/serve/core.c src/serve/http.c src/serve/routes.c src/serve/history.c $assets"
  [socket]="src/serve/core.c src/serve/http.c src/serve/routes.c src/serve/history.c src/serve/server.c $assets"
)
# Tokens of the arch-string grammar for fuzz_model (libFuzzer splices them into the "arch" entry)
cat >"$out/model.dict" <<'EOF'
"seq:"
"conv("
",bn"
",relu"
"maxpool(2)"
"avgpool(2)"
",gap"
",flatten"
"dropout(0.5)"
"dense("
"mlp("
"cnn"
"resnet20"
"wrn10_1"
"),"
",3,1,1)"
EOF
# Each target is built and fuzzed in its own job, KDP_FUZZ_JOBS (default: the cores, at most 2)
# at a time: the same seconds of fuzzing per target in a fraction of the wall time. A job writes
# its result lines to $out/result_T and ok or fail to $out/status_T.
fuzz_one() {
  local t="$1" exe="$out/fuzz_$1" rc execs
  exec >"$out/result_$t" 2>&1
  echo fail >"$out/status_$t"
  # shellcheck disable=SC2086  # srcs and libs are word lists
  if ! clang "${cflags[@]}" "tests/fuzz/fuzz_$t.c" "${core[@]}" ${srcs[$t]} -o "$exe" $libs -lhttp_parser -lpthread -lm \
    >"$out/build_$t.log" 2>&1; then
    echo "FAIL - fuzz_$t does not build:"
    sed 's/^/    /' "$out/build_$t.log" | head -20
    return
  fi
  rm -f "$out"/crash_"${t}"_*
  local corpus="$out/corpus_$t"
  rm -rf "$corpus"
  mkdir -p "$corpus"
  cp -r "tests/fuzz/corpus/$t/." "$corpus/" 2>/dev/null || true
  local dict=()
  [ -f "$out/$t.dict" ] && dict=("-dict=$out/$t.dict")
  (cd "$out" && UBSAN_OPTIONS=halt_on_error=1 "$exe" -max_total_time="$secs" -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 "${dict[@]}" -artifact_prefix="$out/crash_${t}_" "$corpus" \
    >"$out/run_$t.log" 2>&1)
  rc=$?
  execs=$(grep -m1 'stat::number_of_executed_units' "$out/run_$t.log" | awk '{ print $2 }')
  if [ "$rc" = 0 ]; then
    echo "ok   - fuzz_$t: ${execs:-?} inputs in ${secs}s, no crash, leak or sanitizer report"
    echo ok >"$out/status_$t"
  else
    echo "FAIL - fuzz_$t (exit $rc):"
    grep -E 'ERROR|SUMMARY|runtime error|leak' "$out/run_$t.log" | head -10 | sed 's/^/    /'
    for a in "$out"/crash_"${t}"_*; do
      [ -e "$a" ] && echo "    artifact: $a"
    done
  fi
}
cores=$(nproc)
jobs_max="${KDP_FUZZ_JOBS:-$((cores < 2 ? 1 : 2))}"
# KDP_FUZZ_TARGETS: a subset, e.g. "model idx" (default: every target)
read -r -a targets <<<"${KDP_FUZZ_TARGETS:-config idx cifar npy ckpt model http socket}"
running=0
for t in "${targets[@]}"; do
  rm -f "$out/status_$t" "$out/result_$t"
  if [ "$running" -ge "$jobs_max" ]; then
    wait -n
    running=$((running - 1))
  fi
  fuzz_one "$t" &
  running=$((running + 1))
done
wait
pass=0
fail=0
for t in "${targets[@]}"; do
  cat "$out/result_$t" 2>/dev/null
  if [ "$(cat "$out/status_$t" 2>/dev/null)" = ok ]; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1))
  fi
done
echo "fuzz: $pass passed, $fail failed"
[ "$fail" = 0 ]
