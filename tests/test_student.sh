#!/usr/bin/env bash
# test_student.sh: the deployable student. kdpeers-predict links no MPI/libuv/HTTP/JSON library
# (ldd); old (format 1) model files load and predict as the kdpeers that wrote them; every
# architecture kdpeers builds exports to ONNX that passes onnx's checker with full shape inference
# and that ONNX Runtime runs to the same labels and probabilities (within 1e-5) as kdpeers-predict;
# a trained mlp and cnn agree on 1,000 test images; launch/kdpm2torch.py loads the model files
# into PyTorch's reference models with the same predictions; PNG inputs; kdpeers serve MODEL.kdpm;
# export --ema writes a peer's EMA copy (run.ema_decay) as .kdpm and ONNX, which score what the run
# reported as peer0.ema; --best refuses a run without a validation split.
# Usage: tests/test_student.sh PATH/TO/kdpeers (kdpeers-predict and student_tool beside it, or in
# KDP_BUILD_ROOT). ONNX Runtime comes from launch/setup-onnxruntime: without it the ONNX Runtime
# checks skip with the reason, except under CI=true, where they fail.
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
build="${KDP_BUILD_ROOT:-$(dirname "$exe")}"
pred="$build/kdpeers-predict"
tool="$build/tests/student_tool"
py=/usr/bin/python3
check="$src/tests/student_check.py"
t10k=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
export NODE_PATH="$src/.cache/onnxruntime/node_modules"
# expect_out DESC CMD...: CMD succeeds; its last output line joins the description (one run)
expect_out() {
  local d="$1" out st
  shift
  out=$("$@" 2>&1)
  st=$?
  d="$d ($(tail -1 <<<"$out"))"
  if [ "$st" = 0 ]; then ok "$d"; else bad "$d"; printf '%s\n' "$out" | tail -5; fi
}

# ---------- ldd: only what inference needs ----------
libs=$(ldd "$pred")
expect "kdpeers-predict links libopenblas, libpng, libmsgpackc and zlib" \
  bash -c "grep -q libopenblas <<<'$libs' && grep -q libpng <<<'$libs' && grep -q libmsgpackc <<<'$libs' && grep -q libz <<<'$libs'"
expect "kdpeers-predict links no MPI, libuv, http-parser, json-c, protobuf-c or inih ($(awk '{print $1}' <<<"$libs" | tr '\n' ' '))" \
  bash -c "! grep -E -q 'libmpi|libopen-|libuv|http_parser|json-c|protobuf|inih|libpmix|libevent' <<<'$libs'"
expect "kdpeers (the trainer) does link MPI (so the check above can fail)" bash -c "ldd '$exe' | grep -q libmpi"
"$pred" --version >"$tmp/pv"
expect "kdpeers-predict --version names the version and OpenBLAS" \
  bash -c "grep -q '^kdpeers-predict [0-9.]* (git ' '$tmp/pv' && grep -qE '^OpenBLAS [0-9]+\.[0-9]+' '$tmp/pv'"
if head=$(git -C "$src" rev-parse --short=12 HEAD 2>/dev/null); then
  expect "kdpeers-predict --version names the git commit it was built from ($head)" \
    grep -q "^kdpeers-predict [0-9.]* (git $head" "$tmp/pv"
fi

if grep -qw avx512f /proc/cpuinfo; then
  expect "kdpeers-predict --version: this CPU has AVX-512, so the packed kernels run" \
    grep -q '^packed kernels: AVX-512' "$tmp/pv"
fi
# same_text A B: two text prediction files (index label p0 p1 ...): the same lines and labels,
# every printed probability within one unit of its last digit (1e-5)
same_text() {
  awk 'NR == FNR { a[FNR] = $0; n = FNR; next }
       { split(a[FNR], x, " "); if (NF != split(a[FNR], x, " ") || $1 != x[1] || $2 != x[2]) exit 1
         for (i = 3; i <= NF; i++) { d = $i - x[i]; if (d > 1.000001e-5 || d < -1.000001e-5) exit 1 } }
       END { if (FNR != n) exit 1 }' "$1" "$2"
}

