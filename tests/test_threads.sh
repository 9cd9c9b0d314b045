#!/usr/bin/env bash
# run.threads does not change results: the same runs with 1, 2 and 3 threads per rank end with
# bitwise identical checkpoints (weights, momentum, BN statistics: `kdpeers inspect` digests) and
# identical metrics, for mlp(512,256) (GEMM tiles), cnn (conv chunks, the fused block) and a model
# with dropout, batchnorm and pools, on one process and on 2 ranks under mpirun (DML).
# Usage: tests/test_threads.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

digests() { "$exe" inspect "$1" | sed -n '/tensor digests/,$p'; }
final_dir() { ls -d "$1"/checkpoints/step-* | tail -n 1; }
evals() { grep -E '"event":"(eval|train)"' "$1/metrics.jsonl" | sed 's/,"samples_per_second".*//'; }

common=(-s data.subset=1280 -s data.test_subset=500 -s run.epochs=1 -s optim.batch_size=128
  -s run.progress=none -s run.log_every=5 -s checkpoint.every_steps=1000)
seqm="seq:conv(8,3),bn,relu,maxpool(2),dropout(0.25),conv(16,3),bn,relu,avgpool(3,2,1),gap,dropout(0.5),dense(32),relu"

# one process
for arch in "mlp(512,256)" cnn "$seqm"; do
  name=${arch%%(*}
  name=${name%%:*}
  for t in 1 2 3; do
    timeout 300 "$exe" "${common[@]}" -s "model.arch=$arch" -s run.threads=$t \
      -s run.dir="$tmp/$name.t$t" >"$tmp/$name.t$t.out" 2>&1
    expect "$name, $t threads: the run exits 0" test $? = 0
  done
  f1=$(final_dir "$tmp/$name.t1")
  for t in 2 3; do
    ft=$(final_dir "$tmp/$name.t$t")
    expect "$name: $t threads end bitwise equal to 1 (weights, momentum, BN stats)" \
      cmp -s <(digests "$f1/peer-000.kdpc") <(digests "$ft/peer-000.kdpc")
    expect "$name: $t threads, identical train and eval metrics" \
      cmp -s <(evals "$tmp/$name.t1") <(evals "$tmp/$name.t$t")
  done
done
expect "the digests are real (an mlp and a cnn checkpoint differ)" \
  bash -c "! cmp -s <(\"$exe\" inspect \"$(final_dir "$tmp/mlp.t1")/peer-000.kdpc\" | sed -n '/tensor digests/,\$p') \
    <(\"$exe\" inspect \"$(final_dir "$tmp/cnn.t1")/peer-000.kdpc\" | sed -n '/tensor digests/,\$p')"

# two ranks (DML), oversubscribed when the threads do not fit the cores
for t in 1 2; do
  timeout 300 mpirun -np 2 --oversubscribe --bind-to none "$exe" "${common[@]}" -s model.arch=cnn \
    -s kd.method=dml -s run.threads=$t -s run.dir="$tmp/dml.t$t" >"$tmp/dml.t$t.out" 2>&1
  expect "dml, 2 ranks x $t threads: the run exits 0" test $? = 0
done
for r in 0 1; do
  expect "dml: rank $r ends bitwise equal with 2 threads per rank and with 1" \
    cmp -s <(digests "$(final_dir "$tmp/dml.t1")/peer-00$r.kdpc") \
    <(digests "$(final_dir "$tmp/dml.t2")/peer-00$r.kdpc")
done
finish test_threads
