#!/usr/bin/env bash
# switokd and frozen teachers under mpirun (issue 12; switokd's pausing teacher, expert counts and
# bitwise resume are in test_resume.sh):
#  - switokd: /metrics and /status carry the last epoch's expert fraction and the students' mean;
#    kdpeers serve of the run replays the expert fraction (and validation accuracy) into /history;
#  - a frozen teacher (peer.N.teacher = a model file from kdpeers export): a cnn trained briefly,
#    joined to 2 mlp peers under dml, has the same test accuracy at every evaluation, equal to
#    kdpeers predict's on the same test images; its weights in the checkpoint are the file's;
#    methods it cannot join, a missing file and a changed file on resume are refused.
# Usage: tests/test_switokd.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
for tool in curl jq; do
  command -v "$tool" >/dev/null || { echo "test_switokd: needs $tool"; exit 1; }
done
run() {
  local np="$1"; shift
  timeout 300 mpirun -np "$np" --oversubscribe --bind-to none "$exe" -s run.progress=plain "$@"
}
final_dir() { ls -d "$1"/checkpoints/step-* | tail -n 1; }
acc_of() { jq -r "select(.event == \"eval\" and .model == \"$2\") | .acc" "$1/metrics.jsonl"; }

# live: /metrics and /status carry the last epoch's expert fraction
d="$tmp/sw-live"
serve_bg "$d" timeout 300 mpirun -np 2 --oversubscribe --bind-to none "$exe" -s run.progress=plain \
  -s run.dir="$d" -s run.epochs=5000 -s data.subset=256 -s data.test_subset=200 \
  -s optim.batch_size=64 -s "model.arch=mlp(16)" -s kd.method=switokd -s data.val_size=64
expect "switokd live: the server started" test -n "$addr"
for _ in $(seq 1 300); do
  curl -s "$addr/status" | jq -e '.switokd.expert_fraction >= 0' >/dev/null 2>&1 &&
    curl -s "$addr/metrics" | grep -q '^kdpeers_switokd_expert_ratio ' && break
  sleep 0.1
done
curl -s "$addr/status" >"$tmp/status.json"
curl -s "$addr/metrics" >"$tmp/metrics.txt"
curl -s -X POST "$addr/control" -d '{"action":"stop"}' >/dev/null
expect "switokd live: /status has switokd {epoch, expert_fraction in [0, 1]}" \
  jq -e '.switokd | .epoch >= 1 and .expert_fraction >= 0 and .expert_fraction <= 1' "$tmp/status.json"
expect "switokd live: /metrics has kdpeers_switokd_expert_ratio" \
  grep -q '^kdpeers_switokd_expert_ratio [0-9.e+-]*$' "$tmp/metrics.txt"
expect "switokd live: /status has the students' mean" jq -e '.eval.students.acc >= 0' "$tmp/status.json"
wait "$last_pid"
# kdpeers serve of the stopped run (its 2 ranks): the dashboard's history is replayed from
# metrics.jsonl, switokd's expert fraction and the validation accuracy with the rest
rm -f "$d/server.addr"
serve_bg "$d" timeout 120 mpirun -np 2 --oversubscribe --bind-to none "$exe" serve "$d" -s run.progress=plain
curl -s "$addr/history" >"$tmp/serve-h.json"
curl -s -X POST "$addr/control" -d '{"action":"stop"}' >/dev/null
wait "$last_pid"
points() { jq "[.series[] | select(.chart == \"$1\" and .name == \"$2\") | .x[]] | length" "$tmp/serve-h.json"; }
n_sw=$(grep -c '"event":"switokd"' "$d/metrics.jsonl")
expect "switokd serve: /history replays the expert fraction of every epoch ($(points switokd expert_fraction) of $n_sw)" \
  test "$(points switokd expert_fraction)" = "$n_sw" -a "$n_sw" -gt 0
n_val=$(grep -c '"event":"eval".*"model":"peer0".*"val_acc"' "$d/metrics.jsonl")
expect "  ...and peer0's validation accuracy at every evaluation ($(points val_accuracy peer0) of $n_val)" \
  test "$(points val_accuracy peer0)" = "$n_val" -a "$n_val" -gt 0

# --- a frozen teacher: a cnn trained for one epoch, exported, joined to 2 mlp peers under dml ---
small=(-s data.subset=1024 -s data.test_subset=1000 -s optim.batch_size=64)
t="$tmp/teacher"
run 1 "${small[@]}" -s run.epochs=1 -s model.arch=cnn -s run.dir="$t" >"$t.out" 2>&1
"$exe" export "$t" --peer 0 -o "$t.kdpm" >/dev/null 2>&1
expect "frozen: a cnn trained and exported" test -s "$t.kdpm"
cp "$t.kdpm" "$tmp/original.kdpm"
# another cnn (2 steps): the same arch, other weights
run 1 "${small[@]}" -s run.max_steps=2 -s model.arch=cnn -s run.dir="$t-2" >/dev/null 2>&1
"$exe" export "$t-2" --peer 0 -o "$tmp/other.kdpm" >/dev/null 2>&1
fz=("${small[@]}" -s run.epochs=3 -s kd.method=dml -s "model.arch=mlp(32)" -s peer.0.teacher="$t.kdpm"
  -s checkpoint.every_steps=8)
