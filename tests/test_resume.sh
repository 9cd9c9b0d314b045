#!/usr/bin/env bash
# Checkpoints, exact resume and faults, under mpirun: an interrupted and resumed run finishes
# bitwise identical to an uninterrupted one (dml, one, ffl with its fusion head's first layer kept
# per peer and gathered for checkpoints and evaluations, mcl with its embedding heads, switokd with
# its expert counts); mismatches are refused; a crash in a checkpoint write leaves the previous one;
# divergence is reported; bad input gets clear messages.
# Usage: tests/test_resume.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
# several jobs share the cores (spawn): a rank that waits in a collective yields its core (Open
# MPI does so by itself only when a job alone has more ranks than cores)
export OMPI_MCA_mpi_yield_when_idle=1
run() {
  local np="$1"; shift
  timeout 300 mpirun -np "$np" --oversubscribe --bind-to none "$exe" -s run.progress=plain "$@"
}
# digests of every tensor of a checkpoint file (weights, momentum, BN stats, modules)
digests() { "$exe" inspect "$1" | sed -n '/tensor digests/,$p'; }
final_dir() { ls -d "$1"/checkpoints/step-* | tail -n 1; }
evals() { grep -E '"event":"(eval|train|switokd)"' "$1/metrics.jsonl" | sed 's/,"samples_per_second".*//'; }

base=(-s data.subset=1536 -s data.test_subset=1000 -s run.epochs=2 -s "model.arch=mlp(64,32)"
  -s optim.batch_size=64 -s run.log_every=5 -s checkpoint.every_steps=10 -s checkpoint.keep=2)

# Each case: an uninterrupted run (a) and a run stopped by a signal at step 17 and resumed (b);
# every case's runs start here, KDP_TEST_JOBS at a time (spawn, tests/lib.sh), and are checked
# below. The uninterrupted runs only serve the bitwise comparisons, which the release build makes:
# under the sanitizers the stop and resume paths run alone.
case_args() { # case_args CASE: the case's arguments beyond base
  case "$1" in
    switokd) echo "-s kd.method=switokd -s model.arch=mlp(8) -s peer.0.arch=mlp(128)" ;;
    bk) echo "-s run.ranks_per_peer=2 -s run.bucket_kb=1 -s run.grad_sum=allreduce -s kd.method=independent" ;;
    shm) echo "-s run.ranks_per_peer=2 -s run.grad_sum=shm -s kd.method=independent" ;;
    *) echo "-s kd.method=$1" ;;
  esac
}
stop_and_resume() { # stop_and_resume DIR ARGS...: DIR.out1 and DIR.out2, exit statuses in .rc;
  # DIR.stop lists the checkpoints the stop left (the resumed run's retention deletes them)
  local b="$1"
  shift
  KDP_FAULT_SIGNAL_AT_STEP=17 run 2 "$@" -s run.dir="$b" >"$b.out1" 2>&1
  echo $? >"$b.out1.rc"
  (cd "$b/checkpoints" 2>/dev/null && ls -d step-*/MANIFEST.kdpc) >"$b.stop"
  run 2 "$@" -s run.dir="$b" >"$b.out2" 2>&1
  echo $? >"$b.out2.rc"
}
# switokd: a stronger teacher (peer 0) than its student, so that some steps are in expert mode;
# bk: one peer on 2 ranks with the gradient allreduce in 1 KiB buckets; shm: the same peer with
# its gradients summed through the shared window (run.grad_sum = shm)
cases=(dml one ffl mcl switokd bk shm)
compare=1
sanitizer_skip "the uninterrupted reference runs (bitwise comparisons)" && compare=0
for c in "${cases[@]}"; do
  read -r -a m <<<"$(case_args "$c")"
  [ "$compare" = 1 ] && spawn_to "$tmp/$c-a.out" run 2 "${base[@]}" "${m[@]}" -s run.dir="$tmp/$c-a"
  spawn stop_and_resume "$tmp/$c-b" "${base[@]}" "${m[@]}"
done
# divergence (checked further down)
f="$tmp/div"
spawn_to "$f.out" run 2 "${base[@]}" -s optim.lr=10 -s run.dir="$f"
KDP_FAULT_NAN_AT_STEP=15 spawn_to "$f.rout" run 2 "${base[@]}" -s checkpoint.on_divergence=rollback -s run.dir="$f.r"
settle

