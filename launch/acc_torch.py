#!/usr/bin/python3
"""acc_torch.py: PyTorch 1.13 reference for kdpeers' accuracy study (launch/bench-accuracy).

P peers are simulated in ONE process, following shared/kd-methods.md exactly:
  independent  L_i = CE(z_i, y)
  dml          L_i = CE + lam w T^2 (1/(P-1)) sum_{j!=i} KL(sg s_T(z_j) || s_T(z_i))
  codistill    L_i = CE + lam w_t T^2 KL(sg mean_{j!=i} s_T(z_j) || s_T(z_i))   (logits mode,
               w_t = 0 for the first --burn-in steps)
  avg          L_i = CE + lam w T^2 KL(sg mean_j s_T(z_j) || s_T(z_i))          (mean includes i)
KL is summed over classes and averaged over the batch ('batchmean'). Every peer sees the same
shuffled batches; each peer has its own initialisation (PyTorch defaults).

Data: Fashion-MNIST IDX .gz files, normalised (x/255 - 0.2860)/0.3530, the first `subset` training
examples, then symmetric label noise: round(frac*n) positions, seeded by --noise-seed, get labels
drawn uniformly from all 10 classes (a drawn label may equal the old one). By default the draw
replays kdpeers' own generator (PCG32 stream 5, partial Fisher-Yates, as kdp_dataset_label_noise),
so both sides train on the very same noisy labels; --noise-rng numpy makes an independent draw.
Optimizer: SGD nesterov momentum 0.9, weight decay 5e-4 (coupled), lr 0.05 with a per-step cosine
to 0 (CosineAnnealingLR, T_max = total steps), batch 128 (last partial batch kept), 1 thread.

Output: one JSON line per finished (method, seed) run, appended to --out (stdout if none), in the
schema of bench-accuracy's results ("source": "pytorch"). Runs whose run_id is already in --out
are skipped, so an interrupted study resumes.

Usage: /usr/bin/python3 launch/acc_torch.py --regime noisy|full [--methods dml,independent]
         [--seeds 3 | --seed-list 1,2,3] [--peers 4] [--epochs E] [--subset N] [--label-noise F]
         [--arch mlp|cnn] [--quick] [--out FILE] [--eval-every 1]
"""
import argparse
import gzip
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530
METHODS = ("independent", "dml", "codistill", "avg")
MLP_ARCH = "mlp(512,256)"


