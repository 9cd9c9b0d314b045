# shellcheck shell=bash disable=SC2034
# tests/lib.sh: sourced by the shell test scripts: the environment, a temp dir, ok/FAIL counting.
# After sourcing: $exe (the kdpeers binary, first argument), $src (source root), $tmp (removed at
# exit), expect DESC CMD..., and finish NAME (prints "NAME: N passed, M failed" and sets the exit).
exe="${1:?usage: $0 PATH/TO/kdpeers}"
src="${KDP_SOURCE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=launch/env.sh
. "$src/launch/env.sh"
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  rm -rf "$tmp"
}
trap cleanup EXIT
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   - $1"; }
bad() { fail=$((fail + 1)); echo "FAIL - $1"; }
expect() { # expect DESC CMD...: CMD succeeds
  local d="$1"
  shift
  if "$@"; then ok "$d"; else bad "$d"; fi
}
# Under launch/test's sanitizer builds (KDP_SANITIZER_RUN=asan|tsan) the scripts skip the runs
# that only repeat a code path for a comparison (determinism, a reference run): the sanitizers
# look for memory errors and races, which the first run of each path shows.
sanitizer_skip() { # sanitizer_skip DESC: true (and says so) when the part is skipped
  [ -n "${KDP_SANITIZER_RUN:-}" ] || return 1
  echo "skip - $1 (a comparison run; skipped under $KDP_SANITIZER_RUN)"
}
# serve_bg DIR CMD...: runs CMD (a training run or kdpeers serve with run.dir DIR) in the
# background, its output in DIR.out, and waits up to 30 s for DIR/server.addr; sets $last_pid
# and $addr ("" if the address never came)
serve_bg() {
  local dir="$1"
  shift
  "$@" >"$dir.out" 2>&1 &
  pids+=($!)
  last_pid=$!
  addr=""
  for _ in $(seq 1 300); do
    [ -s "$dir/server.addr" ] && addr=$(cat "$dir/server.addr") && break
    sleep 0.1
  done
}
# mpi_run NP ARGS...: kdpeers under mpirun (the timeout guards against a hang in a collective)
mpi_run() {
  local np="$1"
  shift
  timeout 300 mpirun -np "$np" --oversubscribe --bind-to none "$exe" -s run.progress=plain "$@"
}
# ckpt_digests FILE: the crc32 of every tensor of a checkpoint file (weights, momentum, BN stats,
# modules, EMA copies)
ckpt_digests() { "$exe" inspect "$1" | sed -n '/tensor digests/,$p'; }
# entry FILE NAME: the value of one entry of a checkpoint file (as kdpeers inspect prints it)
entry() { "$exe" inspect "$1" | awk -v k="$2" '$1 == k { print $NF }'; }
# live_snapshot: saves $addr's /status, /metrics and /history to $tmp/status.json, metrics.txt and
# history.json, then stops the run with a control command
live_snapshot() {
  curl -s "$addr/status" >"$tmp/status.json"
  curl -s "$addr/metrics" >"$tmp/metrics.txt"
  curl -s "$addr/history" >"$tmp/history.json"
  curl -s -X POST "$addr/control" -d '{"action":"stop"}' >/dev/null
}
# rank_pid RUN_DIR RANK: the pid of that rank of the job that writes RUN_DIR (-s run.dir=RUN_DIR)
rank_pid() {
  local p
  for p in $(pgrep -x kdpeers); do
    tr '\0' '\n' 2>/dev/null <"/proc/$p/cmdline" | grep -qx "run.dir=$1" || continue
    tr '\0' '\n' 2>/dev/null <"/proc/$p/environ" | grep -qx "OMPI_COMM_WORLD_RANK=$2" && echo "$p"
  done
}
left() { # left RUN_DIR: how many kdpeers processes of the job that writes RUN_DIR are left
  local p n=0
  for p in $(pgrep -x kdpeers); do
    tr '\0' '\n' 2>/dev/null <"/proc/$p/cmdline" | grep -qx "run.dir=$1" && n=$((n + 1))
  done
  echo "$n"
}
finish() {
  echo "$1: $pass passed, $fail failed"
  [ "$fail" = 0 ]
}
