#!/usr/bin/env bash
# kdpeers under a real (one-node, throw-away) Slurm cluster: launch/kdpeers.sbatch runs 2 peers by
# srun --mpi=pmix; a USR1 to the batch shell checkpoints, exits 75, requeues the job and the
# requeued job resumes and finishes; the same with launch/kdpeers-mpirun.sbatch; without requeue the
# printed sbatch command resumes; a plain scancel stops it for good, also under mpirun with a slow
# checkpoint; srun without an MPI plugin (or no launcher at all) fails with an explanation. Needs root and Debian's slurm-wlm + munge (installed if missing); exits 77 (skip)
# only if they cannot be installed or started.   Usage: tests/test_slurm.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source=tests/slurm/cluster.sh
. "$src/tests/slurm/cluster.sh"
t0=$SECONDS

skip() {
  echo "slurm: SKIP - $1"
  exit 77
}
[ "$(id -u)" = 0 ] || skip "needs root (the test cluster runs slurmctld/slurmd as root)"
export PATH="$PATH:/usr/sbin"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  echo "slurm: installing slurm-wlm and munge"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge \
    >"$tmp/apt.log" 2>&1; then
    apt-get update -qq >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge \
      >"$tmp/apt.log" 2>&1 || skip "cannot install slurm-wlm munge: $(tail -n 2 "$tmp/apt.log")"
  fi
fi

cl="$tmp/cluster"
slurm_cpus=8 # (the sections run at once, below; not exported: kdpeers refuses unknown KDP_ variables)
export OMPI_MCA_mpi_yield_when_idle=1
chmod 755 "$tmp" # munged wants every directory above its socket open to all
trap 'slurm_down "$cl"; cleanup' EXIT
slurm_up "$cl" || skip "cannot start the test cluster: $slurm_why"
echo "# cluster up in $((SECONDS - t0)) s (SLURM_CONF=$SLURM_CONF)"
# the jobs run this build of kdpeers, from this checkout (absolute paths: jobs run elsewhere)
exe="$(cd "$(dirname "$exe")" && pwd)/$(basename "$exe")"
src="$(cd "$src" && pwd)"
export KDPEERS="$exe" KDP_ROOT="$src"
work="$cl/work"
cd "$work" || exit 1

