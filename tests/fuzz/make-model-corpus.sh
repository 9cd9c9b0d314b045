#!/usr/bin/env bash
# make-model-corpus.sh: the format-2 seeds of fuzz_model (tests/fuzz/corpus/model/v2_*), written by
# the real writer (kdp_modelfile_write through tests/student_tool and kdpeers export), small
# enough for the fuzzer's 64 KiB inputs, plus field-mutation seeds (0xff, how, seed, entry: see
# fuzz_model.c). v2_huge_activations.kdpm (a 4096 x 4096 input shape on a wide 1x1 conv: asked
# the reader for 4 TiB) is a regression seed, made once by hand from v2_seq_wide and kept.
# Usage: tests/fuzz/make-model-corpus.sh [BUILD_DIR]   (default build)
set -euo pipefail
src="$(cd "$(dirname "$0")/../.." && pwd)"
bd="${1:-$src/build}"
out="$src/tests/fuzz/corpus/model"
tool="$bd/tests/student_tool"
"$tool" model "mlp(8)" 6 6 1 3 1 "$out/v2_mlp.kdpm"
"$tool" model "seq:conv(4,3,1,1),bn,maxpool(2),relu,flatten,dense(5)" 6 6 2 5 2 "$out/v2_seq_block.kdpm"
"$tool" model "seq:conv(3,3,2,1),bn,relu,avgpool(2),gap,dense(4),bn,dropout(0.5),relu" 7 5 3 2 3 "$out/v2_seq_ops.kdpm"
"$tool" model "seq:conv(256,1,1,0),gap,dense(2)" 8 8 3 2 1 "$out/v2_seq_wide.kdpm"
"$bd/kdpeers" export "$out/v2_mlp.kdpm" --classes "T-shirt,two words,x" -o "$out/v2_mlp_names.kdpm" >/dev/null
# field mutations: every how (0..8) on a few entries of every start-up seed
for s in 0 1 2 3 4 5; do
  for h in 0 1 2 3 4 5 6 7 8; do
    e=$(( (s * 7 + h * 5) % 19 ))
    printf "\xff\x$(printf %02x "$h")\x$(printf %02x "$s")\x$(printf %02x "$e")\x04name\x01\x02\x03\x04\x05\x06\x07\x08\x09" \
      >"$out/field_${s}_${h}"
  done
done
