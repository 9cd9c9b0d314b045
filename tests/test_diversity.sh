#!/usr/bin/env bash
# The cohort's diversity at every evaluation, under mpirun: the metrics.jsonl lines and their
# ranges, zero for a cohort of identical peers, churn across a resume equal to an uninterrupted
# run's, and /metrics, /status and /history while a run trains.
# Usage: tests/test_diversity.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
for tool in curl jq; do
  command -v "$tool" >/dev/null || { echo "test_diversity: $tool is missing (launch/setup installs it)"; exit 77; }
done
run() {
  local np="$1"; shift
  timeout 300 mpirun -np "$np" --oversubscribe --bind-to none "$exe" -s run.progress=plain "$@"
}
# 8 steps an epoch, an evaluation at the end of each of the 3
small=(-s data.subset=512 -s data.test_subset=500 -s run.epochs=3 -s optim.batch_size=64
  -s "model.arch=mlp(32)")
div() { grep '"event":"diversity"' "$1/metrics.jsonl"; }

# --- dml, 3 heterogeneous peers: one line per evaluation, values in range, churn from the 2nd ---
d="$tmp/dml"
run 3 "${small[@]}" -s kd.method=dml -s "peer.1.arch=mlp(48,24)" -s run.dir="$d" >"$d.out" 2>&1
expect "dml, 3 peers: the run exits 0" test $? = 0
expect "dml: one diversity line per evaluation (3)" test "$(div "$d" | wc -l)" = 3
expect "dml: the first evaluation has no churn, the later ones 3 values" \
  test "$(div "$d" | jq -c '[.step, (.churn | length)]' | tr -d '\n')" = '[8,0][16,3][24,3]'
expect "dml: KL >= 0, 0 <= disagreement <= 1, churn in [0, 1]" \
  test "$(div "$d" | jq -s 'all(.kl >= 0 and .disagreement >= 0 and .disagreement <= 1 and
    ((.churn // []) | all(. >= 0 and . <= 1)))')" = true
expect "dml: peers that start apart disagree (disagreement > 0 and KL > 0 at step 8)" \
  test "$(div "$d" | jq -s '.[0].kl > 0 and .[0].disagreement > 0')" = true
expect "dml: curves.svg draws KL, disagreement and the mean churn in a diversity panel" \
  test "$(grep -c '<polyline class="diversity"' "$d/curves.svg")" = 3
expect "  ...with 3 points on KL's curve" \
  test "$(grep '<polyline class="diversity" data-series="diversity KL"' "$d/curves.svg" | sed 's/.*points="\([^"]*\)".*/\1/' | wc -w)" = 3

# --- identical peers (independent, every peer from peer 0's weights): diversity exactly 0 ---
d="$tmp/same"
KDP_TEST_SAME_INIT=1 run 2 "${small[@]}" -s kd.method=independent -s run.dir="$d" >"$d.out" 2>&1
expect "identical peers: the run exits 0" test $? = 0
expect "identical peers: KL = 0 and disagreement = 0 at all 3 evaluations" \
  test "$(div "$d" | jq -s 'length == 3 and all(.kl == 0 and .disagreement == 0)')" = true
expect "identical peers: both peers churn alike, and something changed (churn > 0)" \
  test "$(div "$d" | jq -s '[.[1:][] | .churn] | all(length == 2 and .[0] == .[1] and .[0] > 0)')" = true
d="$tmp/apart"
run 2 "${small[@]}" -s kd.method=independent -s run.dir="$d" >"$d.out" 2>&1
expect "independent peers from their own seeds: disagreement > 0" \
  test "$(div "$d" | jq -s 'all(.disagreement > 0 and .kl > 0)')" = true

# --- churn across a resume: stopped after the first evaluation (checkpoint at step 12), resumed,
# the diversity lines equal the uninterrupted run's ---
a="$tmp/ra" b="$tmp/rb"
rargs=("${small[@]}" -s kd.method=dml -s checkpoint.every_steps=100)
run 2 "${rargs[@]}" -s run.dir="$a" >"$a.out" 2>&1
expect "resume: uninterrupted run exits 0" test $? = 0
KDP_FAULT_SIGNAL_AT_STEP=11 run 2 "${rargs[@]}" -s run.dir="$b" >"$b.out1" 2>&1
expect "resume: a signal stops the run with exit 75" test $? = 75
run 2 "${rargs[@]}" -s run.dir="$b" >"$b.out2" 2>&1
expect "resume: the resumed run finishes" test $? = 0
expect "resume: it resumed from step 12" grep -q "resumed from the checkpoint at step 12" "$b.out2"
expect "resume: the diversity lines (churn included) equal the uninterrupted run's" \
  cmp -s <(div "$a") <(div "$b")
expect "  ...and the evaluation at step 16 has churn" \
  test "$(div "$b" | jq -s '.[1].churn | length')" = 2

# --- live: /metrics gauges, /status, the dashboard's diversity chart ---
d="$tmp/live"
serve_bg "$d" timeout 300 mpirun -np 2 --oversubscribe --bind-to none "$exe" -s run.progress=plain \
  -s run.dir="$d" -s run.epochs=5000 -s data.subset=256 -s data.test_subset=200 \
  -s optim.batch_size=64 -s "model.arch=mlp(16)" -s kd.method=dml
expect "live: the server started" test -n "$addr"
# /status and /metrics are separate snapshots, each refreshed on its own: wait for both to carry
# the second evaluation's churn
for _ in $(seq 1 300); do
  [ "$(curl -s "$addr/status" | jq '.diversity.churn | length' 2>/dev/null)" = 2 ] &&
    curl -s "$addr/metrics" | grep -q '^kdpeers_churn_ratio{peer="1"}' && break
  sleep 0.1
done
live_snapshot
expect "live: /status has diversity {kl, disagreement, churn[2]} in range" \
  jq -e '.diversity | .kl >= 0 and .disagreement >= 0 and .disagreement <= 1 and
    (.churn | length == 2 and all(. >= 0 and . <= 1))' "$tmp/status.json"
for m in kdpeers_diversity_kl kdpeers_diversity_disagreement 'kdpeers_churn_ratio{peer="0"}' \
  'kdpeers_churn_ratio{peer="1"}'; do
  expect "live: /metrics has $m" awk -v k="$m" '$1 == k { f = 1 } END { exit !f }' "$tmp/metrics.txt"
done
expect "live: /history declares the diversity chart and holds kl, disagreement and churn series" \
  jq -e '(.charts | map(.id) | index("diversity")) != null and
    ([.series[] | select(.chart == "diversity") | .name] | sort == ["churn.peer0","churn.peer1","disagreement","kl"])' \
  "$tmp/history.json"
wait "$last_pid"

finish test_diversity
