#!/usr/bin/python3
"""torch_dml.py: the PyTorch half of launch/bench-dml, and its report.

  torch_dml.py train --method dml|independent [--steps N] [--warmup N] [--batch N]
                     [--temperature T] [--port P] [--out FILE]
      Two processes (torch.multiprocessing), torch.distributed gloo on 127.0.0.1, one thread
      each, one mlp(512,256) peer per process on Fashion-MNIST pre-loaded as float tensors, the
      same batch order on both ranks. dml: every step the logits are all-gathered (dist.all_gather)
      and each peer minimises CE + T^2 * KL(sg softmax(z_other/T) || softmax(z_i/T)) (batchmean).
      independent: CE only, no exchange. SGD nesterov momentum 0.9, wd 5e-4, lr 0.05, cosine.
      The warm-up steps run first and are excluded; prints one JSON line with the per-rank
      timings (forward+backward+SGD, all_gather, the rest of the step).

  torch_dml.py report --dir DIR --json FILE --md FILE --steps N --repeat N
      Reads the files launch/bench-dml wrote into DIR (kdpeers.METHOD.rR.json: a kdpeers summary
      line; torch.METHOD.rR.json; loadavg.*, uptime.*, commands.txt, env.txt), prints the markdown
      table and writes the JSON and the markdown report.

Run with Debian's /usr/bin/python3 (python3-torch 1.13).
"""
import argparse
import glob
import gzip
import json
import math
import os
import resource
import socket
import statistics
import sys
import tempfile
import time

DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel mean/std after /255, as kdpeers' defaults
N_CLASSES = 10
HIDDEN = (512, 256)
WORLD = 2
METHODS = ("dml", "independent")

# ----------------------------------------------------------------------------- train


