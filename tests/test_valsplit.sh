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
    test "$(jq -n --slurpfile a <(evals "$v") --slurpfile b <(evals "$h") \
      '[$a, $b] | transpose | length == 3 and all(.[0].val_acc == .[1].val_acc and
        ((.[0].val_loss - .[1].val_loss) | fabs) < 1e-5)')" = true
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

# --- a split that leaves nothing to train on is refused before anything is written ---
run 1 -s data.subset=100 -s data.val_size=100 -s run.dir="$tmp/none" >"$tmp/none.out" 2>&1
expect "val_size >= the training set: exit 2" test $? = 2
expect "  ...saying why" grep -q "data.val_size = 100 leaves no training examples" "$tmp/none.out"

finish test_valsplit
