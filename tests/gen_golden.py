#!/usr/bin/python3
"""gen_golden.py: PyTorch reference for the model zoo (tests/golden_{mlp,cnn}.bin, read by test_golden.c).

Regenerate (Debian's python3-torch; the python3 on PATH cannot see it):
    cd /work/main && OPENBLAS_NUM_THREADS=1 /usr/bin/python3 tests/gen_golden.py
It also prints the PyTorch parameter counts that tests/test_model.c hard-codes, and, per
record, the float32-vs-float64 error of PyTorch itself (the basis of the C tolerances).

Data: the first 8 Fashion-MNIST test images, normalised (v/255 - 0.2860)/0.3530, plus a small
jitter (see "kinks" below: exact ties in the cnn's max pools would make the gradient depend on
float32 rounding). Parameters are deterministic (paramgen), not torch's random init.

File format: tests/testutil.h ("KDPGOLD1", records of name, dims, float32 data). Records:
  x (B,H,W,C) NHWC input, y (B) labels, logits (B,10), loss (1) mean CE, features (B,F),
  dlogits (B,10) = d loss / d logits,
  param.NAME     parameter in kdpeers layout (conv weights Cout x K x K x Cin)
  paramgen.NAME  [seed, scale] for large tensors instead of param.NAME: value i is
                 float32(k_i) * scale (float32 product), k_i = (h(seed, i) >> 8) - 2^23, where
                 h is the 32-bit hash in golden_hash() below (tests/test_golden.c repeats it)
  grad.NAME      d loss / d param after one backward
  buffer0.NAME   BN running stats before any forward, in kdp_model_buffers() order
  buffer.NAME    BN running stats after the one train-mode forward
  steps.loss (5) loss before each of 5 SGD steps (lr 0.05, momentum 0.9, nesterov, wd 5e-4),
                 each step = zero grads, train forward, CE, backward, step, same batch,
                 starting again from param.* / buffer0.*
  final.NAME     parameters after the 5 steps; for tensors over 100k floats only some rows are
                 kept, as final_sub.NAME (R x cols) with the row indices in final_rows.NAME
  final_buffer.NAME  BN running stats after the 5 steps (5 train forwards)
  final.eval_logits  eval-mode logits (running stats) after the 5 steps
  paramgen_head.NAME the first 16 values of a paramgen tensor (checks the C regeneration)
  f32err.REC     max |float32 - float64| of PyTorch itself on record REC (same computation
                 in double); test_golden.c adds 10x this to its absolute tolerances
"""
import copy
import gzip
import struct
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(1)
torch.manual_seed(1234)

DATA = "/usr/share/datasets/fashion-mnist"
B = 8
MEAN, STD = 0.2860, 0.3530
LR, MOM, WD, NSTEPS = 0.05, 0.9, 5e-4, 5
PARAMGEN_MIN = 32768   # tensors at least this large are stored as paramgen.NAME
FINAL_SUB_MIN = 100000  # tensors at least this large keep FINAL_SUB_ROWS rows in final_sub.NAME
FINAL_SUB_ROWS = 32


# ---------------------------------------------------------------- data
def load_batch():
    with gzip.open(f"{DATA}/t10k-images-idx3-ubyte.gz", "rb") as f:
        buf = f.read()
    magic, n, h, w = struct.unpack(">IIII", buf[:16])
    assert magic == 2051 and h == 28 and w == 28
    img = np.frombuffer(buf, dtype=np.uint8, offset=16, count=B * h * w).reshape(B, h, w)
    with gzip.open(f"{DATA}/t10k-labels-idx1-ubyte.gz", "rb") as f:
        lbuf = f.read()
    assert struct.unpack(">II", lbuf[:8])[0] == 2049
    lab = np.frombuffer(lbuf, dtype=np.uint8, offset=8, count=B).astype(np.int64)
    x = ((img.astype(np.float32) / np.float32(255.0) - np.float32(MEAN)) / np.float32(STD))
    return torch.from_numpy(x.astype(np.float32)).reshape(B, 1, 28, 28), torch.from_numpy(lab)


# ---------------------------------------------------------------- kinks
# ReLU and max pooling are not differentiable at a kink (pre-activation 0, or two tied values
# in a pooling window); there the gradient depends on which side float32 rounding falls, and
# two correct implementations may route it differently. Raw Fashion-MNIST images have large
# constant backgrounds, which make thousands of exact ties in the cnn's max pools, so the batch
# gets a small jitter whose seed is chosen (select_jitter) to keep every ReLU input and every
# pooling margin at least KINK_MIN away from a kink over the whole 5-step trajectory; both
# sides' float32 results differ from exact by ~1e-7 there (see the f32err records).
KINK_MIN = 2e-6
JITTER = 0.05
KINKS = None  # a list while measuring: distances to the nearest kink


