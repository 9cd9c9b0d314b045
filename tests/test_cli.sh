#!/usr/bin/env bash
# Integration tests of the kdpeers command line: help, config errors (exit 2, nothing written),
# a real single-process run on a Fashion-MNIST subset, metrics.jsonl contents, determinism.
# Usage: tests/test_cli.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

# --- help, version, print-config ---
"$exe" --version >"$tmp/v" 2>&1
expect "--version prints the version" grep -q "^kdpeers [0-9]" "$tmp/v"
if head=$(git -C "$src" rev-parse --short=12 HEAD 2>/dev/null); then
  expect "--version names the git commit it was built from ($head)" grep -q "^kdpeers [0-9.]* (git $head" "$tmp/v"
fi
expect "--version names the MPI library" grep -qE "^Open MPI v[0-9]+\.[0-9]+.*\(MPI [0-9]\.[0-9]\)$" "$tmp/v"
expect "--version names OpenBLAS and its version" grep -qE "^OpenBLAS [0-9]+\.[0-9]+" "$tmp/v"
"$exe" --help >"$tmp/h" 2>&1
expect "--help exits 0 and lists config keys" grep -q "optim.lr" "$tmp/h"
"$exe" --print-config -s optim.lr=0.125 >"$tmp/c.ini" 2>"$tmp/err"
expect "--print-config shows -s overrides" grep -qE "^lr *= *0.125" "$tmp/c.ini"
"$exe" --print-config -c "$tmp/c.ini" >"$tmp/c2.ini" 2>"$tmp/err"
expect "--print-config round-trips through -c" cmp -s "$tmp/c.ini" "$tmp/c2.ini"
# every KDP_ variable a launch script reads reaches kdpeers in its environment (mpirun passes it
# on): kdpeers must know it, not refuse it as a misspelt config key (KDP_BIND, kdpeers-local's
# switch for shared machines, once made every rank exit 2)
for f in "$src"/launch/*; do
  case "$f" in *.c | *.py | *.js | *.json | */meson.build) continue ;; esac
  grep -ohE '\$\{?KDP_[A-Z0-9_]+' "$f"
done | tr -d '${' | sort -u >"$tmp/launch-env"
expect "the launch scripts read KDP_ variables (found $(wc -l <"$tmp/launch-env"))" test -s "$tmp/launch-env"
while read -r v; do
  env "$v=1" "$exe" --print-config >/dev/null 2>"$tmp/err"
  expect "$v (read by a launch script) is no error for kdpeers" test $? = 0
done <"$tmp/launch-env"

# --- config errors: exit 2, the message names file and line, nothing written ---
printf '[optim]\nlr = 0.1\nlearning_rate = 3\n' >"$tmp/bad.ini"
"$exe" -c "$tmp/bad.ini" -s run.dir="$tmp/never1" >"$tmp/o" 2>"$tmp/e"
rc=$?
expect "unknown key exits 2" test "$rc" = 2
expect "unknown key message names file:line" grep -q "bad.ini:3" "$tmp/e"
expect "nothing written on a config error" test ! -e "$tmp/never1"
"$exe" -s optim.lr=abc -s run.dir="$tmp/never2" >"$tmp/o" 2>"$tmp/e"
rc=$?
expect "malformed -s value exits 2" test "$rc" = 2
expect "malformed -s message names the argument" grep -q "optim.lr=abc" "$tmp/e"
"$exe" -s optim.momentum=1.5 -s run.dir="$tmp/never3" >"$tmp/o" 2>"$tmp/e"
rc=$?
expect "out-of-range value exits 2" test "$rc" = 2
expect "nothing written on a range error" test ! -e "$tmp/never3"
"$exe" --bogus >"$tmp/o" 2>"$tmp/e"
rc=$?
expect "unknown option exits 2" test "$rc" = 2
"$exe" -s data.train_images=/nonexistent/x.gz -s run.dir="$tmp/never4" -s run.progress=none \
  >"$tmp/o" 2>"$tmp/e"
rc=$?
expect "missing dataset fails non-zero" test "$rc" != 0
expect "missing dataset message names the file" grep -q "/nonexistent/x.gz" "$tmp/e"

