#!/usr/bin/env bash
# What a bad day does to a run (issue 10), under mpirun: a run that keeps diverging stops after
# checkpoint.max_rollbacks; two runs never share a run.dir (the holder is named, a stale lock is
# taken over); checkpoints that are all corrupt stop the run and nothing is deleted; a full disk
# loses whole metrics lines only, counted; a short metrics.jsonl is never padded; a refused server
# address writes nothing; a moved run.dir resumes; Ctrl-C / SIGTERM of launch/kdpeers-local waits
# for a slow stop checkpoint and exits 75; a stalled rank is named, /healthz says 503 and the job
# ends after run.stall_abort_seconds.   Usage: tests/test_faults.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
for tool in curl jq; do
  command -v "$tool" >/dev/null || { echo "test_faults: $tool is missing (launch/setup installs it)"; exit 77; }
done
run() {
  local np="$1"; shift
  timeout "$wait_limit" mpirun -np "$np" --oversubscribe --bind-to none "$exe" -s run.progress=plain "$@"
}
run1() { timeout "$wait_limit" "$exe" -s run.progress=plain "$@"; } # one process: no mpirun to start
small=(-s data.subset=1536 -s data.test_subset=500 -s run.epochs=2 -s "model.arch=mlp(64,32)"
  -s optim.batch_size=64 -s run.log_every=5)
# wait_for TENTHS CMD...: until CMD succeeds, at most TENTHS tenths of a second
wait_for() {
  local n="$1"; shift
  for _ in $(seq "$n"); do "$@" && return 0; sleep 0.1; done
  return 1
}
stop_mpirun() { pkill -USR1 -f "^mpirun .*run.dir=$1( |$)"; }
holds_lock() { # rank 0 of the job that writes RUN_DIR has written its name into the lock file
  local p
  p=$(rank_pid "$1" 0)
  [ -n "$p" ] && grep -qx "pid=$p" "$1/kdpeers.lock" 2>/dev/null
}
logged() { grep -q "$2" "$1/metrics.jsonl" 2>/dev/null; }
code() { curl -s -m 5 -o /dev/null -w '%{http_code}' "$@"; }
healthz_is() { [ "$(code "$addr/healthz")" = "$1" ]; } # evaluated at each try of wait_for
flip_byte() { # flip_byte FILE OFFSET: one bit of one byte
  local b
  b=$(od -An -tu1 -j "$2" -N 1 "$1" | tr -d ' ')
  # shellcheck disable=SC2059
  printf "\\$(printf %03o $((b ^ 4)))" | dd of="$1" bs=1 seek="$2" conv=notrunc 2>/dev/null
}
tree_sums() { (cd "$1" && find . -type f ! -name kdpeers.lock -exec md5sum {} + | sort); }

