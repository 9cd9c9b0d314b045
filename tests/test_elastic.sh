#!/usr/bin/env bash
# Elastic resume under mpirun (kdpeers --resume-as, issue 14): shrink 3 -> 2 with --keep 0,2 and
# grow 2 -> 3 carry the kept peers' weights, momentum, data position and RNG over bitwise (the
# independent method, where a peer's trajectory does not depend on the others, so the resized run
# must match the unresized one peer for peer); a grown peer from its seed or --clone-from;
# dml, one and ffl resize (one's gate, ffl's fc1 columns remapped); the same P through --resume-as
# stays bitwise; bad requests exit 2; the resize is in metrics.jsonl, the checkpoint and /status; a
# frozen teacher (peer.N.teacher) stays frozen on its file, kept or new, and is never cloned.
# Usage: tests/test_elastic.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
run() {
  local np="$1"; shift
  timeout 300 mpirun -np "$np" --oversubscribe --bind-to none "$exe" -s run.progress=plain "$@"
}
digests() { "$exe" inspect "$1" | sed -n '/tensor digests/,$p' | grep -E '^  (params|momentum|buffers|module)'; }
step_dir() { printf '%s/checkpoints/step-%012d' "$1" "$2"; }
# a copy of run A's checkpoint at step S (and its metrics.jsonl) as a new run.dir B
copy_at() {
  mkdir -p "$2/checkpoints"
  cp -r "$(step_dir "$1" "$3")" "$2/checkpoints/"
  cp "$1/metrics.jsonl" "$2/"
}

base=(-s data.subset=512 -s data.test_subset=200 -s run.epochs=1 -s "model.arch=mlp(32)"
  -s optim.batch_size=64 -s run.log_every=4 -s checkpoint.every_steps=4 -s checkpoint.keep=5)
# 512 / 64 = 8 steps: checkpoints at 4 and 8

# ---- shrink 3 -> 2 keeping peers 0 and 2: bitwise the same peers as the run that kept 3
a="$tmp/ind3" b="$tmp/ind3-shrunk"
run 3 "${base[@]}" -s kd.method=independent -s run.dir="$a" >"$a.out" 2>&1
expect "independent P=3 reference run (exit $?)" test -f "$(step_dir "$a" 8)/MANIFEST.kdpc"
copy_at "$a" "$b" 4
run 2 "${base[@]}" -s kd.method=independent -s run.dir="$b" --resume-as 2 --keep 0,2 >"$b.out" 2>&1
rc=$?
expect "--resume-as 2 --keep 0,2 from the P=3 checkpoint finishes (exit $rc)" test "$rc" = 0
expect "  ...its step-8 checkpoint has 2 ranks" test -f "$(step_dir "$b" 8)/peer-001.kdpc" -a ! -f "$(step_dir "$b" 8)/peer-002.kdpc"
expect "  ...new peer 0 = old peer 0, bitwise (weights, momentum; data position and RNG carried)" \
  cmp -s <(digests "$(step_dir "$a" 8)/peer-000.kdpc") <(digests "$(step_dir "$b" 8)/peer-000.kdpc")
expect "  ...new peer 1 = old peer 2, bitwise" \
  cmp -s <(digests "$(step_dir "$a" 8)/peer-002.kdpc") <(digests "$(step_dir "$b" 8)/peer-001.kdpc")
expect "  ...metrics.jsonl records the resize" \
  grep -q '{"event":"resize","step":4,"from":3,"to":2,"kept":\[0,2\],"new":\[\],"clone_from":-1,"ranks":2}' "$b/metrics.jsonl"
expect "  ...and so does the checkpoint (its history of resizes)" \
  sh -c "'$exe' inspect '$(step_dir "$b" 8)/peer-000.kdpc' | grep -q '^  resizes  *str'"
