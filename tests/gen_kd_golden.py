#!/usr/bin/python3
"""Writes tests/golden_kd.bin: PyTorch reference values for every online-distillation method.

Run with Debian's python3-torch:  /usr/bin/python3 tests/gen_kd_golden.py
Each method is written straight from /work/shared/kd-methods.md (float64 autograd on float32
inputs). P = 3 peers with different feature dims (16, 24, 8), B = 6, C = 5, T = 3, weight 0.7.

Records (format of tests/testutil.h):
  z (P,B,C), h (flat: peer blocks (B x d_j) in cohort order), dims (P), y (B), hyper [T, weight]
  per case "<case>.":
    config [method id (kd.h enum order), leader (-1 = last), detach, burn_in, fusion_dim, proj_dim]
    ce, kd, loss (P)         per-peer CE, unweighted T^2 KL term, L_i
    module_loss (1), total (1)   L_gate / L_f, and J = sum_i L_i + L_module
    dz (P,B,C), dh (flat)    dJ/dz, dJ/dh
    params, dparams          module arena (kd.h layout) and dJ/dparams (only if a module exists)
    buffers                  BN running mean|var after one train forward (one, ffl)
    teacher, teacher_eval    teacher logits in train mode / eval mode after that forward
    rank<i>.dz, rank<i>.dh, rank<i>.dparams   gradients of rank i's share J_i = L_i + L_module / P
"""
import math
import os
import struct

import torch
import torch.nn.functional as F

P, DIMS, B, C = 3, [16, 24, 8], 6, 5
T, W = 3.0, 0.7
METHOD_ID = {"independent": 0, "dml": 1, "codistill": 2, "avg": 3, "one": 4, "ffl": 5, "okddip": 6}

torch.manual_seed(20240601)
Z32 = (torch.randn(P, B, C) * 2.0).float()
H32 = [torch.randn(B, d).float() for d in DIMS]
Y = torch.randint(0, C, (B,))
D = sum(DIMS)

records = []


def rec(name, t):
    t = torch.as_tensor(t).detach().to(torch.float32).contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    records.append((name, list(t.shape), t.reshape(-1).tolist()))


def write(path):
    with open(path, "wb") as f:
        f.write(b"KDPGOLD1")
        f.write(struct.pack("<I", len(records)))
        for name, dims, data in records:
            nb = name.encode()
            f.write(struct.pack("<I", len(nb)))
            f.write(nb)
            f.write(struct.pack("<I", len(dims)))
            for d in dims:
                f.write(struct.pack("<I", d))
            f.write(struct.pack("<%df" % len(data), *data))


def kl_logits(t, z):
    """T^2 KL(s_T(t) || s_T(z)), batchmean; gradients flow into whatever is not detached."""
    lq = F.log_softmax(t / T, dim=1)
    lp = F.log_softmax(z / T, dim=1)
    return (lq.exp() * (lq - lp)).sum() / z.shape[0] * T * T


def kl_probs(q, z):
    lp = F.log_softmax(z / T, dim=1)
    return (q * (q.log() - lp)).sum() / z.shape[0] * T * T


