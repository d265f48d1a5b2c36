"""``python -m metafunc quickstart``: MAML on sinusoid regression, from public metafunc names only.

Finn et al. 2017 (arXiv:1703.03400), section 5.1: tasks are sinusoids with amplitude in [0.1, 5] and
phase in [0, pi], inputs in [-5, 5], K=10 support and 10 query points; an MLP 1-40-40-1 adapts
with one SGD step (lr 0.01) per task, and the meta-batch is 25 tasks, vmapped.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn
from torch.func import grad, vmap

import metafunc


def sample_sinusoids(n_tasks: int, k: int, generator: torch.Generator):
    """``n_tasks`` sinusoid tasks of ``2k`` points each, split into support and query halves."""
    amplitude = torch.empty(n_tasks, 1, 1).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(n_tasks, 1, 1).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(n_tasks, 2 * k, 1).uniform_(-5.0, 5.0, generator=generator)
    y = amplitude * torch.sin(x - phase)
    return (x[:, :k], y[:, :k]), (x[:, k:], y[:, k:])


def run(steps: int = 2000, meta_batch: int = 25, k: int = 10, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    fm = metafunc.functionalize(model)  # fm.params are model's own parameters
    inner = metafunc.optim.sgd(lr=0.01)
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def mse(params, x, y):
        return ((fm(params, x) - y) ** 2).mean()

    def adapt(params, x, y, inner_steps=1):
        state = inner.init(params)
        for _ in range(inner_steps):
            updates, state = inner.update(grad(mse)(params, x, y), state, params)
            params = metafunc.apply_updates(params, updates)
        return params

    def task_loss(params, support, query):
        return mse(adapt(params, *support), *query)

    def evaluate(n_tasks=200, inner_steps=1):
        eval_gen = torch.Generator().manual_seed(12345)
        support, query = sample_sinusoids(n_tasks, k, eval_gen)
        params = {name: p.detach() for name, p in fm.params.items()}
        losses = vmap(lambda s, q: mse(adapt(params, s[0], s[1], inner_steps), *q))(support, query)
        return losses.mean().item()

    before = evaluate()
    print(f"MAML on sinusoid: {steps} meta-steps, meta-batch {meta_batch}, K={k}")
    print(f"post-adaptation MSE before meta-training: {before:.3f}")
    start = time.perf_counter()
    for step in range(1, steps + 1):
        support, query = sample_sinusoids(meta_batch, k, gen)
        meta_loss = vmap(task_loss, in_dims=(None, 0, 0))(fm.params, support, query).mean()
        outer.zero_grad()
        meta_loss.backward()  # the meta-gradient lands in model.parameters()
        outer.step()
        if step % max(1, steps // 10) == 0:
            print(f"  step {step:5d}  meta-loss {meta_loss.item():.3f}")
    seconds = time.perf_counter() - start
    after = evaluate()
    after10 = evaluate(inner_steps=10)
    print(
        f"post-adaptation MSE after meta-training: {after:.3f} (1 step), {after10:.3f} (10 steps)"
    )
    print(f"meta-training took {seconds:.1f} s ({1000 * seconds / steps:.1f} ms per meta-step)")
    return {"before": before, "after": after, "after_10_steps": after10, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metafunc quickstart", description=__doc__)
    parser.add_argument("--steps", type=int, default=2000, help="meta-training steps")
    parser.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-step")
    parser.add_argument("--k", type=int, default=10, help="support (and query) points per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "meta_batch", "k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    run(args.steps, args.meta_batch, args.k, args.seed)