# kdpeers serve (the run's 2 ranks) reads the history back: /status and the dashboard's /history
timeout 120 mpirun -np 2 --oversubscribe --bind-to none "$exe" serve "$b" -s run.progress=plain >"$b.serve" 2>&1 &
spid=$!
pids+=("$spid")
for _ in $(seq 1 200); do [ -s "$b/server.addr" ] && break; sleep 0.05; done
addr=$(cat "$b/server.addr" 2>/dev/null)
expect "  .../status lists the resize from the checkpoint" \
  test "$(curl -s "$addr/status" | jq -c '.resizes | map([.step, .from, .to, .kept])')" = '[[4,3,2,[0,2]]]'
expect "  .../history holds it as an event" \
  test "$(curl -s "$addr/history" | jq -r '.events[] | select(.kind == "resize") | .text')" = "3 -> 2 peers"
curl -s -X POST "$addr/control" -d '{"action":"stop"}' >/dev/null
wait "$spid"
# the default keeps the first P
c="$tmp/ind3-first"
copy_at "$a" "$c" 4
run 2 "${base[@]}" -s kd.method=independent -s run.dir="$c" --resume-as 2 >"$c.out" 2>&1
expect "--resume-as 2 without --keep keeps peers 0 and 1 (bitwise peer 1)" \
  cmp -s <(digests "$(step_dir "$a" 8)/peer-001.kdpc") <(digests "$(step_dir "$c" 8)/peer-001.kdpc")

# per-peer layouts and architectures carry over: peer 2 on 2 ranks with its own arch (4 ranks)
a="$tmp/lay" b="$tmp/lay-shrunk"
lay=(-s kd.method=independent -s peer.2.ranks_per_peer=2 -s "peer.2.arch=mlp(16)")
run 4 "${base[@]}" "${lay[@]}" -s run.dir="$a" >"$a.out" 2>&1
copy_at "$a" "$b" 4
run 3 "${base[@]}" "${lay[@]}" -s run.dir="$b" --resume-as 2 --keep 0,2 >"$b.out" 2>&1
rc=$?
expect "layout 1+1+2 -> 1+2 (--keep 0,2 on 3 ranks) finishes (exit $rc)" test "$rc" = 0
for s in 0 1; do
  expect "  ...peer 2's slice $s (mlp(16), 2 ranks) continues bitwise as new peer 1's" \
    cmp -s <(digests "$(step_dir "$a" 8)/peer-00$((2 + s)).kdpc") <(digests "$(step_dir "$b" 8)/peer-00$((1 + s)).kdpc")
done
run 2 "${base[@]}" "${lay[@]}" -s run.dir="$b" --resume-as 2 >"$b.out2" 2>&1
expect "  ...a rerun on 2 ranks is refused: the kept peer needs its 2 ranks (-np 3)" grep -qi "with -np 3" "$b.out2"

# ---- grow 2 -> 3: the kept peers bitwise, the new one from its own seed or a perturbed copy
a="$tmp/ind2" b="$tmp/ind2-grown" c="$tmp/ind2-clone"
run 2 "${base[@]}" -s kd.method=independent -s run.dir="$a" >"$a.out" 2>&1
copy_at "$a" "$b" 4
run 3 "${base[@]}" -s kd.method=independent -s run.dir="$b" --resume-as 3 >"$b.out" 2>&1
rc=$?
expect "--resume-as 3 from a P=2 checkpoint finishes (exit $rc)" test "$rc" = 0
for r in 0 1; do
  expect "  ...peer $r bitwise as in the P=2 run" \
    cmp -s <(digests "$(step_dir "$a" 8)/peer-00$r.kdpc") <(digests "$(step_dir "$b" 8)/peer-00$r.kdpc")
