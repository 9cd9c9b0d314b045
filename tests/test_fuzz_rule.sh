#!/usr/bin/env bash
# The fuzz suite's skip rule: without the toolchain, tests/fuzz/run.sh skips (77) on a workstation
# and FAILS (1) when CI=true, so CI never goes green without fuzzing. clang is hidden by running
# it with an empty PATH.
set -uo pipefail
src="${KDP_SOURCE_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}"
bash=$(command -v bash)
pass=0 fail=0
check() { # check DESC WANT_RC [VAR=VALUE...]
  local d="$1" want="$2"; shift 2
  local out rc
  out=$(env -i KDP_SOURCE_ROOT="$src" PATH=/nonexistent "$@" "$bash" "$src/tests/fuzz/run.sh" 1 /nonexistent 2>&1)
  rc=$?
  if [ "$rc" = "$want" ]; then pass=$((pass + 1)); echo "ok   - $d (exit $rc: $out)"
  else fail=$((fail + 1)); echo "FAIL - $d: exit $rc, wanted $want: $out"; fi
}
check "no clang, no CI: the fuzz suite skips" 77
check "no clang, CI=false: skips" 77 CI=false
check "no clang, CI=true: the skip is a failure" 1 CI=true
echo "fuzz_rule: $pass passed, $fail failed"
[ "$fail" = 0 ]
