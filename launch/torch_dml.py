#!/usr/bin/python3
"""PyTorch 1.13 reference for kdpeers' 2-rank DML speed: one peer per process, mlp(512,256),
logits allgathered with torch.distributed (gloo) every step, 1 thread per rank.

Usage: /usr/bin/python3 launch/torch_dml.py [--method dml|independent] [--steps N] [--warmup N]
Prints one JSON line per rank: {"rank":r,"method":...,"steps":N,"seconds":T,"steps_per_second":R}.
"""
import argparse, gzip, json, os, time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

FM = "/usr/share/datasets/fashion-mnist/"


def load():
    with gzip.open(FM + "train-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(FM + "train-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    x = (torch.tensor(x, dtype=torch.float32) / 255.0 - 0.2860) / 0.3530
    return x, torch.tensor(y, dtype=torch.int64)


def worker(rank, args, port):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(1 + rank)
    x, y = load()
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(42)  # the same batch order on both ranks
    perm = torch.randperm(x.shape[0], generator=g)
    T = 3.0
    B = 128
    gathered = [torch.empty(B, 10) for _ in range(2)]
    total = args.warmup + args.steps
    t0 = None
    for step in range(total):
        if step == args.warmup:
            dist.barrier()
            t0 = time.perf_counter()
        i = (step * B) % (x.shape[0] - B)
        idx = perm[i:i + B]
        xb, yb = x[idx], y[idx]
        z = model(xb)
        loss = F.cross_entropy(z, yb)
        if args.method == "dml":
            dist.all_gather(gathered, z.detach().contiguous())
            other = gathered[1 - rank]
            loss = loss + T * T * F.kl_div(F.log_softmax(z / T, dim=1), F.softmax(other / T, dim=1),
                                           reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dist.barrier()
    sec = time.perf_counter() - t0
    print(json.dumps({"rank": rank, "method": args.method, "steps": args.steps, "seconds": sec,
                      "steps_per_second": args.steps / sec}), flush=True)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="dml", choices=["dml", "independent"])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--port", type=int, default=29517)
    args = ap.parse_args()
    mp.spawn(worker, args=(args, args.port), nprocs=2, join=True)


if __name__ == "__main__":
    main()