# ---------- format 1 files (kdpeers 0.1.0) still load ----------
zcat "$t10k" | tail -c +17 | head -c $((784 * 1000)) >"$tmp/t1000.raw"
head -c $((784 * 100)) "$tmp/t1000.raw" >"$tmp/t100.raw"
v1="$src/tests/data/student-v1.kdpm"
"$pred" "$v1" "$tmp/t100.raw" >"$tmp/v1.pred"
"$pred" "$v1" "$tmp/t100.raw" --no-pack >"$tmp/v1-blas.pred"
# (not byte for byte any more: the tiled dense layer, bias first, already moved 2 of its 1,000
# printed probabilities by one unit in the last digit; the packed kernels sum in another order too)
expect "a format-1 model file predicts what the kdpeers that wrote it printed (labels; probabilities to the last printed digit)" \
  same_text "$tmp/v1.pred" "$src/tests/data/student-v1.pred"
expect "... also through OpenBLAS for every layer (--no-pack)" \
  same_text "$tmp/v1-blas.pred" "$src/tests/data/student-v1.pred"
expect "same_text fails on a changed label (so the checks above can fail)" \
  bash -c "! same_text <(sed '1s/^0 9 /0 8 /' '$tmp/v1.pred') '$tmp/v1.pred'"
expect "same_text fails on a probability 2e-5 off" \
  bash -c "! same_text <(sed '1s/0.94073/0.94075/' '$src/tests/data/student-v1.pred') '$src/tests/data/student-v1.pred'"
"$exe" export "$v1" -o "$tmp/v2.kdpm" >/dev/null
"$exe" inspect "$tmp/v2.kdpm" >"$tmp/v2.inspect"
expect "exporting it writes format 2 with PyTorch's names and shapes (0.weight [4,1,3,3])" \
  bash -c "grep -Eq 'model_format +u64 +scalar +8 +2' '$tmp/v2.inspect' && grep -Eq '^  0.weight +f32 +\[4,1,3,3\]' '$tmp/v2.inspect' && grep -Eq '^  1.running_var +f32 +\[4\]' '$tmp/v2.inspect' && ! grep -Eq '^  params ' '$tmp/v2.inspect'"
"$exe" predict "$tmp/v2.kdpm" - <"$tmp/t100.raw" >"$tmp/v2.pred"
expect "... and predicts the same, byte for byte (kdpeers predict on format 2 = kdpeers-predict on format 1)" cmp -s "$tmp/v2.pred" "$tmp/v1.pred"
printf 'KDPCKPT junk' >"$tmp/bad.kdpm"
expect "a damaged model file is refused with a message" \
  bash -c "'$pred' '$tmp/bad.kdpm' '$tmp/t100.raw' 2>&1 >/dev/null | grep -q 'not a kdpeers checkpoint'"

# (found by fuzz_model: a 6.6 KB format-2 file, a wide 1x1 conv on a damaged 4096 x 4096 input
# shape, made the reader ask for 4 TiB and abort)
expect "a model file whose activations would not fit in memory is refused with a message" \
  bash -c "'$pred' '$src/tests/fuzz/corpus/model/v2_huge_activations.kdpm' '$tmp/t100.raw' 2>&1 >/dev/null | grep -q 'GiB of memory here'"

# ---------- inputs: PNG, IDX, raw and stdin agree ----------
"$tool" png "$tmp/t100.raw" 28 28 1 5 "$tmp/img"
"$pred" "$tmp/v2.kdpm" "$tmp"/img-00{0,1,2,3,4}.png --json >"$tmp/png.jsonl"
head -c $((784 * 5)) "$tmp/t100.raw" | "$pred" "$tmp/v2.kdpm" --json >"$tmp/raw5.jsonl"
expect "5 PNG files predict as their raw pixels" \
  bash -c "diff <(jq -c '.probs' '$tmp/png.jsonl') <(jq -c '.probs' '$tmp/raw5.jsonl')"
