#!/usr/bin/env bash
# Builds every libFuzzer target with clang (ASan + UBSan) and runs each on a scratch copy of its
# committed seed corpus: the seeds first (libFuzzer replays the corpus before mutating), then
# mutations up to a fixed number of inputs per target, so a run does the same work on any machine
# and a quiet one finishes sooner. Fails if any target crashes, leaks or trips a sanitizer.
# Usage: tests/fuzz/run.sh [ROUNDS, default 1] [BUILD_DIR]
#   ROUNDS multiplies every target's input count (runs_of below); ROUNDSs (e.g. 300s) fuzzes each
#   target for that many seconds instead (by hand, for a longer search: time-based, not for tests)
#        tests/fuzz/run.sh build [BUILD_DIR]   builds the targets only (launch/test does this
#                                              beside other tests; the run then only fuzzes)
# Every source is compiled once (objects in BUILD_DIR/obj, named by a digest of the source, the
# headers, the flags and the compiler, so an object is reused only if it would come out the same),
# then each target is linked from its objects.
# A missing toolchain skips (exit 77) on a workstation; with CI=true in the environment it fails:
# CI must never go green without having fuzzed.
set -uo pipefail
build_only=0
if [ "${1:-}" = build ]; then
  build_only=1
  shift
  set -- 0 "$@"
fi
rounds="${1:-1}"
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
out=$(cd "$out" && pwd) # one spelling of every path (the targets' object lists are compared)
# objects get libFuzzer's coverage instrumentation (fuzzer-no-link); the link adds its main()
cflags=(-g -O1 "-fsanitize=fuzzer-no-link,address,undefined" -fno-sanitize-recover=undefined -D_GNU_SOURCE
  -Iinclude -Itests/fuzz -Isrc/serve)
ldflags=(-g "-fsanitize=fuzzer,address,undefined")
pkgs=(inih zlib msgpack json-c openblas libuv libpng)
incs=$(pkg-config --cflags "${pkgs[@]}")
libs=$(pkg-config --libs "${pkgs[@]}")
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
# inputs per target at ROUNDS = 1: about 3 s each on a quiet 2-core machine (the slow targets
# allocate large buffers or drive real sockets per input, so they get fewer)
declare -A runs_of=([config]=6000 [idx]=300 [cifar]=400 [npy]=20000 [ckpt]=60000 [model]=600
  [http]=25000 [socket]=500)
cores=$(nproc)
jobs_max="${KDP_FUZZ_JOBS:-$((cores < 2 ? 1 : 2))}"
# KDP_FUZZ_TARGETS: a subset, e.g. "model idx" (default: every target)
read -r -a targets <<<"${KDP_FUZZ_TARGETS:-config idx cifar npy ckpt model http socket}"

# ---- build: each source once, jobs_max compilers at a time, then one link per target ----
objdir="$out/obj"
mkdir -p "$objdir"
# what every object depends on besides its own source: compiler, flags, libraries, every header
# of the project and of the fuzz targets
common_key=$({ clang --version; printf '%s\n' "${cflags[@]}" "$incs" "$libs"
  find include src tests/fuzz -name '*.h' | sort | xargs cat; } | sha1sum | cut -c1-16)
obj_of() { # obj_of SRC: the object file SRC compiles to
  echo "$objdir/$(basename "${1%.c}")-$({ echo "$common_key"; cat "$1"; } | sha1sum | cut -c1-16).o"
}
compile() { # compile SRC OBJ: writes OBJ (via a temporary name: an object exists only if complete)
  # shellcheck disable=SC2086  # incs is a word list
  if clang "${cflags[@]}" $incs -c "$1" -o "$2.tmp$$" >"$2.log" 2>&1; then
    mv "$2.tmp$$" "$2" && rm -f "$2.log"
  else
    rm -f "$2.tmp$$"
  fi
}
declare -A objs=() # target -> its object files
declare -A todo=() # object -> source, for the objects not built yet
for t in "${targets[@]}"; do
  objs[$t]=""
  for f in "tests/fuzz/fuzz_$t.c" "${core[@]}" ${srcs[$t]}; do
    o=$(obj_of "$f")
    objs[$t]+="$o "
    [ -f "$o" ] || todo[$o]="$f"
  done
