#!/usr/bin/env bash
# Real training runs under mpirun: every method with heterogeneous peers, hybrid parallelism
# (ranks_per_peer = 2 equals 1, per-peer ranks_per_peer 2+1 equals 1+1), determinism, and layout
# errors.
# Usage: tests/test_mpi.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
# several jobs share the cores (spawn): a rank that waits in a collective yields its core (Open
# MPI does so by itself only when a job alone has more ranks than cores)
export OMPI_MCA_mpi_yield_when_idle=1
run() { # run NP ARGS... (timeout guards against a hang in a collective)
  local np="$1"; shift
  timeout 300 mpirun -np "$np" --oversubscribe --bind-to none "$exe" -s run.progress=plain "$@"
}
small=(-s data.subset=1024 -s data.test_subset=1000 -s run.epochs=1 -s optim.batch_size=64)

# Every run below that no other run depends on starts here, KDP_TEST_JOBS (default 2) at a time
# (spawn, tests/lib.sh); the checks follow in order once they have all ended (settle).
methods=(independent dml codistill avg one ffl okddip kdcl pcl mcl switokd)
hyb=(-s data.subset=2048 -s data.test_subset=1000 -s run.epochs=1 -s run.max_steps=20
  -s run.log_every=1 -s "model.arch=mlp(64,32)" -s kd.method=dml -s optim.batch_size=64)
bk=(-s data.subset=1024 -s data.test_subset=200 -s run.epochs=1 -s run.max_steps=8
  -s optim.batch_size=32 -s run.ranks_per_peer=2 -s run.log_every=1)
shr=(-s data.subset=2048 -s data.test_subset=500 -s run.max_steps=8 -s "model.arch=mlp(32)" -s kd.method=dml)
cmp_args=(-s data.subset=1024 -s data.test_subset=500 -s run.epochs=1 -s "model.arch=mlp(32)")
# launch/compare (a script around kdpeers: no C path of its own, not repeated under the
# sanitizers) runs its 4 runs one after another: first, beside the others
compare_bg() {
  "$src/launch/compare" -np 2 --seeds 2 --methods dml,independent --runs "$tmp/cmp" --out "$tmp/cmp.md" -- \
    "${cmp_args[@]}" >"$tmp/cmp.out" 2>"$tmp/cmp.err"
}
sanitizer_skip "launch/compare" || spawn compare_bg
for method in "${methods[@]}"; do
  d="$tmp/m-$method" extra=()
  [ "$method" = switokd ] && extra=(-s kd.teacher_peer=1) # the cnn teaches the mlps
  spawn_to "$d.out" run 3 "${small[@]}" -s run.max_steps=6 -s kd.method="$method" -s "model.arch=mlp(32)" \
    -s peer.1.arch=cnn -s "peer.2.arch=mlp(48,24)" "${extra[@]}" -s run.dir="$d"
done
spawn_to "$tmp/cw.out" run 3 "${small[@]}" -s run.max_steps=8 -s kd.method=codistill -s kd.exchange=weights \
  -s kd.exchange_every=3 -s kd.burn_in_steps=2 -s "model.arch=mlp(32)" -s peer.1.arch=cnn -s run.dir="$tmp/cw"
spawn_to "$tmp/h1.out" run 2 "${hyb[@]}" -s run.dir="$tmp/h1"
spawn_to "$tmp/h2.out" run 4 "${hyb[@]}" -s run.ranks_per_peer=2 -s run.dir="$tmp/h2"
for method in dml ffl pcl mcl switokd; do
  [ "$method" = dml ] || spawn_to "$tmp/u-$method.out" run 2 "${hyb[@]}" -s kd.method="$method" -s run.dir="$tmp/u-$method"
  spawn_to "$tmp/n-$method.out" run 3 "${hyb[@]}" -s kd.method="$method" -s peer.0.ranks_per_peer=2 -s run.dir="$tmp/n-$method"
done
for a in "mlp(64,32)" cnn; do
  t=$(echo "$a" | tr -c 'a-z0-9' _)
  for kb in 0 1; do
    spawn_to "$tmp/bk-$t-$kb.out" run 2 "${bk[@]}" -s "model.arch=$a" -s run.bucket_kb=$kb -s run.grad_sum=allreduce \
      -s run.dir="$tmp/bk-$t-$kb"
  done
  spawn_to "$tmp/bk-$t-shm.out" run 2 "${bk[@]}" -s "model.arch=$a" -s run.grad_sum=shm -s run.dir="$tmp/bk-$t-shm"
