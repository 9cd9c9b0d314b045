#!/usr/bin/python3
"""bench_torch.py: the PyTorch half of launch/bench-speed, and its report.

  bench_torch.py train --model ARCH [--steps N] [--warmup N] [--batch N] [--out FILE]
      Trains ARCH (mlp(h1,...), mlp = mlp(512,256), or cnn) on Fashion-MNIST pre-loaded as
      tensors, one thread, SGD nesterov momentum 0.9, wd 5e-4, lr 0.05, cosine, and prints one
      JSON line {"steps", "train_seconds", "steps_per_second", "peak_rss_mb", ...}. The warm-up
      steps are run first and excluded from the timing.

  bench_torch.py report --dir DIR --json FILE --model ARCH... --steps N --repeat N
                        [--threads LIST] [--native PATH]
      Reads the per-run files bench-speed wrote into DIR (roofline.rR.json,
      kdpeers.mI.tT.rR.jsonl, native.mI.tT.rR.jsonl, torch.mI.tT.CONFIG.rR.json,
      stepprof.mI.json, commands.txt, loadavg.*) and prints the comparison tables.

Run with Debian's /usr/bin/python3 (python3-torch 1.13).
"""
import argparse
import glob
import gzip
import json
import math
import os
import re
import resource
import statistics
import sys
import time

DATA_DIR = "/usr/share/datasets/fashion-mnist"
# Fashion-MNIST pixel mean/std (after /255); only affects values, not speed.
MEAN, STD = 0.2860, 0.3530
IN_H, IN_W, IN_C, N_CLASSES = 28, 28, 1, 10


def canonical_arch(arch):
    return "mlp(512,256)" if arch == "mlp" else arch


def mlp_hidden(arch):
    m = re.fullmatch(r"mlp\(([0-9]+(?:,[0-9]+)*)\)", arch)
    if not m:
        return None
    return [int(h) for h in m.group(1).split(",")]


def flops_per_step(arch, batch):
    """Honest GEMM FLOPs of one training step and the forward FLOPs, per the brief.

    Returns (step, forward): step = forward + weight-gradient GEMMs of every layer + input-gradient
    GEMMs of every layer but the first (3x forward minus the first layer's forward);
    forward = 2*M*N*K summed over the layers' GEMMs. Both for the whole batch."""
    arch = canonical_arch(arch)
    hidden = mlp_hidden(arch)
    if hidden is not None:
        dims = [IN_H * IN_W * IN_C] + hidden + [N_CLASSES]
        layers = [2 * a * b for a, b in zip(dims[:-1], dims[1:])]
    elif arch == "cnn":
        layers = [2 * 28 * 28 * 32 * 9, 2 * 14 * 14 * 64 * 288, 2 * 3136 * 128, 2 * 128 * 10]
    else:
        raise SystemExit(f"bench_torch: unknown arch '{arch}' (expected mlp, mlp(h1,...) or cnn)")
    fwd = sum(layers)
    return batch * (3 * fwd - layers[0]), batch * fwd


# ----------------------------------------------------------------------------- train


def read_idx_gz(path):
    import numpy as np

    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise SystemExit(f"bench_torch: {path}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise SystemExit(f"bench_torch: {path}: {data.size} bytes of data, header says {dims}")
    return data.reshape(dims)


def build_model(arch, pool_first=False):
    """pool_first (cnn): max-pool before an in-place ReLU, the same function (relu and max
    commute), with the ReLU on a 4x smaller map; kdpeers' cnn runs that order too."""
    import torch.nn as nn

    arch = canonical_arch(arch)
    hidden = mlp_hidden(arch)
    if hidden is not None:
        layers, d = [nn.Flatten()], IN_H * IN_W * IN_C
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, N_CLASSES))
        return nn.Sequential(*layers)
    if arch == "cnn":
        # as build_cnn in src/nn/model.c: conv(32,3,1,1)+bias bn relu maxpool2,
        # conv(64,3,1,1)+bias bn relu maxpool2, flatten, fc128 relu, fc10
        if pool_first:
            return nn.Sequential(
                nn.Conv2d(1, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.MaxPool2d(2), nn.ReLU(True),
                nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.MaxPool2d(2), nn.ReLU(True),
                nn.Flatten(), nn.Linear(7 * 7 * 64, 128), nn.ReLU(True), nn.Linear(128, N_CLASSES))
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(7 * 7 * 64, 128), nn.ReLU(), nn.Linear(128, N_CLASSES))
    raise SystemExit(f"bench_torch: unknown arch '{arch}' (expected mlp, mlp(h1,...) or cnn)")