# ---------- divergence with rollback: bounded, and a signal still stops it ----------
sec_rollback() {
f="$tmp/rollback"
rb=(-s checkpoint.on_divergence=rollback -s optim.lr=10 -s checkpoint.every_steps=3
  -s checkpoint.rollback_lr_scale=0.9)
t0=$SECONDS
run1 "${small[@]}" "${rb[@]}" -s run.dir="$f" >"$f.out" 2>&1
rc=$?
expect "rollback: a run that keeps diverging stops with the divergence error (exit $rc, $((SECONDS - t0)) s)" test "$rc" = 1
expect "  ...after checkpoint.max_rollbacks = 3 rollbacks ($(grep -c '"event":"rollback"' "$f/metrics.jsonl"))" \
  test "$(grep -c '"event":"rollback"' "$f/metrics.jsonl")" = 3
scales=$(grep '"event":"rollback"' "$f/metrics.jsonl" | sed 's/.*"value":\([0-9.]*\)}/\1/' | tr '\n' ' ')
expect "  ...the lr scale shrinks at each one, not reloaded from the checkpoint (${scales:0:40})" test "$scales" = "0.9 0.81 0.729 "
expect "  ...rank 0 counts them (rollback 3 of 3)" grep -q "rollback 3 of 3" "$f.out"
expect "  ...the error says how many and what to change" grep -q "after 3 rollbacks (checkpoint.max_rollbacks = 3, lr scale 0.729). Lower optim.lr or kd.weight, or raise checkpoint.max_rollbacks" "$f.out"
expect "  ...and does not suggest the rollback that is already set" bash -c "! grep -q 'set checkpoint.on_divergence' '$f.out'"
run1 "${small[@]}" "${rb[@]}" -s checkpoint.max_rollbacks=5 -s run.dir="$f.5" >"$f.5.out" 2>&1
expect "checkpoint.max_rollbacks = 5 allows 5 ($(grep -c '"event":"rollback"' "$f.5/metrics.jsonl"))" \
  test "$(grep -c '"event":"rollback"' "$f.5/metrics.jsonl")" = 5
g="$tmp/rollback-signal"
run 2 "${small[@]}" "${rb[@]}" -s checkpoint.rollback_lr_scale=0.999 -s checkpoint.max_rollbacks=1000 \
  -s run.epochs=50 -s run.dir="$g" >"$g.out" 2>&1 &
pid=$!
wait_for 600 logged "$g" '"event":"rollback"' || bad "rollback+signal: no rollback logged"
t0=$SECONDS
stop_mpirun "$g"
wait "$pid"
rc=$?
expect "rollback: a signal stops a run that keeps rolling back (exit $rc, $((SECONDS - t0)) s)" test "$rc" = 75 -a $((SECONDS - t0)) -le 30
}

# ---------- one run per run.dir ----------
sec_lock() {
l="$tmp/lock"
run 2 "${small[@]}" -s run.epochs=200 -s checkpoint.every_steps=10 -s run.dir="$l" >"$l.out1" 2>&1 &
pid=$!
wait_for 600 logged "$l" '"event":"checkpoint"' || bad "lock: the first run wrote no checkpoint"
holder=$(rank_pid "$l" 0)
run 2 "${small[@]}" -s run.dir="$l" >"$l.out2" 2>&1
rc=$?
expect "lock: a second run into a run.dir in use exits 2 (got $rc)" test "$rc" = 2
expect "  ...naming the holder: pid $holder, host, start time" \
  grep -qE "run.dir $l is in use by another kdpeers run: pid $holder on host $(hostname), started 20[0-9]{2}-" "$l.out2"
"$exe" export "$l" --peer 1 -o "$tmp/lock.kdpm" >/dev/null 2>&1
expect "  ...kdpeers export still reads the locked run.dir" test -s "$tmp/lock.kdpm"
stop_mpirun "$l"
wait "$pid"
rc=$?
expect "  ...the first run goes on undisturbed and stops on its signal (exit $rc)" test "$rc" = 75
expect "  ...with one start line in metrics.jsonl" test "$(grep -c '"event":"start"' "$l/metrics.jsonl")" = 1
expect "  ...and its clean end empties kdpeers.lock" test -f "$l/kdpeers.lock" -a ! -s "$l/kdpeers.lock"
# a holder killed with -9 leaves its name behind: taken over
run 2 "${small[@]}" -s run.epochs=200 -s run.dir="$l" >"$l.out3" 2>&1 &
pid=$!
wait_for 600 holds_lock "$l" || bad "lock: the restarted run does not hold the lock"
victim=$(rank_pid "$l" 0)
kill -9 "$victim"
wait "$pid"
run 2 "${small[@]}" -s run.epochs=200 -s run.max_steps=60 -s run.dir="$l" >"$l.out4" 2>&1
rc=$?
expect "lock: after kill -9 of the holder the next run starts (exit $rc)" test "$rc" = 0
expect "  ...warning that it takes over the stale lock of pid $victim" \
  grep -q "taking over the stale lock of run.dir $l: it names pid $victim on host $(hostname), .*, which is no longer running" "$l.out4"
printf 'pid=4242\nhost=elsewhere.example\nstarted=2020-01-01 00:00:00 +0000\n' >"$l/kdpeers.lock"
run 2 "${small[@]}" -s run.epochs=200 -s run.max_steps=70 -s run.dir="$l" >"$l.out5" 2>&1
rc=$?
expect "lock: a lock file from another host whose lock is free is taken over (exit $rc)" test "$rc" = 0
expect "  ...with a warning naming that host" grep -q "pid 4242 on host elsewhere.example, .*runs on another host and no longer holds the lock" "$l.out5"
# a process of this host named in the file that still runs (a file system without working locks)
printf 'pid=%s\nhost=%s\nstarted=then\nboot_id=%s\nproc_start=%s\n' "$$" "$(hostname)" \
  "$(cat /proc/sys/kernel/random/boot_id)" "$(awk '{ print $22 }' "/proc/$$/stat")" >"$l/kdpeers.lock"
run 2 "${small[@]}" -s run.epochs=200 -s run.max_steps=80 -s run.dir="$l" >"$l.out6" 2>&1
rc=$?
expect "lock: a named holder that still runs on this host is respected even without its lock (exit $rc)" test "$rc" = 2
expect "  ...saying so" grep -q "pid $$ on host $(hostname), started then, still running" "$l.out6"
}