def read_idx_gz(path):
    import numpy as np

    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise SystemExit(f"torch_dml: {path}: too short for an IDX header")
    magic = int.from_bytes(raw[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim < 1:
        raise SystemExit(f"torch_dml: {path}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise SystemExit(f"torch_dml: {path}: {data.size} bytes of data, header says {dims}")
    return data.reshape(dims)


def build_mlp():
    import torch.nn as nn

    layers, d = [], 28 * 28
    for h in HIDDEN:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, N_CLASSES))
    return nn.Sequential(*layers)


def worker(rank, a, port, outdir):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    t_load = time.perf_counter()
    x = read_idx_gz(os.path.join(a.data_dir, "train-images-idx3-ubyte.gz"))
    y = read_idx_gz(os.path.join(a.data_dir, "train-labels-idx1-ubyte.gz"))
    if len(x) != len(y):
        raise SystemExit(f"torch_dml: {len(x)} images but {len(y)} labels in {a.data_dir}")
    X = ((torch.from_numpy(x.copy()).float() / 255.0 - MEAN) / STD).reshape(len(x), -1).contiguous()
    Y = torch.from_numpy(y.astype("int64"))
    load_seconds = time.perf_counter() - t_load

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    torch.manual_seed(a.seed + 1 + rank)  # different initial weights per peer
    model = build_mlp()
    model.train()
    total = a.warmup + a.steps
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    T = a.temperature
    dml = a.method == "dml"
    gathered = [torch.empty(a.batch, N_CLASSES) for _ in range(WORLD)]
    shuffle = torch.Generator().manual_seed(a.seed)  # same seed on both ranks: same batches
    n, pos, perm = len(X), len(X), None
    t_compute = t_exchange = 0.0
    ce = kd = None
    t0 = None
    for step in range(total):
        if step == a.warmup:
            dist.barrier()
            t_compute = t_exchange = 0.0
            t0 = time.perf_counter()
        if pos + a.batch > n:  # new epoch: reshuffle, drop the last partial batch
            perm, pos = torch.randperm(n, generator=shuffle), 0
        idx = perm[pos:pos + a.batch]
        pos += a.batch
        xb, yb = X.index_select(0, idx), Y.index_select(0, idx)
        c0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        z = model(xb)
        c1 = time.perf_counter()
        t_compute += c1 - c0
        ce = F.cross_entropy(z, yb)
        loss = ce
        if dml:
            e0 = time.perf_counter()
            dist.all_gather(gathered, z.detach().contiguous())
            t_exchange += time.perf_counter() - e0
            if step == 0 and not torch.equal(gathered[rank], z.detach()):
                raise SystemExit(f"torch_dml: rank {rank}: all_gather did not return this rank's "
                                 "own logits in its slot")
            target = F.softmax(gathered[1 - rank] / T, dim=1)  # no grad: stop-gradient teacher
            kd = T * T * F.kl_div(F.log_softmax(z / T, dim=1), target, reduction="batchmean")
            loss = ce + kd
        c2 = time.perf_counter()
        loss.backward()
        opt.step()
        sched.step()
        t_compute += time.perf_counter() - c2
    train_seconds = time.perf_counter() - t0
    if not math.isfinite(float(ce)) or (kd is not None and not math.isfinite(float(kd))):
        raise SystemExit(f"torch_dml: rank {rank}: non-finite loss (ce {float(ce)}, kd {kd})")
    res = {"rank": rank, "train_seconds": train_seconds, "compute_seconds": t_compute,
           "exchange_seconds": t_exchange, "load_seconds": load_seconds,
           "final_ce": float(ce), "final_kd": float(kd) if kd is not None else None,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
           "torch_threads": torch.get_num_threads()}
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_train(a):
    import torch
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    port = a.port or free_port()
    with tempfile.TemporaryDirectory(prefix="torch_dml.") as outdir:
        mp.spawn(worker, args=(a, port, outdir), nprocs=WORLD, join=True)
        ranks = []
        for r in range(WORLD):
            with open(os.path.join(outdir, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    # as kdpeers: the run takes as long as its slowest rank
    train_seconds = max(r["train_seconds"] for r in ranks)
    res = {"event": "summary", "impl": "pytorch", "method": a.method, "arch": "mlp(512,256)",
           "world_size": WORLD, "batch": a.batch, "steps": a.steps, "warmup_steps": a.warmup,
           "train_seconds": train_seconds, "steps_per_second": a.steps / train_seconds,
           "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "ranks": ranks,
           "bytes_per_step": (WORLD - 1) * a.batch * N_CLASSES * 4 if a.method == "dml" else 0,
           "torch_version": torch.__version__, "backend": "gloo"}
    line = json.dumps(res)
    print(line)
    if a.out:
        with open(a.out, "w") as f:
            f.write(line + "\n")


# ----------------------------------------------------------------------------- report


def read_json_line(path, want_summary=False):
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    if not lines:
        raise SystemExit(f"torch_dml report: {path} is empty")
    d = json.loads(lines[-1])
    if want_summary and d.get("event") != "summary":
        raise SystemExit(f"torch_dml report: last line of {path} is not a summary: {lines[-1][:200]}")
    return d


def stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "values": values}


def spread(st):
    """Half the min-max range relative to the median, in percent."""
    return 100.0 * (st["max"] - st["min"]) / 2.0 / st["median"] if st["median"] else 0.0


def split_ms(run, impl, steps):
    """Per-step split in ms of one run (kdpeers: rank 0's counters; PyTorch: rank 0's timers)."""
    step_ms = 1e3 / run["steps_per_second"]
    if impl == "kdpeers":
        n = run["steps_this_run"] if run.get("steps_this_run") else run["steps"]
        src = run
    else:
        n = run["steps"]
        src = run["ranks"][0]
    parts = {"compute": 1e3 * src["compute_seconds"] / n,
             "exchange": 1e3 * src["exchange_seconds"] / n,
             "wait": 1e3 * src["wait_seconds"] / n if "wait_seconds" in src else None,
             "allreduce": 1e3 * src["allreduce_seconds"] / n if "allreduce_seconds" in src else None}
    parts["other"] = step_ms - sum(v for v in parts.values() if v is not None)
    parts["step"] = step_ms
    return parts


def cmd_report(a):
    runs = {}
    for impl in ("kdpeers", "kdpeers-mca", "torch"):
        for m in METHODS:
            paths = sorted(glob.glob(os.path.join(a.dir, f"{impl}.{m}.r*.json")),
                           key=lambda p: int(p.rsplit(".r", 1)[1].split(".")[0]))
            runs[(impl, m)] = [read_json_line(p, want_summary=True) for p in paths]
    meta = {"arch": "mlp(512,256)", "ranks": WORLD, "batch": a.batch, "steps": a.steps,
            "repeat": a.repeat, "temperature": a.temperature}
    for name in ("uptime.before", "uptime.after", "env.txt", "commands.txt", "cpu.txt"):
        path = os.path.join(a.dir, name)
        if os.path.exists(path):
            with open(path) as f:
                txt = f.read().strip()
            meta[name.replace(".", "_")] = txt.splitlines() if name.endswith(".txt") else txt
    loads = {}
    for path in sorted(glob.glob(os.path.join(a.dir, "loadavg.*"))):
        with open(path) as f:
            loads[os.path.basename(path)[len("loadavg."):]] = " ".join(f.read().split()[:3])
    meta["loadavg_before_each_run"] = loads

    label = {("kdpeers", "dml"): "kdpeers dml", ("kdpeers", "independent"): "kdpeers independent"}
    if runs[("kdpeers-mca", "dml")] or runs[("kdpeers-mca", "independent")]:
        if not a.mca:
            raise SystemExit("torch_dml report: kdpeers-mca runs in the directory but no --mca")
        meta["mca"] = a.mca
        for m in METHODS:
            label[("kdpeers-mca", m)] = f"kdpeers {m} [{a.mca}]"
    label[("torch", "dml")] = "PyTorch dml"
    label[("torch", "independent")] = "PyTorch independent"
    out = {"meta": meta, "runs": {}, "checks": {}}
    rows = []
    for key in label:
        rs = runs[key]
        if not rs:
            out["runs"][label[key]] = None
            continue
        impl = "kdpeers" if key[0].startswith("kdpeers") else "pytorch"
        for r in rs:
            if r.get("steps_this_run", r.get("steps")) != a.steps:
                print(f"torch_dml report: WARNING: a {label[key]} run took "
                      f"{r.get('steps_this_run', r.get('steps'))} steps, not {a.steps}",
                      file=sys.stderr)
        splits = [split_ms(r, impl, a.steps) for r in rs]
        ent = {"impl": impl, "method": key[1],
               "steps_per_second": stats([r["steps_per_second"] for r in rs]),
               "ms_per_step": stats([s["step"] for s in splits]),
               "split_ms_per_step": {k: (stats([s[k] for s in splits])
                                         if splits[0][k] is not None else None)
                                     for k in ("compute", "exchange", "wait", "allreduce", "other")},
               "bytes_per_step": rs[0].get("bytes_per_step"),
               "peak_rss_mb": stats([r["peak_rss_mb"] for r in rs]),
               "summaries": rs}
        out["runs"][label[key]] = ent
        rows.append((label[key], ent))

    def med(name, field="steps_per_second"):
        e = out["runs"].get(name)
        return e[field]["median"] if e else None

    def paired(num, den):
        """Per-round ratio num/den of steps/s (rounds where both ran), then its median."""
        if not out["runs"].get(num) or not out["runs"].get(den):
            return None
        va = out["runs"][num]["steps_per_second"]["values"]
        vb = out["runs"][den]["steps_per_second"]["values"]
        return stats([x / y for x, y in zip(va, vb)])

    checks = out["checks"]
    kd_dml, kd_ind = med("kdpeers dml"), med("kdpeers independent")
    th_dml, th_ind = med("PyTorch dml"), med("PyTorch independent")
    if kd_dml and kd_ind:
        pr = paired("kdpeers independent", "kdpeers dml")
        checks["kdpeers_exchange_overhead_percent"] = {
            "value": 100.0 * (kd_ind / kd_dml - 1.0), "target_max": 5.0,
            "per_round": [100.0 * (v - 1.0) for v in pr["values"]],
            "per_round_median": 100.0 * (pr["median"] - 1.0),
            "pass": 100.0 * (kd_ind / kd_dml - 1.0) <= 5.0,
            "definition": "median dml step time / median independent step time - 1"}
    if th_dml and th_ind:
        pr = paired("PyTorch independent", "PyTorch dml")
        checks["pytorch_exchange_overhead_percent"] = {
            "value": 100.0 * (th_ind / th_dml - 1.0),
            "per_round": [100.0 * (v - 1.0) for v in pr["values"]],
            "per_round_median": 100.0 * (pr["median"] - 1.0)}
    if kd_dml and th_dml:
        pr = paired("kdpeers dml", "PyTorch dml")
        checks["kdpeers_dml_over_pytorch_dml"] = {
            "value": kd_dml / th_dml, "target_min": 1.5, "per_round": pr["values"],
            "per_round_median": pr["median"], "pass": kd_dml / th_dml >= 1.5,
            "definition": "median kdpeers dml steps/s per peer / median PyTorch dml steps/s per peer"}
    if kd_ind and th_ind:
        checks["kdpeers_independent_over_pytorch_independent"] = {"value": kd_ind / th_ind}
    if a.mca:
        vd, vi = f"kdpeers dml [{a.mca}]", f"kdpeers independent [{a.mca}]"
        if med(vd) and med(vi):
            pr = paired(vi, vd)
            v = 100.0 * (med(vi) / med(vd) - 1.0)
            checks["kdpeers_mca_exchange_overhead_percent"] = {
                "mca": a.mca, "value": v, "target_max": 5.0, "pass": v <= 5.0,
                "per_round": [100.0 * (x - 1.0) for x in pr["values"]],
                "per_round_median": 100.0 * (pr["median"] - 1.0)}
        if med(vd) and th_dml:
            pr = paired(vd, "PyTorch dml")
            checks["kdpeers_mca_dml_over_pytorch_dml"] = {
                "mca": a.mca, "value": med(vd) / th_dml, "target_min": 1.5,
                "pass": med(vd) / th_dml >= 1.5, "per_round": pr["values"],
                "per_round_median": pr["median"]}

    # ---- the table
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    hdr = ["run", "steps/s per peer", "±", "ms/step", "compute ms", "exchange ms", "wait ms",
           "allreduce ms", "other ms", "bytes/step", "peak RSS MB"]
    table = []
    for name, e in rows:
        sp = e["split_ms_per_step"]
        table.append([name, f(e["steps_per_second"]["median"], "{:.1f}"),
                      f"{spread(e['steps_per_second']):.1f}%", f(e["ms_per_step"]["median"], "{:.3f}"),
                      *[f(sp[k]["median"] if sp[k] else None, "{:.3f}")
                        for k in ("compute", "exchange", "wait", "allreduce", "other")],
                      f(e["bytes_per_step"], "{:.0f}"), f(e["peak_rss_mb"]["median"], "{:.0f}")])
    lines = ["| " + " | ".join(hdr) + " |", "|" + "|".join(["---"] + ["---:"] * (len(hdr) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table]

    verdict = []
    c = checks.get("kdpeers_exchange_overhead_percent")
    if c:
        verdict.append(f"- (a) kdpeers exchange overhead (dml step time / independent step time - 1): "
                       f"**{c['value']:.1f}%** (target <= 5%: {'PASS' if c['pass'] else 'FAIL'}); "
                       f"per round: {', '.join(f'{v:.1f}%' for v in c['per_round'])}")
    c = checks.get("kdpeers_dml_over_pytorch_dml")
    if c:
        verdict.append(f"- (b) kdpeers dml / PyTorch dml: **{c['value']:.2f}x** steps/s per peer "
                       f"(target >= 1.5x: {'PASS' if c['pass'] else 'FAIL'}); per round: "
                       f"{', '.join(f'{v:.2f}x' for v in c['per_round'])}")
    c = checks.get("pytorch_exchange_overhead_percent")
    if c:
        verdict.append(f"- PyTorch's own exchange overhead (dml vs independent): {c['value']:.1f}%; "
                       f"per round: {', '.join(f'{v:.1f}%' for v in c['per_round'])}")
    c = checks.get("kdpeers_independent_over_pytorch_independent")
    if c:
        verdict.append(f"- kdpeers independent / PyTorch independent: {c['value']:.2f}x")
    for name, tag in (("kdpeers dml", "(c)"), (f"kdpeers dml [{a.mca}]", "(c')")):
        e = out["runs"].get(name)
        if e:
            sp = {k: v["median"] for k, v in e["split_ms_per_step"].items() if v}
            tot = e["ms_per_step"]["median"]
            verdict.append(f"- {tag} {name} step split (rank 0, median ms per step): " + ", ".join(
                f"{k} {v:.3f} ({100 * v / tot:.0f}%)" for k, v in sp.items()) + f" of {tot:.3f} ms")
    c = checks.get("kdpeers_mca_exchange_overhead_percent")
    if c:
        verdict.append(f"- (a') with {c['mca']}: kdpeers exchange overhead **{c['value']:.1f}%** "
                       f"(target <= 5%: {'PASS' if c['pass'] else 'FAIL'}); per round: "
                       f"{', '.join(f'{v:.1f}%' for v in c['per_round'])}")
    c = checks.get("kdpeers_mca_dml_over_pytorch_dml")
    if c:
        verdict.append(f"- (b') with {c['mca']}: kdpeers dml / PyTorch dml **{c['value']:.2f}x** "
                       f"(target >= 1.5x: {'PASS' if c['pass'] else 'FAIL'}); per round: "
                       f"{', '.join(f'{v:.2f}x' for v in c['per_round'])}")

    notes = [
        f"{WORLD} ranks (one peer each), mlp(512,256), batch {a.batch} per peer, {a.steps} timed "
        f"steps per run, {a.repeat} interleaved rounds (kdpeers dml, kdpeers independent, PyTorch "
        "dml, PyTorch independent), 1 thread per rank.",
        "steps/s per peer: median over the rounds; ± = half the min-max range relative to the "
        "median. kdpeers: the summary's steps_per_second (train_seconds = the slowest rank's "
        "accumulated step time; start-up, data loading, logging and evaluation excluded; the "
        "first steps are included, there is no warm-up option). PyTorch: steps / the slowest "
        "rank's wall time over the timed steps, after its warm-up steps and a barrier.",
        "Split, kdpeers (rank 0 only, from the summary): compute = forward + backward + SGD; "
        "exchange = the logit allgather (MPI); wait = the per-step agreement point "
        "(an MPI_Allreduce of flags, i.e. waiting for the slower rank), present in independent "
        "runs too; allreduce = gradient allreduce within a peer (0: one rank per peer); other = "
        "step time - the rest (batch assembly, KD loss math, timers, rank-0 skew). kdpeers' "
        "exchange_seconds also counts the ensemble allreduce of the final evaluation (run after "
        "the last step, outside train_seconds; bench-dml keeps it to 100 test examples), so "
        "exchange is slightly overstated and other can come out slightly negative.",
        "Split, PyTorch (rank 0): compute = zero_grad + forward + backward (incl. the KD term's) "
        "+ SGD + lr schedule; exchange = dist.all_gather (gloo, includes waiting for the other "
        "rank: there is no separate agreement point); other = batch indexing + CE/KL forward.",
        "The per-round ratios pair the runs of one round, so slow drift of the machine cancels.",
    ]
    if a.mca:
        notes.append(f"[{a.mca}]: the same kdpeers runs with OMPI_MCA_ set for these Open MPI "
                     "parameters, in the same rounds (after the plain pair); the plain rows run with "
                     "whatever launch/kdpeers-local sets (the environment below lists the "
                     "parameters the ranks saw in each variant).")
    if meta.get("uptime_before"):
        notes.append(f"Load (`uptime`) before: `{meta['uptime_before']}`; after: "
                     f"`{meta.get('uptime_after', '?')}`. The machine has 2 cores shared with other "
                     "engineers' jobs: a run's 2 ranks compete with them, which shows in the wait "
                     "and exchange columns (a rank descheduled while the other waits) and in the "
                     "spreads.")
    if loads:
        notes.append("1-minute load before each run: " + ", ".join(
            f"{k} {v.split()[0]}" for k, v in loads.items()))

    text = "\n".join(lines)
    print(text)
    print()
    print("\n".join(verdict))
    print()
    for n_ in notes:
        print(n_)

    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as fj:
        json.dump(out, fj, indent=1)
        fj.write("\n")
    print(f"wrote {a.json}")
    if a.md:
        md = ["# DML speed: kdpeers vs PyTorch, 2 ranks", "",
              "Generated by `launch/bench-dml` (raw numbers: "
              f"`{os.path.relpath(os.path.abspath(a.json), os.path.dirname(os.path.abspath(a.md)))}`).",
              "", text, "", *verdict, "", *[f"- {n_}" for n_ in notes], ""]
        env = meta.get("env_txt")
        if env:
            md += ["Environment:", "", "```", *env, "```", ""]
        cmds = meta.get("commands_txt")
        if cmds:
            md += ["Commands, in the order they ran:", "", "```", *cmds, "```", ""]
        os.makedirs(os.path.dirname(os.path.abspath(a.md)), exist_ok=True)
        with open(a.md, "w") as fm:
            fm.write("\n".join(md))
        print(f"wrote {a.md}")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="time 2-process PyTorch DML (or independent) steps")
    t.add_argument("--method", default="dml", choices=METHODS)
    t.add_argument("--steps", type=int, default=1000, help="timed steps")
    t.add_argument("--warmup", type=int, default=50, help="untimed steps first")
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--temperature", type=float, default=3.0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--port", type=int, default=0, help="rendezvous port (0 = a free one)")
    t.add_argument("--data-dir", default=DATA_DIR)
    t.add_argument("--out", help="also write the JSON line here")
    r = sub.add_parser("report", help="print and write the bench-dml report")
    r.add_argument("--dir", required=True)
    r.add_argument("--json", required=True)
    r.add_argument("--md", help="markdown report to write")
    r.add_argument("--batch", type=int, default=128)
    r.add_argument("--temperature", type=float, default=3.0)
    r.add_argument("--steps", type=int, required=True)
    r.add_argument("--repeat", type=int, required=True)
    r.add_argument("--mca", default="", help="the --mca parameters of the kdpeers-mca runs")
    a = p.parse_args()
    if a.cmd == "train":
        if a.steps < 1 or a.warmup < 0 or a.batch < 1 or a.threads < 1:
            p.error("--steps, --batch and --threads must be >= 1, --warmup >= 0")
        if a.temperature <= 0:
            p.error("--temperature must be > 0")
        if not 0 <= a.port <= 65535:
            p.error("--port must be in 0..65535")
        cmd_train(a)
    else:
        cmd_report(a)


if __name__ == "__main__":
    sys.exit(main())
