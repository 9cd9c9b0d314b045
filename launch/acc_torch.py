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
The second generation (docs/kd-methods-gen2.md; --methods takes specs NAME+KEY=VALUE, see
launch/acc_report.py --help):
  kdcl         L_i = CE + lam w T^2 KL(sg s_T(z_t) || s_T(z_i)), z_t naive (mean logits), minlogit
               (min_j z_j - z_j[y]) or general (sum_j w_j z_j, w from the +val=N split)
  pcl          EMA mean teachers z'_j and a linear head z_e = W concat(h_j) + b:
               L_i = CE + lam w T^2 [KL(sg z_e || z_i) + mean_{j!=i} KL(sg z'_j || z_i)], + CE(z_e)
  mcl          dml's term + kd.contrast_weight x the supervised contrastive terms of embedding
               heads d -> 128 -> 128 (exact gradients of the cohort objective)
  switokd      teacher peer and students, expert/learning mode per step (no teacher step in expert)
  +ema=D       an EMA copy of every peer (peerN.ema); +aug / +augpp: crop + flip, shared / per peer

Data: Fashion-MNIST IDX .gz files, normalised (x/255 - 0.2860)/0.3530, the first `subset` training
examples, then (+val=N) the validation split, the last N of them with their clean labels, then
symmetric label noise on the rest: round(frac*n) positions, seeded by --noise-seed, get labels
drawn uniformly from all 10 classes (a drawn label may equal the old one). By default the draw
replays kdpeers' own generator (PCG32 stream 5, partial Fisher-Yates, as kdp_dataset_label_noise),
so both sides train on the very same noisy labels; --noise-rng numpy makes an independent draw.
Optimizer: SGD nesterov momentum 0.9, weight decay 5e-4 (coupled), lr 0.05 with a per-step cosine
to 0 (CosineAnnealingLR, T_max = total steps), batch 128 (last partial batch kept), 1 thread.

Output: one JSON line per finished (method, seed) run, appended to --out (stdout if none), in the
schema of bench-accuracy's results ("source": "pytorch"). Runs whose run_id is already in --out
are skipped, so an interrupted study resumes.

Usage: /usr/bin/python3 launch/acc_torch.py --regime noisy|full [--methods dml,pcl,kdcl+ensemble=minlogit]
         [--seeds 3 | --seed-list 1,2,3] [--peers 4] [--epochs E] [--subset N] [--label-noise F]
         [--arch mlp|cnn|cnn,mlp,...] [--quick] [--out FILE] [--eval-every 1] [--crop-pad 4]
"""
import argparse
import copy
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acc_report import SpecError, parse_spec, spec_label  # noqa: E402  (one spec grammar)

DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530
METHODS = ("independent", "dml", "codistill", "avg", "kdcl", "pcl", "mcl", "switokd")
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


def load_raw():
    """The Fashion-MNIST files as uint8 images and int64 labels (train, test)."""
    return (read_idx(os.path.join(DATA_DIR, "train-images-idx3-ubyte.gz")),
            read_idx(os.path.join(DATA_DIR, "train-labels-idx1-ubyte.gz")).astype(np.int64),
            read_idx(os.path.join(DATA_DIR, "t10k-images-idx3-ubyte.gz")),
            read_idx(os.path.join(DATA_DIR, "t10k-labels-idx1-ubyte.gz")).astype(np.int64))


def load_data(raw, subset, label_noise, noise_seed, noise_rng="kdpeers", val=0):
    """As kdpeers' kdp_train_load: the first `subset` training examples, then the validation split
    (the last `val` of them, labels untouched), then the label noise on the training part only
    (round(frac * (n - val)) draws over n - val examples). Returns (xtr, ytr, xte, yte, changed,
    xval, yval); xval/yval are None without a split."""
    xtr, ytr, xte, yte = raw
    ytr = ytr.copy()
    if subset > 0:
        xtr, ytr = xtr[:subset], ytr[:subset]
    xval = yval = None
    if val:
        if val >= len(ytr):
            raise SystemExit(f"acc_torch: val={val} leaves no training examples "
                             f"(the training set has {len(ytr)})")
        xval, yval = xtr[-val:], ytr[-val:].copy()
        xtr, ytr = xtr[:-val], ytr[:-val]
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

    return (norm(xtr), torch.from_numpy(ytr), norm(xte), torch.from_numpy(yte), changed,
            None if xval is None else norm(xval), None if yval is None else torch.from_numpy(yval))


# ---------------------------------------------------------------- augmentation
class Augment:
    """data.augment as kdpeers' batcher does it (src/data/batcher.c): torchvision's
    RandomCrop(28, padding=pad) with black (0) padding pixels, top-left corner drawn in [0, 2 pad]
    for rows then columns, then a horizontal flip with probability 1/2; normalised after, so the
    padding is (0 - mean) / std. kdpeers draws from its PCG32 stream; here torch's generator
    (same distribution, not the same draws). Shared: every peer gets the same draws (data.augment:
    every rank runs the same batcher stream); per peer (data.augment_per_peer): independent draws."""

    def __init__(self, xtr, pad, flip, seed):
        self.pad, self.flip = pad, flip
        fill = (0.0 - MEAN) / STD
        self.xp = F.pad(xtr, (pad, pad, pad, pad), value=fill) if pad else xtr
        self.H, self.W = xtr.shape[2], xtr.shape[3]
        self.gen = torch.Generator().manual_seed(1000003 * seed + 3)

    def batch(self, idx):
        B, H, W, p = len(idx), self.H, self.W, self.pad
        oy = torch.randint(0, 2 * p + 1, (B,), generator=self.gen)
        ox = torch.randint(0, 2 * p + 1, (B,), generator=self.gen)
        fl = (torch.randint(0, 2, (B,), generator=self.gen) if self.flip
              else torch.zeros(B, dtype=torch.long)).bool()
        ar_h, ar_w = torch.arange(H), torch.arange(W)
        rows = oy[:, None] + ar_h[None, :]
        cols = ox[:, None] + torch.where(fl[:, None], W - 1 - ar_w[None, :], ar_w[None, :])
        x = self.xp[idx[:, None, None], 0, rows[:, :, None], cols[:, None, :]]
        return x.unsqueeze(1)


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


def forward(m, x):
    """(features h, logits z): h is the input of the last Linear (kdpeers' pooled penultimate)."""
    h = m[:-1](x)
    return h, m[-1](h)


def arch_label(archs):
    names = [MLP_ARCH if a == "mlp" else a for a in archs]
    if len(set(names)) == 1:
        return names[0]
    if all(n == names[1] for n in names[1:]):
        return f"{names[0]}+{names[1]}x{len(names) - 1}"  # bench-accuracy's hetero label
    return "+".join(names)


class EmaCopy:
    """run.ema_decay / pcl's peer mean teacher: theta' = a theta' + (1 - a) theta after optimizer
    step t (t = 1 for the first), a = min(1 - 1/(t + 1), decay), theta' = theta at initialisation,
    ema.mul_(a).add_(theta, alpha=1 - a) as PCL's code (and kdpeers' golden test). Batchnorm
    running statistics get the same average; the copy's own train-mode forward (pcl's mean
    teacher) uses batch statistics and leaves them alone (momentum 0)."""

    def __init__(self, model, decay):
        self.decay = decay
        self.m = copy.deepcopy(model)
        for p in self.m.parameters():
            p.requires_grad_(False)
        for mod in self.m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.momentum = 0.0

    @torch.no_grad()
    def update(self, model, t):
        a = min(1.0 - 1.0 / (t + 1), self.decay)
        for pe, p in zip(self.m.parameters(), model.parameters()):
            pe.mul_(a).add_(p.detach(), alpha=1 - a)
        for be, b in zip(self.m.buffers(), model.buffers()):
            if be.dtype.is_floating_point:
                be.mul_(a).add_(b, alpha=1 - a)
            else:
                be.copy_(b)


class EmbedHead(nn.Module):
    """mcl: v = l2normalize(fc2(relu(fc1(h)))), d -> hidden -> E, PyTorch's default Linear init."""

    def __init__(self, d, hidden, E):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, E)

    def forward(self, h):
        return F.normalize(self.fc2(F.relu(self.fc1(h))), dim=1, eps=1e-12)


# ---------------------------------------------------------------- losses
def kl_batchmean(q, logp):
    """KL(q || p) summed over classes, averaged over the batch; q is a probability tensor."""
    return (q * (torch.log(q.clamp_min(1e-30)) - logp)).sum(1).mean()


def kl_logits(t, z, T):
    """T^2 KL(s_T(t) || s_T(z)), batchmean; the gradient flows into whatever is not detached."""
    lq = F.log_softmax(t / T, dim=1)
    return (lq.exp() * (lq - F.log_softmax(z / T, dim=1))).sum() / z.shape[0] * T * T


def sup_contrast(S, y):
    """mcl's SC(S): anchors with a positive (same label, m != n); the denominator leaves out the
    diagonal; anchors without a positive are left out, none at all gives 0."""
    n = S.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    pos = (y.view(-1, 1) == y.view(1, -1)) & ~eye
    lse = torch.logsumexp(S.masked_fill(eye, float("-inf")), 1)
    npos = pos.sum(1)
    valid = npos > 0
    if not bool(valid.any()):
        return S.sum() * 0.0
    per = ((S - lse[:, None]) * pos).sum(1)[valid] / npos[valid]
    return -per.mean()


def kdcl_teacher(zs, y, ens, w):
    """kdcl's teacher logits from the peers' logits (list of B x C), stop-gradient by the caller."""
    Z = torch.stack(zs)
    if ens == "naive":
        return Z.mean(0)
    if ens == "minlogit":
        zy = Z.gather(2, y.view(1, -1, 1).expand(Z.shape[0], -1, 1))
        return (Z - zy).min(0).values
    return sum(float(w[j]) * zs[j] for j in range(len(zs)))


def kdcl_general_weights(zval, yval):
    """w = C^-1 1 / (1^T C^-1 1), C_jk = mean_n <e_j, e_k>, e_j = softmax(z_j) - onehot(y),
    C + 1e-6 I, negative weights clipped to 0 and renormalised (in double)."""
    e = F.softmax(zval.double(), 2) - F.one_hot(yval, zval.shape[2]).double()
    Q = torch.einsum("jnc,knc->jk", e, e) / zval.shape[1] + \
        1e-6 * torch.eye(zval.shape[0], dtype=torch.float64)
    x = torch.linalg.solve(Q, torch.ones(zval.shape[0], dtype=torch.float64))
    w = (x / x.sum()).clamp(min=0)
    return w / w.sum()


def switokd_gaps(zs, y, t):
    """(s, g_t, G, expert) of one step from the train-mode logits, in double, T = 1."""
    Z = torch.stack([z.detach().double() for z in zs])
    zs_ = torch.stack([Z[j] for j in range(len(zs)) if j != t]).mean(0)
    oh = F.one_hot(y, Z.shape[2]).double()
    ps, pt = F.softmax(zs_, 1), F.softmax(Z[t], 1)
    s_ = (ps - oh).abs().sum(1).mean().item()
    gt = (pt - oh).abs().sum(1).mean().item()
    G = (pt - ps).abs().sum(1).mean().item()
    eps = math.exp(-gt / (gt + s_)) if gt + s_ > 0 else 1.0
    delta = s_ - eps * gt
    return s_, gt, G, (G > delta and gt < s_)


def peer_losses(method, zs, y, T, lam, w, ctx=None):
    """The objective J whose backward trains the cohort (a scalar tensor: every peer's loss plus
    the methods' module losses; cross terms are stop-gradient where the method says so), and a
    dict of things to log. ctx carries the method's extra inputs (features, EMA logits, heads...)."""
    P = len(zs)
    ce = [F.cross_entropy(z, y) for z in zs]
    info = {}
    if method == "independent" or P == 1:
        return sum(ce), info
    lw = lam * w
    if method in ("dml", "codistill", "avg"):
        with torch.no_grad():
            qs = [F.softmax(z.detach() / T, dim=1) for z in zs]
            qsum = torch.stack(qs).sum(0)
        out = []
        for i, z in enumerate(zs):
            logp = F.log_softmax(z / T, dim=1)
            if method == "dml":
                kd = sum(kl_batchmean(qs[j], logp) for j in range(P) if j != i) / (P - 1)
            elif method == "codistill":
                kd = kl_batchmean((qsum - qs[i]) / (P - 1), logp)
            else:
                kd = kl_batchmean(qsum / P, logp)
            out.append(ce[i] + lw * T * T * kd)
        return sum(out), info
    if method == "kdcl":
        with torch.no_grad():
            zt = kdcl_teacher([z.detach() for z in zs], y, ctx["ensemble"], ctx["kdcl_w"])
        return sum(ce[i] + lw * kl_logits(zt, zs[i], T) for i in range(P)), info
    if method == "pcl":
        ze = ctx["ens"](torch.cat(ctx["hs"], 1))  # not detached: CE(z_e) reaches the peers
        zema = ctx["z_ema"]
        ze_d = ze.detach()
        J = F.cross_entropy(ze, y)  # L_e, once, not ramped
        for i in range(P):
            kd = kl_logits(ze_d, zs[i], T) + \
                sum(kl_logits(zema[j], zs[i], T) for j in range(P) if j != i) / (P - 1)
            J = J + ce[i] + lw * kd
        return J, info
    if method == "mcl":
        vs, tau, lc = ctx["vs"], ctx["tau"], ctx["cw"]

        def S(a, b):
            return vs[a] @ vs[b].T / tau
        J = 0.0
        for i in range(P):
            kd = sum(kl_logits(zs[j].detach(), zs[i], T) for j in range(P) if j != i) / (P - 1)
            Sii = S(i, i)
            con = sup_contrast(Sii, y)
            for j in range(P):
                if j != i:
                    Sij = S(i, j)
                    con = con + (sup_contrast(Sij, y) + kl_logits(S(j, i).detach(), Sij, T) +
                                 kl_logits(S(j, j).detach(), Sii, T)) / (P - 1)
            J = J + ce[i] + lw * kd + lc * con
        return J, info
    if method == "switokd":
        t = ctx["teacher"]
        _, _, _, expert = switokd_gaps(zs, y, t)
        info["expert"] = expert
        zt = zs[t].detach()
        J = 0.0
        for i in range(P):
            if i != t:
                J = J + ce[i] + lw * kl_logits(zt, zs[i], T)
            elif not expert:
                zs_mean = torch.stack([zs[j].detach() for j in range(P) if j != t]).mean(0)
                J = J + ce[i] + lw * kl_logits(zs_mean, zs[i], T)
            # expert mode: no term at all, so the teacher's parameters keep grad None and SGD
            # skips them (no update, no weight decay, momentum unchanged); the schedule advances
        return J, info
    raise SystemExit(f"acc_torch: method '{method}' is not simulated here")


def rampup(epoch, R):
    if R <= 0:
        return 1.0
    x = 1.0 - min(epoch / R, 1.0)
    return math.exp(-5.0 * x * x)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(models, x_all, y_all, teacher=None, emas=None, bs=1000, keep_logits=False):
    """Accuracy and loss of every peer, the probability-mean ensemble, the method's teacher
    (teacher(hs, zs) -> (name, logits)), and every EMA copy (peerN.ema) with their ensemble.
    keep_logits: also return the peers' logits (P x N x C), e.g. for kdcl's general weights."""
    for m in models + [e.m for e in emas or []]:
        m.eval()
    P, n = len(models), len(y_all)
    acc, loss = {}, {}
    logits = [] if keep_logits else None

    def add(name, z_or_p, y, probs=False):
        lp = torch.log(z_or_p.clamp_min(1e-30)) if probs else F.log_softmax(z_or_p, 1)
        acc[name] = acc.get(name, 0) + int((lp.argmax(1) == y).sum())
        loss[name] = loss.get(name, 0.0) + float(-lp.gather(1, y[:, None]).sum())

    for a in range(0, n, bs):
        x, y = x_all[a:a + bs], y_all[a:a + bs]
        hz = [forward(m, x) for m in models]
        hs, zs = [h for h, _ in hz], [z for _, z in hz]
        for i in range(P):
            add(f"peer{i}", zs[i], y)
        if P > 1:
            add("ensemble", torch.stack([F.softmax(z, 1) for z in zs]).mean(0), y, probs=True)
        if teacher is not None:
            tname, zt = teacher(hs, zs)
            if tname:
                add(tname, zt, y)
        if emas:
            ze = [e.m(x) for e in emas]
            for i in range(P):
                add(f"peer{i}.ema", ze[i], y)
            if P > 1:
                add("ensemble.ema", torch.stack([F.softmax(z, 1) for z in ze]).mean(0), y,
                    probs=True)
        if keep_logits:
            logits.append(torch.stack(zs))
    for m in models + [e.m for e in emas or []]:
        m.train()
    res = {k: {"acc": acc[k] / n, "loss": loss[k] / n} for k in acc}
    return (res, torch.cat(logits, 1)) if keep_logits else res


# ---------------------------------------------------------------- one run
def run(args, spec, seed, data, run_id):
    method, opts = spec
    xtr, ytr, xte, yte, _, xval, yval = data  # the split and the noise as kdpeers makes them
    P = args.peers
    archs = args.archs
    nval = opts.get("val", 0)
    torch.manual_seed(seed)
    models = [make_model(archs[i]) for i in range(P)]  # same draws as before: peers first
    extra = []  # the method's own trained parameters (peers' weight decay)
    ctx = {}
    with torch.no_grad():  # eval mode: a train-mode probe would move batchnorm's statistics
        dims = [forward(m.eval(), xtr[:2])[0].shape[1] for m in models]
    for m in models:
        m.train()
    if method == "pcl":
        ctx["ens"] = nn.Linear(sum(dims), 10)
        extra += list(ctx["ens"].parameters())
    if method == "mcl":
        heads = [EmbedHead(d, args.embed_hidden, opts.get("embed", 128)) for d in dims]
        extra += [p for h in heads for p in h.parameters()]
        ctx.update(tau=opts.get("tau", 0.07), cw=opts.get("cw", 1.0))
    if method == "kdcl":
        ctx["ensemble"] = opts["ensemble"]
        ctx["kdcl_w"] = torch.full((P,), 1.0 / P, dtype=torch.float64)  # naive until evaluated
    if method == "switokd":
        ctx["teacher"] = opts.get("teacher", 0)
        if not 0 <= ctx["teacher"] < P:
            raise SystemExit(f"acc_torch: teacher peer {ctx['teacher']} out of range")
    decay = opts.get("ema", 0.999 if method == "pcl" else None)
    emas = [EmaCopy(m, decay) for m in models] if decay else None
    params = [p for m in models for p in m.parameters()] + extra
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=True,
                          weight_decay=args.weight_decay)
    n = len(ytr)
    spe = (n + args.batch - 1) // args.batch
    total = spe * args.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.0)
    gen = torch.Generator().manual_seed(seed)
    aug = None
    if opts.get("aug") or opts.get("augpp"):
        aug = Augment(xtr, args.crop_pad, not args.no_flip, seed)

    def teacher_fn(hs, zs):
        if method == "kdcl" and ctx["ensemble"] != "minlogit":
            return "kdcl", kdcl_teacher(zs, None, ctx["ensemble"], ctx["kdcl_w"])
        if method == "pcl":
            return "pcl", ctx["ens"](torch.cat(hs, 1))
        if method == "switokd":
            return "switokd", zs[ctx["teacher"]]
        return None, None  # kdcl minlogit: its teacher reads the label; the ensemble is reported

    def record_head():
        """the fields every record of this run carries, finished or failed"""
        return {"source": "pytorch", "study": args.study, "run_id": run_id, "method": method,
                "variant": spec_label(method, opts), "options": opts,
                "arch": arch_label(archs), "peers": P, "seed": seed,
                "epochs": args.epochs, "subset": args.subset, "label_noise": args.label_noise,
                "noise_seed": args.noise_seed, "noise_rng": args.noise_rng, "quick": args.quick,
                "lr": args.lr, "batch": args.batch, "temperature": args.temperature,
                "rampup_epochs": args.rampup_epochs, "weight": args.weight,
                "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    curve, expert_frac = [], []
    step = 0
    diverged = 0
    t_wall = time.time()
    t_train = 0.0
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=gen)
        t0 = time.time()
        n_expert, n_steps, j_sum = 0, 0, 0.0
        for a in range(0, n, args.batch):
            idx = order[a:a + args.batch]
            y = ytr[idx]
            if aug is None:
                xs = [xtr[idx]] * P
            elif opts.get("augpp"):
                xs = [aug.batch(idx) for _ in range(P)]
            else:
                xs = [aug.batch(idx)] * P
            hz = [forward(m, xs[i]) for i, m in enumerate(models)]
            zs = [z for _, z in hz]
            w = rampup(step / spe, args.rampup_epochs)
            if method == "codistill" and step < args.burn_in:
                w = 0.0
            if method == "pcl":
                ctx["hs"] = [h for h, _ in hz]
                with torch.no_grad():
                    ctx["z_ema"] = [emas[j].m(xs[j]) for j in range(P)]  # train mode
            if method == "mcl":
                ctx["vs"] = [heads[i](hz[i][0]) for i in range(P)]
            J, info = peer_losses(method, zs, y, args.temperature, args.weight, w, ctx)
            if not math.isfinite(float(J)):  # as kdpeers' divergence check: stop, record failed
                diverged = step + 1
                break
            opt.zero_grad(set_to_none=True)
            J.backward()  # peer i's parameters only see what the method lets reach them
            opt.step()
            sched.step()
            step += 1
            if args.trace_steps:  # a stability probe: the objective step by step, no evaluation
                zmax = max(float(z.detach().abs().max()) for z in zs)
                print(f"trace {run_id} step {step} objective/peer {float(J) / P:.6g} "
                      f"max|z| {zmax:.6g}", flush=True)
                if step >= args.trace_steps or not math.isfinite(float(J)):
                    return None
            n_steps += 1
            j_sum += float(J)
            n_expert += int(bool(info.get("expert")))
            if emas:
                for e, m in zip(emas, models):
                    e.update(m, step)
        t_train += time.time() - t0
        if diverged:
            print(f"acc_torch {run_id}: the objective is not finite at step {diverged}: diverged",
                  file=sys.stderr, flush=True)
            return dict(record_head(), status="failed", diverged_at_step=diverged,
                        problems=[f"diverged: objective not finite at step {diverged}"])
        if method == "switokd":
            expert_frac.append(n_expert / n_steps)
        last = epoch + 1 == args.epochs
        if last or (epoch + 1) % args.eval_every == 0:
            val = None
            if nval:  # validation first: kdcl general's weights come from it
                val, zval = evaluate(models, xval, yval, keep_logits=True)
                if method == "kdcl" and ctx["ensemble"] == "general":
                    ctx["kdcl_w"] = kdcl_general_weights(zval, yval)
            ev = evaluate(models, xte, yte, teacher_fn, emas)
            mp = sum(ev[f"peer{i}"]["acc"] for i in range(P)) / P
            c = {"epoch": epoch + 1, "step": step, "train_objective": j_sum / n_steps,
                 "mean_peer": mp,
                 "ensemble": ev["ensemble"]["acc"] if P > 1 else None}
            tn = next((k for k in ("kdcl", "pcl", "switokd") if k in ev), None)
            if tn:
                c["teacher"] = ev[tn]["acc"]
            if emas:
                c["ema"] = sum(ev[f"peer{i}.ema"]["acc"] for i in range(P)) / P
            if val:
                c["val_mean_peer"] = sum(val[f"peer{i}"]["acc"] for i in range(P)) / P
            if expert_frac:
                c["expert_fraction"] = expert_frac[-1]
            curve.append(c)
            print(f"acc_torch {run_id}: epoch {epoch + 1}/{args.epochs} mean peer "
                  f"{100 * mp:.2f}% objective {j_sum / n_steps:.4f}" + (f" ensemble {100 * c['ensemble']:.2f}%" if P > 1 else "")
                  + (f" {tn} {100 * c['teacher']:.2f}%" if tn else "")
                  + (f" ema {100 * c['ema']:.2f}%" if emas else "")
                  + (f" expert {100 * expert_frac[-1]:.1f}%" if expert_frac else ""),
                  file=sys.stderr, flush=True)
    wall = time.time() - t_wall
    final = {k: v["acc"] for k, v in ev.items()}
    final_loss = {k: v["loss"] for k, v in ev.items()}
    mean_peer = sum(final[f"peer{i}"] for i in range(P)) / P
    tn = next((k for k in ("kdcl", "pcl", "switokd") if k in final), None)
    rec = dict(record_head(), **{
        "status": "ok",
        "final": final, "final_loss": final_loss, "mean_peer": mean_peer,
        "ensemble": final.get("ensemble"), "teacher": final.get(tn) if tn else None,
        "teacher_model": tn,
        "curve": curve, "wall_seconds": round(wall, 3), "train_seconds": round(t_train, 3),
        "steps": step, "steps_per_second": round(step / t_train, 4) if t_train > 0 else None,
    })
    if emas:
        rec["ema_decay"] = decay
        rec["ema"] = sum(final[f"peer{i}.ema"] for i in range(P)) / P
        rec["ema_ensemble"] = final.get("ensemble.ema")
    if nval:
        rec["val_size"] = nval
        rec["final_val"] = {k: v["acc"] for k, v in val.items()}
        rec["val_mean_peer"] = sum(val[f"peer{i}"]["acc"] for i in range(P)) / P
    if method == "kdcl" and ctx["ensemble"] == "general":
        rec["kdcl_weights"] = [round(float(v), 6) for v in ctx["kdcl_w"]]
    if method == "switokd":
        t = ctx["teacher"]
        rec["teacher_peer"] = t
        rec["students"] = sum(final[f"peer{i}"] for i in range(P) if i != t) / (P - 1)
        rec["expert_fraction"] = [round(f, 4) for f in expert_frac]
    return rec


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
                    help="comma-separated method specs NAME[+KEY[=VALUE]]... (acc_report.py's "
                         "grammar: ensemble, ema, aug, augpp, val, teacher, tau, cw, embed); "
                         "names from: " + ",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    ap.add_argument("--seed-list", default="", help="explicit comma-separated seeds")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--arch", default="mlp",
                    help="mlp or cnn for every peer, or one per peer (cnn,mlp,mlp,mlp)")
    ap.add_argument("--crop-pad", type=int, default=4, help="data.crop_pad of +aug/+augpp")
    ap.add_argument("--no-flip", action="store_true", help="data.flip = false")
    ap.add_argument("--embed-hidden", type=int, default=128, help="mcl's head hidden width")
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
    ap.add_argument("--trace-steps", type=int, default=0,
                    help="stability probe: print the objective and max |logit| of every step for "
                         "the first N steps (or until not finite), then stop; nothing recorded")
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
    specs = []
    for m in (m for m in args.methods.split(",") if m):
        try:
            specs.append(parse_spec(m))
        except SpecError as e:
            ap.error(str(e))
        if specs[-1][0] not in METHODS:
            ap.error(f"method '{specs[-1][0]}' is not simulated (choose from {', '.join(METHODS)})")
    args.archs = args.arch.split(",")
    if len(args.archs) == 1:
        args.archs *= args.peers
    if len(args.archs) != args.peers or any(a not in ("mlp", "cnn") for a in args.archs):
        ap.error("--arch: mlp or cnn, once or once per peer")
    if args.peers < 1 or args.epochs < 1 or args.batch < 1:
        ap.error("--peers, --epochs and --batch must be >= 1")
    seeds = ([int(s) for s in args.seed_list.split(",") if s] if args.seed_list
             else list(range(1, args.seeds + 1)))

    raw = load_raw()
    datas = {}  # per validation-split size: the split comes off before the noise, as in kdpeers
    for val in sorted({o.get("val", 0) for _, o in specs}):
        datas[val] = load_data(raw, args.subset, args.label_noise, args.noise_seed,
                               args.noise_rng, val)
        d = datas[val]
        print(f"acc_torch: {len(d[1])} training examples, {d[4]} labels changed by noise, "
              + (f"{len(d[6])} validation examples (clean labels), " if val else "")
              + f"{len(d[3])} test examples", file=sys.stderr, flush=True)
    done = done_ids(args.out)
    for seed in seeds:
        for spec in specs:
            run_id = (f"pytorch/{args.study}/{spec_label(*spec)}/{arch_label(args.archs)}"
                      f"/P{args.peers}/e{args.epochs}"
                      f"/n{args.subset}/noise{args.label_noise:g}/s{seed}"
                      + (f"/ramp{args.rampup_epochs:g}" if args.rampup_epochs else "")
                      + ("/quick" if args.quick else ""))
            if run_id in done:
                print(f"acc_torch: skip {run_id} (already recorded)", file=sys.stderr)
                continue
            rec = run(args, spec, seed, datas[spec[1].get("val", 0)], run_id)
            if rec is None:  # --trace-steps
                continue
            line = json.dumps(rec, sort_keys=False)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
            else:
                print(line, flush=True)


if __name__ == "__main__":
    main()