done
expect "  ...the resize names the new peer" grep -q '"event":"resize","step":4,"from":2,"to":3,"kept":\[0,1\],"new":\[2\]' "$b/metrics.jsonl"
copy_at "$a" "$c" 4
run 3 "${base[@]}" -s kd.method=independent -s run.dir="$c" --resume-as 3 --clone-from 0 --clone-seed 5 >"$c.out" 2>&1
rc=$?
expect "--resume-as 3 --clone-from 0 finishes (exit $rc)" test "$rc" = 0
pa=$(digests "$(step_dir "$c" 8)/peer-000.kdpc" | grep '^  params') pc=$(digests "$(step_dir "$c" 8)/peer-002.kdpc" | grep '^  params')
pf=$(digests "$(step_dir "$b" 8)/peer-002.kdpc" | grep '^  params')
expect "  ...the clone is perturbed (not peer 0) and not the seed-initialised peer" test "$pa" != "$pc" -a "$pc" != "$pf"
# with lr = 0 nothing moves: the clone's weights are peer 0's within the perturbation (1%)
d="$tmp/ind2-clone0"
copy_at "$a" "$d" 4
run 3 "${base[@]}" -s kd.method=independent -s optim.lr=0 -s run.dir="$d" --allow-config-change \
  --resume-as 3 --clone-from 0 >"$d.out" 2>&1
"$exe" export "$d" --peer 0 -o "$tmp/p0.kdpm" >/dev/null 2>&1
"$exe" export "$d" --peer 2 -o "$tmp/p2.kdpm" >/dev/null 2>&1
expect "  ...(lr = 0) the clone's file differs from peer 0's" test -s "$tmp/p0.kdpm" -a -s "$tmp/p2.kdpm"
expect "  ...in at most the weights: same size" test "$(stat -c %s "$tmp/p0.kdpm")" = "$(stat -c %s "$tmp/p2.kdpm")"
expect "  ...and not equal" test "$(cmp "$tmp/p0.kdpm" "$tmp/p2.kdpm" | wc -l)" = 1

# ---- methods with interaction: dml shrinks, one's gate is remapped both ways, ffl's fusion head
# (each rank steps only its peer's columns of fc1; the checkpoint gathers them) shrinks
for method in dml one ffl; do
  a="$tmp/$method-3" b="$tmp/$method-shrunk"
  run 3 "${base[@]}" -s kd.method="$method" -s run.max_steps=4 -s run.dir="$a" >"$a.out" 2>&1
  copy_at "$a" "$b" 4
  run 2 "${base[@]}" -s kd.method="$method" -s run.dir="$b" --resume-as 2 --keep 0,2 >"$b.out" 2>&1
  rc=$?
  expect "$method: 3 -> 2 finishes (exit $rc)" test "$rc" = 0
  expect "$method: ...and evaluates both peers" grep -q '"event":"eval".*"model":"peer1"' "$b/metrics.jsonl"
done
expect "one: the log says what of the gate was kept" grep -q "resize 3 -> 2 peers: one's module .* remapped.*gate.weight" "$tmp/one-shrunk.out"
expect "ffl: the kept peers' columns of fc1 carried over" grep -q "resize 3 -> 2 peers: ffl's module .* remapped.*fusion.fc1.weight kept" "$tmp/ffl-shrunk.out"
mdig() { "$exe" inspect "$(step_dir "$tmp/ffl-3" 4)/peer-00$1.kdpc" | sed -n '/tensor digests/,$p' | grep -E '^  module'; }
expect "ffl: the 3 ranks' checkpoints hold the same whole module and momentum (every peer's columns gathered)" \
  test "$(mdig 0 | wc -l)" -ge 3 -a "$(mdig 0)" = "$(mdig 1)" -a "$(mdig 0)" = "$(mdig 2)"
b="$tmp/one-grown"
copy_at "$tmp/one-3" "$b" 4
run 4 "${base[@]}" -s kd.method=one -s run.dir="$b" --resume-as 4 >"$b.out" 2>&1
rc=$?
expect "one: 3 -> 4 finishes (exit $rc)" test "$rc" = 0
expect "one: ...the new peer's gate blocks are fresh" grep -q "gate.weight peer blocks kept (" "$b.out"

# ---- --resume-as auto: the cohort that fits the ranks (what launch/kdpeers.sbatch passes)
r="$tmp/auto-shrink"
copy_at "$tmp/ind3" "$r" 4
run 2 "${base[@]}" -s kd.method=independent -s run.dir="$r" --resume-as auto >"$r.out" 2>&1
expect "--resume-as auto on 2 ranks from 3 peers keeps the first 2 (exit $?)" \
  grep -q '"event":"resize","step":4,"from":3,"to":2,"kept":\[0,1\]' "$r/metrics.jsonl"