# --- mistakes caught before anything is written: exit 2, no run.dir, no metrics.jsonl ---
# refused: CASE-NAME MESSAGE-PATTERN kdpeers-args... (run.dir is added)
refused() {
  local name="$1" pat="$2"
  shift 2
  "$exe" "$@" -s run.dir="$tmp/never-$name" -s run.progress=none >"$tmp/o" 2>"$tmp/e"
  local rc=$?
  expect "$name: exit 2 (got $rc)" test "$rc" = 2
  expect "$name: the message says '$pat'" grep -q -- "$pat" "$tmp/e"
  expect "$name: nothing written (no run.dir, no metrics.jsonl)" test ! -e "$tmp/never-$name"
}
refused listen-port "the port is server.port" -s server.listen=127.0.0.1:0
refused open-no-token "needs server.token" -s server.listen=0.0.0.0
KDP_RUN_EPOCH=2 refused env-typo "did you mean KDP_RUN_EPOCHS" -s run.epochs=1
refused huge-conv "activations for a batch of 500" -s 'model.arch=seq:conv(100000,3)'
expect "huge-conv: the estimate is in the message (GiB)" grep -q "would need about [0-9.]* GiB" "$tmp/e"
refused huge-mlp "more than the physical memory" -s 'model.arch=mlp(3000000)'
expect "huge-mlp: not refused as a parse error" bash -c "! grep -q 'expected a list of positive' '$tmp/e'"
refused max-memory "run.max_memory of 56 MiB" -s run.max_memory=56M
# the estimate (--print-model) against the peak resident memory of the same run
arch='seq:conv(32,3),relu,conv(32,3),relu,gap'
"$exe" --print-model -s "model.arch=$arch" -s data.subset=1000 -s data.test_subset=500 >"$tmp/pm" 2>&1
est=$(sed -n 's/^memory on this node: \([0-9]*\) MiB.*/\1/p' "$tmp/pm")
"$exe" -s "model.arch=$arch" -s data.subset=1000 -s data.test_subset=500 -s run.max_steps=2 \
  -s run.progress=none -s server.enabled=false -s run.dir="$tmp/mem" >/dev/null 2>&1
rss=$(grep -o '"peak_rss_mb":[0-9.]*' "$tmp/mem/metrics.jsonl" | cut -d: -f2)
expect "the memory estimate ($est MiB) is within -5%/+120 MB of the peak RSS ($rss MB)" \
  awk -v e="${est:-0}" -v r="${rss:-0}" 'BEGIN { m = e * 1.048576; exit !(e > 300 && r >= 0.95 * m && r <= m + 120) }'

# --- a real run: mlp on 3000 Fashion-MNIST examples, 2 epochs ---
common=(-s data.subset=3000 -s data.test_subset=2000 -s run.epochs=2 -s "model.arch=mlp(64)"
  -s run.progress=plain -s run.log_every=10)
"$exe" "${common[@]}" -s run.dir="$tmp/r1" >"$tmp/o1" 2>"$tmp/e1"
rc=$?
expect "single-process run exits 0" test "$rc" = 0
m="$tmp/r1/metrics.jsonl"
expect "metrics.jsonl has eval lines for peer0" grep -q '"event":"eval".*"model":"peer0"' "$m"
expect "metrics.jsonl ends with a summary" bash -c "tail -n 1 '$m' | grep -q '\"event\":\"summary\",\"steps\":48,\"train_seconds\"'"
acc=$(grep '"event":"eval"' "$m" | tail -n 1 | sed 's/.*"acc":\([0-9.]*\).*/\1/')
expect "2 epochs on 3000 examples reach > 70% test accuracy (got $acc)" \
  awk -v a="$acc" 'BEGIN { exit !(a > 0.70) }'
expect "plain log lines are timestamped" grep -qE "^20[0-9]{2}-[0-9]{2}-[0-9]{2}T" "$tmp/e1"
expect "the summary table is printed" grep -q "test acc" "$tmp/e1"

# --- learning curves: every run writes curves.svg; kdpeers plot redraws it ---
svg="$tmp/r1/curves.svg"
expect "the run wrote curves.svg" test -s "$svg"
if command -v xmllint >/dev/null; then
  expect "curves.svg is well-formed XML" xmllint --noout "$svg"
else
  bad "xmllint is missing (launch/setup installs libxml2-utils)"
