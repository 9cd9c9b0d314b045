#!/usr/bin/env bash
# The dashboard in a real browser: Debian's chromium, headless, driven by playwright-core (npm,
# launch/setup-playwright) loads GET / of live runs under mpirun. With server.token set it must
# ask for the token (and refuse a wrong one), then show curves that update by themselves and,
# with the run paused, plot exactly what /status says; it takes a screenshot. Without a token the
# curves show at once. A missing browser or Playwright skips (77) on a workstation and fails with
# CI=true.
# Usage: tests/test_dashboard.sh PATH/TO/kdpeers [SCREENSHOT.png]
#   (tests/test_dashboard.sh build/kdpeers docs/dashboard.png refreshes the README's screenshot)
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
shot_out="${2:-}"
missing() {
  if [ "${CI:-}" = true ]; then
    echo "FAIL - dashboard: $1, and CI=true: the browser test must run in CI (launch/setup installs it)"
    exit 1
  fi
  echo "dashboard: $1: skipped"
  exit 77
}
export NODE_PATH="$src/.cache/playwright/node_modules"
command -v node >/dev/null || missing "node is missing (launch/setup installs nodejs)"
[ -x /usr/bin/chromium ] || missing "/usr/bin/chromium is missing (launch/setup installs Debian's chromium)"
[ -f "$NODE_PATH/playwright-core/package.json" ] ||
  missing "playwright-core is not in $NODE_PATH (launch/setup-playwright could not reach the npm registry?)"
for tool in curl jq; do
  command -v "$tool" >/dev/null || missing "$tool is missing (launch/setup installs it)"
done

start() { # start DIR NP ARGS...: a long run in the background; sets $addr
  local dir="$1" np="$2"
  shift 2
  serve_bg "$dir" timeout 300 mpirun -np "$np" --oversubscribe --bind-to none "$exe" \
    -s run.progress=plain -s run.dir="$dir" -s run.epochs=400 -s data.subset=6144 \
    -s data.test_subset=1000 -s "model.arch=mlp(128)" -s run.log_every=8 -s optim.lr=0.02 "$@"
}

# ---------- behind a token: three peers, a method with a teacher ----------
token="dash-$RANDOM-$RANDOM"
KDP_SERVER_TOKEN="$token" start "$tmp/tok" 3 -s kd.method=one
expect "the run serves (server.addr written)" test -n "$addr"
shot="$tmp/dashboard.png"
DASH_TOKEN="$token" node "$src/tests/dashboard.js" "$addr" "$shot" >"$tmp/browser.out" 2>&1
rc=$?
sed 's/^/  browser: /' "$tmp/browser.out"
expect "the browser checks pass (node exit $rc)" test "$rc" = 0
expect "the token never reached the run's output or files" bash -c "! grep -rqF '$token' '$tmp/tok.out' '$tmp/tok'"
expect "the screenshot is a PNG" bash -c "head -c 8 '$shot' | od -An -tx1 | grep -q '89 50 4e 47 0d 0a 1a 0a'"
if [ -n "$shot_out" ] && [ -s "$shot" ]; then
  cp "$shot" "$shot_out" && ok "screenshot copied to $shot_out"
fi
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $token" "$addr/control" -d '{"action":"stop"}')
expect "the run is stopped through /control (202, got $code)" test "$code" = 202
wait "$last_pid"
expect "...and ends with 75" test $? = 75

# ---------- no token: the curves at once ----------
sanitizer_skip "the page without a token (the same code paths)" || {
  start "$tmp/open" 2 -s kd.method=dml
  node "$src/tests/dashboard.js" "$addr" "" >"$tmp/browser2.out" 2>&1
  rc=$?
  sed 's/^/  browser: /' "$tmp/browser2.out"
  expect "without a token: the browser checks pass (node exit $rc)" test "$rc" = 0
  curl -s -o /dev/null -X POST "$addr/control" -d '{"action":"stop"}'
  wait "$last_pid"
}

finish dashboard
