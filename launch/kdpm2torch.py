#!/usr/bin/python3
"""kdpm2torch.py: a kdpeers model file (.kdpm, format 2) in PyTorch, checked against kdpeers.

    launch/kdpm2torch.py MODEL.kdpm... [--images FILE] [-n N] [--predict build/kdpeers-predict]
                         [--tol 1e-5] [--save state_dict.pt]   (MODEL.kdpm.pt for several models)

Reads the file with msgpack (read_kdpm below is the whole format: see docs/model-format.md),
builds the reference PyTorch model of its architecture (ref_model: the same modules and
state_dict names as kdpeers' model zoo, e.g. fc1.weight, conv1.weight, layer1.0.bn1.running_var,
0.weight for seq: specs), loads the tensors with load_state_dict(strict=True), runs the first N
images of FILE (an IDX file, raw or .gz, or raw uint8 pixels; default the Fashion-MNIST test set)
in eval mode and compares the probabilities with `kdpeers-predict --json` on the same images:
same labels and every probability within --tol, else exit 1. --save writes the state_dict.
Run with Debian's /usr/bin/python3 (python3-torch, python3-msgpack, python3-numpy). Format-1
files (kdpeers 0.1.0) hold one flat vector: `kdpeers export OLD.kdpm -o NEW.kdpm` converts them.
"""
import argparse
import gzip
import json
import re
import subprocess
import sys
import zlib

import msgpack
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

F32 = 6  # the entry type tag of float32 tensors


def read_kdpm(path):
    """(metadata dict, {state_dict name: numpy array}) of a .kdpm file."""
    data = open(path, "rb").read()
    if zlib.crc32(data[:-12]) != int.from_bytes(data[-4:], "big"):
        raise SystemExit(f"{path}: checksum mismatch (truncated or damaged)")
    items = msgpack.Unpacker(raw=False)
    items.feed(data[:-12])
    magic, _version, kind = next(items), next(items), next(items)
    if magic != "KDPCKPT" or kind != "model":
        raise SystemExit(f"{path}: not a kdpeers model file")
    meta, tensors = {}, {}
    for name in items:
        tag = next(items)
        if tag == F32:
            _ndim, dims, raw = next(items), next(items), next(items)
            tensors[name] = np.frombuffer(raw, "<f4").reshape(dims)
        else:
            meta[name] = next(items)
    return meta, tensors


