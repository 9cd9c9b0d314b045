#!/usr/bin/env bash
# The validation split (data.val_size) under mpirun: the held-out examples are never trained on
# (a run with them held out trains bitwise like one whose training set stops before them, label
# noise included), every eval line carries val_acc over exactly N examples, ranks_per_peer = 2
# gives the same validation figures, a split that leaves nothing to train on is refused;
# kdpeers export --best; kdcl's ensembles; data.augment_per_peer.
# Usage: tests/test_valsplit.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
command -v jq >/dev/null || { echo "test_valsplit: jq is missing (launch/setup installs it)"; exit 77; }
run() { # run NP ARGS... (timeout guards against a hang in a collective)
  local np="$1"; shift
  timeout 300 mpirun -np "$np" --oversubscribe --bind-to none "$exe" -s run.progress=plain \
    -s server.enabled=false "$@"
}
# 800 training examples = 13 steps of 64; the 300 after them are the validation split
small=(-s data.test_subset=500 -s run.epochs=1 -s optim.batch_size=64 -s "model.arch=mlp(32)"
  -s run.log_every=1 -s data.label_noise=0.4 -s kd.method=dml)
trainlines() { grep '"event":"train"' "$1/metrics.jsonl" | jq -c '[.step, .loss, .kd]'; }
evals() { grep '"event":"eval"' "$1/metrics.jsonl"; }
# same_evals A B N ACC LOSS: true when runs A and B have N eval lines each, line by line with
# equal ACC and LOSS within 1e-5 (a peer on 2 ranks against one rank per peer)
same_evals() {
  jq -n --slurpfile a <(evals "$1") --slurpfile b <(evals "$2") --argjson n "$3" --arg acc "$4" \
    --arg loss "$5" '[$a, $b] | transpose | length == $n and all(.[0][$acc] == .[1][$acc] and
      ((.[0][$loss] - .[1][$loss]) | fabs) < 1e-5)'
}
digests() { # digests DIR STEP: every tensor's crc32 in the checkpoint of STEP, peer by peer
  for f in "$1/checkpoints/step-$(printf %012d "$2")"/peer-*.kdpc; do
    "$exe" inspect "$f" | grep " floats)"
  done
}

# --- held out: subset 1100 with 300 held out trains exactly like subset 800 ---
v="$tmp/val" r="$tmp/ref"
run 2 "${small[@]}" -s data.subset=1100 -s data.val_size=300 -s run.dir="$v" >"$v.out" 2>&1
expect "val_size=300: the run exits 0" test $? = 0
run 2 "${small[@]}" -s data.subset=800 -s run.dir="$r" >"$r.out" 2>&1
expect "reference (subset 800, no split): the run exits 0" test $? = 0
expect "val_size=300 of 1100: an epoch is 13 steps of 64 (800 examples trained on)" \
  test "$(trainlines "$v" | wc -l)" = 13
expect "the training losses equal the run on the first 800 alone (label noise on the same 800)" \
  test "$(trainlines "$v" | md5sum)" = "$(trainlines "$r" | md5sum)"
expect "so do the test figures" \
  test "$(evals "$v" | jq -c '[.model, .acc, .loss]' | md5sum)" = "$(evals "$r" | jq -c '[.model, .acc, .loss]' | md5sum)"
expect "every eval line of the split run carries val_acc and val_loss (peer0, peer1, ensemble)" \
  test "$(evals "$v" | jq -s 'length == 3 and all(.val_acc >= 0 and .val_acc <= 1 and .val_loss > 0)')" = true
expect "no eval line of the run without a split has them" \
  test "$(evals "$r" | jq -s 'all(has("val_acc") | not)')" = true
expect "val_acc counts hits over exactly 300 examples (val_acc x 300 is a whole number)" \
  test "$(evals "$v" | jq -s 'all((.val_acc * 300) as $h | ($h - ($h | round) | fabs) < 1e-3)')" = true
expect "the progress line shows the validation accuracy" grep -q "peer0 .*val acc" "$v.out"

# --- ranks_per_peer = 2: the same validation figures (MLP, no batchnorm) ---
if ! sanitizer_skip "ranks_per_peer = 2 vs 1"; then
  h="$tmp/hyb"
  run 4 "${small[@]}" -s data.subset=1100 -s data.val_size=300 -s run.ranks_per_peer=2 \
    -s run.dir="$h" >"$h.out" 2>&1
  expect "val_size with ranks_per_peer = 2: the run exits 0" test $? = 0
  expect "ranks_per_peer = 2: val_acc equal and val_loss within 1e-5 of one rank per peer" \
    test "$(same_evals "$v" "$h" 3 val_acc val_loss)" = true
fi

