#!/usr/bin/env bash
# The EMA copies (run.ema_decay) and pcl under mpirun: a pcl run of heterogeneous peers (mlp + cnn,
# so the EMA averages batchnorm statistics too) stopped and resumed ends bitwise where the
# uninterrupted one does (weights, EMA copies, module, eval lines incl. peerN.ema and pcl); with a
# decay of ~0 every peerN.ema scores as peerN on a per-peer layout (2+1 ranks, mlp + cnn), so the
# copy follows the right weights and statistics, and /status, /metrics and /history show it;
# /predict of kdpeers serve on the pcl run answers with the pcl teacher; an elastic shrink carries a kept peer's EMA over
# bitwise and a grown peer's EMA starts at the resume.   Usage: tests/test_ema.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
run() { mpi_run "$@"; }
digests() { ckpt_digests "$1"; }
scalar() { "$exe" inspect "$1" | awk -v k="$2" '$1 == k { print $NF }'; }
step_dir() { printf '%s/checkpoints/step-%012d' "$1" "$2"; }
evals() { grep '"event":"eval"' "$1/metrics.jsonl"; }
base=(-s data.subset=512 -s data.test_subset=100 -s "model.arch=mlp(32)" -s optim.batch_size=64
  -s run.log_every=4 -s checkpoint.every_steps=4 -s checkpoint.keep=5)
# 512 / 64 = 8 steps an epoch

# ---- pcl, mlp + cnn: stopped at step 3 and resumed = uninterrupted, bitwise ----
a="$tmp/pcl-a" b="$tmp/pcl-b"
pcl=("${base[@]}" -s run.epochs=1 -s kd.method=pcl -s peer.1.arch=cnn)
run 2 "${pcl[@]}" -s run.dir="$a" >"$a.out" 2>&1
rc=$?
expect "pcl, mlp + cnn peers: trains (exit $rc)" test "$rc" = 0
[ "$rc" = 0 ] || tail -n 20 "$a.out"
expect "  ...evaluates peer0, peer0.ema, peer1, peer1.ema, ensemble and its teacher pcl" \
  test "$(evals "$a" | tail -n 6 | sed 's/.*"model":"\([^"]*\)".*/\1/' | tr '\n' ' ')" = "peer0 peer0.ema peer1 peer1.ema ensemble pcl "
expect "  ...its decay is the default 0.999, and the copy is checkpointed" \
  test "$(scalar "$(step_dir "$a" 8)/peer-001.kdpc" ema.decay)" = 0.999 -a \
  "$(scalar "$(step_dir "$a" 8)/peer-001.kdpc" ema.steps)" = 8
# kdpeers serve (the run's 2 ranks): /predict answers with every peer, the ensemble and pcl
rm -f "$a/server.addr"
serve_bg "$a" timeout 120 mpirun -np 2 --oversubscribe --bind-to none "$exe" serve "$a" -s run.progress=plain
gzip -dc /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz | tail -c +17 | head -c $((3 * 784)) |
  od -An -tu1 -v | tr -s ' \n' ' ' | awk '{ printf "{\"inputs\":["; for (i = 0; i < 3; i++) { printf "%s[", (i ? "," : "");
    for (j = 1; j <= 784; j++) printf "%s%s", (j > 1 ? "," : ""), $(i * 784 + j); printf "]" } printf "]}" }' >"$tmp/pred.json"
expect "pcl: kdpeers serve's /predict answers with the pcl teacher" \
  test "$(curl -s -X POST "$addr/predict" --data @"$tmp/pred.json" | jq -r '[(.peers | length), .teacher.name, (.teacher.probs | length)] | @tsv')" = "$(printf '2\tpcl\t3')"
curl -s -X POST "$addr/control" -d '{"action":"stop"}' >/dev/null
wait "$last_pid"
KDP_FAULT_SIGNAL_AT_STEP=2 run 2 "${pcl[@]}" -s run.dir="$b" >"$b.out1" 2>&1
expect "pcl: a signal stops the run at step 3 (exit $?)" test -f "$(step_dir "$b" 3)/MANIFEST.kdpc"
run 2 "${pcl[@]}" -s run.dir="$b" >"$b.out2" 2>&1
expect "pcl: the rerun resumes from step 3 and finishes (exit $?)" grep -q "resumed from the checkpoint at step 3" "$b.out2"
for r in 0 1; do
  expect "pcl: rank $r's final weights, EMA copy (params, BN stats), module bitwise identical" \
    cmp -s <(digests "$(step_dir "$a" 8)/peer-00$r.kdpc") <(digests "$(step_dir "$b" 8)/peer-00$r.kdpc")