r="$tmp/auto-grow"
copy_at "$tmp/ind2" "$r" 4
run 3 "${base[@]}" -s kd.method=independent -s run.dir="$r" --resume-as auto >"$r.out" 2>&1
expect "--resume-as auto on 3 ranks from 2 peers grows to 3 (exit $?)" \
  grep -q '"event":"resize","step":4,"from":2,"to":3,"kept":\[0,1\],"new":\[2\]' "$r/metrics.jsonl"
r="$tmp/auto-lay"
copy_at "$tmp/lay" "$r" 4
run 3 "${base[@]}" "${lay[@]}" -s run.dir="$r" --resume-as auto >"$r.out" 2>&1
rc=$?
expect "--resume-as auto: 1+1+2 ranks cannot be cut to 3 in order: exit 2 (got $rc)" test "$rc" = 2
expect "  ...saying so" grep -q "no cohort of the checkpoint's peers in order" "$r.out"
r="$tmp/auto-new"
run 2 "${base[@]}" -s kd.method=independent -s run.max_steps=2 -s run.dir="$r" --resume-as auto >"$r.out" 2>&1
expect "--resume-as auto without a checkpoint starts the config's run (exit $?)" test -f "$r/metrics.jsonl"

# ---- the same P through --resume-as: bitwise the same as an uninterrupted run
a="$tmp/same-a" b="$tmp/same-b"
run 2 "${base[@]}" -s kd.method=dml -s run.dir="$a" >"$a.out" 2>&1
KDP_FAULT_SIGNAL_AT_STEP=4 run 2 "${base[@]}" -s kd.method=dml -s run.dir="$b" >"$b.out1" 2>&1
run 2 "${base[@]}" -s kd.method=dml -s run.dir="$b" --resume-as 2 >"$b.out2" 2>&1
rc=$?
expect "dml: --resume-as 2 of a P=2 run finishes (exit $rc) without a resize" test "$rc" = 0 -a "$(grep -c '"event":"resize"' "$b/metrics.jsonl")" = 0
for r in 0 1; do
  expect "dml: ...rank $r bitwise as the uninterrupted run" \
    cmp -s <(digests "$(step_dir "$a" 8)/peer-00$r.kdpc") <(digests "$(step_dir "$b" 8)/peer-00$r.kdpc")
done

# ---- refusals: exit 2 and a message
src3="$tmp/ind3"
bad_req() { # bad_req DESC NP PATTERN ARGS...
  local desc="$1" np="$2" pat="$3"
  shift 3
  local r="$tmp/bad-$RANDOM"
  copy_at "$src3" "$r" 4
  run "$np" "${base[@]}" -s kd.method=independent -s run.dir="$r" "$@" >"$r.out" 2>&1
  local rc=$?
  expect "$desc: exit 2 (got $rc)" test "$rc" = 2
  expect "  ...saying '$pat'" grep -q -- "$pat" "$r.out"
}
bad_req "--keep of a peer the checkpoint lacks" 2 "the checkpoint at step 4 has peers 0..2" --resume-as 2 --keep 0,5
bad_req "--keep naming a peer twice" 2 "names peer 0 twice" --resume-as 2 --keep 0,0
bad_req "--keep with the wrong count" 2 "names 1 peer; expected 2" --resume-as 2 --keep 1
bad_req "--keep when growing" 4 "does not shrink" --resume-as 4 --keep 0,1,2,3
bad_req "--clone-from when shrinking" 2 "does not grow" --resume-as 2 --clone-from 0
bad_req "a world size that does not fit the new cohort" 3 "start it with -np 2" --resume-as 2
bad_req "--keep without --resume-as" 3 "go with --resume-as" --keep 0,1
r="$tmp/bad-plain"
copy_at "$src3" "$r" 4
run 2 "${base[@]}" -s kd.method=independent -s run.dir="$r" >"$r.out" 2>&1
expect "a plain rerun on fewer ranks is refused, pointing at --resume-as" grep -q -- "--resume-as P" "$r.out"