def relu_k(h):
    if KINKS is not None:
        KINKS.append(h.detach().abs().min().item())
    return F.relu(h)


def pool_k(h):
    """2x2 max pool; records the smallest top-1 minus top-2 gap of windows with a positive max."""
    if KINKS is not None:
        B, C, H, W = h.shape
        win = h.detach().reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 2, 4, 3, 5)
        s = win.reshape(-1, 4).sort(1, descending=True)[0]
        live = s[:, 0] > 0
        if live.any():
            KINKS.append((s[live, 0] - s[live, 1]).min().item())
    return F.max_pool2d(h, 2)


# ---------------------------------------------------------------- models (PyTorch layout)
class MLP(nn.Module):
    def __init__(self, hidden, d_in=784, n_classes=10):
        super().__init__()
        dims = [d_in] + list(hidden)
        for i in range(len(hidden)):
            setattr(self, f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        setattr(self, f"fc{len(hidden) + 1}", nn.Linear(dims[-1], n_classes))
        self.n = len(hidden) + 1

    def forward(self, x):
        h = x.flatten(1)
        for i in range(1, self.n):
            h = relu_k(getattr(self, f"fc{i}")(h))
        self.feat = h
        return getattr(self, f"fc{self.n}")(h)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(32, eps=1e-5, momentum=0.1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(64, eps=1e-5, momentum=0.1)
        self.fc1 = nn.Linear(3136, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        h = pool_k(relu_k(self.bn1(self.conv1(x))))
        h = pool_k(relu_k(self.bn2(self.conv2(h))))
        h = relu_k(self.fc1(h.flatten(1)))  # NCHW flatten
        self.feat = h
        return self.fc2(h)


# CIFAR ResNet (He et al. 2016, sec. 4.2): 3x3 convs without bias, BN affine, option-A
# shortcuts (subsample + zero channel padding, no parameters).
class BasicBlockA(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, (cout - cin) // 2

    def forward(self, x):
        o = F.relu(self.bn1(self.conv1(x)))
        o = self.bn2(self.conv2(o))
        s = x[:, :, ::self.stride, ::self.stride]
        if self.pad:
            s = F.pad(s, (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(o + s)


class ResNetCifar(nn.Module):
    def __init__(self, depth, n_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, w in enumerate([16, 32, 64]):
            for b in range(n):
                blocks.append(BasicBlockA(cin, w, 2 if (stage > 0 and b == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, n_classes)

    def forward(self, x):
        h = self.blocks(F.relu(self.bn1(self.conv1(x))))
        self.feat = h.mean((2, 3))
        return self.fc(self.feat)


# Wide ResNet (Zagoruyko & Komodakis 2016): pre-activation blocks, 1x1 conv shortcut (no bias)
# where the channel count changes, convs without bias, final BN + ReLU + GAP + linear.
class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        o = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return o + (x if self.short is None else self.short(a))


class WRN(nn.Module):
    def __init__(self, depth, k, n_classes=10):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, cin = [], 16
        for stage, w in enumerate(widths):
            for b in range(n):
                blocks.append(WideBlock(cin, w, 2 if (stage > 0 and b == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, n_classes)

    def forward(self, x):
        h = F.relu(self.bn(self.blocks(self.conv1(x))))
        self.feat = h.mean((2, 3))
        return self.fc(self.feat)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- layout conversion
def to_kdp(name, t):
    """PyTorch tensor -> kdpeers layout (conv weights Cout x K x K x Cin)."""
    t = t.detach()
    if t.dim() == 4:
        t = t.permute(0, 2, 3, 1)
    return t.contiguous().float().numpy()


MASK = 0xFFFFFFFF


def golden_hash(seed, n):
    """32-bit integer hash of (seed, i), i = 0..n-1 (repeated in tests/test_golden.c)."""
    x = (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B1) + np.uint64(seed * 0x85EBCA77)
         + np.uint64(0x165667B1)) & np.uint64(MASK)
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x2C1B3C6D)) & np.uint64(MASK)
    x ^= x >> np.uint64(12)
    x = (x * np.uint64(0x297A2D39)) & np.uint64(MASK)
    x ^= x >> np.uint64(15)
    return x


def paramgen(seed, n, bound):
    """n values in [-bound, bound): float32(k) * scale, k = (hash >> 8) - 2^23."""
    scale = np.float32(bound / 8388608.0)
    k = (golden_hash(seed, n) >> np.uint64(8)).astype(np.int64) - 8388608
    return k.astype(np.float32) * scale, scale


def set_params(model):
    """Deterministic parameters: weights/biases U(-1/sqrt(fan_in), ..) from paramgen, BN gamma
    around 1 and beta around 0 (non-trivial so the affine part is tested).
    Returns {name: (seed, scale)} for tensors stored as paramgen."""
    gen = {}
    mods = dict(model.named_modules())
    for seed, (name, p) in enumerate(model.named_parameters(), start=101):
        mod = mods[name.rsplit(".", 1)[0]]
        with torch.no_grad():
            if isinstance(mod, nn.BatchNorm2d):
                v, _ = paramgen(seed, p.numel(), 0.2)
                p.copy_(torch.from_numpy(v + (1.0 if name.endswith("weight") else 0.0)))
            else:
                fan_in = mod.weight[0].numel()
                v, scale = paramgen(seed, p.numel(), 1.0 / np.sqrt(fan_in))
                # paramgen values are in PyTorch's order only for 2-D/1-D tensors; conv
                # weights are generated in kdpeers layout and permuted back
                if p.dim() == 4:
                    co, ci, kh, kw = p.shape
                    p.copy_(torch.from_numpy(v.reshape(co, kh, kw, ci)).permute(0, 3, 1, 2))
                else:
                    p.copy_(torch.from_numpy(v.reshape(p.shape)))
                if p.numel() >= PARAMGEN_MIN:
                    gen[name] = (seed, scale)
    return gen


# ---------------------------------------------------------------- golden writer
class Writer:
    def __init__(self):
        self.recs = []

    def add(self, name, arr):
        # copy: .numpy() views share memory with tensors that training updates in place
        arr = np.array(arr, dtype=np.float32, copy=True, order="C")
        if arr.ndim == 0:
            arr = arr.reshape(1)
        self.recs.append((name, arr))

    def save(self, path):
        with open(path, "wb") as f:
            f.write(b"KDPGOLD1")
            f.write(struct.pack("<I", len(self.recs)))
            for name, arr in self.recs:
                nb = name.encode()
                f.write(struct.pack("<I", len(nb)))
                f.write(nb)
                f.write(struct.pack("<I", arr.ndim))
                f.write(struct.pack(f"<{arr.ndim}I", *arr.shape))
                f.write(arr.astype("<f4").tobytes())
        return sum(a.size for _, a in self.recs) * 4


def buffer_names(model):
    return [n for n, _ in model.named_buffers() if not n.endswith("num_batches_tracked")]


def forward_backward(model, x, y):
    model.train()
    for p in model.parameters():
        p.grad = None
    logits = model(x)
    logits.retain_grad()
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return logits, loss


def sgd_trajectory(m, x, y, opt=None):
    """NSTEPS SGD steps on (x, y); returns the losses before each step."""
    opt = opt or torch.optim.SGD(m.parameters(), lr=LR, momentum=MOM, weight_decay=WD,
                                 nesterov=True)
    ls = []
    for _ in range(NSTEPS):
        opt.zero_grad()
        m.train()
        loss = F.cross_entropy(m(x), y)
        ls.append(loss.item())
        loss.backward()
        opt.step()
    return ls


def select_jitter(model, x, y, n_seeds=400):
    """x + JITTER * N(0, 1) with the first seed whose float64 trajectory stays KINK_MIN away from
    every ReLU/max-pool kink (see above); returns (x, seed, distance)."""
    global KINKS
    best = (-1.0, None)
    for seed in range(n_seeds):
        gen = torch.Generator().manual_seed(seed)
        xj = (x + JITTER * torch.randn(x.shape, generator=gen)).float()
        m = copy.deepcopy(model).double()
        KINKS = []
        sgd_trajectory(m, xj.double(), y)
        d = min(KINKS)
        KINKS = None
        if d > best[0]:
            best = (d, seed, xj)
        if d >= KINK_MIN:
            return xj, seed, d
    sys.exit(f"no jitter seed in {n_seeds} keeps {KINK_MIN} from the kinks (best {best[0]:.3g})")


def make_golden(model, path):
    x, y = load_batch()
    gen = set_params(model)
    x, jseed, kink = select_jitter(model, x, y)
    print(f"{path}: jitter seed {jseed}, nearest ReLU/max-pool kink {kink:.3g}")
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    w = Writer()
    w.add("x", x.permute(0, 2, 3, 1).numpy())
    w.add("y", y.numpy())
    for name, p in model.named_parameters():
        if name in gen:
            w.add("paramgen." + name, [gen[name][0], gen[name][1]])
            w.add("paramgen_head." + name, to_kdp(name, p).reshape(-1)[:16])
        else:
            w.add("param." + name, to_kdp(name, p))
    bnames = buffer_names(model)
    for b in bnames:
        w.add("buffer0." + b, model.get_buffer(b).numpy())

    # float64 twin: estimates PyTorch's own float32 rounding error per record
    model.feat = None
    m64 = copy.deepcopy(model).double()
    logits64, loss64 = forward_backward(m64, x.double(), y)

    logits, loss = forward_backward(model, x, y)
    report = []

    def rec(name, t32, t64):
        a, b = t32.detach().double(), t64.detach()
        err = (a - b).abs().max().item()
        report.append((name, err, b.abs().max().item()))
        w.add("f32err." + name, [err])

    w.add("logits", logits.detach().numpy())
    rec("logits", logits, logits64)
    w.add("loss", [loss.item()])
    rec("loss", loss, loss64)
    w.add("features", model.feat.detach().numpy())
    rec("features", model.feat, m64.feat)
    w.add("dlogits", logits.grad.numpy())
    rec("dlogits", logits.grad, logits64.grad)
    p64 = dict(m64.named_parameters())
    for name, p in model.named_parameters():
        w.add("grad." + name, to_kdp(name, p.grad))
        rec("grad." + name, p.grad, p64[name].grad)
    for b in bnames:
        w.add("buffer." + b, model.get_buffer(b).numpy())
        rec("buffer." + b, model.get_buffer(b), m64.get_buffer(b))

    # 5 SGD steps from the initial state, float32 and float64
    model.load_state_dict(init_state)
    model.feat = None
    m64 = copy.deepcopy(model).double()
    losses = [sgd_trajectory(model, x, y), sgd_trajectory(m64, x.double(), y)]
    w.add("steps.loss", losses[0])
    report.append(("steps.loss", max(abs(a - b) for a, b in zip(*losses)), max(losses[1])))
    w.add("f32err.steps.loss", [report[-1][1]])
    p64 = dict(m64.named_parameters())
    for name, p in model.named_parameters():
        v = to_kdp(name, p)
        rec("final." + name, p, p64[name])
        if v.size >= FINAL_SUB_MIN:
            rows = np.unique(np.round(np.linspace(0, v.shape[0] - 1, FINAL_SUB_ROWS)).astype(int))
            w.add("final_rows." + name, rows)
            w.add("final_sub." + name, v.reshape(v.shape[0], -1)[rows])
        else:
            w.add("final." + name, v)
    for b in bnames:
        w.add("final_buffer." + b, model.get_buffer(b).numpy())
        rec("final_buffer." + b, model.get_buffer(b), m64.get_buffer(b))
    model.eval()
    m64.eval()
    with torch.no_grad():
        ev = model(x)
        ev64 = m64(x.double())
    w.add("final.eval_logits", ev.numpy())
    rec("final.eval_logits", ev, ev64)

    nbytes = w.save(path)
    print(f"{path}: {len(w.recs)} records, {nbytes / 1e6:.2f} MB of floats")
    print("  PyTorch float32 vs float64 (max abs error / max abs value):")
    for name, err, scale in report:
        print(f"    {name:28s} {err:.3e} / {scale:.3e}")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "tests"
    print("parameter counts (hard-coded in tests/test_model.c):")
    for arch, m in [("mlp(512,256)", MLP([512, 256])), ("mlp(64,32)", MLP([64, 32])),
                    ("cnn", CNN()), ("resnet20", ResNetCifar(20)), ("resnet32", ResNetCifar(32)),
                    ("resnet56", ResNetCifar(56)), ("resnet110", ResNetCifar(110)),
                    ("wrn16_2", WRN(16, 2)), ("wrn16_4", WRN(16, 4)), ("wrn28_10", WRN(28, 10))]:
        nb = sum(b.numel() for n, b in m.named_buffers() if not n.endswith("num_batches_tracked"))
        print(f"  {arch:14s} params {n_params(m):9d}  bn buffers {nb:6d}")
    make_golden(MLP([64, 32]), f"{root}/golden_mlp.bin")
    make_golden(CNN(), f"{root}/golden_cnn.bin")


if __name__ == "__main__":
    main()