f="$tmp/frozen"
# stopped after step 24, resumed once the file changed (refused) and once it is back
KDP_FAULT_SIGNAL_AT_STEP=23 run 3 "${fz[@]}" -s run.dir="$f" >"$f.out1" 2>&1
expect "frozen: the cohort (frozen cnn + 2 mlp) trains and stops on a signal (exit $?)" \
  test -f "$f/checkpoints/step-000000000024/MANIFEST.kdpc"
cp "$tmp/other.kdpm" "$t.kdpm"
run 3 "${fz[@]}" -s run.dir="$f" >"$f.out2" 2>&1
rc=$?
expect "frozen: a changed model file is refused on resume (exit $rc)" test "$rc" != 0
expect "  ...saying the file changed since the checkpoint" grep -q "changed since the checkpoint" "$f.out2"
cp "$tmp/original.kdpm" "$t.kdpm"
run 3 "${fz[@]}" -s run.dir="$f" >"$f.out3" 2>&1
expect "frozen: with the original file back it resumes and finishes (exit $?)" \
  grep -q '"event":"summary"' "$f/metrics.jsonl"
mapfile -t accs < <(acc_of "$f" peer0)
expect "frozen: 3 evaluations of the teacher (${accs[*]})" test "${#accs[@]}" = 3
expect "frozen: the teacher's test accuracy is the same number at every evaluation" \
  test "$(printf '%s\n' "${accs[@]}" | sort -u | wc -l)" = 1
"$exe" predict "$t.kdpm" /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz --no-pack 2>/dev/null |
  head -n 1000 | awk '{ print $2 }' >"$tmp/pred.labels"
hits=$(python3 - "$tmp/pred.labels" <<'EOF'
import gzip, sys
lab = gzip.open("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").read()[8:]
pred = [int(l) for l in open(sys.argv[1])]
print(sum(1 for i, p in enumerate(pred) if p == lab[i]))
EOF
)
expect "frozen: it equals kdpeers predict's accuracy on the same 1000 test images ($hits / 1000 vs ${accs[0]})" \
  awk -v h="$hits" -v a="${accs[0]}" 'BEGIN { exit !(h / 1000 == a) }'
expect "frozen: the students learn (peer1 accuracy rises)" \
  awk 'NR == 1 { f = $1 } END { exit !($1 > f) }' <(acc_of "$f" peer1)
expect "frozen: a students' mean eval line per evaluation" test "$(acc_of "$f" students | wc -l)" = 3
ff=$(final_dir "$f")
expect "frozen: its checkpoint names the file" \
  test "$(entry "$ff/peer-000.kdpc" frozen.teacher)" = "\"$t.kdpm\""
expect "frozen: peer 0's arch came from the file (cnn)" test "$(entry "$ff/peer-000.kdpc" arch)" = '"cnn"'
expect "frozen: it never took an optimizer step" test "$(entry "$ff/peer-000.kdpc" opt_steps)" = 0
"$exe" export "$f" --peer 0 -o "$tmp/again.kdpm" >/dev/null 2>&1
expect "frozen: its weights after training are the file's (exported again: the same predictions)" \
  cmp -s <("$exe" predict "$t.kdpm" /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz --no-pack | head -n 200) \
  <("$exe" predict "$tmp/again.kdpm" /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz --no-pack | head -n 200)

# refusals at the config check (exit 2)
run 3 "${fz[@]}" -s kd.method=ffl -s run.dir="$tmp/ffl" >"$tmp/ffl.out" 2>&1
rc=$?
expect "frozen: ffl (a module trained through the peers' features) is refused at the config check (exit $rc)" test "$rc" = 2
expect "  ...naming the methods that accept a frozen peer" grep -q "methods that accept one: independent, dml, codistill, avg" "$tmp/ffl.out"
run 3 "${fz[@]}" -s peer.0.teacher="$tmp/none.kdpm" -s run.dir="$tmp/none" >"$tmp/none.out" 2>&1
rc=$?
expect "frozen: a missing model file is refused at the config check (exit $rc)" test "$rc" = 2
expect "  ...naming peer.0.teacher" grep -q "peer.0.teacher" "$tmp/none.out"
run 3 "${fz[@]}" -s "peer.0.arch=mlp(16)" -s run.dir="$tmp/arch" >"$tmp/arch.out" 2>&1
rc=$?
expect "frozen: a peer.0.arch other than the file's is refused (exit $rc)" test "$rc" = 2

finish test_switokd