# ---------- the only checkpoint corrupt ----------
sec_corrupt() {
c="$tmp/corrupt"
run 2 "${small[@]}" -s run.max_steps=10 -s run.dir="$c" >"$c.out1" 2>&1
expect "corrupt: a short run leaves one checkpoint" test "$(ls -d "$c"/checkpoints/step-* | wc -l)" = 1
flip_byte "$c/checkpoints/step-000000000010/peer-001.kdpc" 300
before=$(tree_sums "$c")
run 2 "${small[@]}" -s run.max_steps=20 -s run.dir="$c" >"$c.out" 2>&1
rc=$?
expect "corrupt: checkpoints that are all unusable stop the run (exit $rc)" test "$rc" = 1
expect "  ...saying none is usable and why" grep -q "holds 1 completed checkpoint but none is usable (the newest, step 10: .*checksum mismatch" "$c.out"
expect "  ...and what --fresh would do" grep -q -- "--fresh would delete $c/checkpoints and empty metrics.jsonl" "$c.out"
expect "  ...nothing deleted, nothing appended (checkpoints, both peer files, metrics.jsonl)" \
  test "$before" = "$(tree_sums "$c")"
}

# ---------- metrics.jsonl: a full disk, a short file ----------
sec_metrics() {
m="$tmp/full"
KDP_FAULT_METRICS_FULL=10-20 run1 "${small[@]}" -s run.log_every=1 -s run.dir="$m" >"$m.out" 2>&1
rc=$?
expect "disk full: metrics lines that cannot be written do not stop the run (exit $rc)" test "$rc" = 0
expect "  ...every line left is whole JSON (no spliced lines)" bash -c "jq -e -c . '$m/metrics.jsonl' >/dev/null"
trains=$(grep '"event":"train"' "$m/metrics.jsonl" | sed 's/.*"step":\([0-9]*\),.*/\1/' | tr '\n' ' ')
expect "  ...the train lines of steps 10-19 are lost, 9 and 20 are there" \
  bash -c "[[ ' $trains' == *' 9 20 '* ]]"
expect "  ...the summary counts the 10 lost lines" grep -q '"metrics_lines_lost":10' "$m/metrics.jsonl"
expect "  ...one loud warning while it happens" test "$(grep -c 'WARNING: cannot write' "$m.out")" = 1
expect "  ...and the count at the end" grep -q "10 lines of $m/metrics.jsonl could not be written" "$m.out"
s="$tmp/short"
KDP_FAULT_SIGNAL_AT_STEP=25 run1 "${small[@]}" -s checkpoint.every_steps=10 -s run.dir="$s" >"$s.out1" 2>&1
truncate -s 300 "$s/metrics.jsonl"
run1 "${small[@]}" -s checkpoint.every_steps=10 -s run.dir="$s" >"$s.out" 2>&1
rc=$?
expect "short metrics.jsonl: the resume goes on (exit $rc)" test "$rc" = 0
expect "  ...warning that lines before the checkpoint are missing" grep -q "holds 300 bytes, fewer than the .* the checkpoint recorded" "$s.out"
expect "  ...and no NUL byte is written" test "$(tr -d '\000' <"$s/metrics.jsonl" | wc -c)" = "$(wc -c <"$s/metrics.jsonl")"
bad_lines=$(jq -R -c 'try fromjson catch "BAD"' "$s/metrics.jsonl" | grep -c '^"BAD"$')
expect "  ...the resumed lines start on a line of their own (1 cut line, got $bad_lines)" test "$bad_lines" -le 1

# ---------- refusals before anything is written; a moved run.dir ----------
n="$tmp/listen"
run1 "${small[@]}" -s server.listen=0.0.0.0 -s run.dir="$n" >"$n.out" 2>&1
rc=$?
expect "a non-loopback server.listen without a token exits 2 (got $rc)" test "$rc" = 2
expect "  ...saying why" grep -q "server.listen = 0.0.0.0 is not a loopback address.*needs server.token" "$n.out"
expect "  ...having written nothing (not even run.dir)" test ! -e "$n"
sums=$(tree_sums "$m")
run1 "${small[@]}" -s server.listen=0.0.0.0 -s run.dir="$m" >"$n.out2" 2>&1
expect "  ...nor a start line into an existing run's metrics.jsonl" test "$sums" = "$(tree_sums "$m")"
a="$tmp/move-a"
KDP_FAULT_SIGNAL_AT_STEP=17 run1 "${small[@]}" -s checkpoint.every_steps=10 -s run.dir="$a" >"$a.out1" 2>&1
mv "$a" "$tmp/moved"
run1 "${small[@]}" -s checkpoint.every_steps=10 -s run.dir="$tmp/moved" >"$a.out" 2>&1
rc=$?
expect "a moved run.dir resumes without --allow-config-change (exit $rc)" test "$rc" = 0
expect "  ...from its checkpoint" grep -q "resumed from the checkpoint at step 18 in $tmp/moved/checkpoints" "$a.out"
}