for c in "${cases[@]}"; do
  method=$c
  [ "$c" = bk ] && method=buckets
  [ "$c" = shm ] && method="shared-window sum"
  a="$tmp/$c-a" b="$tmp/$c-b"
  [ "$compare" = 1 ] && expect "$method: uninterrupted run exits 0" test "$(rc_of "$a.out")" = 0
  rc=$(rc_of "$b.out1")
  expect "$method: a signal stops the run with exit 75 (got $rc)" test "$rc" = 75
  expect "$method: the stop wrote a checkpoint at step 18" grep -qx step-000000000018/MANIFEST.kdpc "$b.stop"
  rc=$(rc_of "$b.out2")
  expect "$method: rerunning the same command resumes and finishes (exit $rc)" test "$rc" = 0
  expect "$method: it says it resumed" grep -q "resumed from the checkpoint at step 18" "$b.out2"
  expect "$method: retention keeps checkpoint.keep = 2" test "$(ls -d "$b"/checkpoints/step-* | wc -l)" = 2
  fb=$(final_dir "$b")
  if [ "$compare" = 1 ]; then
    fa=$(final_dir "$a")
    expect "$method: both end at the same step" test "$(basename "$fa")" = "$(basename "$fb")"
    for r in 0 1; do
      expect "$method: rank $r final weights, momentum, BN stats and module bitwise identical" \
        cmp -s <(digests "$fa/peer-00$r.kdpc") <(digests "$fb/peer-00$r.kdpc")
    done
    expect "$method: identical metrics (train and eval lines)" cmp -s <(evals "$a") <(evals "$b")
  else
    expect "$method: the resumed run ends at step 48" test "$(basename "$fb")" = step-000000000048
  fi
  [ "$c" = switokd ] || continue
  # the teacher pauses in expert mode: its optimizer steps = 48 - the expert steps (the resumed
  # run's own record, which the comparison above holds equal to the uninterrupted run's)
  expect "switokd: one expert-fraction line per epoch" test "$(grep -c '"event":"switokd"' "$b/metrics.jsonl")" = 2
  expert=$(jq -s '[.[] | select(.event == "switokd") | .expert_steps] | add' "$b/metrics.jsonl")
  expect "switokd: expert mode happened ($expert of 48 steps) and not always" test "$expert" -gt 0 -a "$expert" -lt 48
  expect "switokd: fractions are expert_steps / steps" \
    jq -se '[.[] | select(.event == "switokd") | (.expert_fraction - .expert_steps / .steps) | . < 1e-5 and . > -1e-5] | all' "$b/metrics.jsonl"
  ts=$(entry "$fb/peer-000.kdpc" opt_steps) ss=$(entry "$fb/peer-001.kdpc" opt_steps)
  expect "switokd: the teacher stepped $ts times = 48 - $expert expert steps" test "$ts" = $((48 - expert))
  expect "switokd: the student stepped every step ($ss)" test "$ss" = 48
  expect "switokd: a students' mean eval line (= peer1 with one student)" test \
    "$(jq -r 'select(.model == "students") | .acc' "$b/metrics.jsonl")" = "$(jq -r 'select(.model == "peer1") | .acc' "$b/metrics.jsonl")"
done

# mismatches are refused clearly; a deliberate change needs a flag and is logged: one run after
# another on dml's resumed run.dir, beside the signal and crash cases below (checked after them)
mismatches() {
  local b="$tmp/dml-b" i=1
  for args in "3 -s kd.method=dml -s run.epochs=3" "2 -s kd.method=dml -s model.arch=mlp(32)" \
    "2 -s kd.method=avg" "2 -s kd.method=dml -s run.epochs=3 -s optim.lr=0.01" \
    "2 -s kd.method=dml -s run.epochs=3 -s optim.lr=0.01 --allow-config-change" "2 -s kd.method=avg --fresh"; do
    read -r -a a <<<"$args"
    run "${a[0]}" "${base[@]}" "${a[@]:1}" -s run.dir="$b" >"$tmp/mm$i" 2>&1
    echo $? >"$tmp/mm$i.rc"
    cp "$b/metrics.jsonl" "$tmp/mm$i.metrics" # (the last one, --fresh, empties it)
    i=$((i + 1))
  done
}
spawn mismatches

# a real signal sent to mpirun (as Slurm's --signal=B:USR1 would, via the batch script)
c="$tmp/sig"
run 2 "${base[@]}" -s run.epochs=200 -s run.dir="$c" >"$c.out" 2>&1 &
pid=$!
for _ in $(seq 1 100); do grep -q '"event":"checkpoint"' "$c/metrics.jsonl" 2>/dev/null && break; sleep 0.2; done
# signal mpirun itself (the background job is a subshell around it)
pkill -USR1 -f "^mpirun .*run.dir=$c" || pkill -USR1 -f "mpirun .*run.dir=$c"
wait "$pid"
rc=$?
expect "SIGUSR1 to mpirun: checkpoint and exit 75 (got $rc)" test "$rc" = 75
expect "SIGUSR1: the message tells how to resume" grep -q "rerun the same command to resume" "$c.out"

# a crash in the middle of a checkpoint write leaves the previous checkpoint intact
d="$tmp/crash"
KDP_FAULT_CKPT_SLEEP_MS=4000 run 2 "${base[@]}" -s run.dir="$d" >"$d.out" 2>&1 &
pid=$!
for _ in $(seq 1 150); do [ -d "$d/checkpoints/step-000000000020" ] && break; sleep 0.1; done
sleep 0.5
kill -9 "$pid" 2>/dev/null
pkill -9 -f "run.dir=$d" 2>/dev/null
wait "$pid" 2>/dev/null
expect "killed while writing step 20: it has no manifest" test ! -f "$d/checkpoints/step-000000000020/MANIFEST.kdpc"
expect "  ...and step 10 is complete" test -f "$d/checkpoints/step-000000000010/MANIFEST.kdpc"
run 2 "${base[@]}" -s run.dir="$d" >"$d.out2" 2>&1
rc=$?
expect "the restart resumes from step 10 and finishes (exit $rc)" test "$rc" = 0
expect "  ...from step 10" grep -q "resumed from the checkpoint at step 10" "$d.out2"
"$exe" inspect "$d/checkpoints/step-000000000030/peer-000.kdpc" >/dev/null 2>&1 || true

