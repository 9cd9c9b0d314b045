// ort_run.js: ONNX Runtime (npm onnxruntime-node) on a kdpeers ONNX export, for the tests and
// launch/bench-student. Needs NODE_PATH=.cache/onnxruntime/node_modules (launch/setup-onnxruntime).
//   node launch/ort_run.js predict MODEL.onnx PIXELS.raw H W C        one JSON line per image:
//        {"label": k, "probs": [...]}  (softmax of the logits in double precision)
//   node launch/ort_run.js bench MODEL.onnx PIXELS.raw H W C BATCH REPS
//        one JSON line: the time of session.run on the first BATCH images (the input tensor is
//        built once, outside the timing), 1 intra-op and 1 inter-op thread
// PIXELS.raw: uint8 images, H x W x C each (NHWC, as kdpeers-predict reads raw input); the model
// takes float32 NCHW raw pixel values (0..255) and normalises them itself.
'use strict';
const fs = require('fs');
const ort = require('onnxruntime-node');

function die(msg) {
  process.stderr.write(`ort_run: ${msg}\n`);
  process.exit(2);
}

function nchw(raw, first, n, H, W, C) {
  const isz = H * W * C, x = new Float32Array(n * isz);
  for (let i = 0; i < n; i++)
    for (let h = 0; h < H; h++)
      for (let w = 0; w < W; w++)
        for (let c = 0; c < C; c++)
          x[i * isz + (c * H + h) * W + w] = raw[(first + i) * isz + (h * W + w) * C + c];
  return new ort.Tensor('float32', x, [n, C, H, W]);
}

async function main() {
  const [cmd, model, rawPath, Hs, Ws, Cs, Bs, Rs] = process.argv.slice(2);
  if (!['predict', 'bench'].includes(cmd) || !Cs) die('usage: see the comment at the top');
  const H = +Hs, W = +Ws, C = +Cs, isz = H * W * C;
  const raw = fs.readFileSync(rawPath);
  if (raw.length % isz) die(`${rawPath}: ${raw.length} bytes is not a whole number of ${H}x${W}x${C} images`);
  const n = raw.length / isz;
  const opts = {intraOpNumThreads: 1, interOpNumThreads: 1, executionMode: 'sequential',
                graphOptimizationLevel: 'all'};
  const t0 = process.hrtime.bigint();
  const session = await ort.InferenceSession.create(model, opts);
  const loadSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
  if (cmd === 'predict') {
    const out = [];
    for (let first = 0; first < n; first += 256) {
      const b = Math.min(256, n - first);
      const r = await session.run({pixels: nchw(raw, first, b, H, W, C)});
      const z = r.logits.data, K = r.logits.dims[1];
      for (let i = 0; i < b; i++) {
        const row = Array.from(z.subarray(i * K, (i + 1) * K));
        const m = Math.max(...row), e = row.map((v) => Math.exp(v - m));
        const s = e.reduce((a, v) => a + v, 0);
        let am = 0;
        for (let k = 1; k < K; k++) if (row[k] > row[am]) am = k;
        out.push(JSON.stringify({label: am, probs: e.map((v) => v / s)}));
      }
    }
    process.stdout.write(out.join('\n') + '\n');
    return;
  }
  const B = +Bs, reps = +Rs;
  if (!(B >= 1 && B <= n && reps >= 1)) die(`bench needs 1 <= BATCH <= ${n} and REPS >= 1`);
  const feeds = {pixels: nchw(raw, 0, B, H, W, C)};
  const warm = Math.floor(reps / 10) + 1;
  for (let r = 0; r < warm; r++) await session.run(feeds);
  const t1 = process.hrtime.bigint();
  for (let r = 0; r < reps; r++) await session.run(feeds);
  const dt = Number(process.hrtime.bigint() - t1) / 1e9;
  console.log(JSON.stringify({impl: 'onnxruntime', version: ort.env.versions.node, batch: B, reps,
    seconds: dt, us_per_batch: 1e6 * dt / reps, images_per_second: reps * B / dt,
    session_create_seconds: loadSeconds}));
}

main().catch((e) => die(e && e.stack ? e.stack : String(e)));
