#!/usr/bin/env bash
# Losing a rank (issue 14), under mpirun: kill -9 of one rank ends the job within 10 s with a
# non-zero status and leaves no process, for every method the binary accepts (the rank killed
# inside the method's exchange), for a rank killed halfway through its checkpoint file and in
# the middle of an evaluation; the half-written checkpoint is never taken as complete, the last
# complete one loads, and the rerun resumes from it with the same P (bitwise equal to an
# uninterrupted run) or with --resume-as one fewer. The rank is caught at those moments by
# KDP_FAULT_STOP_AT_STEP=N:R:WHERE (it stops itself with SIGSTOP; the test then kills it).
# Also codistill's weights mode (kd.exchange = weights) resized: the stale copies of the kept
# peers carry over, a new peer's is its weights at the resume.
#   Usage: tests/test_kill.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
run() {
  local np="$1"; shift
  timeout 120 mpirun -np "$np" --oversubscribe --bind-to none "$exe" -s run.progress=plain "$@"
}
step_dir() { printf '%s/checkpoints/step-%012d' "$1" "$2"; }
digests() { "$exe" inspect "$1" | sed -n '/tensor digests/,$p' | grep -E "^  ${2:-(params|momentum|buffers|module)}"; }
mkdata="${2:-}"
[ -x "$mkdata" ] || { echo "test_kill: kdp-mkdata (second argument) is missing"; exit 1; }
"$mkdata" npy "$tmp/npy" 512 200 || exit 1
data=(-s data.format=npy -s data.train_images="$tmp/npy/x.npy" -s data.train_labels="$tmp/npy/y.npy"
  -s data.test_images="$tmp/npy/tx.npy" -s data.test_labels="$tmp/npy/ty.npy")
base=("${data[@]}" -s "model.arch=mlp(32)" -s optim.batch_size=64 -s run.log_every=4
  -s checkpoint.every_steps=4 -s checkpoint.keep=5 -s run.epochs=2 -s run.max_steps=12)
# 512 / 64 = 8 steps an epoch: checkpoints at steps 4, 8 and 12, evaluations at 8 and 12

# kill_at DIR NP RANK STOP ARGS...: a run whose rank RANK stops itself at STOP (N:WHERE of
# KDP_FAULT_STOP_AT_STEP); once it is stopped, kill -9. Sets $rc (the job's exit status), $secs
# (from the kill to the job's end, in seconds), $caught (1 when the rank was seen stopped) and
# $alive (the job's processes still there after its end), and writes them to DIR.res (for a
# kill_at in a background subshell).
kill_at() {
  local dir="$1" np="$2" rank="$3" stop="$4" pid victim="" t0
  shift 4
  KDP_FAULT_STOP_AT_STEP="${stop%%:*}:$rank:${stop#*:}" run "$np" "${base[@]}" -s run.dir="$dir" \
    "$@" >"$dir.out" 2>&1 &
  pid=$!
  pids+=("$pid")
  caught=0 secs=-1
  for _ in $(seq 1200); do
    [ -n "$victim" ] || victim=$(rank_pid "$dir" "$rank")
    [ -n "$victim" ] && [ "$(cut -d ' ' -f 3 "/proc/$victim/stat" 2>/dev/null)" = T ] && caught=1 && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  local job="" p
  if [ "$caught" = 1 ]; then
    job=$(pgrep -f -- "run.dir=$dir( |$)") # the job's processes: timeout, mpirun, the ranks
    t0=$EPOCHREALTIME
    kill -9 "$victim"
    wait "$pid"
    rc=$?
    secs=$(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $t0 }")
  else
    wait "$pid"
    rc=$?
  fi
  alive=0
  for p in $job; do # a zombie has ended (this container's pid 1 may reap it late)
    case "$(cut -d ' ' -f 3 "/proc/$p/stat" 2>/dev/null)" in "" | Z) ;; *) alive=$((alive + 1)) ;; esac
  done
  echo "$rc $secs $caught $alive $(wc -w <<<"$job")" >"$dir.res"
}
# ended DESC DIR RANK: the assertions every kill shares
ended() {
  read -r rc secs caught alive njob <"$2.res"
  expect "$1: rank $3 was caught stopped there and killed" test "$caught" = 1
  [ "$caught" = 1 ] || tail -n 3 "$2.out" # why the run ended first (a method's own requirement?)
  expect "  ...the job ends by itself within 10 s (took $secs s) with a non-zero status ($rc; 124 = the test's timeout)" \
    awk "BEGIN { exit !($secs >= 0 && $secs <= 10 && $rc != 0 && $rc != 124) }"
  expect "  ...mpirun names the killed rank" grep -q "rank $3 .*signal 9" "$2.out"
  expect "  ...and none of its $njob processes (mpirun, the ranks) is left" test "$alive" = 0 -a "$njob" -ge 3
  times+=("$secs")
}
times=()