done
if ! sanitizer_skip "buckets and the shared-window sum on 3 and 4 ranks against 1"; then
  spawn_to "$tmp/bk3-1.out" run 1 "${hyb[@]}" -s kd.method=independent -s optim.batch_size=48 -s run.dir="$tmp/bk3-1"
  spawn_to "$tmp/bk3-3.out" run 3 "${hyb[@]}" -s kd.method=independent -s optim.batch_size=48 -s run.ranks_per_peer=3 \
    -s run.bucket_kb=1 -s run.grad_sum=allreduce -s run.dir="$tmp/bk3-3"
  for k in 3 4; do
    spawn_to "$tmp/shm$k.out" run $k "${hyb[@]}" -s kd.method=independent -s optim.batch_size=48 -s run.ranks_per_peer=$k \
      -s run.grad_sum=shm -s run.dir="$tmp/shm$k"
  done
fi
# determinism: d2 also writes the timeline (run.timeline, checked below), which must not change a result
sanitizer_skip "determinism" || spawn_to "$tmp/d1.out" run 2 "${small[@]}" -s run.max_steps=10 -s "model.arch=mlp(32)" \
  -s kd.method=one -s run.dir="$tmp/d1"
spawn_to "$tmp/d2.out" run 2 "${small[@]}" -s run.max_steps=10 -s "model.arch=mlp(32)" -s kd.method=one \
  -s run.timeline=true -s run.dir="$tmp/d2"
spawn_to "$tmp/s1.out" run 4 "${shr[@]}" -s data.shared=true -s run.dir="$tmp/s1"
sanitizer_skip "private dataset copies, compared with the shared one" ||
  spawn_to "$tmp/s2.out" run 4 "${shr[@]}" -s data.shared=false -s run.dir="$tmp/s2"
if [ -x "${2:-}" ]; then
  "$2" folder "$tmp/fold" 600 90 3
  spawn_to "$tmp/fold-run.out" run 2 -s data.format=folder -s data.train_images="$tmp/fold/train" \
    -s data.test_images="$tmp/fold/test" -s run.epochs=1 -s "model.arch=mlp(32)" -s run.progress=none \
    -s run.dir="$tmp/fold-run"
fi
# layout errors (refused at the start)
spawn_to "$tmp/bad1.out" run 3 "${small[@]}" -s run.ranks_per_peer=2 -s run.dir="$tmp/bad1"
spawn_to "$tmp/bad3.out" run 2 "${small[@]}" -s peer.0.ranks_per_peer=2 -s peer.1.ranks_per_peer=1 -s run.dir="$tmp/bad3"
spawn_to "$tmp/bad4.out" run 4 "${small[@]}" -s run.ranks_per_peer=2 -s peer.1.ranks_per_peer=1 -s run.dir="$tmp/bad4"
spawn_to "$tmp/bad5.out" run 4 "${small[@]}" -s run.ranks_per_peer=2 -s data.subset=129 -s optim.batch_size=64 -s run.dir="$tmp/bad5"
spawn_to "$tmp/bad2.out" run 2 "${small[@]}" -s kd.method=okddip -s run.dir="$tmp/bad2"
settle

# --- every method, heterogeneous peers (mlp, cnn, mlp), 3 ranks ---
for method in "${methods[@]}"; do
  d="$tmp/m-$method"
  rc=$(rc_of "$d.out")
  expect "$method: 3 heterogeneous peers train (exit $rc)" test "$rc" = 0
  for p in peer0 peer1 peer2; do
    expect "$method: eval line for $p" grep -q "\"model\":\"$p\"" "$d/metrics.jsonl"
  done
  [ "$method" = independent ] || expect "$method: ensemble eval line" grep -q '"model":"ensemble"' "$d/metrics.jsonl"
  case "$method" in
    one) expect "one: gate eval line" grep -q '"model":"gate"' "$d/metrics.jsonl" ;;
    ffl) expect "ffl: fused eval line" grep -q '"model":"fused"' "$d/metrics.jsonl" ;;
    okddip) expect "okddip: leader eval line" grep -q '"model":"leader"' "$d/metrics.jsonl" ;;
    pcl) expect "pcl: its teacher's eval line and every peer's mean teacher (peerN.ema)" \
      bash -c "grep -q '\"model\":\"pcl\"' '$d/metrics.jsonl' && test \$(grep -c '\"model\":\"peer[012].ema\"' '$d/metrics.jsonl') = 3" ;;
    kdcl) expect "kdcl: kdcl (teacher) eval line" grep -q '"model":"kdcl"' "$d/metrics.jsonl" ;;
    mcl) expect "mcl: train lines carry the contrastive loss next to kd" \
      grep -q '"kd":[-0-9.e]*,"contrast":[0-9.e]' "$d/metrics.jsonl"
      expect "mcl: the start line counts the embedding head in the peer's parameters" \
        grep -q '"params":'"$(( $(grep -o '"params":[0-9]*' "$tmp/m-dml/metrics.jsonl" | cut -d: -f2) + 32 * 128 + 128 + 128 * 128 + 128 ))"',' "$d/metrics.jsonl" ;;
    switokd) expect "switokd: students' mean eval line" grep -q '"model":"students"' "$d/metrics.jsonl"
      expect "switokd: expert-fraction line" grep -q '"event":"switokd"' "$d/metrics.jsonl" ;;
  esac
  [ "$rc" = 0 ] || sed 's/^/    /' "$d.out" | tail -n 20