def make_params(method, leader, gen):
    """Module tensors (float32 values, PyTorch default init), in kd.h layout order."""
    torch.manual_seed(gen)
    ps = []
    if method in ("one", "ffl"):
        hid = P if method == "one" else D // P
        fc1 = torch.nn.Linear(D, hid)
        ps += [fc1.weight.data.clone(), fc1.bias.data.clone()]
        # perturb BN's affine params so their gradients are tested away from gamma=1, beta=0
        ps += [1.0 + 0.1 * torch.randn(hid), 0.1 * torch.randn(hid)]
        if method == "ffl":
            fc2 = torch.nn.Linear(hid, C)
            ps += [fc2.weight.data.clone(), fc2.bias.data.clone()]
    elif method == "okddip":
        aux = [j for j in range(P) if j != leader]
        r = max(1, min(DIMS[j] for j in aux) // 8)
        for j in aux:
            ps += [torch.nn.Linear(DIMS[j], r, bias=False).weight.data.clone(),
                   torch.nn.Linear(DIMS[j], r, bias=False).weight.data.clone()]
    return [p.float() for p in ps]


def bn(x, gamma, beta, bufs, train):
    return F.batch_norm(x, bufs[0], bufs[1], gamma, beta, training=train, momentum=0.1, eps=1e-5)


def forward(method, z, hs, ps, bufs, leader, detach, burn_in, train=True):
    """Returns (ce list, kd list, L list, L_module, teacher logits)."""
    y = Y
    ces = [F.cross_entropy(z[i], y) for i in range(P)]
    kds = [torch.zeros((), dtype=torch.float64) for _ in range(P)]
    w = W
    Lm = torch.zeros((), dtype=torch.float64)
    ens = torch.log(torch.stack([F.softmax(z[j], 1) for j in range(P)]).mean(0))
    teacher = ens
    if method == "independent":
        w = 0.0
    elif method == "dml":
        for i in range(P):
            kds[i] = sum(kl_logits(z[j].detach(), z[i]) for j in range(P) if j != i) / (P - 1)
    elif method == "codistill":
        if burn_in:
            w = 0.0
        for i in range(P):
            q = torch.stack([F.softmax(z[j] / T, 1) for j in range(P) if j != i]).mean(0)
            kds[i] = kl_probs(q.detach(), z[i])
    elif method == "avg":
        q = torch.stack([F.softmax(z[j] / T, 1) for j in range(P)]).mean(0).detach()
        for i in range(P):
            kds[i] = kl_probs(q, z[i])
    elif method == "one":
        u = torch.cat([h.detach() for h in hs], 1)
        a = F.relu(bn(F.linear(u, ps[0], ps[1]), ps[2], ps[3], bufs, train))
        g = F.softmax(a, 1)
        ze = sum(g[:, j:j + 1] * z[j] for j in range(P))
        for i in range(P):
            kds[i] = kl_logits(ze.detach(), z[i])
        Lm = F.cross_entropy(ze, y)
        teacher = ze
    elif method == "ffl":
        u = torch.cat(hs, 1)
        a = F.relu(bn(F.linear(u, ps[0], ps[1]), ps[2], ps[3], bufs, train))
        zf = F.linear(a, ps[4], ps[5])
        for i in range(P):
            kds[i] = kl_logits(zf.detach(), z[i])
        zmean = torch.stack([z[j] for j in range(P)]).mean(0)
        Lm = F.cross_entropy(zf, y) + W * kl_logits(zmean.detach(), zf)
        teacher = zf
    elif method == "okddip":
        aux = [j for j in range(P) if j != leader]
        qs = [F.linear(hs[j], ps[2 * a]) for a, j in enumerate(aux)]
        ks = [F.linear(hs[j], ps[2 * a + 1]) for a, j in enumerate(aux)]
        for ai, i in enumerate(aux):
            e = torch.stack([(qs[ai] * ks[aj]).sum(1) for aj in range(len(aux))], 1)
            att = F.softmax(e, 1)
            t = sum(att[:, aj:aj + 1] * z[j] for aj, j in enumerate(aux))
            kds[i] = kl_logits(t.detach() if detach else t, z[i])
        tl = torch.stack([z[j] for j in aux]).mean(0)
        kds[leader] = kl_logits(tl.detach() if detach else tl, z[leader])
        teacher = z[leader]
    Ls = [ces[i] + w * kds[i] for i in range(P)]
    return ces, kds, Ls, Lm, teacher


def grads(obj, z, hs, ps):
    """d obj / d (z, the features concatenated, the module params concatenated or None)."""
    gs = torch.autograd.grad(obj, [z] + hs + ps, allow_unused=True)
    gs = [torch.zeros_like(x) if g is None else g for g, x in zip(gs, [z] + hs + ps)]
    dz = gs[0]
    dh = torch.cat([g.reshape(-1) for g in gs[1:1 + P]])
    dp = torch.cat([g.reshape(-1) for g in gs[1 + P:]]) if ps else None
    return dz, dh, dp


def case(name, method, leader=-1, detach=0, burn_in=0):
    lead = P - 1 if leader < 0 else leader
    ps32 = make_params(method, lead, 7 + METHOD_ID[method] * 31 + lead)
    hid = P if method == "one" else (D // P if method == "ffl" else 0)
    r = 0
    if method == "okddip":
        r = max(1, min(DIMS[j] for j in range(P) if j != lead) // 8)
    rec(name + ".config", [METHOD_ID[method], leader, detach, burn_in,
                           D // P if method == "ffl" else 0, r])

    def fresh_bufs():
        return [torch.zeros(hid, dtype=torch.float64), torch.ones(hid, dtype=torch.float64)]

    def leaves():
        z = Z32.double().clone().requires_grad_(True)
        hs = [h.double().clone().requires_grad_(True) for h in H32]
        ps = [p.double().clone().requires_grad_(True) for p in ps32]
        return z, hs, ps

    # total objective
    z, hs, ps = leaves()
    bufs = fresh_bufs()
    ces, kds, Ls, Lm, teacher = forward(method, z, hs, ps, bufs, lead, detach, burn_in)
    J = sum(Ls) + Lm
    dz, dh, dp = grads(J, z, hs, ps)
    rec(name + ".ce", torch.stack(ces))
    rec(name + ".kd", torch.stack(kds))
    rec(name + ".loss", torch.stack(Ls))
    rec(name + ".module_loss", Lm)
    rec(name + ".total", J)
    rec(name + ".dz", dz)
    rec(name + ".dh", dh)
    rec(name + ".teacher", teacher)
    if ps32:
        rec(name + ".params", torch.cat([p.reshape(-1) for p in ps32]))
        rec(name + ".dparams", dp)
    if hid:
        rec(name + ".buffers", torch.cat(bufs))
    with torch.no_grad():
        _, _, _, _, tev = forward(method, z, hs, ps, bufs, lead, detach, burn_in, train=False)
    rec(name + ".teacher_eval", tev)

    # each rank's share J_i = L_i + L_module / P
    for i in range(P):
        z, hs, ps = leaves()
        _, _, Ls, Lm, _ = forward(method, z, hs, ps, fresh_bufs(), lead, detach, burn_in)
        dz, dh, dp = grads(Ls[i] + Lm / P, z, hs, ps)
        rec("%s.rank%d.dz" % (name, i), dz)
        rec("%s.rank%d.dh" % (name, i), dh)
        if ps32:
            rec("%s.rank%d.dparams" % (name, i), dp)


# ===================================================================== the second generation
# Issue 12's methods, from the section "The second generation" of /work/shared/kd-methods.md (and
# the decisions in docs/kd-methods-gen2.md). Their own inputs, prefix "g2.": P = 3 peers with
# feature dims (16, 24, 8), B = 8 (label 4 occurs once: an anchor without a positive), C = 5.
# Records of a case "<case>." as above (config, ce, kd, loss, module_loss, total, dz, dh, teacher,
# teacher_eval, params, dparams) plus what the method adds (listed at each case).

G2B = 8
G2Y = torch.tensor([1, 2, 3, 1, 3, 2, 4, 1])
KDCL_ID = {"naive": 0, "minlogit": 1, "general": 2}


class G2:
    pass


def g2_inputs():
    torch.manual_seed(20261207)
    g = G2()
    g.z = (torch.randn(P, G2B, C) * 2.0).float()
    g.h = [torch.randn(G2B, d).float() for d in DIMS]
    g.z_ema = (torch.randn(P, G2B, C) * 2.0).float()
    # validation logits for kdcl general: peer 0 good, peer 1 fair, peer 2 a noisy copy of peer 1
    # (its weight comes out negative and is clipped)
    N = 40
    g.yval = torch.randint(0, C, (N,))
    onehot = F.one_hot(g.yval, C).float()
    base = torch.randn(N, C)
    zv0 = 2.5 * onehot + torch.randn(N, C)
    zv1 = 1.5 * onehot + base
    zv2 = 1.2 * onehot + base + 0.3 * torch.randn(N, C)
    g.zval = torch.stack([zv0, zv1, zv2]).float()
    rec("g2.z", g.z)
    rec("g2.h", torch.cat([h.reshape(-1) for h in g.h]))
    rec("g2.y", G2Y.float())
    rec("g2.z_ema", g.z_ema)
    rec("g2.zval", g.zval)
    rec("g2.yval", g.yval.float())
    return g


def g2_leaves(g, params32):
    z = g.z.double().clone().requires_grad_(True)
    hs = [h.double().clone().requires_grad_(True) for h in g.h]
    ps = [p.double().clone().requires_grad_(True) for p in params32]
    return z, hs, ps


def g2_std(name, config, ces, kds, Ls, Lm, J, dz, dh, teacher, teacher_eval, ps32=None, dp=None):
    rec(name + ".config", config)
    rec(name + ".ce", torch.stack(ces))
    rec(name + ".kd", torch.stack(kds))
    rec(name + ".loss", torch.stack(Ls))
    rec(name + ".module_loss", Lm)
    rec(name + ".total", J)
    rec(name + ".dz", dz)
    rec(name + ".dh", dh)
    rec(name + ".teacher", teacher)
    rec(name + ".teacher_eval", teacher_eval)
    if ps32:
        rec(name + ".params", torch.cat([p.reshape(-1) for p in ps32]))
        rec(name + ".dparams", dp)


def kdcl_general_weights(zval, yval):
    e = F.softmax(zval.double(), 2) - F.one_hot(yval, C).double()
    n = zval.shape[1]
    Q = torch.einsum("jnc,knc->jk", e, e) / n + 1e-6 * torch.eye(zval.shape[0], dtype=torch.float64)
    x = torch.linalg.solve(Q, torch.ones(zval.shape[0], dtype=torch.float64))
    w = x / x.sum()
    w = w.clamp(min=0)
    return w / w.sum(), x / x.sum()


def kdcl_teacher(z, ens, w):
    if ens == "naive":
        return z.mean(0)
    if ens == "minlogit":
        zy = z.gather(2, G2Y.view(1, -1, 1).expand(z.shape[0], -1, 1))
        return (z - zy).min(0).values
    return sum(w[j] * z[j] for j in range(z.shape[0]))


def g2_kdcl(g, ens):
    """kdcl: config [ensemble]; zt = the training teacher (minlogit reads the label)."""
    name = "kdcl_" + ens
    w, _ = kdcl_general_weights(g.zval, g.yval)
    w32 = w.float()
    z, hs, _ = g2_leaves(g, [])
    zt = kdcl_teacher(z, ens, w32.double())
    ces = [F.cross_entropy(z[i], G2Y) for i in range(P)]
    kds = [kl_logits(zt.detach(), z[i]) for i in range(P)]
    Ls = [ces[i] + W * kds[i] for i in range(P)]
    J = sum(Ls)
    dz, dh, _ = grads(J, z, hs, [])
    with torch.no_grad():
        if ens == "minlogit":
            tev = torch.log(torch.stack([F.softmax(z[j], 1) for j in range(P)]).mean(0))
        else:
            tev = kdcl_teacher(z, ens, w32.double())
    g2_std(name, [KDCL_ID[ens]], ces, kds, Ls, torch.zeros(()), J, dz, dh, tev, tev)
    rec(name + ".zt", zt)


def g2_pcl(g):
    """pcl: the ensemble teacher linear(concat h) (not detached), the mean teachers' logits g2.z_ema;
    rank<i>.{dz,dh,dparams}: gradients of L_i + L_e / P."""
    torch.manual_seed(4242)
    lin = torch.nn.Linear(D, C)
    ps32 = [lin.weight.data.clone().float(), lin.bias.data.clone().float()]

    def objective(z, hs, ps):
        ze = F.linear(torch.cat(hs, 1), ps[0], ps[1])
        zema = g.z_ema.double()
        ces = [F.cross_entropy(z[i], G2Y) for i in range(P)]
        kds = [kl_logits(ze.detach(), z[i]) +
               sum(kl_logits(zema[j], z[i]) for j in range(P) if j != i) / (P - 1)
               for i in range(P)]
        Ls = [ces[i] + W * kds[i] for i in range(P)]
        return ces, kds, Ls, F.cross_entropy(ze, G2Y), ze

    z, hs, ps = g2_leaves(g, ps32)
    ces, kds, Ls, Le, ze = objective(z, hs, ps)
    J = sum(Ls) + Le
    dz, dh, dp = grads(J, z, hs, ps)
    g2_std("pcl", [0], ces, kds, Ls, Le, J, dz, dh, ze, ze, ps32, dp)
    for i in range(P):
        z, hs, ps = g2_leaves(g, ps32)
        _, _, Ls, Le, _ = objective(z, hs, ps)
        dz, dh, dp = grads(Ls[i] + Le / P, z, hs, ps)
        rec("pcl.rank%d.dz" % i, dz)
        rec("pcl.rank%d.dh" % i, dh)
        rec("pcl.rank%d.dparams" % i, dp)


def g2_ema():
    """The temporal mean as PCL's code updates it, in float32: after optimizer step t (t = 1, 2,
    ...), a = min(1 - 1/(t + 1), decay), ema.mul_(a).add_(theta_t, alpha=1 - a), ema_0 = theta_0.
    Records ema.thetas (N+1 x n), ema.decays, ema.d<k>.traj (N x n): the mean after every step."""
    torch.manual_seed(777)
    N, n = 40, 64
    thetas = [torch.randn(n)]
    for _ in range(N):
        thetas.append(thetas[-1] - 0.05 * torch.randn(n) + 0.01)
    rec("ema.thetas", torch.stack(thetas))
    decays = [0.9, 0.999]
    rec("ema.decays", torch.tensor(decays))
    for k, decay in enumerate(decays):
        ema = thetas[0].clone()
        traj = []
        for t in range(1, N + 1):
            a = min(1.0 - 1.0 / (t + 1), decay)
            ema.mul_(a).add_(thetas[t], alpha=1 - a)
            traj.append(ema.clone())
        rec("ema.d%d.traj" % k, torch.stack(traj))


MCL_HID, MCL_E, MCL_TAU, MCL_LC = 10, 8, 0.07, 0.8


def sup_contrast(S):
    """SC(S): anchors with a positive (same label, m != n); the denominator leaves out the diagonal."""
    n = S.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    pos = (G2Y.view(-1, 1) == G2Y.view(1, -1)) & ~eye
    lse = torch.logsumexp(S.masked_fill(eye, float("-inf")), 1)
    npos = pos.sum(1)
    valid = npos > 0
    per = ((S - lse[:, None]) * pos).sum(1)[valid] / npos[valid]
    return -per.mean()


def mcl_from_v(z, vs):
    """ce, dml kd, contrastive bracket, L_i for embeddings vs (list of B x E)."""
    def S(a, b):
        return vs[a] @ vs[b].T / MCL_TAU
    ces = [F.cross_entropy(z[i], G2Y) for i in range(P)]
    kds = [sum(kl_logits(z[j].detach(), z[i]) for j in range(P) if j != i) / (P - 1)
           for i in range(P)]
    cons = []
    for i in range(P):
        con = sup_contrast(S(i, i))
        for j in range(P):
            if j != i:
                con = con + (sup_contrast(S(i, j)) + kl_logits(S(j, i).detach(), S(i, j)) +
                             kl_logits(S(j, j).detach(), S(i, i))) / (P - 1)
        cons.append(con)
    Ls = [ces[i] + W * kds[i] + MCL_LC * cons[i] for i in range(P)]
    return ces, kds, cons, Ls


def g2_mcl(g):
    """mcl: config [hidden, E, tau, contrast_weight]; params = the 3 heads (fc1.weight, fc1.bias,
    fc2.weight, fc2.bias each, peer order); v = the heads' outputs (float32); the objective on those
    float32 v: dv = dJ/dv; dh, dparams = dJ/dh and dJ/dheads through the heads;
    rank<i>.{dz,dv}: dL_i/dz, dL_i/dv (what rank i sends in the reduce-scatter)."""
    torch.manual_seed(5150)
    heads32 = []
    for d in DIMS:
        l1, l2 = torch.nn.Linear(d, MCL_HID), torch.nn.Linear(MCL_HID, MCL_E)
        heads32 += [l1.weight.data.clone(), l1.bias.data.clone(), l2.weight.data.clone(),
                    l2.bias.data.clone()]
    z, hs, ps = g2_leaves(g, heads32)
    v64 = []
    for j in range(P):
        x = F.relu(F.linear(hs[j], ps[4 * j], ps[4 * j + 1]))
        x = F.linear(x, ps[4 * j + 2], ps[4 * j + 3])
        v64.append(x / x.norm(dim=1, keepdim=True))
    v32 = torch.stack([v.detach() for v in v64]).float()
    vl = v32.double().clone().requires_grad_(True)
    ces, kds, cons, Ls = mcl_from_v(z, [vl[j] for j in range(P)])
    J = sum(Ls)
    dz, dv = torch.autograd.grad(J, [z, vl])
    gh = torch.autograd.grad(v64, hs + ps, grad_outputs=[dv[j] for j in range(P)])
    dh = torch.cat([x.reshape(-1) for x in gh[:P]])
    dp = torch.cat([x.reshape(-1) for x in gh[P:]])
    with torch.no_grad():
        ens = torch.log(torch.stack([F.softmax(z[j], 1) for j in range(P)]).mean(0))
    g2_std("mcl", [MCL_HID, MCL_E, MCL_TAU, MCL_LC], ces, kds, Ls, torch.zeros(()), J, dz, dh,
           ens, ens, heads32, dp)
    rec("mcl.contrast", torch.stack(cons))
    rec("mcl.v", v32)
    rec("mcl.dv", dv)
    for i in range(P):
        zz = g.z.double().clone().requires_grad_(True)
        vv = v32.double().clone().requires_grad_(True)
        _, _, _, Ls = mcl_from_v(zz, [vv[j] for j in range(P)])
        gz, gv = torch.autograd.grad(Ls[i], [zz, vv])
        rec("mcl.rank%d.dz" % i, gz)
        rec("mcl.rank%d.dv" % i, gv)


def switokd_gaps(z, y, t):
    """[s, g_t, G, eps, delta, expert] of one step, float64 from the float32 logits z (P x n x C)."""
    z = z.double()
    zs = torch.stack([z[j] for j in range(z.shape[0]) if j != t]).mean(0)
    oh = F.one_hot(y, z.shape[2]).double()
    ps, pt = F.softmax(zs, 1), F.softmax(z[t], 1)
    s_ = (ps - oh).abs().sum(1).mean().item()
    gt = (pt - oh).abs().sum(1).mean().item()
    G = (pt - ps).abs().sum(1).mean().item()
    eps = math.exp(-gt / (gt + s_))
    delta = s_ - eps * gt
    return [s_, gt, G, eps, delta, 1.0 if (G > delta and gt < s_) else 0.0]


def switokd_losses(z, y, t, expert):
    """ce, kd, L per peer; the teacher in expert mode reports its CE and passes no gradient."""
    zs = torch.stack([z[j] for j in range(P) if j != t]).mean(0)
    ces = [F.cross_entropy(z[i], y) for i in range(P)]
    kds, Ls = [], []
    for i in range(P):
        if i != t:
            kds.append(kl_logits(z[t].detach(), z[i]))
        elif expert:
            ces[i] = ces[i].detach()
            kds.append(torch.zeros((), dtype=z.dtype))
        else:
            kds.append(kl_logits(zs.detach(), z[i]))
        Ls.append(ces[i] + W * kds[i])
    return ces, kds, Ls


def g2_switokd(g, name, t, expert):
    """switokd: config [teacher_peer, expert]; gaps = switokd_gaps of g2.z (the mode the inputs
    give; the case forces `expert` so that both modes' gradients are tested)."""
    z, hs, _ = g2_leaves(g, [])
    ces, kds, Ls = switokd_losses(z, G2Y, t, expert)
    J = sum(Ls)
    dz, dh, _ = grads(J, z, hs, [])
    with torch.no_grad():
        ens = torch.log(torch.stack([F.softmax(z[j], 1) for j in range(P)]).mean(0))
    g2_std(name, [t, expert], ces, kds, Ls, torch.zeros(()), J, dz, dh, ens, ens)
    rec(name + ".gaps", torch.tensor(switokd_gaps(g.z, G2Y, t), dtype=torch.float64))


def g2_switokd_sequence(steps=200, B=12, Cs=5, din=20):
    """200 training steps of a heterogeneous cohort in float32: teacher (peer 0) an MLP
    din -> 64 -> C, students linear din -> C, SGD; each step the mode is decided from the step's
    logits before any update, and the teacher does not step in expert mode.
    Records switokd_seq.z (steps x P x B x C), .y (steps x B), .modes (steps), .gaps (steps x 5),
    .margin (steps): min(|G - delta|, |g_t - s|), how far each decision is from its threshold."""
    torch.manual_seed(31337)
    w_true = torch.randn(din, Cs)
    X = torch.randn(steps * B, din)
    Yall = (X @ w_true + 0.8 * torch.randn(steps * B, Cs)).argmax(1)
    teacher = torch.nn.Sequential(torch.nn.Linear(din, 64), torch.nn.ReLU(), torch.nn.Linear(64, Cs))
    students = [torch.nn.Linear(din, Cs) for _ in range(P - 1)]
    nets = [teacher] + students
    opts = [torch.optim.SGD(teacher.parameters(), lr=0.2, momentum=0.9)] + \
           [torch.optim.SGD(m.parameters(), lr=0.005, momentum=0.9) for m in students]
    zs_, ys_, modes, gaps, margins = [], [], [], [], []
    for k in range(steps):
        x, y = X[k * B:(k + 1) * B], Yall[k * B:(k + 1) * B]
        z = torch.stack([m(x) for m in nets])
        gp = switokd_gaps(z.detach(), y, 0)
        expert = gp[5] > 0.5
        ces, kds, Ls = switokd_losses(z, y, 0, expert)
        for o in opts:
            o.zero_grad()
        sum(Ls).backward()
        for i, o in enumerate(opts):
            if i == 0 and expert:
                continue
            o.step()
        zs_.append(z.detach())
        ys_.append(y)
        modes.append(1.0 if expert else 0.0)
        gaps.append(gp[:5])
        margins.append(min(abs(gp[2] - gp[4]), abs(gp[1] - gp[0])))
    n_exp = int(sum(modes))
    assert 10 <= n_exp <= steps - 10, "the sequence should mix both modes: %d expert" % n_exp
    assert min(margins) > 1e-9, "a decision sits on its threshold: %g" % min(margins)
    rec("switokd_seq.z", torch.stack(zs_))
    rec("switokd_seq.y", torch.stack(ys_).float())
    rec("switokd_seq.modes", torch.tensor(modes))
    rec("switokd_seq.gaps", torch.tensor(gaps, dtype=torch.float64))
    rec("switokd_seq.margin", torch.tensor(margins, dtype=torch.float64))
    print("switokd sequence: %d of %d steps in expert mode, smallest margin %.3g"
          % (n_exp, steps, min(margins)))


def g2_diversity():
    """Diversity of a cohort at T = 1 on N examples: div.z and div.zprev (P x N x C, this and the
    previous evaluation); div.kl = mean over examples and ordered pairs i != j of KL(p_i || p_j);
    div.disagreement = mean over examples and unordered pairs of [argmax p_i != argmax p_j];
    div.churn (P) = fraction of examples whose label changed since zprev."""
    torch.manual_seed(8080)
    N = 50
    base = torch.randn(N, C) * 2.0
    z = torch.stack([base + 1.2 * torch.randn(N, C) for _ in range(P)]).float()
    zprev = (z + 1.0 * torch.randn(P, N, C)).float()
    lp = F.log_softmax(z.double(), 2)
    kl = sum((lp[i].exp() * (lp[i] - lp[j])).sum(1).mean()
             for i in range(P) for j in range(P) if i != j) / (P * (P - 1))
    lab, labp = z.argmax(2), zprev.argmax(2)
    dis = sum((lab[i] != lab[j]).double().mean()
              for i in range(P) for j in range(i + 1, P)) / (P * (P - 1) / 2)
    churn = torch.stack([(lab[i] != labp[i]).double().mean() for i in range(P)])
    assert 0 < dis < 1 and (churn > 0).all()
    rec("div.z", z)
    rec("div.zprev", zprev)
    rec("div.kl", kl)
    rec("div.disagreement", dis)
    rec("div.churn", churn)


def gen2():
    g = g2_inputs()
    w, x = kdcl_general_weights(g.zval, g.yval)
    assert (x < 0).any(), "the golden's general weights should exercise the clipping: %s" % x
    rec("g2.kdcl_w", w)
    for ens in ("naive", "minlogit", "general"):
        g2_kdcl(g, ens)
    g2_pcl(g)
    g2_ema()
    g2_mcl(g)
    g2_switokd(g, "switokd_learning", 0, 0)
    g2_switokd(g, "switokd_expert", 0, 1)
    g2_switokd(g, "switokd_t2", 2, 0)
    g2_switokd_sequence()
    g2_diversity()


def main():
    rec("z", Z32)
    rec("h", torch.cat([h.reshape(-1) for h in H32]))
    rec("dims", torch.tensor(DIMS, dtype=torch.float32))
    rec("y", Y.float())
    rec("hyper", torch.tensor([T, W]))
    case("independent", "independent")
    case("dml", "dml")
    case("codistill", "codistill")
    case("codistill_burnin", "codistill", burn_in=1)
    case("avg", "avg")
    case("one", "one")
    case("ffl", "ffl")
    case("okddip", "okddip")
    case("okddip_detach", "okddip", detach=1)
    case("okddip_leader0", "okddip", leader=0)
    gen2()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_kd.bin")
    write(out)
    print("wrote %s: %d records" % (out, len(records)))


if __name__ == "__main__":
    main()
