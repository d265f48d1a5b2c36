"""Throughput (tasks per second) of MAML meta-steps with 1 and 2 processes (torch.distributed).

Each configuration runs in its own ``torchrun`` (gloo on CPU, nccl with ``--device cuda``): every
process draws the same meta-batch, keeps its share (``metafunc.distributed``), computes its
meta-gradient with vmap, and the task-weighted mean is all-reduced before the outer Adam step.
One torch thread per process, so 2 processes use 2 cores where 1 process uses 1.

    python benchmarks/distributed.py                 # sinusoid MAML, 1 and 2 processes
    python benchmarks/distributed.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import optree
import torch
from torch import nn

import metafunc
from metafunc import distributed
from metafunc.algorithms import MAML
from metafunc.data import Sinusoid


def worker(steps: int, meta_batch: int, warmup: int, device: str) -> None:
    torch.set_num_threads(1)
    dev = torch.device(device)
    if dev.type == "cuda":  # one GPU per process, by its local rank on this host
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    learner = MAML(metafunc.functionalize(model.to(dev)), steps=5, inner_lr=0.01, strategy="vmap")
    meta = learner.init()
    leaves = optree.tree_leaves(meta)
    outer = torch.optim.Adam(leaves, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        episode = Sinusoid().sample(meta_batch, 10, generator=gen, device=dev)
        grads, _ = distributed.meta_grad(learner, meta, episode.support, episode.query)
        for leaf, g in zip(leaves, optree.tree_leaves(grads)):
            leaf.grad = g
        outer.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if distributed.rank() == 0:
        print(json.dumps({"seconds": seconds, "tasks_per_s": steps * meta_batch / seconds}))
    if distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--meta-batch", type=int, default=50)
    p.add_argument("--processes", default="1,2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    steps, warmup = (10, 2) if args.quick else (args.steps, 5)
    if args.worker:
        worker(steps, args.meta_batch, warmup, args.device)
        return
    print(
        f"MAML sinusoid, MLP 1-40-40-1, 5 inner steps, meta-batch {args.meta_batch}, {steps} "
        f"timed meta-steps after {warmup}; torch {torch.__version__}, {args.device}"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    base = None
    for n in [int(x) for x in args.processes.split(",")]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", __file__,
               "--worker", "--meta-batch", str(args.meta_batch), "--device", args.device,
               "--steps", str(args.steps)] + (["--quick"] if args.quick else [])  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        base = base or result["tasks_per_s"]
        print(f"  {n} process(es): {result['tasks_per_s']:8.1f} tasks/s  "
              f"({result['tasks_per_s'] / base:.2f}x one process)")  # fmt: skip


if __name__ == "__main__":
    main()