done

# --- codistill, weights mode: disjoint shards, stale copies refreshed every 3 steps ---
d="$tmp/cw"
rc=$(rc_of "$d.out")
expect "codistill weights mode trains heterogeneous peers (exit $rc)" test "$rc" = 0
expect "codistill weights mode: ensemble eval line" grep -q '"model":"ensemble"' "$d/metrics.jsonl"
[ "$rc" = 0 ] || tail -n 20 "$d.out"

# --- hybrid: ranks_per_peer = 2 gives the same losses as 1 (MLP, no batchnorm) ---
losses() { grep '"event":"train"' "$1" | sed 's/.*"loss":\([^,]*\),"kd":\([^,]*\),.*/\1 \2/'; }
expect "hybrid runs logged 20 steps each" test "$(losses "$tmp/h1/metrics.jsonl" | wc -l)" = 20 -a \
  "$(losses "$tmp/h2/metrics.jsonl" | wc -l)" = 20
maxdiff=$(paste <(losses "$tmp/h1/metrics.jsonl") <(losses "$tmp/h2/metrics.jsonl") |
  awk 'function abs(v) { return v < 0 ? -v : v }
       { d = abs($1 - $3) / (1e-6 + abs($1)); if (d > m) m = d; d = abs($2 - $4) / (1e-6 + abs($2)); if (d > m) m = d }
       END { printf "%g", m + 0 }')
expect "ranks_per_peer=2 equals 1 over 20 steps (max relative loss difference $maxdiff < 1e-4)" \
  awk -v m="$maxdiff" 'BEGIN { exit !(m < 1e-4) }'

# --- per-peer ranks_per_peer: peer 0 on 2 ranks, peer 1 on 1 (3 ranks) equals 1 rank each, under
# dml, switokd (the mode from row sums gathered over peer 0's ranks) and under ffl (a replicated fusion module with batchnorm: every rank computes the whole
# cohort objective, so its batch statistics are the global batch's, as with 1 rank per peer) ---
evals() { grep '"event":"eval"' "$1" | sed 's/.*"model":"\([^"]*\)","acc":\([^,]*\),"loss":\([^,}]*\).*/\1 \2 \3/'; }
relmax() { # relmax A B: max relative difference of the numeric columns of two aligned listings
  paste -d' ' <(echo "$1") <(echo "$2") | awk 'function abs(v) { return v < 0 ? -v : v }
    { h = NF / 2; for (i = 1; i <= h; i++) if ($i ~ /^[-0-9.e+]+$/) {
        d = abs($i - $(i + h)) / (1e-6 + abs($i)); if (d > m) m = d } else if ($i != $(i + h)) m = 1e9 }
    END { printf "%g", m + 0 }'
}
for method in dml ffl pcl mcl switokd; do
  u="$tmp/h1"
  [ "$method" != dml ] && u="$tmp/u-$method"
  n="$tmp/n-$method"
  rc=$(rc_of "$n.out")
  expect "$method: per-peer layout 2+1 on 3 ranks trains (exit $rc)" test "$rc" = 0
  [ "$rc" = 0 ] || tail -n 20 "$n.out"
  expect "$method: the per-peer layout is announced" grep -q "per-peer layout: 3 ranks = 2+1" "$n.out"
  expect "$method: 20 steps logged by both runs" test "$(losses "$u/metrics.jsonl" | wc -l)" = 20 -a \
    "$(losses "$n/metrics.jsonl" | wc -l)" = 20
  md=$(relmax "$(losses "$u/metrics.jsonl")" "$(losses "$n/metrics.jsonl")")
  expect "$method: per-peer k = (2,1) equals k = (1,1) over 20 steps (max relative loss difference $md < 1e-4)" \
    awk -v m="$md" 'BEGIN { exit !(m < 1e-4) }'
  ue=$(evals "$u/metrics.jsonl") ne=$(evals "$n/metrics.jsonl")
  expect "$method: the same eval lines (peers, ensemble$([ "$method" = ffl ] && echo ", fused")$([ "$method" = pcl ] && echo ", pcl, peerN.ema"))" \
    test "$(echo "$ue" | cut -d' ' -f1 | tr '\n' ' ')" = "$(echo "$ne" | cut -d' ' -f1 | tr '\n' ' ')" -a -n "$ue"
  md=$(relmax "$ue" "$ne")
  expect "$method: per-peer k = (2,1) evaluates like k = (1,1) (max relative difference $md < 1e-4)" \
    awk -v m="$md" 'BEGIN { exit !(m < 1e-4) }'
  [ "$method" = switokd ] && expect "switokd: per-peer k = (2,1) decides the modes of k = (1,1)" \
    cmp -s <(grep '"event":"switokd"' "$u/metrics.jsonl") <(grep '"event":"switokd"' "$n/metrics.jsonl")
done
# the 2+1 ffl run's checkpoint: the fusion module is bitwise identical on the 3 ranks (params,
# momentum, batchnorm buffers), peer 0's 2 ranks hold the same weights
ck=$(ls -d "$tmp/n-ffl/checkpoints/step-"* 2>/dev/null | tail -n 1)
digests() { "$exe" inspect "$ck/peer-$1.kdpc" 2>/dev/null | grep -E "^  $2 +crc32" | sed 's/.*crc32 //'; }
expect "ffl 2+1: the module replicas are bitwise identical on the 3 ranks" \
  test "$(digests 000 "module\\.[a-z]+" | wc -l)" = 3 -a "$(digests 000 "module\\.[a-z]+")" = "$(digests 001 "module\\.[a-z]+")" -a \
  "$(digests 000 "module\\.[a-z]+")" = "$(digests 002 "module\\.[a-z]+")"
expect "ffl 2+1: peer 0's two ranks hold the same parameters" \
  test -n "$(digests 000 params)" -a "$(digests 000 params)" = "$(digests 001 params)"
# kdpeers serve on the 2+1 run: alone and under mpirun -np 3 (slice-0 ranks answer), same peers
awk 'BEGIN { srand(1); printf "{\"inputs\":["; for (i = 0; i < 3; i++) { printf "%s[", (i ? "," : "");
  for (j = 0; j < 784; j++) printf "%s%d", (j ? "," : ""), int(rand() * 256); printf "]" } printf "]}" }' >"$tmp/pp.json"