expect "the JSON lines name each PNG as its source" \
  test "$(jq -r .source "$tmp/png.jsonl" | head -2 | tail -1)" = "$tmp/img-001.png"
"$pred" "$tmp/v2.kdpm" "$t10k" --top | head -100 >"$tmp/idx.top"
# npy_u8 RAW N H W OUT: a NumPy .npy (format 1.0, |u1, shape (N, H, W)) of raw pixels, as np.save
npy_u8() {
  local d="{'descr': '|u1', 'fortran_order': False, 'shape': ($2, $3, $4), }" hl
  hl=$(( (10 + ${#d} + 1 + 63) / 64 * 64 - 10 ))
  { printf '\x93NUMPY\x01\x00'; printf "\\x$(printf %02x $((hl & 255)))\\x$(printf %02x $((hl >> 8)))"
    printf '%s%*s\n' "$d" $((hl - ${#d} - 1)) ""; cat "$1"; } >"$5"
}
npy_u8 "$tmp/t100.raw" 100 28 28 "$tmp/t100.npy"
"$pred" "$tmp/v2.kdpm" "$tmp/t100.npy" >"$tmp/npy.pred"
expect "a .npy of the same images predicts exactly as the raw pixels" \
  cmp -s "$tmp/npy.pred" "$tmp/v1.pred"
expect "an IDX .gz file predicts as its raw pixels" \
  bash -c "diff <(cut -d' ' -f1,2 '$tmp/idx.top') <(cut -d' ' -f1,2 '$tmp/v1.pred')"
expect "raw input of a partial image is refused" \
  bash -c "head -c 1000 '$tmp/t100.raw' | '$pred' '$tmp/v2.kdpm' 2>&1 >/dev/null | grep -q 'not a whole number of images'"

# ---------- every architecture: ONNX (checker, ONNX Runtime) and PyTorch against kdpeers ----------
have_ort=0
ort_why=""
if ! command -v node >/dev/null; then
  ort_why="node is missing (launch/setup installs nodejs)"
elif ! node -e "require('onnxruntime-node')" 2>"$tmp/ort.err"; then
  ort_why="onnxruntime-node is not installed in $NODE_PATH (launch/setup-onnxruntime could not reach the npm registry?): $(head -1 "$tmp/ort.err")"
else
  have_ort=1
fi
if [ "$have_ort" = 0 ]; then
  if [ "${CI:-}" = true ]; then
    bad "ONNX Runtime is required under CI=true: $ort_why"
  else
    echo "skip - ONNX Runtime checks: $ort_why"
  fi
fi
have_torch=0
if $py -c "import torch, msgpack, numpy" 2>/dev/null; then have_torch=1; else
  echo "skip - kdpm2torch.py checks: Debian's python3-torch / python3-msgpack / python3-numpy missing (launch/setup --torch)"
fi
have_onnx=0
if $py -c "import onnx" 2>/dev/null; then have_onnx=1; elif [ "${CI:-}" = true ]; then
  bad "python3-onnx is required under CI=true (launch/setup installs it)"
else echo "skip - onnx checker: python3-onnx missing (launch/setup installs it)"; fi

# random uint8 images for 3-channel 32x32 models
head -c $((3072 * 64)) /dev/urandom >"$tmp/rgb64.raw"
# the zoo (mlp, cnn, ResNet, WRN) and seq specs with every op: conv with and without padding,
# stride 2, batchnorm on conv and dense outputs, max/avg pooling (with padding), gap, dropout,
# flatten of multi-channel maps, dense on the raw input
archs=(
  "28 28 1 10 mlp(64,32)"
  "28 28 1 10 cnn"
  "32 32 3 10 mlp(40)"
  "32 32 3 10 resnet20"
  "28 28 1 10 wrn10_2"
  "32 32 3 7 seq:conv(8,3),bn,relu,maxpool(2),conv(12,3,2,1),bn,relu,avgpool(3,2,1),dropout(0.3),flatten,dense(24),bn,relu,dense(7)"
  "28 28 1 10 seq:conv(6,5,1,0),relu,gap,dense(10)"
  "28 28 1 5 seq:dense(32),dropout(0.5),relu"
  "32 32 3 7 seq:conv(40,3,1,0),bn,maxpool(2),relu,conv(5,1,1,0),bn,maxpool(2),relu,flatten,dense(33),relu,dense(7)"
)
i=0
onnx_files=() torch_gray=() torch_rgb=()
for spec in "${archs[@]}"; do
  read -r H W C K arch <<<"$spec"
  m="$tmp/a$i"
  if [ "$C" = 3 ]; then img="$tmp/rgb64.raw"; else img="$tmp/t100.raw"; fi
  "$tool" model "$arch" "$H" "$W" "$C" "$K" $((i + 7)) "$m.kdpm" || bad "student_tool model $arch"
  "$pred" "$m.kdpm" "$img" --json >"$m.kdp.jsonl"
  "$exe" export "$m.kdpm" -o "$m.onnx" >/dev/null || bad "export $arch to ONNX"
  if [ "$have_onnx" = 1 ]; then
    onnx_files+=("$m.onnx:$K")
  fi
  if [ "$have_ort" = 1 ]; then
    node "$src/launch/ort_run.js" predict "$m.onnx" "$img" "$H" "$W" "$C" >"$m.ort.jsonl"
    expect_out "$arch: ONNX Runtime = kdpeers-predict" $py "$check" compare "$m.kdp.jsonl" "$m.ort.jsonl" 1e-5
  fi
  if [ "$C" = 3 ]; then torch_rgb+=("$m.kdpm"); else torch_gray+=("$m.kdpm"); fi
  i=$((i + 1))
done
# one process each for the checker and PyTorch (their imports take seconds)
if [ "$have_onnx" = 1 ]; then
  $py "$check" onnx "${onnx_files[@]}" >"$tmp/onnx.out" 2>&1
  for f in "${onnx_files[@]}"; do
    line=$(grep -F "${f%:*}: " "$tmp/onnx.out")
    expect "$(basename "${f%:*}"): onnx.checker full_check + strict shape inference (${line#*: })" \
      grep -q "check_model(full_check) ok" <<<"$line"
  done
fi
if [ "$have_torch" = 1 ]; then
  for set in gray rgb; do
    if [ $set = gray ]; then models=("${torch_gray[@]}") img="$tmp/t100.raw"; else models=("${torch_rgb[@]}") img="$tmp/rgb64.raw"; fi
    $py "$src/launch/kdpm2torch.py" "${models[@]}" --images "$img" --predict "$pred" >"$tmp/torch.out" 2>&1
    for mfile in "${models[@]}"; do
      line=$(grep -F "$mfile: " "$tmp/torch.out")
      expect "kdpm2torch.py: PyTorch's reference model = kdpeers-predict (${line#*: })" grep -q ": 0 labels differ" <<<"$line"
    done
  done
fi

# (the last seq model: the packed kernels' edges: fused conv -> bn -> pool -> relu blocks of 40
# channels (a part panel), 900 output rows per image (not a multiple of 8), a pointwise unpadded
# conv, odd pooled maps, dense widths 33 and 7)

# ---------- trained students: mlp and cnn, 1,000 test images ----------
for arch in "mlp(128)" cnn; do
  r="$tmp/run-${arch%%(*}"
  ema=0 # the cnn (batchnorm) also keeps an EMA copy, for export --ema below
  [ "$arch" = cnn ] && ema=0.9
  "$exe" -s run.dir="$r" -s model.arch="$arch" -s run.max_steps=25 -s checkpoint.every_steps=25 \
    -s run.ema_decay=$ema -s run.progress=none -s data.test_subset=500 >"$r.log" 2>&1 || bad "training $arch: $(tail -2 "$r.log")"
  "$exe" export "$r" --peer 0 -o "$r.kdpm" >/dev/null
  "$exe" export "$r" --peer 0 --format onnx -o "$r.model" >/dev/null
  expect "$arch (trained): the run's class names (Fashion-MNIST) go into the model file and ONNX" \
    bash -c "'$pred' '$r.kdpm' '$tmp/t100.raw' --top --json | head -1 | jq -e '.class | length > 0' >/dev/null && grep -q 'Ankle boot' '$r.model'"
  "$pred" "$r.kdpm" "$tmp/t1000.raw" --json >"$r.kdp.jsonl"
  "$pred" "$r.kdpm" "$tmp/t1000.raw" --json --no-pack >"$r.blas.jsonl"
  "$pred" "$r.kdpm" "$tmp/t1000.raw" --json --threads 2 --batch 100 >"$r.t2.jsonl"
  "$pred" "$r.kdpm" "$tmp/t1000.raw" --json --threads 1 --batch 100 >"$r.t1.jsonl"
  expect_out "$arch (trained): the packed kernels = OpenBLAS for every layer (--no-pack)" \
    $py "$check" compare "$r.kdp.jsonl" "$r.blas.jsonl" 1e-5
  expect "$arch (trained): 2 threads predict byte for byte as 1" cmp -s "$r.t1.jsonl" "$r.t2.jsonl"
  if [ "$have_ort" = 1 ]; then
    node "$src/launch/ort_run.js" predict "$r.model" "$tmp/t1000.raw" 28 28 1 >"$r.ort.jsonl"
    expect_out "$arch (trained): ONNX Runtime = kdpeers-predict on 1,000 test images" \
      $py "$check" compare "$r.kdp.jsonl" "$r.ort.jsonl" 1e-5
  fi
done

# ---------- export options ----------
r="$tmp/run-cnn"
"$exe" export "$tmp/run-mlp" --ema -o "$tmp/x.kdpm" 2>"$tmp/ema.err"
expect "export --ema of a run without EMA copies fails (exit 1) naming run.ema_decay" \
  bash -c "'$exe' export '$tmp/run-mlp' --ema -o '$tmp/x.kdpm' 2>/dev/null; test \$? = 1 && grep -q 'run.ema_decay' '$tmp/ema.err' && test ! -e '$tmp/x.kdpm'"
"$exe" export "$r" --ema -o "$tmp/ema.kdpm" >/dev/null
"$exe" export "$r" --peer 0 --ema --format onnx -o "$tmp/ema.model" >/dev/null
"$exe" eval "$tmp/ema.kdpm" -s data.test_subset=500 >"$tmp/ema.ev" 2>&1
acc=$(awk '$1 == "model" && $2 ~ /%/ { sub("%", "", $2); print $2 }' "$tmp/ema.ev")
last=$(grep '"model":"peer0.ema"' "$r/metrics.jsonl" | tail -n 1 | sed 's/.*"acc":\([0-9.]*\).*/\1/')
peer=$(grep '"model":"peer0"' "$r/metrics.jsonl" | tail -n 1 | sed 's/.*"loss":\([0-9.]*\).*/\1/')
expect "export --ema: the EMA copy scores the run's own last peer0.ema ($acc% vs $last)" \
  awk -v a="$acc" -v b="$last" 'BEGIN { d = a / 100 - b; exit !(b != "" && d < 1e-4 && d > -1e-4) }'
expect "  ...and it is not the peer itself (EMA loss $(awk '$1 == "model" && $2 ~ /%/ { print $3 }' "$tmp/ema.ev"), peer $peer)" \
  awk -v a="$(awk '$1 == "model" && $2 ~ /%/ { print $3 }' "$tmp/ema.ev")" -v b="$peer" 'BEGIN { d = a - b; exit !(d > 1e-3 || d < -1e-3) }'
# kdpeers eval of the run lists each peer and then its EMA copy (no ensemble of one peer)
"$exe" eval "$r" -s data.test_subset=500 >"$tmp/run.ev" 2>&1
ev_acc() { awk -v m="$1" '$1 == m { sub("%", "", $2); print $2 }' "$tmp/run.ev"; }
expect "eval RUN_DIR lists peer0 then its EMA copy peer0.ema ($(awk 'NR > 1 { print $1 }' "$tmp/run.ev" | tr '\n' ' '))" \
  test "$(awk 'NR > 1 { print $1 }' "$tmp/run.ev" | tr '\n' ' ')" = "peer0 peer0.ema "
expect "  ...peer0.ema scores the run's own last peer0.ema ($(ev_acc peer0.ema)% vs $last)" \
  awk -v a="$(ev_acc peer0.ema)" -v b="$last" 'BEGIN { d = a / 100 - b; exit !(a != "" && d < 1e-4 && d > -1e-4) }'
if [ "$have_ort" = 1 ]; then
  "$pred" "$tmp/ema.kdpm" "$tmp/t1000.raw" --json >"$tmp/ema.kdp.jsonl"
  node "$src/launch/ort_run.js" predict "$tmp/ema.model" "$tmp/t1000.raw" 28 28 1 >"$tmp/ema.ort.jsonl"
  expect_out "export --ema --format onnx: ONNX Runtime = kdpeers-predict of the EMA copy" \
    $py "$check" compare "$tmp/ema.kdp.jsonl" "$tmp/ema.ort.jsonl" 1e-5
fi
expect "export --best refuses (exit 2) for a run without a validation split (data.val_size)" \
  bash -c "'$exe' export '$r' --best -o '$tmp/x.kdpm' 2>&1 | grep -q 'validation split'; '$exe' export '$r' --best -o '$tmp/x.kdpm' 2>/dev/null; test \$? = 2"
expect "export --classes with the wrong count fails" \
  bash -c "'$exe' export '$r' --classes a,b -o '$tmp/x.kdpm' 2>&1 | grep -q '2 class names for 10 classes' && test ! -e '$tmp/x.kdpm'"
"$exe" export "$v1" --classes "zero,one,two,three,four,five,six,seven,eight,nine" -o "$tmp/named.kdpm" >/dev/null
expect "--classes names the labels in kdpeers-predict's output" \
  test "$("$pred" "$tmp/named.kdpm" "$tmp/t100.raw" --top | head -1)" = "0 9 nine"

# ---------- kdpeers serve MODEL.kdpm ----------
rm -f "$tmp/v2.kdpm.addr"
"$exe" serve "$tmp/v2.kdpm" -s server.port=0 >"$tmp/serve.log" 2>&1 &
spid=$!
pids+=("$spid")
for _ in $(seq 1 100); do [ -s "$tmp/v2.kdpm.addr" ] && break; sleep 0.05; done
addr=$(cat "$tmp/v2.kdpm.addr" 2>/dev/null)
body=$(head -c 784 "$tmp/t100.raw" | od -An -v -tu1 | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
curl -s -X POST "$addr/predict" -d "{\"inputs\": [[${body}]]}" >"$tmp/served.json"
want=$(head -1 "$tmp/v1.pred" | cut -d' ' -f3-)
got=$(jq -r '.peers[0][0] | map(. * 100000 | round / 100000) | map(tostring) | join(" ")' "$tmp/served.json" 2>/dev/null)
expect "kdpeers serve MODEL.kdpm answers /predict with the model's probabilities" \
  awk -v a="$want" -v b="$got" 'BEGIN { n = split(a, x, " "); split(b, y, " "); if (n != 10) exit 1; for (i = 1; i <= n; i++) { d = x[i] - y[i]; if (d > 2e-5 || d < -2e-5) exit 1 } }'
curl -s -X POST "$addr/control" -d '{"action":"stop"}' >/dev/null
for _ in $(seq 1 100); do kill -0 "$spid" 2>/dev/null || break; sleep 0.05; done
expect "/control stop ends it" bash -c "! kill -0 $spid 2>/dev/null"

finish test_student