done
expect "pcl: identical eval lines (peers, their EMA copies, ensemble, pcl)" \
  cmp -s <(evals "$a") <(evals "$b")

# ---- run.ema_decay ~ 0: the copy is the peer (2+1 ranks, mlp + cnn, independent); live, so
# /status, /metrics and the dashboard's history show peerN.ema; ended by a stop command ----
c="$tmp/ema0"
serve_bg "$c" mpi_run 3 "${base[@]}" -s run.epochs=5000 -s kd.method=independent \
  -s run.ema_decay=1e-9 -s peer.0.ranks_per_peer=2 -s peer.1.arch=cnn -s run.dir="$c"
expect "independent, 2+1 ranks, run.ema_decay = 1e-9: the live run started" test -n "$addr"
for _ in $(seq 1 1200); do
  [ "$(curl -s "$addr/status" | jq '.eval | has("peer1.ema")' 2>/dev/null)" = true ] &&
    curl -s "$addr/metrics" | grep -q '^kdpeers_test_accuracy_ratio{model="peer1.ema"}' && break
  sleep 0.1
done
live_snapshot
wait "$last_pid"
expect "  .../status has peer0.ema and peer1.ema beside the peers" \
  jq -e '.eval | has("peer0") and has("peer0.ema") and has("peer1.ema")' "$tmp/status.json"
expect "  .../metrics has kdpeers_test_accuracy_ratio{model=\"peer0.ema\"}" \
  grep -q '^kdpeers_test_accuracy_ratio{model="peer0.ema"}' "$tmp/metrics.txt"
expect "  .../history holds the peer0.ema test accuracy series" \
  jq -e '[.series[] | select(.chart == "test_accuracy") | .name] | index("peer0.ema") != null' "$tmp/history.json"
pairs=$(evals "$c" | grep '"model":"peer' | sed 's/.*"model":"\(peer[0-9]\)\(\.ema\)\{0,1\}","acc":\([^,]*\),"loss":\([^,}]*\).*/\1 \3 \4/' | sort -s -k1,1)
md=$(echo "$pairs" | awk 'function abs(v) { return v < 0 ? -v : v }
  { if ($1 == p && !paired) { d = abs($2 - a) + abs($3 - l) / abs(l); if (d > m) m = d; n++; paired = 1 }
    else paired = 0; p = $1; a = $2; l = $3 }
  END { printf "%d %g", n, m + 0 }')
expect "  ...every evaluation's peerN.ema scores as peerN (pairs, max difference: $md)" \
  awk -v s="$md" 'BEGIN { split(s, v, " "); exit !(v[1] >= 2 && v[1] % 2 == 0 && v[2] < 1e-5) }'

# ---- elastic: shrink 3 -> 2 keeps peer 2's EMA bitwise; a grown peer's EMA starts at the resume
e="$tmp/e3"
el=("${base[@]}" -s run.epochs=1 -s kd.method=independent -s run.ema_decay=0.9)
run 3 "${el[@]}" -s run.dir="$e" >"$e.out" 2>&1
expect "independent P=3 with EMA copies: reference run (exit $?)" test -f "$(step_dir "$e" 8)/MANIFEST.kdpc"
for to in 2 4; do
  f="$tmp/e$to"
  mkdir -p "$f/checkpoints"
  cp -r "$(step_dir "$e" 4)" "$f/checkpoints/"
  cp "$e/metrics.jsonl" "$f/"
done
run 2 "${el[@]}" -s run.dir="$tmp/e2" --resume-as 2 --keep 0,2 >"$tmp/e2.out" 2>&1
expect "--resume-as 2 --keep 0,2: new peer 1 = old peer 2 bitwise, EMA copy included" \
  cmp -s <(digests "$(step_dir "$e" 8)/peer-002.kdpc") <(digests "$(step_dir "$tmp/e2" 8)/peer-001.kdpc")
run 4 "${el[@]}" -s run.dir="$tmp/e4" --resume-as 4 >"$tmp/e4.out" 2>&1
g="$(step_dir "$tmp/e4" 8)"
expect "--resume-as 4: kept peers' EMA copies counted from step 0 (8 updates), the new peer's from the resume (4)" \
  test "$(scalar "$g/peer-000.kdpc" ema.steps)" = 8 -a "$(scalar "$g/peer-003.kdpc" ema.steps)" = 4
expect "  ...and the kept peers' EMA copies are the unresized run's" \
  cmp -s <(digests "$(step_dir "$e" 8)/peer-001.kdpc" | grep ema) <(digests "$g/peer-001.kdpc" | grep ema)

finish ema