serve_predict() { # serve_predict OUT CMD... (serving $sdir): starts the server, asks one /predict, stops it
  local out=$1; shift
  rm -f "$sdir/server.addr"
  timeout 120 "$@" >"$out.log" 2>&1 &
  local spid=$! addr=""
  for _ in $(seq 1 200); do [ -s "$sdir/server.addr" ] && break; sleep 0.05; done
  addr=$(cat "$sdir/server.addr" 2>/dev/null)
  curl -s -X POST "$addr/predict" --data @"$tmp/pp.json" >"$out"
  curl -s "$addr/metrics" >"$out.metrics"
  curl -s -X POST "$addr/control" -d '{"action":"stop"}' >/dev/null
  wait "$spid"
}
sdir="$tmp/n-ffl"
serve_predict "$tmp/pp1.json" "$exe" serve "$tmp/n-ffl"
serve_predict "$tmp/pp3.json" mpirun -np 3 --oversubscribe --bind-to none "$exe" serve "$tmp/n-ffl" -s run.progress=plain
expect "serve (mpirun -np 3) of a 2+1 run answers with the fused teacher" \
  test "$(jq -r .teacher.name "$tmp/pp3.json" 2>/dev/null)" = fused
expect "serve of a 2+1 run: the same peers alone and under mpirun -np 3" \
  test -n "$(jq -c .peers "$tmp/pp1.json" 2>/dev/null)" -a \
  "$(jq -c .peers "$tmp/pp1.json" 2>/dev/null)" = "$(jq -c .peers "$tmp/pp3.json" 2>/dev/null)"
# an mcl run (its teacher is the probability-mean ensemble; the embedding heads play no part)
sdir="$tmp/n-mcl"
serve_predict "$tmp/pm3.json" mpirun -np 3 --oversubscribe --bind-to none "$exe" serve "$tmp/n-mcl" -s run.progress=plain
expect "serve of a 2+1 mcl run answers /predict: 2 peers, the ensemble (its teacher) for 3 inputs" \
  test "$(jq -r '[(.peers | length), (.ensemble | length), (.labels.ensemble | length), .teacher] | @csv' "$tmp/pm3.json" 2>/dev/null)" = "2,3,3,"