done
running=0
for o in "${!todo[@]}"; do
  if [ "$running" -ge "$jobs_max" ]; then
    wait -n
    running=$((running - 1))
  fi
  compile "${todo[$o]}" "$o" &
  running=$((running + 1))
done
wait
link() { # link T: BUILD_DIR/fuzz_T from its objects (kept when they have not changed)
  local t="$1" exe="$out/fuzz_$1" o
  for o in ${objs[$t]}; do
    if [ ! -f "$o" ]; then
      echo "FAIL - fuzz_$t does not build: ${todo[$o]:-$o}:"
      sed 's/^/    /' "$o.log" 2>/dev/null | head -20
      return 1
    fi
  done
  [ -x "$exe" ] && [ "$(cat "$exe.objs" 2>/dev/null)" = "${objs[$t]}" ] && return 0
  rm -f "$exe.objs"
  # (via a temporary name: launch/test's background build may link the same target meanwhile)
  # shellcheck disable=SC2086  # objs and libs are word lists
  if ! clang "${ldflags[@]}" ${objs[$t]} -o "$exe.tmp$$" $libs -lhttp_parser -lpthread -lm >"$out/build_$t.log" 2>&1; then
    rm -f "$exe.tmp$$"
    echo "FAIL - fuzz_$t does not link:"
    sed 's/^/    /' "$out/build_$t.log" | head -20
    return 1
  fi
  mv -f "$exe.tmp$$" "$exe"
  echo "${objs[$t]}" >"$exe.objs"
}

# Each target is fuzzed in its own job, KDP_FUZZ_JOBS (default: the cores, at most 2) at a time:
# the same seconds of fuzzing per target in a fraction of the wall time. A job writes its result
# lines to $out/result_T and ok or fail to $out/status_T.
fuzz_one() {
  local t="$1" exe="$out/fuzz_$1" rc execs
  exec >"$out/result_$t" 2>&1
  echo fail >"$out/status_$t"
  link "$t" || return
  rm -f "$out"/crash_"${t}"_*
  local corpus="$out/corpus_$t"
  rm -rf "$corpus"
  mkdir -p "$corpus"
  cp -r "tests/fuzz/corpus/$t/." "$corpus/" 2>/dev/null || true
  local dict=()
  [ -f "$out/$t.dict" ] && dict=("-dict=$out/$t.dict")
  local budget what
  if [[ "$rounds" =~ ^([0-9]+)s$ ]]; then
    budget="-max_total_time=${BASH_REMATCH[1]}" what="in ${BASH_REMATCH[1]} s"
  else
    budget="-runs=$((rounds * ${runs_of[$t]:-1000}))" what="of $((rounds * ${runs_of[$t]:-1000}))"
  fi
  (cd "$out" && UBSAN_OPTIONS=halt_on_error=1 "$exe" "$budget" -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 "${dict[@]}" -artifact_prefix="$out/crash_${t}_" "$corpus" \
    >"$out/run_$t.log" 2>&1)
  rc=$?
  execs=$(grep -m1 'stat::number_of_executed_units' "$out/run_$t.log" | awk '{ print $2 }')
  if [ "$rc" = 0 ]; then
    echo "ok   - fuzz_$t: ${execs:-?} inputs $what (its $(find "tests/fuzz/corpus/$t" -type f | wc -l) seeds first), no crash, leak or sanitizer report"
    echo ok >"$out/status_$t"
  else
    echo "FAIL - fuzz_$t (exit $rc):"
    grep -E 'ERROR|SUMMARY|runtime error|leak' "$out/run_$t.log" | head -10 | sed 's/^/    /'
    for a in "$out"/crash_"${t}"_*; do
      [ -e "$a" ] && echo "    artifact: $a"
    done
  fi
}
if [ "$build_only" = 1 ]; then
  bfail=0
  for t in "${targets[@]}"; do link "$t" || bfail=1; done
  echo "fuzz: built ${#targets[@]} targets in $out"
  exit "$bfail"
fi
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