fi
# xp FILE XPATH: the matches of an XPath over the SVG (its namespace bound to s:)
xp() { xmllint --xpath "$2" - 2>/dev/null <<<"$(sed 's/ xmlns="[^"]*"//' "$1")"; }
expect "curves.svg draws peer0's test accuracy and test loss" \
  test "$(xp "$svg" 'count(//polyline[@data-series="peer0"])')" = 2
expect "curves.svg has a legend entry for peer0" grep -q '>peer0 ' "$svg"
npts=$(xp "$svg" 'string(//polyline[@class="train-loss"]/@points)' | wc -w)
expect "curves.svg plots the per-step training loss (a point per log window: $npts)" test "$npts" -ge 4
# round tick labels: each panel's ticks are evenly spaced by 1, 2 or 5 x 10^k, and each label is a
# multiple of that step printed without a long tail of digits
for axis in 'tick-y" and @data-panel="acc' 'tick-y" and @data-panel="loss' 'tick-x" and @data-panel="acc'; do
  ticks=$(xp "$svg" "//text[@class=\"$axis\"]/text()" | tr '\n' ' ')
  expect "round ticks ($ticks)" awk -v t="$ticks" 'BEGIN {
    n = split(t, v, " "); if (n < 3) exit 1
    step = v[2] - v[1]; e = 10 ^ int(log(step) / log(10) - (step < 1)); m = step / e
    if (!(m > 0.999 && m < 1.001 || m > 1.999 && m < 2.001 || m > 4.999 && m < 5.001)) exit 1
    for (i = 1; i <= n; i++) {
      if (length(v[i]) > 6) exit 1
      q = v[i] / step; if (q - int(q + (q < 0 ? -0.5 : 0.5)) > 1e-6 || q - int(q + (q < 0 ? -0.5 : 0.5)) < -1e-6) exit 1
      if (i > 1 && (v[i] - v[i - 1] - step > 1e-9 || v[i] - v[i - 1] - step < -1e-9)) exit 1
    }
  }'
done
"$exe" plot "$tmp/r1" -o "$tmp/again.svg" >/dev/null
expect "kdpeers plot RUN_DIR -o FILE redraws the same figure" cmp -s "$svg" "$tmp/again.svg"
"$exe" plot -o "$tmp/again2.svg" "$tmp/r1" >/dev/null
expect "kdpeers plot -o FILE RUN_DIR (options first) draws the same" cmp -s "$svg" "$tmp/again2.svg"
"$exe" -s data.subset=3000 -s data.test_subset=500 -s run.epochs=1 -s "model.arch=mlp(64)" \
  -s run.progress=none -s run.log_every=5 -s run.dir="$tmp/one-epoch" >/dev/null 2>&1
one="$tmp/one-epoch/curves.svg"
expect "a 1-epoch run: curves.svg is well-formed" xmllint --noout "$one"
npts=$(xp "$one" 'string(//polyline[@class="train-loss"]/@points)' | wc -w)
expect "a 1-epoch run still shows a curve: training loss over $npts log windows" test "$npts" -ge 4
expect "a 1-epoch run: its single evaluation is drawn as a point in both panels" \
  test "$(xp "$one" 'count(//circle)')" = 2
"$exe" plot "$tmp/nowhere" >"$tmp/o" 2>&1
expect "kdpeers plot of a missing run fails clearly" grep -q "cannot read" "$tmp/o"

# --- determinism: the same seed gives identical eval lines ---
"$exe" "${common[@]}" -s run.dir="$tmp/r2" >/dev/null 2>&1
"$exe" plot "$tmp/r1" "$tmp/one-epoch" -o "$tmp/both.svg" >/dev/null
expect "kdpeers plot RUN_DIR RUN_DIR overlays both runs (legend names each run's peer0)" \
  bash -c "grep -q '>r1 peer0 ' '$tmp/both.svg' && grep -q '>one-epoch peer0 ' '$tmp/both.svg'"
expect "  ...with every curve of both (6 polylines)" test "$(xp "$tmp/both.svg" 'count(//polyline)')" = 6
expect "same seed, same results" cmp -s <(grep '"event":"eval"' "$m") \
  <(grep '"event":"eval"' "$tmp/r2/metrics.jsonl")
"$exe" "${common[@]}" -s run.seed=7 -s run.dir="$tmp/r3" >/dev/null 2>&1
expect "another seed, other results" bash -c "! cmp -s <(grep '\"event\":\"eval\"' '$m') <(grep '\"event\":\"eval\"' '$tmp/r3/metrics.jsonl')"

# --- bring your own data: the same examples as .npy (uint8 and float32) train exactly alike ---
mkdata="${2:-}"
if [ -x "$mkdata" ]; then
  "$mkdata" npy "$tmp/npy" 3000 2000 && "$mkdata" folder "$tmp/fold" 1500 300 3
  np_common=("${common[@]/data.subset=3000/data.subset=0}")
  for kind in u8 f32; do
    x=x.npy tx=tx.npy
    [ "$kind" = f32 ] && x=xf.npy tx=txf.npy
    "$exe" "${np_common[@]}" -s data.format=npy -s data.train_images="$tmp/npy/$x" \
      -s data.train_labels="$tmp/npy/y.npy" -s data.test_images="$tmp/npy/$tx" \
      -s data.test_labels="$tmp/npy/ty.npy" -s run.dir="$tmp/npy-$kind" >/dev/null 2>"$tmp/e"
    expect "npy $kind: the run exits 0 ($(tail -n 1 "$tmp/e"))" test -s "$tmp/npy-$kind/metrics.jsonl"
    expect "npy $kind: the same eval lines as the IDX run of the same examples" \
      cmp -s <(grep '"event":"eval"' "$m") <(grep '"event":"eval"' "$tmp/npy-$kind/metrics.jsonl")
    # kdpeers eval reads the .npy test set (float32 too) through the model files' predict path
    "$exe" eval "$tmp/npy-$kind" -s data.format=npy -s data.train_images="$tmp/npy/$x" \
      -s data.train_labels="$tmp/npy/y.npy" -s data.test_images="$tmp/npy/$tx" \
      -s data.test_labels="$tmp/npy/ty.npy" >"$tmp/ev" 2>&1
    acc=$(awk '$1 == "peer0" && $2 ~ /%/ { sub("%", "", $2); print $2 }' "$tmp/ev")
    last=$(grep '"event":"eval".*"model":"peer0"' "$tmp/npy-$kind/metrics.jsonl" | tail -n 1 | sed 's/.*"acc":\([0-9.]*\).*/\1/')
    expect "npy $kind: kdpeers eval of the run ($acc%) equals its own last evaluation ($last)" \
      awk -v a="$acc" -v b="$last" 'BEGIN { d = a / 100 - b; exit !(a != "" && d < 1e-4 && d > -1e-4) }'
  done
  "$exe" -s data.format=npy -s data.train_images="$tmp/npy/x.npy" -s data.train_labels="$tmp/npy/ty.npy" \
    -s data.test_images="$tmp/npy/tx.npy" -s data.test_labels="$tmp/npy/ty.npy" \
    -s run.dir="$tmp/never-npy" >/dev/null 2>"$tmp/e"
  expect "npy: a label count mismatch is refused before anything is written" test ! -e "$tmp/never-npy"
  expect "npy: ...and the message names both counts" grep -q "holds 2000 labels but the images file holds 3000" "$tmp/e"
  # an image folder of 3 classes: class names travel into the model file and predict's output
  "$exe" -s data.format=folder -s data.train_images="$tmp/fold/train" -s data.test_images="$tmp/fold/test" \
    -s run.epochs=2 -s "model.arch=mlp(64)" -s run.progress=none -s checkpoint.every_steps=1000 \
    -s run.dir="$tmp/fold-run" >/dev/null 2>"$tmp/e"
  expect "folder: the run exits 0 ($(tail -n 1 "$tmp/e"))" grep -q '"event":"summary"' "$tmp/fold-run/metrics.jsonl"
  acc=$(grep '"event":"eval"' "$tmp/fold-run/metrics.jsonl" | tail -n 1 | sed 's/.*"acc":\([0-9.]*\).*/\1/')
  expect "folder: 3 classes learnt (test accuracy $acc > 0.8)" awk -v a="$acc" 'BEGIN { exit !(a > 0.8) }'
  "$exe" export "$tmp/fold-run" --peer 0 -o "$tmp/fold.kdpm" >/dev/null
  "$exe" inspect "$tmp/fold.kdpm" >"$tmp/insp"
  expect "folder: the model file holds class_names" grep -q "class_names" "$tmp/insp"
  first=$(ls "$tmp/fold/test/trouser" | head -n 1)
  "$exe" predict "$tmp/fold.kdpm" "$tmp/fold/test/trouser/$first" "$tmp/fold/test/pullover/"*.png --top >"$tmp/pred"
  expect "folder: predict takes PNG files and names the class (trouser)" grep -q "^0 2 trouser$" "$tmp/pred"
  n_pull=$(ls "$tmp/fold/test/pullover" | wc -l)
  right=$(grep -c " pullover$" "$tmp/pred")
  expect "folder: most pullovers are called pullover ($right of $n_pull)" test "$right" -gt $((n_pull * 7 / 10))
  "$exe" predict "$tmp/fold.kdpm" "$tmp/npy/tx.npy" >"$tmp/pred2"
  expect "folder: predict also takes a .npy of images: one line per image with name and 3 probabilities" \
    test "$(awk 'NF == 6 && $3 ~ /^(t-shirt|trouser|pullover)$/' "$tmp/pred2" | wc -l)" = 2000
  "$exe" predict "$tmp/fold.kdpm" "$tmp/npy/txf.npy" >"$tmp/pred3"
  expect "folder: the float32 .npy of the same images (pixel / 255) predicts exactly the same" \
    cmp -s "$tmp/pred2" "$tmp/pred3"
  "$exe" predict "$tmp/fold.kdpm" "$tmp/npy/tx.npy" "$tmp/npy/txf.npy" >/dev/null 2>"$tmp/e"
  rc=$?
  expect "predict: uint8 and float32 inputs in one call are refused with why (exit $rc)" \
    bash -c "test $rc = 1 && grep -q 'cannot be mixed' '$tmp/e'"
  "$exe" predict "$tmp/fold.kdpm" "$tmp/fold/test/trouser/$first" --json >"$tmp/pred.json"
  expect "folder: --json names the class too" \
    bash -c "jq -e '.label == 2 and .class == \"trouser\" and (.probs | length) == 3' '$tmp/pred.json' >/dev/null"
else
  bad "kdp-mkdata (second argument) is missing: the npy and folder tests did not run"
fi

# --- progress on a terminal: launch/kdpeers-local under a pty (script) draws the bar although
# mpirun pipes the ranks' stderr; without a terminal, timestamped lines ---
if command -v script >/dev/null; then
  small=(-s data.subset=2000 -s data.test_subset=500 -s run.epochs=1 -s "model.arch=mlp(32)"
    -s run.log_every=2 -s server.enabled=false)
  # bar COLS NP [args]: the pty's output of launch/kdpeers-local, \r turned into newlines
  bar() {
    local cols="$1" np="$2"
    shift 2
    KDPEERS="$exe" timeout 120 script -qfec "stty cols $cols; $src/launch/kdpeers-local -np $np $(printf '%q ' "${small[@]}" "$@")" \
      /dev/null </dev/null 2>&1 | tr '\r' '\n'
  }
  bar 120 2 -s run.dir="$tmp/bar2" >"$tmp/bar2.txt"
  expect "terminal: 2 ranks under mpirun draw the bar" grep -q '^.\[Kepoch 0.25 \[#####\.*\] step 4/16 loss' "$tmp/bar2.txt"
  expect "terminal: the bar shows the learning rate and dml's kd" grep -q 'step 16/16 loss [0-9.]* kd [0-9.]* acc [0-9.]*% lr 0.0004804 ' "$tmp/bar2.txt"
  expect "terminal: no timestamped step lines" bash -c "! grep -qE '^20[0-9-]+T[0-9:]+ epoch' '$tmp/bar2.txt'"
  bar 120 1 -s run.dir="$tmp/bar1" >"$tmp/bar1.txt"
  expect "terminal: independent (1 peer): a bar without kd" bash -c "grep -q 'step 16/16 loss [0-9.]* acc' '$tmp/bar1.txt' && ! grep -q ' kd ' '$tmp/bar1.txt'"
  bar 60 2 -s run.dir="$tmp/bar3" >"$tmp/bar3.txt"
  long=$(grep 'step [0-9]*/16' "$tmp/bar3.txt" | sed 's/^.\[K//' | awk '{ if (length($0) > m) m = length($0) } END { print m + 0 }')
  expect "terminal: a 60-column terminal gets lines cut to 59 characters (longest $long)" test "$long" = 59
  KDPEERS="$exe" "$src/launch/kdpeers-local" -np 2 "${small[@]}" -s run.dir="$tmp/bar4" 2>"$tmp/bar4.txt" >/dev/null
  expect "no terminal: timestamped lines, no bar" bash -c "grep -qE '^20[0-9-]+T[0-9:]+ epoch 1.00 step 16/16' '$tmp/bar4.txt' && ! grep -q \$'\r' '$tmp/bar4.txt'"
else
  bad "script (util-linux) is missing: the terminal tests did not run"
fi

# --- max_steps, cnn, label noise ---
"$exe" -s data.subset=512 -s data.test_subset=500 -s model.arch=cnn -s run.max_steps=3 \
  -s run.progress=none -s data.label_noise=0.4 -s run.dir="$tmp/r4" >/dev/null 2>"$tmp/e4"
rc=$?
expect "cnn run with max_steps exits 0" test "$rc" = 0
expect "max_steps stops after 3 steps" grep -q '"event":"summary","steps":3,' "$tmp/r4/metrics.jsonl"

finish cli