expect "/metrics of an mcl run has the contrastive loss per peer beside kd" \
  test "$(grep -c '^kdpeers_loss_contrast{peer="[01]"}' "$tmp/pm3.json.metrics")" = 2
expect "/metrics of an ffl run has no contrastive loss" \
  test "$(grep -c kdpeers_loss_contrast "$tmp/pp3.json.metrics")" = 0

# --- gradient buckets (run.bucket_kb): on k = 2 ranks the bucketed allreduce, started during the
# backward pass, gives bitwise the weights of one allreduce after it (a + b = b + a): mlp and the
# cnn (fused conv blocks, batchnorm). On k = 3 Open MPI sums in an order that can depend on the
# message size, so buckets are held to the single-rank reference at the hybrid tolerance above.
# The shared-window sum (run.grad_sum = shm, the default on one node) likewise: bitwise on 2 ranks,
# the single-rank reference's tolerance on 3 and 4 ---
ckdig() { # ckdig DIR RANK: digests of the last checkpoint of DIR, rank RANK's file
  "$exe" inspect "$(ls -d "$1"/checkpoints/step-* | tail -n 1)/peer-00$2.kdpc" 2>/dev/null | sed -n '/tensor digests/,$p'
}
for a in "mlp(64,32)" cnn; do
  t=$(echo "$a" | tr -c 'a-z0-9' _)
  for kb in 0 1; do
    rc=$(rc_of "$tmp/bk-$t-$kb.out")
    expect "buckets: $a on 2 ranks, bucket_kb = $kb trains (exit $rc)" test "$rc" = 0
    [ "$rc" = 0 ] || tail -n 20 "$tmp/bk-$t-$kb.out"
  done
  rc=$(rc_of "$tmp/bk-$t-shm.out")
  expect "shared-window sum: $a on 2 ranks, grad_sum = shm trains (exit $rc)" test "$rc" = 0
  d0=$(ckdig "$tmp/bk-$t-0" 0) d1=$(ckdig "$tmp/bk-$t-1" 0) ds=$(ckdig "$tmp/bk-$t-shm" 0)
  expect "buckets: $a on 2 ranks: 1 KiB buckets give bitwise the weights and momentum of one allreduce" \
    test -n "$d0" -a "$d0" = "$d1"
  expect "shared-window sum: $a on 2 ranks gives bitwise the weights and momentum of one allreduce" \
    test -n "$d0" -a "$d0" = "$ds"
  # (batchnorm's running statistics are each rank's own: params and momentum only)
  for v in 1 shm; do
    expect "buckets ($v): $a: the two ranks hold the same weights and momentum" \
      test "$(ckdig "$tmp/bk-$t-$v" 0 | grep -E '^  (params|momentum) ')" = "$(ckdig "$tmp/bk-$t-$v" 1 | grep -E '^  (params|momentum) ')"
  done
done
if [ -z "${KDP_SANITIZER_RUN:-}" ]; then
  rc=$(rc_of "$tmp/bk3-3.out")
  expect "buckets: one peer on 3 ranks with 1 KiB buckets trains (exit $rc)" test "$rc" = 0
  md=$(relmax "$(losses "$tmp/bk3-1/metrics.jsonl")" "$(losses "$tmp/bk3-3/metrics.jsonl")")
  expect "buckets: 3 ranks equal 1 over 20 steps (max relative loss difference $md < 1e-4)" \
    awk -v m="$md" 'BEGIN { exit !(m < 1e-4) }'
  expect "buckets: 20 steps logged by both" test "$(losses "$tmp/bk3-1/metrics.jsonl" | wc -l)" = 20 -a \
    "$(losses "$tmp/bk3-3/metrics.jsonl" | wc -l)" = 20
  for k in 3 4; do
    rc=$(rc_of "$tmp/shm$k.out")
    expect "shared-window sum: one peer on $k ranks trains (exit $rc)" test "$rc" = 0
    md=$(relmax "$(losses "$tmp/bk3-1/metrics.jsonl")" "$(losses "$tmp/shm$k/metrics.jsonl")")
    expect "shared-window sum: $k ranks equal 1 over 20 steps (max relative loss difference $md < 1e-4)" \
      awk -v m="$md" 'BEGIN { exit !(m < 1e-4) }'
    expect "shared-window sum: 20 steps logged on $k ranks" test "$(losses "$tmp/shm$k/metrics.jsonl" | wc -l)" = 20
  done