# ---------- signals through launch/kdpeers-local, with a 3 s stop checkpoint ----------
sec_local() {
for how in TERM INT; do
  k="$tmp/local-$how"
  if [ "$how" = INT ]; then set -m; fi # Ctrl-C: SIGINT to the launcher's process group
  KDPEERS="$exe" KDP_FAULT_CKPT_SLEEP_MS=3000 "$src/launch/kdpeers-local" -np 2 "${small[@]}" \
    -s run.progress=plain -s run.epochs=500 -s run.dir="$k" >"$k.out" 2>&1 &
  pid=$!
  set +m
  wait_for 600 logged "$k" '"event":"train"' || bad "kdpeers-local: no train line"
  t0=$SECONDS
  if [ "$how" = INT ]; then kill -INT -- "-$pid"; else kill -TERM "$pid"; fi
  wait "$pid"
  rc=$?
  expect "kdpeers-local, SIG$how: waits for the ranks' 3 s stop checkpoint and exits 75 (got $rc after $((SECONDS - t0)) s)" test "$rc" = 75
  ck=$(ls -d "$k"/checkpoints/step-* 2>/dev/null | tail -n 1)
  expect "  ...that checkpoint is complete (${ck##*/})" test -f "$ck/MANIFEST.kdpc"
  expect "  ...and the log says how to resume" grep -q "rerun the same command to resume" "$k.out"
done
}