# ---------- every method: a rank killed inside the method's exchange (loop step 2) ----------
methods=$("$exe" --help | sed -n 's/.*(enum, one of: \(.*\); env KDP_KD_METHOD)$/\1/p' | tr -d ,)
expect "the methods, from kdpeers --help: $methods" grep -qw dml <<<"$methods"
# one job per method at once (each with its own run.dir), then the checks
kill_method() { # kill_method METHOD: at P=2, or at the P the method says it needs
  local k="$tmp/kill-$1" need
  kill_at "$k" 2 1 2:exchange -s kd.method="$1"
  need=$(sed -n "s/.*kd.method = $1 needs at least \([0-9]*\) peers.*/\1/p" "$k.out" | head -n 1)
  if [ "$caught" = 0 ] && [ -n "$need" ]; then
    rm -rf "$k"
    kill_at "$k" "$need" 1 2:exchange -s kd.method="$1"
  fi
}
# three jobs at a time: eleven at once on a loaded 2-core machine took longer than the run's
# timeout to reach the step where their rank is caught
for m in $methods; do
  while [ "$(jobs -rp | wc -l)" -ge 3 ]; do wait -n; done
  kill_method "$m" &
done
wait
for m in $methods; do
  ended "$m: kill -9 in the exchange of step 3" "$tmp/kill-$m" 1
done

# ---------- a rank killed halfway through its checkpoint file; the rerun with the same P ----
a="$tmp/ref" c="$tmp/ckpt"
run 2 "${base[@]}" -s kd.method=dml -s run.dir="$a" >"$a.out" 2>&1
expect "an uninterrupted dml run (P=2) to step 12 (exit $?)" test -f "$(step_dir "$a" 12)/MANIFEST.kdpc"
kill_at "$c" 2 1 8:ckpt -s kd.method=dml
ended "dml: kill -9 halfway through rank 1's file of the checkpoint at step 8" "$c" 1
s8=$(step_dir "$c" 8) s4=$(step_dir "$c" 4)
part=$(find "$s8" -name 'peer-001.kdpc.tmp.*' 2>/dev/null | head -n 1)
expect "  ...which is left half written: rank 1's temp file (${part:+$(stat -c %s "$part")} bytes), no peer-001.kdpc, no manifest" \
  test -s "$part" -a ! -e "$s8/peer-001.kdpc" -a ! -e "$s8/MANIFEST.kdpc"
expect "  ...(rank 0's file of step 8 is whole)" test -f "$s8/peer-000.kdpc"
expect "  ...the checkpoint at step 4 is complete and intact (both files' checksums)" \
  bash -c "'$exe' inspect '$s4/peer-000.kdpc' | grep -q 'crc32 .* ok' && '$exe' inspect '$s4/peer-001.kdpc' | grep -q 'crc32 .* ok'"
run 2 "${base[@]}" -s kd.method=dml -s run.dir="$c" >"$c.out2" 2>&1
rc=$?
expect "the rerun with the same P finishes (exit $rc)" test "$rc" = 0
expect "  ...resumed from the last complete checkpoint, step 4, not the half-written one" \
  grep -q "resumed from the checkpoint at step 4 " "$c.out2"
for r in 0 1; do
  expect "  ...rank $r at step 12 bitwise equal to the uninterrupted run's (weights, momentum)" \
    cmp -s <(digests "$(step_dir "$a" 12)/peer-00$r.kdpc") <(digests "$(step_dir "$c" 12)/peer-00$r.kdpc")
done