# --- export --best: the peer with the best val_acc of the last evaluation (the first of equals) ---
want=$(evals "$v" | jq -rs '[.[] | select(.model | test("^peer[0-9]+$"))] | max_by(.val_acc) as $m |
  map(select(.val_acc == $m.val_acc))[0].model | ltrimstr("peer")')
"$exe" export "$v" --best -o "$tmp/best.kdpm" >"$tmp/best.out" 2>&1
expect "export --best exits 0" test $? = 0
expect "  ...names peer $want, the best by validation accuracy" grep -q "peer $want has the best validation accuracy at step 13" "$tmp/best.out"
"$exe" export "$v" --peer "$want" -o "$tmp/want.kdpm" >/dev/null 2>&1
expect "  ...and writes the same file as export --peer $want" cmp -s "$tmp/best.kdpm" "$tmp/want.kdpm"
"$exe" export "$r" --best -o "$tmp/nobest.kdpm" >"$tmp/nobest.out" 2>&1
expect "export --best of a run without a split: exit 2" test $? = 2
expect "  ...saying the run had no validation split" grep -q "had no validation split" "$tmp/nobest.out"
expect "  ...and writing nothing" test ! -e "$tmp/nobest.kdpm"

# --- export --best with EMA copies (run.ema_decay): peerN.ema is scored on the split and is a candidate ---
e="$tmp/ema"
run 2 "${small[@]}" -s data.subset=1100 -s data.val_size=300 -s run.ema_decay=0.5 -s run.dir="$e" >"$e.out" 2>&1
expect "val_size with run.ema_decay: the run exits 0" test $? = 0
expect "  ...both peerN.ema eval lines carry val_acc" \
  test "$(evals "$e" | jq -s '[.[] | select(.model | test("^peer[0-9]+[.]ema$"))] | length == 2 and all(has("val_acc"))')" = true
best=$(evals "$e" | jq -rs '[.[] | select(.model | test("^peer[0-9]+([.]ema)?$"))] | max_by(.val_acc) as $m |
  map(select(.val_acc == $m.val_acc))[0].model')
"$exe" export "$e" --best -o "$tmp/ebest.kdpm" >"$tmp/ebest.out" 2>&1
expect "export --best over peers and EMA copies exits 0, listing peer0.ema and peer1.ema among the candidates" \
  bash -c "grep -q 'peer0.ema' '$tmp/ebest.out' && grep -q 'peer1.ema' '$tmp/ebest.out'"
n=${best#peer}; n=${n%.ema} flag=""
if [ "$best" = "peer$n.ema" ]; then
  flag=" --ema"
  "$exe" export "$e" --peer "$n" --ema -o "$tmp/ewant.kdpm" >/dev/null 2>&1
else
  "$exe" export "$e" --peer "$n" -o "$tmp/ewant.kdpm" >/dev/null 2>&1
fi
expect "  ...and writes the best of them ($best) as export --peer $n$flag would" cmp -s "$tmp/ebest.kdpm" "$tmp/ewant.kdpm"

# --- kdcl general: weights refitted on the split at every evaluation, carried by the checkpoint
# (a run stopped after the first evaluation and resumed ends bitwise like an uninterrupted one) ---
kargs=(-s data.subset=1100 -s data.val_size=300 -s data.test_subset=500 -s run.epochs=2
  -s optim.batch_size=64 -s "model.arch=mlp(32)" -s run.log_every=1 -s kd.method=kdcl
  -s kd.ensemble=general -s checkpoint.every_steps=100)
a="$tmp/kga" b="$tmp/kgb"
run 2 "${kargs[@]}" -s run.dir="$a" >"$a.out" 2>&1
expect "kdcl general: the run exits 0" test $? = 0
expect "kdcl general: a kdcl_weights line per evaluation (steps 13 and 26), weights >= 0 summing to 1" \
  test "$(grep '"event":"kdcl_weights"' "$a/metrics.jsonl" | jq -s '[.[].step] == [13, 26] and
    all(.weights | length == 2 and all(. >= 0) and ((add - 1) | fabs) < 1e-5)')" = true
expect "kdcl general: the kdcl teacher is evaluated on test and validation" \
  test "$(evals "$a" | jq -s '[.[] | select(.model == "kdcl" and has("val_acc"))] | length')" = 2
if ! sanitizer_skip "kdcl general resume"; then
  KDP_FAULT_SIGNAL_AT_STEP=17 run 2 "${kargs[@]}" -s run.dir="$b" >"$b.out1" 2>&1
  expect "kdcl general: a signal after the first evaluation stops the run (exit 75)" test $? = 75
  run 2 "${kargs[@]}" -s run.dir="$b" >"$b.out2" 2>&1
  expect "kdcl general: the resumed run finishes" test $? = 0
  expect "kdcl general: resumed training lines equal the uninterrupted run's" \
    test "$(trainlines "$b" | md5sum)" = "$(trainlines "$a" | md5sum)"
  expect "kdcl general: the final checkpoints are bitwise equal (weights, module buffers: $(digests "$a" 26 | wc -l) tensors)" \
    test "$(digests "$a" 26 | md5sum)" = "$(digests "$b" 26 | md5sum)"
  expect "kdcl general: the second evaluation's weights are the same after the resume" \
    test "$(grep kdcl_weights "$b/metrics.jsonl" | tail -n 1)" = "$(grep kdcl_weights "$a/metrics.jsonl" | tail -n 1)"
fi
run 2 -s kd.method=kdcl -s kd.ensemble=general -s run.dir="$tmp/kgn" >"$tmp/kgn.out" 2>&1
expect "kdcl general without data.val_size is refused (exit 2)" test $? = 2
expect "  ...naming data.val_size" grep -q "data.val_size is 0" "$tmp/kgn.out"

# --- data.augment_per_peer: peers that start equal (KDP_TEST_SAME_INIT) and train on the same
# batches stay equal under a shared augmentation and part under per-peer draws; peer 0 keeps the
# shared stream; ranks_per_peer = 2 draws alike on a peer's ranks; a resume is bitwise ---
aargs=(-s data.subset=512 -s data.test_subset=500 -s run.epochs=2 -s optim.batch_size=64
  -s "model.arch=mlp(32)" -s run.log_every=1 -s kd.method=independent -s data.augment=true
  -s checkpoint.every_steps=100)
pe() { evals "$1" | jq -c 'select(.model | test("^peer")) | [.step, .acc, .loss]'; }
peer_evals() { evals "$1" | jq -c --arg p "$2" 'select(.model == $p) | [.step, .acc, .loss]'; }
s1="$tmp/aug-shared" s2="$tmp/aug-peer"
KDP_TEST_SAME_INIT=1 run 2 "${aargs[@]}" -s run.dir="$s1" >"$s1.out" 2>&1
expect "augment shared: the run exits 0" test $? = 0
KDP_TEST_SAME_INIT=1 run 2 "${aargs[@]}" -s data.augment_per_peer=true -s run.dir="$s2" >"$s2.out" 2>&1
expect "augment_per_peer: the run exits 0" test $? = 0
expect "shared augmentation: equal peers stay equal (peer0's eval lines = peer1's)" \
  test "$(peer_evals "$s1" peer0)" = "$(peer_evals "$s1" peer1)"
expect "augment_per_peer: the same peers, the same batches, other crops and flips: they part" \
  test "$(peer_evals "$s2" peer0)" != "$(peer_evals "$s2" peer1)"
expect "augment_per_peer: peer 0 draws the shared stream (its train lines equal the shared run's)" \
  test "$(trainlines "$s2" | md5sum)" = "$(trainlines "$s1" | md5sum)"
if ! sanitizer_skip "augment_per_peer comparisons"; then
  s3="$tmp/aug-k2" s4="$tmp/aug-resume"
  KDP_TEST_SAME_INIT=1 run 4 "${aargs[@]}" -s data.augment_per_peer=true -s run.ranks_per_peer=2 \
    -s run.dir="$s3" >"$s3.out" 2>&1
  expect "augment_per_peer, ranks_per_peer = 2: the run exits 0" test $? = 0
  expect "  ...every peer's evaluation within 1e-5 of one rank per peer (a peer's ranks draw alike)" \
    test "$(same_evals "$s2" "$s3" 6 acc loss)" = true
  KDP_TEST_SAME_INIT=1 KDP_FAULT_SIGNAL_AT_STEP=5 run 2 "${aargs[@]}" -s data.augment_per_peer=true \
    -s run.dir="$s4" >"$s4.out1" 2>&1
  expect "augment_per_peer: a signal stops the run (exit 75)" test $? = 75
  KDP_TEST_SAME_INIT=1 run 2 "${aargs[@]}" -s data.augment_per_peer=true -s run.dir="$s4" >"$s4.out2" 2>&1
  expect "augment_per_peer: the resumed run finishes" test $? = 0
  expect "augment_per_peer: resumed, the peers' evaluations equal the uninterrupted run's" \
    test "$(pe "$s4")" = "$(pe "$s2")"
  expect "augment_per_peer: the final checkpoints are bitwise equal" \
    test "$(digests "$s4" 16 | md5sum)" = "$(digests "$s2" 16 | md5sum)"
fi

# --- a split that leaves nothing to train on is refused before anything is written ---
run 1 -s data.subset=100 -s data.val_size=100 -s run.dir="$tmp/none" >"$tmp/none.out" 2>&1
expect "val_size >= the training set: exit 2" test $? = 2
expect "  ...saying why" grep -q "data.val_size = 100 leaves no training examples" "$tmp/none.out"

finish test_valsplit