ended() { case "$1" in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE) return 0 ;; esac; return 1; }
state() { scontrol show job "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
field() { scontrol show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }
# wait_done JOBID SECONDS: until the job has ended (COMPLETED, FAILED, ...), prints the state
wait_done() {
  local end=$((SECONDS + $2)) s
  while [ "$SECONDS" -lt "$end" ]; do
    s=$(state "$1")
    if ended "$s"; then
      echo "$s"
      return 0
    fi
    sleep 0.5
  done
  echo "TIMEOUT-WAITING($(state "$1"))"
}
# wait_for SECONDS CMD...: until CMD succeeds
wait_for() {
  local end=$((SECONDS + $1))
  shift
  local r
  while [ "$SECONDS" -lt "$end" ]; do
    "$@"
    r=$?
    [ "$r" = 0 ] && return 0
    [ "$r" = 2 ] && return 2
    sleep 0.2
  done
  return 1
}
restarted() {
  [ "$(field "$1" Restarts)" -ge 1 ] 2>/dev/null && return 0
  ended "$(state "$1")" && return 2
  return 1
}
# training DIR JOBID: the job has written a train line (fails at once if the job has ended)
training() {
  grep -q '"event":"train"' "$1/metrics.jsonl" 2>/dev/null && return 0
  ended "$(state "$2")" && return 2
  return 1
}
# shellcheck disable=SC2012
first_ckpt() { ls -d "$1"/checkpoints/step-* 2>/dev/null | head -n 1; }

small=(-s data.subset=2048 -s data.test_subset=500 -s "model.arch=mlp(64)" -s run.progress=plain)
# long enough to be mid-run when the signal lands (cosine schedule over 400 epochs), short overall
long=("${small[@]}" -s run.epochs=400 -s run.max_steps=2000 -s run.log_every=10)

expect "srun --mpi=list offers pmix" bash -c 'srun --mpi=list 2>&1 | grep -qw pmix'

# (a) a short real job, 2 tasks, srun --mpi=pmix
sec_a() {
  ta=$SECONDS
  a="$tmp/run-a"
  id=$(sbatch --parsable --ntasks=2 --time=5 --job-name=short "$src/launch/kdpeers.sbatch" \
    "${small[@]}" -s run.epochs=2 -s run.dir="$a")
  st=$(wait_done "$id" "$wait_limit")
  expect "(a) the job completes (state $st, exit $(field "$id" ExitCode))" test "$st" = COMPLETED
  expect "(a) the log goes to %x_%j = short_$id.out" test -s "short_$id.out"
  expect "(a) both peers trained in one MPI world of 2 ranks" grep -q '"event":"start","peers":2,"ranks":2' "$a/metrics.jsonl"
  for p in 0 1; do
    expect "(a) eval lines for peer$p" grep -q '"event":"eval".*"model":"peer'$p'"' "$a/metrics.jsonl"
  done
  expect "(a) a summary line" grep -q '"event":"summary"' "$a/metrics.jsonl"
  expect "(a) srun used the pmix plugin" grep -q 'srun --mpi=pmix' "short_$id.out"
  echo "# (a) $((SECONDS - ta)) s"
}

# (b) preemption: USR1 to the batch shell -> checkpoint, exit 75, requeue, resume, finish.
# run.dir is left to its default, runs/$SLURM_JOB_NAME.
sec_b() {
  tb=$SECONDS
  b="$work/runs/preempt"
  # --fresh: this submission starts over, the restarts must not
  id=$(sbatch --parsable --ntasks=2 --time=10 --job-name=preempt "$src/launch/kdpeers.sbatch" "${long[@]}" --fresh)
  if wait_for "$wait_limit" training "$b" "$id"; then
    ok "(b) the job is training in the default run.dir runs/preempt"
  else
    bad "(b) no train line in runs/preempt/metrics.jsonl (state $(state "$id"))"
  fi
  scancel --signal=USR1 --batch "$id"
  if wait_for "$wait_limit" restarted "$id"; then ok "(b) requeued: Restarts=1 (state $(state "$id"))"; else bad "(b) not requeued (state $(state "$id"), Restarts=$(field "$id" Restarts))"; fi
  # what a step stopped by the requeue can leave (the restart waits cred_expire = 10 s to start):
  # pmix would fail the restart's step 0 with "File exists"; the script removes them first
  mkdir -p "$cl/tmp/spmix_appdir_0_$id.0/0" "$cl/tmp/spmix_appdir_0_$id.1"
  log="preempt_$id.out"
  expect "(b) the batch shell forwarded the USR1" grep -q 'SIGUSR1: forwarding to srun' "$log"
  expect "(b) kdpeers exited 75 on every task" grep -q 'Exited with exit code 75' "$log"
  expect "(b) the script requeued the job" grep -q "requeued job $id" "$log"
  ck=$(first_ckpt "$b")
  expect "(b) it checkpointed (${ck#"$work/"}/MANIFEST.kdpc)" test -f "$ck/MANIFEST.kdpc"
  step=$(basename "${ck:-step-0}" | sed 's/^step-0*//')
  expect "(b) ...mid-run (step ${step:-?} < 2000)" test "${step:-2000}" -lt 2000
  st=$(wait_done "$id" "$wait_limit")
  expect "(b) the requeued job completes (state $st, exit $(field "$id" ExitCode))" test "$st" = COMPLETED
  expect "(b) the requeued run resumed from the checkpoint at step $step" grep -q "resumed from the checkpoint at step $step " "$log"
  expect "(b) the restart dropped --fresh" grep -q "restart 1: ignoring --fresh" "$log"
  expect "(b) the restart removed the stale pmix step dirs first" \
    grep -q "restart 1: removed what the stopped run left of Slurm's pmix step dirs: .*spmix_appdir_0_$id.0 .*spmix_appdir_0_$id.1" "$log"
  expect "(b) both runs logged to the same %x_%j file (restart 0 and restart 1)" grep -q "restart 1 on" "$log"
  expect "(b) it finished: summary line" grep -q '"event":"summary"' "$b/metrics.jsonl"
  expect "(b) ...at step 2000" test -d "$b/checkpoints/step-000000002000"
  expect "(b) one start line per run, the second resumed at $step" grep -q "\"resumed_at\":$step}" "$b/metrics.jsonl"
  echo "# (b) $((SECONDS - tb)) s"
}

# (k) elastic: a 3-task job (KDP_ELASTIC=1), preempted, requeued with 2 tasks (as Slurm may do
# with --ntasks or --nodes=MIN-MAX): the restart resumes with the 2 first peers (--resume-as auto)
sec_k() {
  tk=$SECONDS
  k="$tmp/run-k"
  id=$(KDP_ELASTIC=1 sbatch --parsable --overcommit --ntasks=3 --time=10 --job-name=elastic \
    "$src/launch/kdpeers.sbatch" "${long[@]}" -s kd.method=dml -s run.dir="$k")
  if wait_for "$wait_limit" training "$k" "$id"; then ok "(k) the 3-task job is training"; else bad "(k) no train line (state $(state "$id"))"; fi
  scancel --signal=USR1 --batch "$id"
  if wait_for "$wait_limit" restarted "$id"; then ok "(k) requeued after USR1"; else bad "(k) not requeued (state $(state "$id"))"; fi
  scontrol update JobId="$id" NumTasks=2
  expect "(k) the requeued job now asks for 2 tasks" test "$(field "$id" NumTasks)" = 2
  st=$(wait_done "$id" "$wait_limit")
  log="elastic_$id.out"
  expect "(k) the requeued job completes (state $st)" test "$st" = COMPLETED
  expect "(k) the first start had 3 peers" grep -q '"event":"start","peers":3,"ranks":3' "$k/metrics.jsonl"
  expect "(k) the restart ran 2 tasks with --resume-as auto" grep -q "restart 1 on .*: 2 tasks" "$log"
  expect "(k) ...and resized the cohort 3 -> 2, keeping peers 0 and 1" \
    grep -q '"event":"resize","step":[0-9]*,"from":3,"to":2,"kept":\[0,1\]' "$k/metrics.jsonl"
  expect "(k) ...and finished on 2 ranks" test -f "$k/checkpoints/step-000000002000/peer-001.kdpc" -a ! -f "$k/checkpoints/step-000000002000/peer-002.kdpc"
  echo "# (k) $((SECONDS - tk)) s"
}

# (c) the same cycle with launch/kdpeers-mpirun.sbatch (mpirun inside the allocation)
sec_c() {
  tc=$SECONDS
  c="$tmp/run-c"
  id=$(sbatch --parsable --ntasks=2 --time=10 --job-name=viampirun "$src/launch/kdpeers-mpirun.sbatch" \
    "${long[@]}" -s run.dir="$c")
  wait_for "$wait_limit" training "$c" "$id" || bad "(c) no train line (state $(state "$id"))"
  scancel --signal=USR1 --batch "$id"
  if wait_for "$wait_limit" restarted "$id"; then ok "(c) mpirun: requeued after USR1"; else bad "(c) mpirun: not requeued (state $(state "$id"))"; fi
  log="viampirun_$id.out"
  expect "(c) mpirun forwarded the USR1" grep -q 'Forwarding signal 10' "$log"
  expect "(c) it checkpointed" test -f "$(first_ckpt "$c")/MANIFEST.kdpc"
  st=$(wait_done "$id" "$wait_limit")
  expect "(c) the requeued job completes (state $st)" test "$st" = COMPLETED
  expect "(c) it resumed" grep -q "resumed from the checkpoint at step" "$log"
  expect "(c) summary line" grep -q '"event":"summary"' "$c/metrics.jsonl"
  expect "(c) 2 ranks under mpirun" grep -q '"event":"start","peers":2,"ranks":2' "$c/metrics.jsonl"
  echo "# (c) $((SECONDS - tc)) s"
}

# (d) a job that may not be requeued: exit 75 stays visible and the printed command resumes
sec_d() {
  td=$SECONDS
  d="$tmp/run-d"
  id=$(sbatch --parsable --no-requeue --ntasks=2 --time=10 --job-name=norequeue "$src/launch/kdpeers.sbatch" \
    "${long[@]}" -s run.dir="$d" --fresh)
  wait_for "$wait_limit" training "$d" "$id" || bad "(d) no train line (state $(state "$id"))"
  scancel --signal=USR1 --batch "$id"
  st=$(wait_done "$id" "$wait_limit")
  expect "(d) --no-requeue: the job ends FAILED with exit 75 (state $st, $(field "$id" ExitCode))" \
    test "$st/$(field "$id" ExitCode)" = "FAILED/75:0"
  log="norequeue_$id.out"
  expect "(d) the log says how to resume" grep -q 'to resume, resubmit' "$log"
  expect "(d) ...without --fresh" bash -c "grep -A1 'to resume, resubmit' '$log' | tail -n 1 | grep -qv -- --fresh"
  resub=$(grep -A1 'to resume, resubmit' "$log" | tail -n 1)
  id2=$(eval "${resub/ sbatch / sbatch --parsable }")
  if [[ "$id2" =~ ^[0-9]+$ ]]; then
    st=$(wait_done "$id2" "$wait_limit")
    expect "(d) the printed sbatch command runs (state $st)" test "$st" = COMPLETED
    expect "(d) ...and resumes from the checkpoint" grep -q "resumed from the checkpoint at step" "norequeue_$id2.out"
    expect "(d) ...and finishes" grep -q '"event":"summary"' "$d/metrics.jsonl"
  else
    bad "(d) the printed command does not submit: $resub"
  fi
  echo "# (d) $((SECONDS - td)) s"
}

# (e) a plain scancel means stop: the tasks get SIGTERM from Slurm, checkpoint, and the job is not
# requeued (the log tells how to resume)
sec_e() {
  tg=$SECONDS
  g="$tmp/run-g"
  id=$(sbatch --parsable --ntasks=2 --time=10 --job-name=cancelled "$src/launch/kdpeers.sbatch" \
    "${long[@]}" -s run.dir="$g")
  wait_for "$wait_limit" training "$g" "$id" || bad "(e) no train line (state $(state "$id"))"
  scancel "$id"
  st=$(wait_done "$id" "$wait_limit")
  log="cancelled_$id.out"
  expect "(e) scancel: the job ends CANCELLED (state $st)" test "$st" = CANCELLED
  expect "(e) ...not requeued (Restarts=$(field "$id" Restarts))" test "$(field "$id" Restarts)" = 0
  expect "(e) ...after a checkpoint on SIGTERM (exit 75)" grep -q 'Exited with exit code 75' "$log"
  expect "(e) ...which is there" test -f "$(first_ckpt "$g")/MANIFEST.kdpc"
  expect "(e) ...and the log says why and how to resume" grep -q 'not requeued' "$log"
  sleep 2
  expect "(e) ...and it stays down" test "$(state "$id")" = CANCELLED
  echo "# (e) $((SECONDS - tg)) s"
}

# (h) job arrays: task N runs with run.seed = N in runs/$SLURM_JOB_NAME/N and logs to %x_%A_%a.out;
# the checkout is found without KDP_ROOT although scontrol names every task of the array; a USR1 to
# task 1 requeues task 1 alone. Each task runs the long run's 2,000 steps: 400 ended before the
# USR1 arrived on a quiet machine (task 1 COMPLETED, not requeued)
sec_h() {
  th=$SECONDS
  id=$(env -u KDP_ROOT sbatch --parsable --array=1-2 --ntasks=2 --time=10 --job-name=arr \
    "$src/launch/kdpeers.sbatch" "${long[@]}" --fresh)
  id="${id%%;*}"
  if wait_for "$wait_limit" training "$work/runs/arr/1" "${id}_1"; then
    ok "(h) array task 1 is training in runs/arr/1"
  else
    bad "(h) array task 1 is not training in runs/arr/1 (state $(state "${id}_1"))"
  fi
  scancel --signal=USR1 --batch "${id}_1"
  if wait_for "$wait_limit" restarted "${id}_1"; then ok "(h) task 1 requeued after USR1"; else bad "(h) task 1 not requeued (state $(state "${id}_1"))"; fi
  st1=$(wait_done "${id}_1" "$wait_limit")
  st2=$(wait_done "${id}_2" "$wait_limit")
  expect "(h) both array tasks complete (states $st1, $st2)" test "$st1/$st2" = COMPLETED/COMPLETED
  expect "(h) the USR1 requeued task 1 only (task 2: Restarts=$(field "${id}_2" Restarts))" test "$(field "${id}_2" Restarts)" = 0
  for t in 1 2; do
    expect "(h) task $t logged to %x_%A_%a = arr_${id}_$t.out" grep -q "kdpeers finished in" "arr_${id}_$t.out"
    expect "(h) task $t trained with run.seed = $t in runs/arr/$t" grep -q "\"seed\":$t," "$work/runs/arr/$t/metrics.jsonl"
    expect "(h) task $t finished (summary line)" grep -q '"event":"summary"' "$work/runs/arr/$t/metrics.jsonl"
  done
  expect "(h) no task lost the checkout" bash -c "! grep -q 'cannot find the kdpeers checkout' arr_${id}_*.out arr_*.out"
  expect "(h) task 1 resumed in its own run.dir" grep -q "resumed from the checkpoint at step" "arr_${id}_1.out"
  echo "# (h) $((SECONDS - th)) s"
}

# (i) an array over a settings file: line N is task N's arguments
sec_i() {
  ti=$SECONDS
  printf '# method per task\n-s kd.method=independent -s run.seed=5\n\n-s kd.method=avg -s run.seed=5 -s run.dir=%s\n' \
    "$tmp/run-i2" >"$tmp/settings.txt"
  id=$(KDP_ARRAY_SETTINGS="$tmp/settings.txt" sbatch --parsable --array=1-2 --ntasks=2 --time=5 \
    --job-name=sweep "$src/launch/kdpeers.sbatch" "${small[@]}" -s run.epochs=1 -s run.dir="$tmp/run-i")
  id="${id%%;*}"
  st1=$(wait_done "${id}_1" "$wait_limit")
  st2=$(wait_done "${id}_2" "$wait_limit")
  expect "(i) both tasks complete ($st1, $st2)" test "$st1/$st2" = COMPLETED/COMPLETED
  expect "(i) task 1 ran its line (independent) in run.dir/1" grep -q '"method":"independent".*"seed":5,' "$tmp/run-i/1/metrics.jsonl"
  expect "(i) task 2 ran its line (avg) in the run.dir its line chose" grep -q '"method":"avg".*"seed":5,' "$tmp/run-i2/metrics.jsonl"
  id=$(KDP_ARRAY_SETTINGS="$tmp/settings.txt" sbatch --parsable --array=3 --ntasks=2 --time=5 \
    --job-name=sweep "$src/launch/kdpeers.sbatch" "${small[@]}")
  id="${id%%;*}"
  st=$(wait_done "${id}_3" "$wait_limit")
  expect "(i) a task beyond the file's lines stops (state $st)" test "$st" = FAILED
  expect "(i) ...saying how many lines there are" grep -q "has 2 settings lines, counted from 1: submit with --array=1-2" "sweep_${id}_3.out"
  echo "# (i) $((SECONDS - ti)) s"
}

# (j) launch/compare --slurm: the whole sweep as one array job, the table when it ends; resumable
sec_j() {
  tj=$SECONDS
  compare_ok "(j) compare --slurm" cmp --slurm --sbatch "--time=5" -np 2 --seeds 1 \
    --methods dml,independent --runs "$tmp/cmp" -- "${small[@]}" -s run.epochs=1
  cmp_out=$(cat "$tmp/cmp.out")
  expect "(j) one array job of 2 tasks" grep -q "submitting 2 runs as one array job" "$tmp/cmp.err"
  expect "(j) the table's rows are in the order asked (dml, then independent)" \
    test "$(grep -o '^| `[a-z]*`' <<<"$cmp_out" | tr -d '|` ' | tr '\n' ,)" = "dml,independent,"
  expect "(j) dml's gain against independent is filled in" grep -qE '^\| `dml` \| 1 \| [0-9.]+ \+- [0-9.]+ \| [+-][0-9.]+ \+- ' <<<"$cmp_out"
  expect "(j) wall time per run to 0.1 s" grep -qE '^\| `independent` .* \| [0-9]+\.[0-9] \|$' <<<"$cmp_out"
  "$src/launch/compare" --slurm -np 2 --seeds 1 --methods dml,independent --runs "$tmp/cmp" \
    -- "${small[@]}" -s run.epochs=1 >"$tmp/cmp2.out" 2>"$tmp/cmp2.err"
  expect "(j) run again: nothing is submitted, the finished runs are kept" \
    bash -c "grep -q '2 finished runs kept' '$tmp/cmp2.err' && ! grep -q submitting '$tmp/cmp2.err'"
  expect "(j) ...and the same table" test "$(grep '^| `' "$tmp/cmp2.out")" = "$(grep '^| `' <<<"$cmp_out")"
  # --peers: one array job per number of peers (P tasks each), submitted together; one table
  compare_ok "(j) compare --slurm --peers 1,2" cmpp --slurm --sbatch "--time=5" --peers 1,2 --seeds 1 \
    --methods independent --runs "$tmp/cmpp" -- "${small[@]}" -s run.epochs=1
  expect "(j) ...one array job of 1 task and one of 2 tasks" \
    bash -c "grep -q 'one array job of 1 tasks each' '$tmp/cmpp.err' && grep -q 'one array job of 2 tasks each' '$tmp/cmpp.err'"
  expect "(j) ...and the table has both P groups" \
    test "$(p_rows "$tmp/cmpp.out" ' 1 \| [0-9.]+ \+- ')" = "1independent,2independent,"
  echo "# (j) $((SECONDS - tj)) s"
}
# (e2) the same under kdpeers-mpirun.sbatch, with a stop checkpoint (4 s) longer than the ~2 s
# mpirun leaves the ranks after Slurm's SIGTERM by default: the script's kill delay lets it finish
sec_e2() {
  th=$SECONDS
  h="$tmp/run-h"
  id=$(KDP_FAULT_CKPT_SLEEP_MS=4000 sbatch --parsable --ntasks=2 --time=10 --job-name=cancelmpi \
    "$src/launch/kdpeers-mpirun.sbatch" "${long[@]}" -s run.dir="$h")
  wait_for "$wait_limit" training "$h" "$id" || bad "(e2) no train line (state $(state "$id"))"
  scancel "$id"
  st=$(wait_done "$id" "$wait_limit")
  log="cancelmpi_$id.out"
  expect "(e2) mpirun: scancel ends the job CANCELLED (state $st)" test "$st" = CANCELLED
  ck=$(first_ckpt "$h")
  expect "(e2) ...after the 4 s stop checkpoint completed (${ck##*/}/MANIFEST.kdpc)" test -f "$ck/MANIFEST.kdpc"
  expect "(e2) ...and the script reports kdpeers' 75 although mpirun exited 1" grep -q 'kdpeers stopped after a checkpoint (exit 75)' "$log"
  echo "# (e2) $((SECONDS - th)) s"
}

# The sections above run at once, 4 at a time, the longest first (checks_bg, tests/lib.sh: each
# section's own jobs and checks, its output printed whole when all are done). Their jobs mostly
# wait (on the scheduler, the requeue delay, signals), so the test cluster's node claims 8 CPUs
# (slurm_cpus: 4 two-task jobs beside each other) and waiting ranks yield their core (mpi_yield_when_idle).
# Every wait above is on a condition; the limit ($wait_limit s, tests/lib.sh) is a last resort.
par_max=4
for s in h d c k b j i e2 e a; do checks_bg "$s" "sec_$s"; done
checks_collect

# (f) the silent singleton: tasks that are not wired into one MPI world must not train alone
out=$(timeout 60 srun --mpi=none -n 2 "$exe" "${small[@]}" -s run.epochs=1 -s run.dir="$tmp/run-e1" 2>&1)
rc=$?
expect "(f) srun --mpi=none -n 2 kdpeers fails (exit $rc)" test "$rc" != 0
# Debian's Open MPI refuses a direct launch without PMI in MPI_Init itself; an MPI that starts
# singletons reaches kdpeers' own check
if grep -q 'SLURM_NTASKS' <<<"$out"; then
  ok "(f) ...kdpeers explains (SLURM_NTASKS)"
elif grep -q 'direct launched using "srun"' <<<"$out"; then
  ok "(f) ...Open MPI refuses the direct launch without PMI before kdpeers' check (explains srun/PMI)"
else
  bad "(f) ...without an explanation: $(tail -n 3 <<<"$out")"
fi
expect "(f) ...and trained nothing" test ! -f "$tmp/run-e1/metrics.jsonl"
# no launcher at all inside a 2-task allocation: kdpeers' check itself
out=$(timeout 60 salloc -n 2 "$exe" "${small[@]}" -s run.epochs=1 -s run.dir="$tmp/run-e2" 2>&1)
rc=$?
expect "(f) salloc -n 2 kdpeers (no srun/mpirun) stops (exit $rc)" test "$rc" = 2
expect "(f) ...with kdpeers' SLURM_NTASKS explanation" grep -q 'SLURM_NTASKS=2 but MPI reports a world of 1' <<<"$out"

# (g) two live jobs cannot share a run.dir (the batch script's lock), checked without the cluster
mkdir -p "$tmp/run-f"
exec 8>>"$tmp/run-f/.slurm.lock"
flock -n 8
out=$(SLURM_JOB_ID=1 SLURM_JOB_NAME=f timeout 30 bash "$src/launch/kdpeers.sbatch" -s run.dir="$tmp/run-f" 2>&1)
rc=$?
expect "(g) a second job on a locked run.dir stops (exit $rc)" test "$rc" = 2
expect "(g) ...saying the run.dir is in use" grep -q 'is in use by another job' <<<"$out"
exec 8>&-

echo "# total $((SECONDS - t0)) s"
if [ "$fail" != 0 ]; then
  echo "# slurmctld log tail:"
  tail -n 20 "$cl/log/slurmctld.log" 2>/dev/null | sed 's/^/#   /'
  for f in "$work"/*.out; do
    echo "# $f:"
    grep -v -E '"?eval epoch|step [0-9]+/' "$f" | tail -n 15 | sed 's/^/#   /'
  done
fi
finish slurm