# ---------- a rank killed in the middle of an evaluation; the rerun with one peer fewer -----
e="$tmp/eval"
kill_at "$e" 3 2 8:eval -s kd.method=dml
ended "dml (P=3): kill -9 of rank 2 in the middle of the evaluation at step 8" "$e" 2
expect "  ...before that evaluation's line was written" bash -c "! grep -q '\"event\":\"eval\"' '$e/metrics.jsonl'"
expect "  ...the last complete checkpoint is step 4 (the one at 8 comes after the evaluation)" \
  test -f "$(step_dir "$e" 4)/MANIFEST.kdpc" -a ! -e "$(step_dir "$e" 8)"
run 2 "${base[@]}" -s kd.method=dml -s run.dir="$e" --resume-as 2 >"$e.out2" 2>&1
rc=$?
expect "the rerun with --resume-as 2 finishes (exit $rc)" test "$rc" = 0
expect "  ...from step 4, as a resize 3 -> 2 keeping peers 0 and 1" \
  grep -q '"event":"resize","step":4,"from":3,"to":2,"kept":\[0,1\]' "$e/metrics.jsonl"
expect "  ...evaluating both peers at step 12" grep -q '"event":"eval",.*"step":12,"model":"peer1"' "$e/metrics.jsonl"
expect "  ...its checkpoint at step 12 has 2 files" \
  test -f "$(step_dir "$e" 12)/peer-001.kdpc" -a ! -e "$(step_dir "$e" 12)/peer-002.kdpc"

# ---------- codistill's weights mode (kd.exchange = weights) resized ----------
# With kd.exchange_every beyond the run, the stale copies stay the ones of the first exchange
# (step 0: every peer's initial weights). Resized at step 2, they must be: shrunk 3 -> 2, the
# kept peers' copies carried over (= a P=2 run's copies); grown 2 -> 3, the kept ones carried
# over and the new peer's its weights at the resume, its seed's (= a P=3 run's copies).
w=(-s kd.method=codistill -s kd.exchange=weights -s kd.exchange_every=100 -s checkpoint.every_steps=2
  -s run.max_steps=6)
stale() { digests "$(step_dir "$1" 6)/peer-00$2.kdpc" codistill.stale; }
copy_at() { # copy_at RUN NEW STEP: NEW, a run.dir holding RUN's checkpoint at STEP
  mkdir -p "$2/checkpoints" && cp -r "$(step_dir "$1" "$3")" "$2/checkpoints/" && cp "$1/metrics.jsonl" "$2/"
}
# (the two runs at once, then the two resumes at once)
run 3 "${base[@]}" "${w[@]}" -s run.dir="$tmp/w3" >"$tmp/w3.out" 2>&1 &
run 2 "${base[@]}" "${w[@]}" -s run.dir="$tmp/w2" >"$tmp/w2.out" 2>&1
wait $!
for np in 3 2; do
  expect "codistill weights, P=$np, to step 6" test -n "$(stale "$tmp/w$np" 0)"
done
copy_at "$tmp/w3" "$tmp/ws" 2
copy_at "$tmp/w2" "$tmp/wg" 2
run 3 "${base[@]}" "${w[@]}" -s run.dir="$tmp/wg" --resume-as 3 >"$tmp/wg.out" 2>&1 &
run 2 "${base[@]}" "${w[@]}" -s run.dir="$tmp/ws" --resume-as 2 >"$tmp/ws.out" 2>&1
wait $!
expect "codistill weights: --resume-as 2 from P=3 finishes" test -f "$(step_dir "$tmp/ws" 6)/MANIFEST.kdpc"
expect "  ...logging what became of the stale copies" \
  grep -q "resize 3 -> 2 peers: codistill's stale copies .* of peers 0,1 kept as of the last exchange" "$tmp/ws.out"
for r in 0 1; do
  expect "  ...rank $r's stale copies are the P=2 run's, bitwise" test "$(stale "$tmp/ws" $r)" = "$(stale "$tmp/w2" 0)"
done
expect "codistill weights: --resume-as 3 from P=2 finishes" test -f "$(step_dir "$tmp/wg" 6)/MANIFEST.kdpc"
expect "  ...the new peer's copy taken from its weights at the resume" \
  grep -q "resize 2 -> 3 peers: .* of peers 0,1 kept as of the last exchange, of peer 2 taken from their weights now" "$tmp/wg.out"
for r in 0 1 2; do
  expect "  ...rank $r's stale copies are the P=3 run's, bitwise" test "$(stale "$tmp/wg" $r)" = "$(stale "$tmp/w3" 0)"
done

echo "kill -9 to the job's end, seconds: ${times[*]}"
finish kill