fi

# --- determinism under mpirun (the second run also writes its timeline) ---
if [ -z "${KDP_SANITIZER_RUN:-}" ]; then
expect "same seed and layout give identical metrics (one run writing its timeline)" cmp -s \
  <(grep -E '"event":"(eval|train)"' "$tmp/d1/metrics.jsonl" | sed 's/,"samples_per_second".*//') \
  <(grep -E '"event":"(eval|train)"' "$tmp/d2/metrics.jsonl" | sed 's/,"samples_per_second".*//')
fi

# --- one dataset copy per node: same results, less memory ---
rc=$(rc_of "$tmp/s1.out")
expect "a 4-rank run with a shared dataset trains (exit $rc)" test "$rc" = 0
if [ -z "${KDP_SANITIZER_RUN:-}" ]; then
expect "shared dataset gives the same results as private copies" cmp -s \
  <(grep '"event":"eval"' "$tmp/s1/metrics.jsonl") <(grep '"event":"eval"' "$tmp/s2/metrics.jsonl")
pss() { tail -n 1 "$1/metrics.jsonl" | sed 's/.*"pss_mb_total":\([0-9.]*\).*/\1/'; }
p1=$(pss "$tmp/s1") p2=$(pss "$tmp/s2")
expect "shared dataset: total PSS over 4 ranks $p1 MB < $p2 MB with private copies" \
  awk -v a="$p1" -v b="$p2" 'BEGIN { exit !(a + 1 < b) }'
fi

# --- run.timeline: a Chrome trace per rank (the determinism pair's second run) ---
for r in 000 001; do
  f="$tmp/d2/timeline-rank$r.json"
  expect "timeline of rank $r is valid JSON with forward, wait, exchange and backward phases" \
    test "$(jq -r '[.traceEvents[].name] | (index("forward") != null) and (index("wait") != null) and (index("exchange+kd") != null) and (index("backward") != null)' "$f" 2>/dev/null)" = true
done

# --- launch/compare: seeds x methods -> a markdown table (a script around kdpeers: no C path of
# its own, not repeated under the sanitizers) ---
if [ -z "${KDP_SANITIZER_RUN:-}" ]; then
expect "launch/compare writes a row per method" test "$(grep -c '^| `' "$tmp/cmp.md")" = 2
expect "launch/compare: rows in the order asked (dml, independent)" \
  test "$(grep -o '^| `[a-z]*`' "$tmp/cmp.md" | tr -d '|` ' | tr '\n' ,)" = "dml,independent,"
expect "launch/compare: seeds, mean peer, gain against independent, ensemble, KL, disagreement (mean +- std), no churn after one evaluation" \
  grep -qE '^\| `dml` \| 2 \| [0-9.]+ \+- [0-9.]+ \| [+-][0-9.]+ \+- [0-9.]+ \| [0-9.]+ \+- [0-9.]+ \| - \| [0-9.]+ \+- [0-9.]+ \| [0-9.]+ \+- [0-9.]+ \| [0-9.]+ \+- [0-9.]+ \| [0-9.]+ \+- [0-9.]+ \| - \| [0-9]+\.[0-9] \|$' "$tmp/cmp.md"
# dml's KL: the mean over seeds of the runs' own last diversity line
want=$(for s in 1 2; do grep '"event":"diversity"' "$tmp/cmp/dml-s$s/metrics.jsonl" | tail -n 1; done | jq -s '[.[].kl] | add / length')
got=$(sed -n 's/^| `dml` | 2 |\( [^|]* |\)\{6\} \([0-9.]*\) +-.*/\2/p' "$tmp/cmp.md")
expect "launch/compare: dml's KL ($got) is the runs' own ($want)" awk -v a="$got" -v b="$want" 'BEGIN { exit !(a != "" && a - b < 0.00006 && b - a < 0.00006) }'
expect "launch/compare: independent has no gain against itself" grep -qE '^\| `independent` \| 2 \| [0-9.]+ \+- [0-9.]+ \| - \|' "$tmp/cmp.md"
# the mean peer of dml = the mean over seeds of (peer0 + peer1) / 2, from the runs' own metrics
want=$(for s in 1 2; do grep '"event":"eval"' "$tmp/cmp/dml-s$s/metrics.jsonl" | grep -E '"model":"peer[01]"' | tail -n 2; done |
  jq -s '[.[].acc] | add / length * 100 | . * 100 | round / 100')