# ---------------------------------------------------------------- data
def read_idx(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        raw = f.read()
    magic, = struct.unpack(">I", raw[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SystemExit(f"acc_torch: {path}: expected {np.prod(dims)} values, got {data.size}")
    return data.reshape(dims)


M64 = (1 << 64) - 1


class Pcg32:
    """kdpeers' kdp_rng (src/common.c): PCG32 XSH-RR, one stream per (seed, stream id)."""

    def __init__(self, seed, stream):
        self.state, self.inc = 0, ((stream << 1) | 1) & M64
        self.u32()
        self.state = (self.state + seed) & M64
        self.u32()

    def u32(self):
        old = self.state
        self.state = (old * 6364136223846793005 + self.inc) & M64
        x = (((old >> 18) ^ old) >> 27) & 0xFFFFFFFF
        rot = old >> 59
        return ((x >> rot) | (x << ((-rot) & 31))) & 0xFFFFFFFF

    def below(self, n):
        if n <= 1:
            return 0
        threshold = ((1 << 32) - n) % n
        while True:
            v = self.u32()
            if v >= threshold:
                return v % n


KDP_STREAM_NOISE = 5


def noise_kdpeers(y, k, noise_seed, n_classes=10):
    """kdp_dataset_label_noise: partial Fisher-Yates over the indices with the noise stream; each
    of the first k picks gets a label drawn uniformly from all classes. Same labels as kdpeers."""
    n = len(y)
    idx = list(range(n))
    r = Pcg32(noise_seed, KDP_STREAM_NOISE)
    changed = 0
    for i in range(k):
        j = i + r.below(n - i)
        idx[i], idx[j] = idx[j], idx[i]
        lab = r.below(n_classes)
        changed += int(y[idx[i]] != lab)
        y[idx[i]] = lab
    return changed


def load_data(subset, label_noise, noise_seed, noise_rng="kdpeers"):
    xtr = read_idx(os.path.join(DATA_DIR, "train-images-idx3-ubyte.gz"))
    ytr = read_idx(os.path.join(DATA_DIR, "train-labels-idx1-ubyte.gz")).astype(np.int64)
    xte = read_idx(os.path.join(DATA_DIR, "t10k-images-idx3-ubyte.gz"))
    yte = read_idx(os.path.join(DATA_DIR, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
    if subset > 0:
        xtr, ytr = xtr[:subset], ytr[:subset].copy()
    changed = 0
    if label_noise > 0:
        n = len(ytr)
        k = int(math.floor(label_noise * n + 0.5))  # round half away from zero, like llround
        if noise_rng == "kdpeers":
            changed = noise_kdpeers(ytr, k, noise_seed)
        else:
            rng = np.random.default_rng(noise_seed)
            pos = rng.choice(n, size=k, replace=False)
            new = rng.integers(0, 10, size=k)
            changed = int((ytr[pos] != new).sum())
            ytr[pos] = new

    def norm(x):
        t = torch.from_numpy(x.astype(np.float32)).div_(255.0).sub_(MEAN).div_(STD)
        return t.unsqueeze(1)  # N x 1 x 28 x 28

    return norm(xtr), torch.from_numpy(ytr), norm(xte), torch.from_numpy(yte), changed


# ---------------------------------------------------------------- models
def make_model(arch):
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256),
                             nn.ReLU(), nn.Linear(256, 10))
    if arch == "cnn":
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3136, 128),
                             nn.ReLU(), nn.Linear(128, 10))
    raise SystemExit(f"acc_torch: unknown arch '{arch}' (expected mlp or cnn)")


# ---------------------------------------------------------------- losses
def kl_batchmean(q, logp):
    """KL(q || p) summed over classes, averaged over the batch; q is a probability tensor."""
    return (q * (torch.log(q.clamp_min(1e-30)) - logp)).sum(1).mean()


def peer_losses(method, zs, y, T, lam, w):
    """Total loss of every peer (list), and the KD parts (list of floats) for logging."""
    P = len(zs)
    ce = [F.cross_entropy(z, y) for z in zs]
    if method == "independent" or P == 1 or lam * w == 0:
        return ce, [0.0] * P
    with torch.no_grad():
        qs = [F.softmax(z.detach() / T, dim=1) for z in zs]
        qsum = torch.stack(qs).sum(0)
    out, kds = [], []
    for i, z in enumerate(zs):
        logp = F.log_softmax(z / T, dim=1)
        if method == "dml":
            kd = sum(kl_batchmean(qs[j], logp) for j in range(P) if j != i) / (P - 1)
        elif method == "codistill":
            kd = kl_batchmean((qsum - qs[i]) / (P - 1), logp)
        elif method == "avg":
            kd = kl_batchmean(qsum / P, logp)
        else:
            raise SystemExit(f"acc_torch: method '{method}' is not simulated here")
        kd = lam * w * T * T * kd
        out.append(ce[i] + kd)
        kds.append(float(kd))
    return out, kds


def rampup(epoch, R):
    if R <= 0:
        return 1.0
    x = 1.0 - min(epoch / R, 1.0)
    return math.exp(-5.0 * x * x)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(models, xte, yte, bs=1000):
    for m in models:
        m.eval()
    P = len(models)
    n = len(yte)
    correct = [0] * P
    loss = [0.0] * P
    ens_c, ens_l = 0, 0.0
    for a in range(0, n, bs):
        x, y = xte[a:a + bs], yte[a:a + bs]
        probs = []
        for i, m in enumerate(models):
            z = m(x)
            loss[i] += float(F.cross_entropy(z, y, reduction="sum"))
            correct[i] += int((z.argmax(1) == y).sum())
            probs.append(F.softmax(z, dim=1))
        pm = torch.stack(probs).mean(0)
        ens_c += int((pm.argmax(1) == y).sum())
        ens_l += float(-torch.log(pm.gather(1, y[:, None]).clamp_min(1e-30)).sum())
    for m in models:
        m.train()
    res = {f"peer{i}": {"acc": correct[i] / n, "loss": loss[i] / n} for i in range(P)}
    if P > 1:
        res["ensemble"] = {"acc": ens_c / n, "loss": ens_l / n}
    return res


# ---------------------------------------------------------------- one run
def run(args, method, seed, data, run_id):
    xtr, ytr, xte, yte, _ = data
    P = args.peers
    torch.manual_seed(seed)
    models = [make_model(args.arch) for _ in range(P)]
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=True,
                          weight_decay=args.weight_decay)
    n = len(ytr)
    spe = (n + args.batch - 1) // args.batch
    total = spe * args.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.0)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    step = 0
    t_wall = time.time()
    t_train = 0.0
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=gen)
        t0 = time.time()
        for a in range(0, n, args.batch):
            idx = order[a:a + args.batch]
            x, y = xtr[idx], ytr[idx]
            zs = [m(x) for m in models]
            w = rampup(step / spe, args.rampup_epochs)
            if method == "codistill" and step < args.burn_in:
                w = 0.0
            losses, _ = peer_losses(method, zs, y, args.temperature, args.weight, w)
            opt.zero_grad(set_to_none=True)
            sum(losses).backward()  # peer i's parameters only see L_i: the teachers are detached
            opt.step()
            sched.step()
            step += 1
        t_train += time.time() - t0
        last = epoch + 1 == args.epochs
        if last or (epoch + 1) % args.eval_every == 0:
            ev = evaluate(models, xte, yte)
            mp = sum(ev[f"peer{i}"]["acc"] for i in range(P)) / P
            curve.append({"epoch": epoch + 1, "mean_peer": mp,
                          "ensemble": ev["ensemble"]["acc"] if P > 1 else None})
            print(f"acc_torch {run_id}: epoch {epoch + 1}/{args.epochs} mean peer "
                  f"{100 * mp:.2f}%" + (f" ensemble {100 * ev['ensemble']['acc']:.2f}%"
                                        if P > 1 else ""), file=sys.stderr, flush=True)
    wall = time.time() - t_wall
    final = {k: v["acc"] for k, v in ev.items()}
    final_loss = {k: v["loss"] for k, v in ev.items()}
    mean_peer = sum(final[f"peer{i}"] for i in range(P)) / P
    return {
        "source": "pytorch", "study": args.study, "run_id": run_id, "method": method,
        "arch": MLP_ARCH if args.arch == "mlp" else args.arch, "peers": P, "seed": seed,
        "epochs": args.epochs, "subset": args.subset, "label_noise": args.label_noise,
        "noise_seed": args.noise_seed, "noise_rng": args.noise_rng, "quick": args.quick, "status": "ok",
        "final": final, "final_loss": final_loss, "mean_peer": mean_peer,
        "ensemble": final.get("ensemble"), "teacher": None, "teacher_model": None,
        "curve": curve, "wall_seconds": round(wall, 3), "train_seconds": round(t_train, 3),
        "steps": step, "steps_per_second": round(step / t_train, 4) if t_train > 0 else None,
        "lr": args.lr, "batch": args.batch, "temperature": args.temperature,
        "rampup_epochs": args.rampup_epochs,
        "weight": args.weight, "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def done_ids(path):
    ids = set()
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if r.get("status") == "ok":
                    ids.add(r.get("run_id"))
    return ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regime", choices=("noisy", "full"), default="noisy")
    ap.add_argument("--methods", default="independent,dml",
                    help="comma-separated, from: " + ",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    ap.add_argument("--seed-list", default="", help="explicit comma-separated seeds")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--arch", default="mlp", choices=("mlp", "cnn"))
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--subset", type=int)
    ap.add_argument("--label-noise", type=float)
    ap.add_argument("--noise-seed", type=int, default=1)
    ap.add_argument("--noise-rng", choices=("kdpeers", "numpy"), default="kdpeers",
                    help="kdpeers: the very labels kdpeers makes (its PCG32 stream); numpy: "
                         "an independent draw of the same regime")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=3.0)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--rampup-epochs", type=float, default=0.0)
    ap.add_argument("--burn-in", type=int, default=0, help="codistill burn-in steps")
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1 epoch on 2000 examples (pipeline test)")
    ap.add_argument("--study", default="", help="study name recorded (default methods-<regime>)")
    ap.add_argument("--out", default="", help="append results here (default stdout)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    regime = {"noisy": (30, 10000, 0.4), "full": (10, 0, 0.0)}[args.regime]
    if args.epochs is None:
        args.epochs = regime[0]
    if args.subset is None:
        args.subset = regime[1]
    if args.label_noise is None:
        args.label_noise = regime[2]
    if args.quick:
        args.epochs, args.subset = 1, 2000
    if not args.study:
        args.study = "methods-" + args.regime
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"method '{m}' is not simulated (choose from {', '.join(METHODS)})")
    if args.peers < 1 or args.epochs < 1 or args.batch < 1:
        ap.error("--peers, --epochs and --batch must be >= 1")
    seeds = ([int(s) for s in args.seed_list.split(",") if s] if args.seed_list
             else list(range(1, args.seeds + 1)))

    data = load_data(args.subset, args.label_noise, args.noise_seed, args.noise_rng)
    print(f"acc_torch: {len(data[1])} training examples, {data[4]} labels changed by noise, "
          f"{len(data[3])} test examples", file=sys.stderr, flush=True)
    done = done_ids(args.out)
    for seed in seeds:
        for method in methods:
            arch = MLP_ARCH if args.arch == "mlp" else args.arch
            run_id = (f"pytorch/{args.study}/{method}/{arch}/P{args.peers}/e{args.epochs}"
                      f"/n{args.subset}/noise{args.label_noise:g}/s{seed}"
                      + (f"/ramp{args.rampup_epochs:g}" if args.rampup_epochs else "")
                      + ("/quick" if args.quick else ""))
            if run_id in done:
                print(f"acc_torch: skip {run_id} (already recorded)", file=sys.stderr)
                continue
            rec = run(args, method, seed, data, run_id)
            line = json.dumps(rec, sort_keys=False)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
            else:
                print(line, flush=True)


if __name__ == "__main__":
    main()
