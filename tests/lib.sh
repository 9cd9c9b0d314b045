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
  # KDP_TEST_KEEP=1 keeps the temp dir (logs, run dirs, a test cluster's slurmd log) to read after a failure
  if [ "${KDP_TEST_KEEP:-0}" = 1 ]; then echo "# kept $tmp" >&2; else rm -rf "$tmp"; fi
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
# Waits are on conditions, each with a generous limit of last resort (a hang must still end the
# test, but a loaded machine only makes it wait longer): KDP_WAIT_LIMIT seconds (default 600).
wait_limit="${KDP_WAIT_LIMIT:-600}"
# wait_until CMD...: polls CMD (every 0.05 s) until it succeeds; false after wait_limit seconds
wait_until() {
  local end=$((SECONDS + wait_limit))
  until "$@"; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 0.05
  done
}
# serve_bg DIR CMD...: runs CMD (a training run or kdpeers serve with run.dir DIR) in the
# background, its output in DIR.out, and waits for DIR/server.addr (while CMD lives, at most
# wait_limit seconds); sets $last_pid and $addr ("" if the address never came)
serve_bg() {
  local dir="$1"
  shift
  "$@" >"$dir.out" 2>&1 &
  pids+=($!)
  last_pid=$!
  addr=""
  wait_until _serving "$dir" "$last_pid"
  [ -s "$dir/server.addr" ] && addr=$(cat "$dir/server.addr")
}
_serving() { [ -s "$1/server.addr" ] || ! kill -0 "$2" 2>/dev/null; }
# the last-resort limit of a background run that a test ends by a control command
run_limit=$((3 * wait_limit))
# mpi_run NP ARGS...: kdpeers under mpirun (the timeout guards against a hang in a collective)
mpi_run() {
  local np="$1"
  shift
  timeout 300 mpirun -np "$np" --oversubscribe --bind-to none "$exe" -s run.progress=plain "$@"
}
# Independent runs at once (their checks come after, as if they had run one after another): spawn
# CMD... starts CMD in the background, at most $par_max at a time (KDP_TEST_JOBS, default 2: the
# runs are short and spend much of their time starting up, loading data and waiting in
# collectives); spawn_to OUT CMD... does the same with CMD's output in OUT and its exit status in
# OUT.rc; settle waits for every spawned job. rc_of OUT prints OUT's exit status (127 if it never
# ended).
par_max="${KDP_TEST_JOBS:-2}"
par_pids=()
spawn() {
  local live p
  while :; do
    live=0
    for p in "${par_pids[@]}"; do kill -0 "$p" 2>/dev/null && live=$((live + 1)); done
    [ "$live" -lt "$par_max" ] && break
    wait -n 2>/dev/null || sleep 0.05
  done
  "$@" &
  par_pids+=($!)
  pids+=($!)
}
spawn_to() {
  local out="$1"
  shift
  rm -f "$out.rc"
  spawn _spawned_to "$out" "$@"
}
_spawned_to() {
  local out="$1"
  shift
  "$@" >"$out" 2>&1
  echo $? >"$out.rc"
}
settle() {
  local p
  for p in "${par_pids[@]}"; do wait "$p" 2>/dev/null; done
  par_pids=()
}
rc_of() { cat "$1.rc" 2>/dev/null || echo 127; }
# Whole sections at once: checks_bg NAME FUNC... runs FUNC (its own runs and checks) as a spawned
# job, its output in $tmp/NAME.checks; checks_collect waits for them (settle), prints each
# section's output in the order they were started and counts its ok/FAIL lines (a section that did
# not reach its end is a failure).
sections=()
checks_bg() {
  local name="$1"
  shift
  sections+=("$name")
  spawn _checks_to "$tmp/$name.checks" "$name" "$@"
}
_checks_to() {
  local out="$1" name="$2"
  shift 2
  { "$@"; echo "section $name: end"; } >"$out" 2>&1
}
checks_collect() {
  local n
  settle
  for n in "${sections[@]}"; do
    grep -v "^section $n: end$" "$tmp/$n.checks"
    pass=$((pass + $(grep -c '^ok   - ' "$tmp/$n.checks")))
    fail=$((fail + $(grep -c '^FAIL - ' "$tmp/$n.checks")))
    grep -qx "section $n: end" "$tmp/$n.checks" || bad "section $n did not reach its end"
  done
  sections=()
}
# compare_ok DESC NAME ARGS...: runs launch/compare ARGS, its stdout in $tmp/NAME.out and its log
# in $tmp/NAME.err, and checks that it exits 0 (naming the log's last line if not)
compare_ok() {
  local d="$1" name="$2" rc
  shift 2
  "$src/launch/compare" "$@" >"$tmp/$name.out" 2>"$tmp/$name.err"
  rc=$?
  expect "$d exits 0 (rc $rc: $(tail -n 1 "$tmp/$name.err"))" test "$rc" = 0
}
# p_rows FILE [ERE]: the rows of a compare --peers table (FILE), in order, as "Pmethod," each;
# with ERE, only the rows whose cells after the method's match it (e.g. ' 1 \| [0-9.]+ \+- ')
p_rows() { grep -oE '^\| [0-9] \| `[a-z]*` \|'"${2:-}" "$1" | cut -d'|' -f2,3 | tr -d '|` ' | tr '\n' ,; }
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