got=$(sed -n 's/^| `dml` | 2 | \([0-9.]*\) +-.*/\1/p' "$tmp/cmp.md")
expect "launch/compare: dml's mean peer ($got) is the runs' own ($want)" awk -v a="$got" -v b="$want" 'BEGIN { exit !(a - b < 0.006 && b - a < 0.006) }'
expect "launch/compare: no set -x noise" bash -c "! grep -q '^+' '$tmp/cmp.err'"
"$src/launch/compare" --help >"$tmp/cmp.help" 2>&1
expect "launch/compare --help: only the usage text" bash -c "head -n 1 '$tmp/cmp.help' | grep -q '^compare: ' && ! grep -qE '^(set |here=|np=)' '$tmp/cmp.help'"
# resumable: a finished run is kept, a missing one runs again
sed -i '/^2\tindependent\t2\t/d' "$tmp/cmp/results.tsv"
"$src/launch/compare" -np 2 --seeds 2 --methods dml,independent --runs "$tmp/cmp" -- "${cmp_args[@]}" \
  >"$tmp/cmp2.out" 2>"$tmp/cmp2.err"
expect "launch/compare resumes: 3 finished runs kept, only independent seed 2 runs again" \
  bash -c "grep -q '3 finished runs kept' '$tmp/cmp2.err' && test \"\$(grep -c ' -> ' '$tmp/cmp2.err')\" = 1 && grep -q 'independent seed 2 ->' '$tmp/cmp2.err'"
# --peers 2,3 in the same directory: the 2-peer runs above are kept (seed 1), only the 3-peer ones
# run; one table, rows grouped by P, the gain against independent at the same P
compare_ok "compare --peers 2,3" cmpp --peers 2,3 --seeds 1 --methods dml,independent --runs "$tmp/cmp" \
  --out "$tmp/cmpp.md" -- "${cmp_args[@]}"
expect "compare --peers 2,3: the 2-peer runs are kept, the two 3-peer runs run" \
  bash -c "grep -q '2 finished runs kept' '$tmp/cmpp.err' && test \"\$(grep -c ' at 3 peers -> ' '$tmp/cmpp.err')\" = 2 && ! grep -q ' at 2 peers -> ' '$tmp/cmpp.err'"
expect "compare --peers 2,3: both P groups, rows grouped by P in the order asked" \
  test "$(p_rows "$tmp/cmpp.md")" = "2dml,2independent,3dml,3independent,"
expect "compare --peers: a P column, no per-peer columns" \
  grep -qx '| P | method | seeds | mean peer | gain | ensemble | teacher | KL | disagreement | churn | wall s/run |' "$tmp/cmpp.md"
# at 3 peers: dml's mean peer is (peer0 + peer1 + peer2) / 3 of its run (p3/dml-s1), its gain that
# minus independent's at 3 peers; at 2 peers the kept run's (dml-s1)
mp() { grep '"event":"eval"' "$1/metrics.jsonl" | grep -E '"model":"peer[0-9]+"' | tail -n "$2" | jq -s '[.[].acc] | add / length * 100'; }
m3=$(mp "$tmp/cmp/p3/dml-s1" 3) i3=$(mp "$tmp/cmp/p3/independent-s1" 3) m2=$(mp "$tmp/cmp/dml-s1" 2)
near() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a != "" && a - b < 0.006 && b - a < 0.006) }'; }
got=$(sed -n 's/^| 3 | `dml` | 1 | \([0-9.]*\) +- 0.00 | \([-+0-9.]*\) +- 0.00 |.*/\1 \2/p' "$tmp/cmpp.md")
expect "compare --peers: dml's mean peer at 3 peers (${got% *}) is its run's own ($m3)" near "${got% *}" "$m3"
expect "compare --peers: dml's gain at 3 peers (${got#* }) is minus independent's at 3 peers ($m3 - $i3)" \
  near "${got#* }" "$(awk -v a="$m3" -v b="$i3" 'BEGIN { print a - b }')"
got=$(sed -n 's/^| 2 | `dml` | 1 | \([0-9.]*\) +-.*/\1/p' "$tmp/cmpp.md")
expect "compare --peers: dml at 2 peers ($got) is the kept run's own ($m2)" near "$got" "$m2"
# --report: the table of what results.tsv holds, nothing runs (3 peers has seed 1 only)
"$src/launch/compare" --report --peers 2,3 --seeds 2 --methods dml,independent --runs "$tmp/cmp" -- \
  "${cmp_args[@]}" >"$tmp/cmpr.out" 2>"$tmp/cmpr.err"
expect "compare --report: runs nothing, says 2 of 8 runs are missing" \
  bash -c "grep -q '2 of the 8 runs asked for are not in' '$tmp/cmpr.err' && ! grep -q ' -> ' '$tmp/cmpr.err'"