# ---------------------------------------------------------------- reference models
class MLP(nn.Module):
    def __init__(self, d_in, hidden, classes):
        super().__init__()
        dims = [d_in] + hidden + [classes]
        for i in range(len(dims) - 1):
            setattr(self, f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.n = len(dims) - 1

    def forward(self, x):
        h = x.flatten(1)
        for i in range(1, self.n):
            h = F.relu(getattr(self, f"fc{i}")(h))
        return getattr(self, f"fc{self.n}")(h)


class CNN(nn.Module):
    def __init__(self, c, h, w, classes):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc1, self.fc2 = nn.Linear(64 * (h // 4) * (w // 4), 128), nn.Linear(128, classes)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


class BasicBlockA(nn.Module):
    """CIFAR ResNet block, option-A shortcut (subsample, zero channel padding)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, ((cout - cin) // 2, cout - cin - (cout - cin) // 2)

    def forward(self, x):
        o = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        s = x[:, :, ::self.stride, ::self.stride]
        if self.pad[0] or self.pad[1]:
            s = F.pad(s, (0, 0, 0, 0, self.pad[0], self.pad[1]))
        return F.relu(o + s)


class ResNet(nn.Module):
    def __init__(self, c, depth, classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1, self.bn1 = nn.Conv2d(c, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        cin = 16
        for s, w in enumerate([16, 32, 64]):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlockA(cin, w, 2 if s > 0 and i == 0 else 1))
                cin = w
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(h.mean((2, 3)))


class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout and stride == 1
        if not self.equal:
            self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        o = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return o + (x if self.equal else self.convShortcut(a))


class WideStage(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.layer = nn.Sequential(*blocks)

    def forward(self, x):
        return self.layer(x)


class WRN(nn.Module):
    def __init__(self, c, depth, k, classes):
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(c, 16, 3, 1, 1, bias=False)
        cin = 16
        for s, w in enumerate([16 * k, 32 * k, 64 * k]):
            blocks = []
            for i in range(n):
                blocks.append(WideBlock(cin, w, 2 if s > 0 and i == 0 else 1))
                cin = w
            setattr(self, f"block{s + 1}", WideStage(blocks))
        self.bn1, self.fc = nn.BatchNorm2d(cin), nn.Linear(cin, classes)

    def forward(self, x):
        h = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.relu(self.bn1(h)).mean((2, 3)))


class Seq(nn.Module):
    """seq:SPEC as src/nn/model.c builds it: module i is the spec's item i (those with tensors
    appear in the state_dict as "i.weight", ...); a final dense(classes) is appended unless the
    spec ends with one. Activations are [N, C, H, W] or, after dense/flatten/gap, [N, D]."""

    def __init__(self, spec, c, h, w, classes):
        super().__init__()
        items = re.findall(r"[a-z]+(?:\([^)]*\))?", spec)
        self.steps = []  # (kind, name or args)
        shape = [c, h, w]  # the current activation, [D] when flat
        last_dense = False
        for idx, item in enumerate(items):
            name, _, args = item.partition("(")
            a = [float(v) for v in args.rstrip(")").split(",")] if args else []
            key = str(idx)
            last_dense = False
            if name == "conv":
                shape = self._to4(shape)
                k = int(a[1])
                st = int(a[2]) if len(a) > 2 else 1
                pad = int(a[3]) if len(a) > 3 else k // 2
                self.add_module(key, nn.Conv2d(shape[0], int(a[0]), k, st, pad))
                shape = [int(a[0]), (shape[1] + 2 * pad - k) // st + 1, (shape[2] + 2 * pad - k) // st + 1]
                self.steps.append(("mod4", key))
            elif name == "bn":
                self.add_module(key, (nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d)(shape[0]))
                self.steps.append(("mod", key))
            elif name == "relu":
                self.steps.append(("relu", None))
            elif name in ("maxpool", "avgpool"):
                shape = self._to4(shape)
                k = int(a[0])
                st = int(a[1]) if len(a) > 1 else k
                pad = int(a[2]) if len(a) > 2 else 0
                self.steps.append((name, (k, st, pad)))
                shape = [shape[0], (shape[1] + 2 * pad - k) // st + 1, (shape[2] + 2 * pad - k) // st + 1]
            elif name == "gap":
                self.steps.append(("gap", None))
                shape = [shape[0]]
            elif name == "flatten":
                self.steps.append(("flatten", None))
                shape = [int(np.prod(shape))]
            elif name == "dropout":
                self.add_module(key, nn.Dropout(a[0]))
                self.steps.append(("mod", key))
            elif name == "dense":
                d = int(np.prod(shape))
                self.add_module(key, nn.Linear(d, int(a[0])))
                self.steps.append(("dense", key))
                shape = [int(a[0])]
                last_dense = True
            else:
                raise SystemExit(f"kdpm2torch: unknown seq item '{item}'")
        if not last_dense or shape[0] != classes:
            key = str(len(items))
            self.add_module(key, nn.Linear(int(np.prod(shape)), classes))
            self.steps.append(("dense", key))

    @staticmethod
    def _to4(shape):
        return shape if len(shape) == 3 else [shape[0], 1, 1]

    def forward(self, x):
        for kind, arg in self.steps:
            if kind in ("mod4", "maxpool", "avgpool") and x.dim() == 2:
                x = x[:, :, None, None]
            if kind in ("mod", "mod4"):
                x = getattr(self, arg)(x)
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "maxpool":
                x = F.max_pool2d(x, arg[0], arg[1], arg[2])
            elif kind == "avgpool":
                x = F.avg_pool2d(x, arg[0], arg[1], arg[2], count_include_pad=True)
            elif kind == "gap":
                x = x.mean((2, 3)) if x.dim() == 4 else x
            elif kind == "flatten":
                x = x.flatten(1)
            elif kind == "dense":
                x = getattr(self, arg)(x.flatten(1))
        return x


def ref_model(arch, c, h, w, classes):
    m = re.fullmatch(r"mlp\(([0-9, ]+)\)", arch)
    if m:
        return MLP(c * h * w, [int(v) for v in m.group(1).split(",")], classes)
    if arch == "cnn":
        return CNN(c, h, w, classes)
    m = re.fullmatch(r"resnet([0-9]+)", arch)
    if m:
        return ResNet(c, int(m.group(1)), classes)
    m = re.fullmatch(r"wrn([0-9]+)_([0-9]+)", arch)
    if m:
        return WRN(c, int(m.group(1)), int(m.group(2)), classes)
    if arch.startswith("seq:"):
        return Seq(arch[4:], c, h, w, classes)
    raise SystemExit(f"kdpm2torch: no reference model for arch '{arch}'")


# ---------------------------------------------------------------- images
def read_images(path, n, isz):
    data = open(path, "rb").read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:4] == b"\x00\x00\x08\x03":
        data = data[16:]
    count = min(n, len(data) // isz)
    return np.frombuffer(data[:count * isz], np.uint8), count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--images", default="/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--predict", default="build/kdpeers-predict")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--save")
    a = ap.parse_args()
    torch.set_num_threads(1)
    bad = sum(check(path, a) for path in a.models)
    sys.exit(1 if bad else 0)


def check(path, a):
    """Loads one model file into its reference model, compares with kdpeers-predict; prints one
    line "PATH: ..." and returns 0 if they agree, else 1."""
    meta, tensors = read_kdpm(path)
    if meta.get("model_format", 1) < 2:
        raise SystemExit(f"{path}: format 1 (one flat vector); convert it first with "
                         f"`kdpeers export {path} -o NEW.kdpm`")
    h, w, c, k = meta["input_h"], meta["input_w"], meta["input_c"], meta["classes"]
    model = ref_model(meta["arch"], c, h, w, k)
    model.load_state_dict({n: torch.from_numpy(t.copy()) for n, t in tensors.items()}, strict=True)
    model.eval()
    if a.save:
        torch.save(model.state_dict(), a.save if len(a.models) == 1 else f"{path}.pt")
    pix, n = read_images(a.images, a.n, h * w * c)
    x = torch.from_numpy(pix.copy()).float().reshape(n, h, w, c).permute(0, 3, 1, 2)
    mean = torch.tensor([meta[f"mean{i}"] for i in range(c)], dtype=torch.float32).reshape(1, c, 1, 1)
    std = torch.tensor([meta[f"std{i}"] for i in range(c)], dtype=torch.float32).reshape(1, c, 1, 1)
    with torch.no_grad():
        p = F.softmax(model((x / 255.0 - mean) / std).double(), 1).numpy()
    out = subprocess.run([a.predict, path, "-", "--json", "--batch", "256"], input=pix.tobytes(),
                         capture_output=True, check=True).stdout.decode().splitlines()
    q = np.array([json.loads(line)["probs"] for line in out])
    labels = int((q.argmax(1) != p.argmax(1)).sum())
    diff = float(np.abs(q - p).max())
    print(f"{path}: {meta['arch']}: PyTorch {torch.__version__} vs kdpeers-predict on {n} images: "
          f"{labels} labels differ, max |p diff| {diff:.3g} (tolerance {a.tol})")
    return 0 if labels == 0 and diff <= a.tol else 1


if __name__ == "__main__":
    main()