def cmd_train(a):
    # OpenBLAS (PyTorch's BLAS here: libblas.so.3 -> OpenBLAS) reads its thread count when torch
    # loads it, so it is set before the import
    if a.blas_threads is not None:
        os.environ["OPENBLAS_NUM_THREADS"] = str(a.blas_threads)
    import torch

    if a.threads > 0:  # 0: PyTorch's default (as many threads as cores)
        torch.set_num_threads(a.threads)
        torch.set_num_interop_threads(1)
    torch.manual_seed(a.seed)
    if a.mkldnn == "off":
        torch.backends.mkldnn.enabled = False
    if a.flush_denormal:
        torch.set_flush_denormal(True)
    t_load = time.perf_counter()
    x = read_idx_gz(os.path.join(a.data_dir, "train-images-idx3-ubyte.gz"))
    y = read_idx_gz(os.path.join(a.data_dir, "train-labels-idx1-ubyte.gz"))
    if len(x) != len(y):
        raise SystemExit(f"bench_torch: {len(x)} images but {len(y)} labels in {a.data_dir}")
    X = ((torch.from_numpy(x.copy()).float() / 255.0 - MEAN) / STD).unsqueeze(1).contiguous()
    if a.flat_input:  # (N, 784): the MLP's input without a view
        X = X.reshape(len(X), -1).contiguous()
    Y = torch.from_numpy(y.astype("int64"))
    load_seconds = time.perf_counter() - t_load

    model = build_model(a.model, pool_first=a.pool_first)
    if a.flat_input and isinstance(model[0], torch.nn.Flatten):
        model = torch.nn.Sequential(*list(model)[1:])
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
        X = X.contiguous(memory_format=torch.channels_last)
    total = a.warmup + a.steps
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum, nesterov=True,
                          weight_decay=a.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    n, pos, perm = len(X), len(X), None
    loss = None
    t0 = c0 = None
    for step in range(total):
        if step == a.warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        if pos + a.batch > n:  # new epoch: reshuffle, drop the last partial batch
            perm, pos = torch.randperm(n), 0
        idx = perm[pos:pos + a.batch]
        pos += a.batch
        xb, yb = X.index_select(0, idx), Y.index_select(0, idx)
        opt.zero_grad(set_to_none=a.zero_grad == "none")
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        sched.step()
    train_seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    step_flops, fwd_flops = flops_per_step(a.model, a.batch)
    res = {
        "event": "summary", "impl": "pytorch", "arch": canonical_arch(a.model),
        "batch": a.batch, "steps": a.steps, "warmup_steps": a.warmup,
        "train_seconds": train_seconds, "steps_per_second": a.steps / train_seconds,
        "cpu_seconds": cpu_seconds, "cores_busy": cpu_seconds / train_seconds,
        "load_seconds": load_seconds, "final_loss": float(loss.item()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "n_params": sum(p.numel() for p in model.parameters()),
        "flops_per_step": step_flops, "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "config": torch_config_name(a),
        "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
    }
    line = json.dumps(res)
    print(line)
    if a.out:
        with open(a.out, "w") as f:
            f.write(line + "\n")


def torch_config_name(a):
    """Short name of a PyTorch configuration: torch threads, OpenBLAS threads, options."""
    parts = [f"torch{a.threads}", f"blas{a.blas_threads if a.blas_threads is not None else '?'}"]
    parts += [k for k, on in (("channels_last", a.channels_last), ("mkldnn_off", a.mkldnn == "off"),
                              ("set_to_none", a.zero_grad == "none"), ("flat", a.flat_input),
                              ("pool_first", a.pool_first),
                              ("ftz", a.flush_denormal)) if on]
    return "/".join(parts)


# ----------------------------------------------------------------------------- report


def load_json(path):
    with open(path) as f:
        return json.load(f)


def last_summary(path):
    """Last line of a kdpeers metrics.jsonl (or a copied summary), which must be the summary."""
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    if not lines:
        raise SystemExit(f"bench_torch report: {path} is empty")
    s = json.loads(lines[-1])
    if s.get("event") != "summary":
        raise SystemExit(f"bench_torch report: last line of {path} is not a summary event: "
                         f"{lines[-1][:200]}")
    return s


def stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "values": values}


def spread(st):
    """Relative half-range around the median, in percent."""
    return 100.0 * (st["max"] - st["min"]) / 2.0 / st["median"] if st["median"] else 0.0