expect "compare --report: 2 seeds at 2 peers, 1 at 3 peers" \
  test "$(grep -oE '^\| [0-9] \| `dml` \| [0-9]' "$tmp/cmpr.out" | tr -d '|` ' | tr '\n' ,)" = "2dml2,3dml1,"
# a results.tsv of the older compare (no P column, -np in its first line) is carried over: nothing
# runs again and the table is the one it gave
mkdir -p "$tmp/cmpold"
{ echo "# compare -np 2 -- ${cmp_args[*]}"
  awk -F'\t' 'NR > 1 && $1 == 2 { sub(/^[^\t]*\t/, ""); print }' "$tmp/cmp/results.tsv"; } >"$tmp/cmpold/results.tsv"
"$src/launch/compare" -np 2 --seeds 2 --methods dml,independent --runs "$tmp/cmpold" -- "${cmp_args[@]}" \
  >"$tmp/cmpold.out" 2>"$tmp/cmpold.err"
expect "compare reads an older results.tsv: 4 runs kept as 2-peer runs, none runs" \
  bash -c "grep -q 'older compare (-np 2, no P column)' '$tmp/cmpold.err' && grep -q '4 finished runs kept' '$tmp/cmpold.err' && ! grep -q ' -> ' '$tmp/cmpold.err'"
expect "  ...and gives the same table as before" test "$(grep '^| `' "$tmp/cmpold.out")" = "$(grep '^| `' "$tmp/cmp2.out")"
echo "not a results file" >"$tmp/cmpold/results.tsv"
"$src/launch/compare" -np 2 --runs "$tmp/cmpold" >/dev/null 2>"$tmp/cmpold.err"
rc=$?
expect "compare refuses a results.tsv it did not write (exit $rc, says so)" \
  bash -c "test $rc = 2 && grep -q 'not a compare results file' '$tmp/cmpold.err'"

fi

# --- an image folder on 2 ranks sharing one copy of the data: every peer's model file carries
# the class names (the node broadcast) ---
if [ -x "${2:-}" ]; then
  for p in 0 1; do
    "$exe" export "$tmp/fold-run" --peer "$p" -o "$tmp/fold$p.kdpm" >/dev/null
    "$exe" predict "$tmp/fold$p.kdpm" "$tmp/fold/test/trouser/"*.png --top >"$tmp/fold$p.txt"
    expect "folder on 2 ranks: peer $p's model names the classes" grep -qE '^0 [0-2] (t-shirt|trouser|pullover)$' "$tmp/fold$p.txt"
  done
else
  bad "kdp-mkdata (second argument) is missing: the image-folder run did not run"
fi

# --- layout errors ---
rc=$(rc_of "$tmp/bad1.out")
expect "-np 3 with ranks_per_peer=2 is refused with exit 2 (got $rc)" test "$rc" = 2
expect "the message says ranks_per_peer does not divide" grep -q "does not divide" "$tmp/bad1.out"
rc=$(rc_of "$tmp/bad3.out")
expect "-np 2 for per-peer k = 2+1 is refused with exit 2 (got $rc)" test "$rc" = 2
expect "the message says the layout does not fit the 2 ranks and asks for -np 3" \
  grep -q "per-peer layout does not fit the 2 MPI ranks.*2 peers take 2+1 = 3 ranks. Start with -np 3" "$tmp/bad3.out"
rc=$(rc_of "$tmp/bad4.out")
expect "-np 4 between the layouts 2+1 and 2+1+2 is refused with exit 2 (got $rc)" test "$rc" = 2
expect "the message names both fitting world sizes" \
  grep -q "2 peers take 2+1 = 3 ranks, 3 peers take 2+1+2 = 5. Start with -np 3 or -np 5" "$tmp/bad4.out"
expect "a refused layout starts no training (no metrics.jsonl)" test ! -e "$tmp/bad4/metrics.jsonl"
rc=$(rc_of "$tmp/bad5.out")
expect "a last batch smaller than ranks_per_peer is refused with exit 2 (got $rc)" test "$rc" = 2
expect "the message names the last batch and ranks_per_peer" \
  grep -q "the last batch of an epoch holds 1 example (129 training examples, optim.batch_size = 64), fewer than run.ranks_per_peer = 2" "$tmp/bad5.out"
rc=$(rc_of "$tmp/bad2.out")
expect "okddip with 2 peers is refused (got $rc)" test "$rc" != 0
expect "the okddip message explains the peer count" grep -q "at least 3 peers" "$tmp/bad2.out"

finish mpi
