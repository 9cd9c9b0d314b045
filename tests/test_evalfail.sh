#!/usr/bin/env bash
# A failed evaluation on one rank stops every rank (issue 11): KDP_TEST_EVAL_FAIL=1 fails rank 1's
# first evaluation (ffl's fused teacher); rank 0 must not wait in the next evaluation batch's
# gathers but stop as well, both ranks naming the failing peer, the step and the cause, exit 1.
# Usage: tests/test_evalfail.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
# 2 epochs of 8 steps; the evaluation after epoch 1 (step 8) fails; a test set of 3 eval batches
KDP_TEST_EVAL_FAIL=1 timeout 120 mpirun -np 2 --oversubscribe --bind-to none "$exe" \
  -s run.progress=plain -s run.dir="$tmp/run" -s kd.method=ffl -s data.subset=512 \
  -s data.test_subset=1200 -s run.epochs=2 -s "model.arch=mlp(64,32)" -s optim.batch_size=64 \
  >"$tmp/out" 2>&1
rc=$?
expect "the job ends with status 1, not by the timeout (rc=$rc)" [ "$rc" = 1 ]
cause='peer 1, step 8: evaluation failed: the fused.s evaluation failed (injected by KDP_TEST_EVAL_FAIL)'
expect "rank 1 names the peer, the step and the cause" grep -q "rank 1: $cause" "$tmp/out"
expect "rank 0 stops with rank 1's message" grep -q "rank 0: rank 1: $cause" "$tmp/out"
expect "no eval line of step 8 is written" \
  bash -c "! grep -q '\"step\":8,.*\"model\":\"fused\"' '$tmp/run/metrics.jsonl'"
[ "$fail" -gt 0 ] && cat "$tmp/out"
finish evalfail