def sps_runs(pattern):
    """steps/s stats and peak RSS of the runs matching a glob (kdpeers summaries or torch JSON)."""
    runs = []
    for p in sorted(glob.glob(pattern)):
        runs.append(last_summary(p) if p.endswith(".jsonl") else load_json(p))
    if not runs:
        return None
    return {"steps_per_second": stats([r["steps_per_second"] for r in runs]),
            "peak_rss_mb": stats([r["peak_rss_mb"] for r in runs]), "steps": runs[0].get("steps"),
            "runs": runs}


def cmd_report(a):
    threads = [int(t) for t in a.threads.split(",")]
    meta = {"models": [canonical_arch(m) for m in a.model], "threads": threads, "batch": a.batch,
            "steps": a.steps, "repeat": a.repeat, "native": a.native,
            "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                   "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                   "GLIBC_TUNABLES")}}
    for key, name in (("load_before", "loadavg.before"), ("load_after", "loadavg.after")):
        path = os.path.join(a.dir, name)
        if os.path.exists(path):
            with open(path) as f:
                meta[key] = " ".join(f.read().split()[:3])
    path = os.path.join(a.dir, "commands.txt")
    if os.path.exists(path):
        with open(path) as f:
            meta["commands"] = f.read().splitlines()
    rooflines = [load_json(p) for p in sorted(glob.glob(os.path.join(a.dir, "roofline.r*.json")))]
    if not rooflines:
        raise SystemExit(f"bench_torch report: no roofline.r*.json in {a.dir}")
    sq = stats([r["square"]["gflops_best"] for r in rooflines])
    out = {"meta": meta, "flop_convention": rooflines[0]["flop_convention"],
           "openblas_config": rooflines[0]["openblas_config"],
           "openblas_corename": rooflines[0]["openblas_corename"],
           "square_peak_gflops": sq, "models": []}
    med = lambda r: r["steps_per_second"]["median"] if r else None  # noqa: E731
    for i, arch in enumerate(meta["models"]):
        tag = f"m{i}"
        rl = [m for r in rooflines for m in r["models"]
              if m["arch"] == arch and m["conv_chunk_floats"] == 0]
        rl_chunk = [m for r in rooflines for m in r["models"]
                    if m["arch"] == arch and m["conv_chunk_floats"] > 0] or rl
        if not rl:
            raise SystemExit(f"bench_torch report: no roofline for '{arch}'")
        step_flops, fwd_flops = flops_per_step(arch, meta["batch"])
        if rl[0]["flops_per_step"] != step_flops:
            raise SystemExit(f"bench_torch report: roofline counts {rl[0]['flops_per_step']} FLOPs "
                             f"per step for {arch}, the formula {step_flops}")
        m = {"arch": arch, "batch": meta["batch"], "flops_per_step": step_flops,
             "flops_per_step_pytorch_convention_3x_forward": 3 * fwd_flops,
             "roofline_seconds_per_step": stats([m["roofline_seconds_per_step"] for m in rl]),
             "roofline_chunked_seconds_per_step":
                 stats([m["roofline_seconds_per_step"] for m in rl_chunk]),
             "roofline_chunked_conv_chunk_floats": rl_chunk[0]["conv_chunk_floats"],
             "gemms": rl[0]["gemms"], "gemms_chunked": rl_chunk[0]["gemms"], "by_threads": []}
        for t in threads:
            row = {"threads": t,
                   "kdpeers": sps_runs(os.path.join(a.dir, f"kdpeers.{tag}.t{t}.r*.jsonl")),
                   "kdpeers_native": sps_runs(os.path.join(a.dir, f"native.{tag}.t{t}.r*.jsonl")),
                   "pytorch_configs": {}}
            for p in sorted(glob.glob(os.path.join(a.dir, f"torch.{tag}.t{t}.*.r*.json"))):
                name = os.path.basename(p)[len(f"torch.{tag}.t{t}."):].rsplit(".r", 1)[0]
                row["pytorch_configs"].setdefault(name, None)
            for name in row["pytorch_configs"]:
                row["pytorch_configs"][name] = sps_runs(
                    os.path.join(a.dir, f"torch.{tag}.t{t}.{name}.r*.json"))
            cfgs = {k: v for k, v in row["pytorch_configs"].items() if v}
            if cfgs:
                best = max(cfgs, key=lambda k: med(cfgs[k]))
                row["pytorch_best_config"] = best
                row["pytorch"] = cfgs[best]
            else:
                row["pytorch"] = None
            k = row["kdpeers"]
            if k and row["pytorch"]:
                row["kdpeers_over_pytorch"] = med(k) / med(row["pytorch"])
            if k and row["kdpeers_native"]:
                row["native_over_portable"] = med(row["kdpeers_native"]) / med(k)
            if k and t == 1:
                kd = med(k)
                row["kdpeers_gflops"] = step_flops * kd / 1e9
                row["kdpeers_percent_of_square_peak"] = 100.0 * step_flops * kd / 1e9 / sq["median"]
                row["kdpeers_x_shape_roofline_time"] = 1.0 / kd / m["roofline_seconds_per_step"]["median"]
                row["kdpeers_x_chunked_roofline_time"] = (
                    1.0 / kd / m["roofline_chunked_seconds_per_step"]["median"])
                row["roofline_ratio_percent"] = 100.0 / row["kdpeers_x_chunked_roofline_time"]
            m["by_threads"].append(row)
        base = m["by_threads"][0]
        for row in m["by_threads"][1:]:
            for name in ("kdpeers", "pytorch"):
                if row.get(name) and base.get(name):
                    row[f"{name}_speedup_over_{base['threads']}"] = med(row[name]) / med(base[name])
        sp = os.path.join(a.dir, f"stepprof.{tag}.json")
        if os.path.exists(sp):
            m["stepprof"] = load_json(sp)
        out["models"].append(m)

    def f_sps(r):
        if not r:
            return "-"
        st = r["steps_per_second"]
        return f"{st['median']:.1f} ±{spread(st):.0f}%"

    def show(hdr, table):
        widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(hdr)]
        print()
        for r in [hdr] + table:
            print("  ".join(c.rjust(w) if i else c.ljust(w)
                            for i, (c, w) in enumerate(zip(r, widths))))

    t1, t2, t3, t4 = [], [], [], []
    for m in out["models"]:
        for row in m["by_threads"]:
            t = row["threads"]
            sp_k = row.get(f"kdpeers_speedup_over_{threads[0]}")
            sp_t = row.get(f"pytorch_speedup_over_{threads[0]}")
            t1.append([m["arch"], str(t), f_sps(row["kdpeers"]), f_sps(row["pytorch"]),
                       row.get("pytorch_best_config", "-"),
                       f"{row['kdpeers_over_pytorch']:.2f}x" if "kdpeers_over_pytorch" in row else "-",
                       f"{sp_k:.2f}x" if sp_k else "", f"{sp_t:.2f}x" if sp_t else "",
                       f_sps(row["kdpeers_native"]),
                       f"{row['native_over_portable']:.3f}" if "native_over_portable" in row else "-"])
            for name, r in sorted(row["pytorch_configs"].items()):
                t2.append([m["arch"], str(t), name, f_sps(r)])
            if t == 1 and "kdpeers_gflops" in row:
                t3.append([m["arch"], f"{row['kdpeers_gflops']:.1f}", f"{sq['median']:.1f}",
                           f"{row['kdpeers_percent_of_square_peak']:.1f}%",
                           f"{1e3 / med(row['kdpeers']):.2f}",
                           f"{1e3 * m['roofline_seconds_per_step']['median']:.2f}",
                           f"{row['kdpeers_x_shape_roofline_time']:.2f}x",
                           f"{1e3 * m['roofline_chunked_seconds_per_step']['median']:.2f}",
                           f"{row['kdpeers_x_chunked_roofline_time']:.2f}x",
                           f"{row['roofline_ratio_percent']:.1f}%"])
        st = m.get("stepprof")
        if st:
            p = st["profile_1_thread"]
            mod = {e["threads"]: e for e in p["modelled"]}
            k1 = med(m["by_threads"][0]["kdpeers"]) if m["by_threads"][0]["kdpeers"] else None
            row = [m["arch"], f"{100 * p['serial_share']:.1f}%"]
            for n in (2, 16, 32, 64):
                e = mod[n]
                row.append(f"{e['amdahl_speedup']:.1f}x / {e['task_speedup']:.1f}x")
            row.append(f"{k1 * mod[64]['amdahl_speedup']:.0f}" if k1 else "-")
            t4.append(row)
    show(["model", "threads", "kdpeers steps/s", "PyTorch steps/s", "PyTorch config",
          "kdpeers/PyTorch", "kdpeers speed-up", "PyTorch speed-up", "native steps/s",
          "native/portable"], t1)
    print(f"\nsteps/s: median of {meta['repeat']} interleaved runs, ± = half the min-max range "
          f"relative to the median; batch {meta['batch']}, {meta['steps']} timed steps. PyTorch: "
          "the fastest configuration at that thread count (all of them below). Speed-ups: over "
          f"{threads[0]} thread(s), each against its own.")
    show(["model", "threads", "PyTorch configuration", "steps/s"], t2)
    print("\nPyTorch configurations: torchN = torch.set_num_threads(N); blasN = OPENBLAS_NUM_THREADS "
          "of PyTorch's OpenBLAS; zero/none = opt.zero_grad(set_to_none=False/True).")
    if t3:
        show(["model", "kdp GF/s", "2048² GF/s", "kdp %2048²", "kdp ms/step", "roofline ms",
              "kdp/roofline", "chunked roofl ms", "kdp/chunked", "roofline ratio"], t3)
        print("\n1 thread. FLOPs: 2*M*N*K per GEMM; per layer forward + weight-gradient + "
              "input-gradient GEMMs, except the first layer's input gradient. roofline ms: the step "
              "if every GEMM ran at its measured single-core speed at its shape and nothing else "
              "cost anything; chunked: with the conv GEMMs split into the batch chunks of "
              "src/nn. roofline ratio = chunked roofline time / kdpeers time.")
        for m in out["models"]:
            print(f"  {m['arch']}: {m['flops_per_step'] / 1e6:.1f} MFLOP/step")
    if t4:
        show(["model", "serial share", "2 threads", "16 threads", "32 threads", "64 threads",
              "steps/s at 64 (Amdahl)"], t4)
        print("\nkdp-stepprof at 1 thread: serial share = the step's time outside the parallel "
              "loops of src/nn (data, loss, loop set-up). Speed-ups: Amdahl from the serial share "
              "/ the same with each parallel loop limited by its task count (GEMM tiles, chunks).")
    env = meta.get("env", {})
    print("env: " + " ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in env.items()))
    print(f"OpenBLAS: {out['openblas_config']}; kernel {out['openblas_corename']}")
    if meta.get("load_before"):
        print(f"load average (1/5/15 min) before: {meta['load_before']}, after: "
              f"{meta.get('load_after', '?')} ({os.cpu_count()} cores, shared)")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {a.json}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="time PyTorch training steps")
    t.add_argument("--model", required=True, help="mlp, mlp(h1,h2,...) or cnn")
    t.add_argument("--steps", type=int, default=300, help="timed steps")
    t.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (0: not called, PyTorch's default)")
    t.add_argument("--blas-threads", type=int, help="OPENBLAS_NUM_THREADS for PyTorch's OpenBLAS "
                   "(default: the environment's)")
    t.add_argument("--channels-last", action="store_true", help="model and data channels-last")
    t.add_argument("--mkldnn", choices=("on", "off"), default="on",
                   help="torch.backends.mkldnn.enabled (oneDNN convolutions)")
    t.add_argument("--zero-grad", choices=("zero", "none"), default="zero",
                   help="opt.zero_grad(set_to_none=False) (zero) or True (none)")
    t.add_argument("--flat-input", action="store_true",
                   help="mlp: the data as (N, 784) and no nn.Flatten")
    t.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True)")
    t.add_argument("--pool-first", action="store_true",
                   help="cnn: max-pool before an in-place ReLU (the same function, less work)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data-dir", default=DATA_DIR)
    t.add_argument("--out", help="also write the JSON line here")
    r = sub.add_parser("report", help="print the bench-speed table")
    r.add_argument("--dir", required=True)
    r.add_argument("--json", required=True)
    r.add_argument("--model", action="append", required=True,
                   help="arch, in the order bench-speed numbered them (m0, m1, ...)")
    r.add_argument("--batch", type=int, default=128)
    r.add_argument("--steps", type=int, required=True)
    r.add_argument("--repeat", type=int, required=True)
    r.add_argument("--threads", default="1", help="comma-separated thread counts")
    r.add_argument("--native", help="the second (native) kdpeers binary, if any")
    a = p.parse_args()
    if a.cmd == "train":
        if a.steps < 1 or a.warmup < 0 or a.batch < 1:
            p.error("--steps and --batch must be >= 1, --warmup >= 0")
        cmd_train(a)
    else:
        cmd_report(a)


if __name__ == "__main__":
    sys.exit(main())