# ---- a frozen teacher (peer.N.teacher) under --resume-as: a kept one stays frozen on its file
# wherever --keep puts it (this run's config still names it as peer 2), its file checked against
# the checkpoint's crc32; a new one is read from its file even under --clone-from; none is cloned
tt="$tmp/teacher"
run 1 "${base[@]}" -s run.max_steps=2 -s "model.arch=mlp(16)" -s run.dir="$tt" >"$tt.out" 2>&1
run 1 "${base[@]}" -s run.max_steps=1 -s "model.arch=mlp(16)" -s run.dir="$tt-2" >/dev/null 2>&1
"$exe" export "$tt" --peer 0 -o "$tt.kdpm" >/dev/null 2>&1
"$exe" export "$tt-2" --peer 0 -o "$tmp/other.kdpm" >/dev/null 2>&1
cp "$tt.kdpm" "$tmp/original.kdpm"
fz=(-s kd.method=independent -s peer.2.teacher="$tt.kdpm")
a="$tmp/fz3" b="$tmp/fz3-shrunk"
run 3 "${base[@]}" "${fz[@]}" -s run.dir="$a" >"$a.out" 2>&1
expect "frozen: the P=3 run with a frozen peer 2 (exit $?)" test -f "$(step_dir "$a" 8)/MANIFEST.kdpc"
copy_at "$a" "$b-changed" 4
cp "$tmp/other.kdpm" "$tt.kdpm"
run 2 "${base[@]}" "${fz[@]}" -s run.dir="$b-changed" --resume-as 2 --keep 0,2 >"$b-changed.out" 2>&1
rc=$?
cp "$tmp/original.kdpm" "$tt.kdpm"
expect "frozen: --keep 0,2 with the teacher's file changed is refused (exit $rc)" test "$rc" != 0
expect "  ...saying the file changed since the checkpoint" grep -q "changed since the checkpoint" "$b-changed.out"
copy_at "$a" "$b" 4
run 2 "${base[@]}" "${fz[@]}" -s run.dir="$b" --resume-as 2 --keep 0,2 >"$b.out" 2>&1
rc=$?
expect "frozen: --resume-as 2 --keep 0,2 keeps the teacher as peer 1 and finishes (exit $rc)" test "$rc" = 0
expect "  ...new peer 1 is the frozen file" test "$(entry "$(step_dir "$b" 8)/peer-001.kdpc" frozen.teacher)" = "\"$tt.kdpm\""
expect "  ...it never took an optimizer step" test "$(entry "$(step_dir "$b" 8)/peer-001.kdpc" opt_steps)" = 0
expect "  ...its weights are the file's (old peer 2's)" \
  cmp -s <(digests "$(step_dir "$a" 8)/peer-002.kdpc" | grep params) <(digests "$(step_dir "$b" 8)/peer-001.kdpc" | grep params)
expect "  ...new peer 0 = old peer 0, bitwise" \
  cmp -s <(digests "$(step_dir "$a" 8)/peer-000.kdpc") <(digests "$(step_dir "$b" 8)/peer-000.kdpc")
c="$tmp/fz-grown"
copy_at "$tmp/ind2" "$c" 4
run 3 "${base[@]}" "${fz[@]}" -s run.dir="$c" --resume-as 3 --clone-from 0 >"$c.out" 2>&1
rc=$?
expect "frozen: 2 -> 3 with a new frozen peer 2 and --clone-from 0 finishes (exit $rc)" test "$rc" = 0
expect "  ...peer 2 is the file, not a clone of peer 0" \
  cmp -s <(digests "$(step_dir "$a" 8)/peer-002.kdpc" | grep params) <(digests "$(step_dir "$c" 8)/peer-002.kdpc" | grep params)
src3="$a"
bad_req "frozen: --clone-from the frozen peer (refused at the plan)" 2 "peer 2 is a frozen teacher" "${fz[@]}" --resume-as 4 --clone-from 2
bad_req "frozen: keeping only the teacher" 1 "nothing would train" "${fz[@]}" --resume-as 1 --keep 2

# a kill -9 of one rank, then a rerun with one peer fewer: tests/test_kill.sh

finish elastic