# the mismatches (run beside the cases above)
settle
b="$tmp/dml-b"
rc=$(rc_of "$tmp/mm1")
expect "resume with another peer count is refused (exit $rc)" test "$rc" != 0
expect "  ...naming the rank counts" grep -q "written by 2 ranks; this run has 3" "$tmp/mm1"
expect "resume with another architecture is refused" grep -q "model.arch was 'mlp(64,32)'" "$tmp/mm2"
expect "resume with another method is refused" grep -q "kd.method was 'dml'" "$tmp/mm3"
rc=$(rc_of "$tmp/mm4")
expect "a changed lr without the flag is refused (exit $rc)" test "$rc" != 0
expect "  ...and the message names the flag" grep -q -- "--allow-config-change" "$tmp/mm4"
rc=$(rc_of "$tmp/mm5")
expect "with --allow-config-change it resumes (exit $rc)" test "$rc" = 0
expect "  ...and logs the change" grep -q '"event":"config_change","key":"optim.lr"' "$tmp/mm5.metrics"
expect "--fresh starts over with another method (exit $(rc_of "$tmp/mm6"))" test "$(rc_of "$tmp/mm6")" = 0
expect "  ...and metrics.jsonl holds only the new run" test "$(grep -c '"event":"start"' "$b/metrics.jsonl")" = 1

# killing one rank (every method, mid-checkpoint, mid-evaluation): tests/test_kill.sh

# divergence (the runs started with the first ones): stops with the peer, step and term; rollback
# retries with a smaller lr
f="$tmp/div"
rc=$(rc_of "$f.out")
expect "divergence exits non-zero (got $rc)" test "$rc" = 1
expect "  ...naming the peer, step and term" grep -qE "divergence: peer [0-9], step [0-9]+: the .*(loss|logits|parameters)" "$f.out"
rc=$(rc_of "$f.rout")
expect "after a rollback the run finishes (exit $rc)" test "$rc" = 0
expect "rollback mode rolls back to the last checkpoint with a smaller lr" grep -q "rolled back to step 10 with lr scale 0.5" "$f.rout"
expect "  ...and logs it" grep -q '"event":"rollback"' "$f.r/metrics.jsonl"

# a finished run for the checks below: dml's uninterrupted one (one's resumed run under the
# sanitizers, which skip the uninterrupted runs; dml's resumed run.dir is reused above)
ref="$tmp/dml-a"
[ "$compare" = 1 ] || ref="$tmp/one-b"

# bad input: clear message, non-zero exit, nothing overwritten
g="$tmp/bad"
mkdir -p "$g"
printf 'not an idx file' >"$g/imgs"
"$exe" -s data.train_images="$g/imgs" -s run.dir="$g/run" >"$g.out" 2>&1
rc=$?
expect "a bad dataset file exits non-zero (got $rc)" test "$rc" != 0
expect "  ...naming the file and the problem" grep -q "$g/imgs.*magic" "$g.out"
cp "$(final_dir "$ref")/peer-000.kdpc" "$g/ck.kdpc"
printf '\x00' | dd of="$g/ck.kdpc" bs=1 seek=300 conv=notrunc 2>/dev/null
"$exe" inspect "$g/ck.kdpc" >"$g.out2" 2>&1
expect "a corrupted checkpoint is reported as a checksum mismatch" grep -q "checksum mismatch" "$g.out2"
head -c 100 "$(final_dir "$ref")/peer-000.kdpc" >"$g/trunc.kdpc"
"$exe" inspect "$g/trunc.kdpc" >"$g.out3" 2>&1
expect "a truncated checkpoint is reported as truncated" grep -q "truncated" "$g.out3"

# the deployable student
h="$ref"
"$exe" export "$h" --peer 1 -o "$tmp/student.kdpm" >/dev/null
expect "export writes a model file" test -s "$tmp/student.kdpm"
"$exe" eval "$tmp/student.kdpm" -s data.test_subset=1000 >"$tmp/ev" 2>&1
acc=$(awk '$1 == "model" && $2 ~ /%/ { sub("%", "", $2); print $2 }' "$tmp/ev")
last=$(grep '"event":"eval".*"model":"peer1"' "$h/metrics.jsonl" | tail -n 1 | sed 's/.*"acc":\([0-9.]*\).*/\1/')
expect "eval of the exported student ($acc%) equals the run's own last eval of peer1 ($last)" \
  awk -v a="$acc" -v b="$last" 'BEGIN { d = a / 100 - b; exit !(d < 1e-4 && d > -1e-4) }'
"$exe" predict "$tmp/student.kdpm" /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz --top >"$tmp/pred"
expect "predict prints one label per test image" test "$(wc -l <"$tmp/pred")" = 10000

finish resume