# ---------- a stalled rank ----------
sec_stall() {
# rank 2 of 3 stops itself before the agreement point of step 31: rank 1 reports that it waits,
# so rank 0 names rank 2 alone
st="$tmp/stall"
KDP_FAULT_STOP_AT_STEP=30:2 run 3 "${small[@]}" -s run.epochs=200 -s run.stall_warn_seconds=1 \
  -s run.stall_abort_seconds=0 -s run.dir="$st" >"$st.out" 2>&1 &
pid=$!
stopped() { [ "$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" = T ]; }
r2=""
for _ in $(seq 300); do r2=$(rank_pid "$st" 2); [ -n "$r2" ] && stopped "$r2" && break; sleep 0.1; done
addr=$(cat "$st/server.addr" 2>/dev/null)
wait_for 100 healthz_is 503
expect "stall: /healthz answers 503 while rank 2 is stopped" test "$(code "$addr/healthz")" = 503
reason=$(curl -s "$addr/healthz" | jq -r .reason 2>/dev/null)
expect "  ...naming rank 2 as the late one ($reason)" grep -q "^rank 2 has not reached the agreement point of step 31 " <<<"$reason"
expect "  ...kdpeers_stalled is 1" bash -c "curl -s '$addr/metrics' | grep -qx 'kdpeers_stalled 1'"
expect "  ...the warning on stderr names rank 2 only" grep -q "WARNING: rank 2 has not reached the agreement point of step 31 after 1 s" "$st.out"
r0=$(rank_pid "$st" 0)
c0=$(awk '{ print $14 + $15 }' "/proc/$r0/stat")
sleep 2
c1=$(awk '{ print $14 + $15 }' "/proc/$r0/stat")
expect "  ...rank 0 waits without spinning ($((c1 - c0)) CPU ticks in 2 s, < 60)" test $((c1 - c0)) -lt 60
kill -CONT "$r2"
wait_for 100 healthz_is 200
expect "  ...after SIGCONT /healthz is 200 again" test "$(code "$addr/healthz")" = 200
expect "  ...kdpeers_stalled is 0" bash -c "curl -s '$addr/metrics' | grep -qx 'kdpeers_stalled 0'"
expect "  ...and the log says training goes on" grep -q "the late ranks caught up after" "$st.out"
stop_mpirun "$st"
wait "$pid"
expect "  ...and the run stops normally on a signal (exit $?)" test $? = 75
# run.stall_abort_seconds ends a job whose rank stays stopped
sa="$tmp/stall-abort"
t0=$SECONDS
KDP_FAULT_STOP_AT_STEP=30:1 run 2 "${small[@]}" -s run.epochs=200 -s run.stall_warn_seconds=1 \
  -s run.stall_abort_seconds=3 -s run.dir="$sa" >"$sa.out" 2>&1
rc=$?
expect "stall: run.stall_abort_seconds = 3 ends the job (exit $rc after $((SECONDS - t0)) s)" test "$rc" = 1
expect "  ...naming rank 1" grep -q "rank 1 has not reached the agreement point of step 31 after 3 s; run.stall_abort_seconds = 3: ending the job" "$sa.out"
expect "  ...leaving no process behind, the stopped one included" test "$(left "$sa")" = 0
# a rank stopped at any moment (it may leave rank 0 inside another collective): still 503, still
# ended
sr="$tmp/stall-any"
run 2 "${small[@]}" -s run.epochs=200 -s run.stall_warn_seconds=1 -s run.stall_abort_seconds=10 \
  -s run.dir="$sr" >"$sr.out" 2>&1 &
pid=$!
wait_for 600 logged "$sr" '"event":"train"' || bad "stall-any: no train line"
addr=$(cat "$sr/server.addr")
kill -STOP "$(rank_pid "$sr" 1)"
wait_for 90 healthz_is 503
expect "stall: SIGSTOP of rank 1 at any moment: /healthz answers 503" test "$(code "$addr/healthz")" = 503
wait "$pid"
rc=$?
expect "  ...and run.stall_abort_seconds ends the job (exit $rc)" test "$rc" = 1
expect "  ...leaving no process behind" test "$(left "$sr")" = 0
}

# The sections but the stall's run two at a time (checks_bg, tests/lib.sh), each with its own
# run.dirs; the stalled rank's comes last, alone (its CPU-tick check wants the cores free)
checks_bg rollback sec_rollback
checks_bg lock sec_lock
checks_bg corrupt sec_corrupt
checks_bg metrics sec_metrics
checks_bg local sec_local
checks_collect
sec_stall

finish faults
