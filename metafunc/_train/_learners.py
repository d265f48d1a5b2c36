"""The learner that ``--algorithm`` names, built from the flags, and the choice of
``--strategy auto`` (vmap or a loop over tasks, timed on this machine)."""

from __future__ import annotations

import argparse
import functools
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import algorithms, distributed, implicit
from .._vmap import _AUTO_CALLS
from ._models import _head_names, _warp_names
from ._report import Progress

# vmap_tasks(strategy="auto") alternates loop and vmap, a warm-up call each and then up to
# _AUTO_CALLS - 1 timed calls each; a call's time ends when the next call starts
_TRIALS = 2 * _AUTO_CALLS + 1


def _learner(args: argparse.Namespace, fm, model: nn.Module, loss: str, strategy: str):
    common: dict[str, Any] = {"strategy": strategy}
    a = args.algorithm
    if a in ("maml", "fomaml", "metasgd", "anil", "mamlpp"):
        kwargs: dict[str, Any] = {
            "inner_lr": args.inner_lr,
            "steps": args.inner_steps,
            "first_order": args.first_order or a == "fomaml",
        }
        if a == "metasgd":
            kwargs["learn_lr"] = algorithms.PerParamLR()
        if a == "anil":
            kwargs["adapted"] = _head_names(model)
        if a == "mamlpp":
            kwargs["learn_lr"] = algorithms.PerStepLR()
            kwargs["step_weights"] = _msl_weights(args.inner_steps, 0.0)
        return algorithms.MAML(fm, loss, **kwargs, **common)
    if a == "reptile":
        return algorithms.Reptile(
            fm, loss, inner_lr=args.inner_lr, steps=args.inner_steps, **common
        )
    if a == "imaml":
        return algorithms.IMAML(
            fm, loss, inner_lr=args.inner_lr, steps=args.inner_steps, lam=args.lam,
            solve=functools.partial(implicit.solve_cg, maxiter=args.cg_steps),
            if_not_converged="ignore", **common,
        )  # fmt: skip
    if a == "leap":
        return algorithms.Leap(fm, loss, inner_lr=args.inner_lr, steps=args.inner_steps, **common)
    if a == "protonet":
        return algorithms.ProtoNet(fm, ways=args.ways, **common)
    if a == "r2d2":  # its own defaults: the initial ridge penalty 50, learned
        return algorithms.R2D2(fm, ways=args.ways, **common)
    if a == "metaoptnet":  # C = 0.1; a solve short of its tolerance is used as it is
        return algorithms.MetaOptNet(fm, ways=args.ways, if_not_converged="ignore", **common)
    return algorithms.WarpGrad(
        fm, loss, warp=_warp_names(model), inner_lr=args.inner_lr,
        steps=args.inner_steps, seed=args.seed,
        buffer_size=1000 if args.task == "sinusoid" else 200, **common,
    )  # fmt: skip


def _meta_grad(learner: Any, meta: Any, support: Any, query: Any) -> Any:
    return learner.meta_grad(meta, support, query)


class _Compiled(NamedTuple):
    """``learner`` whose ``meta_grad`` runs ``compiled`` (for :func:`distributed.meta_grad`).

    The learner is an input of the one compiled function (:func:`compiled_meta_grad`), so
    MAML++'s annealed copies of it (new step weights, read as a tensor) use the same graph."""

    learner: Any
    compiled: Any

    def meta_grad(self, meta: Any, support: Any, query: Any) -> Any:
        return self.compiled(self.learner, meta, support, query)


def compiled_meta_grad(backend: str) -> Any:
    """``meta_grad(learner, meta, support, query)``, compiled by ``torch.compile`` on first use."""
    return torch.compile(_meta_grad, backend=backend)


def _msl_weights(steps: int, progress: float) -> list[float]:
    """MAML++'s multi-step loss: from uniform weights to the last step only, over ``progress``."""
    a = min(max(progress, 0.0), 1.0)
    w = [(1 - a) / steps] * steps
    w[-1] += a
    return w


def _choose_strategy(args, fm, model, tasks, device) -> str:
    """``--strategy``, or for ``auto`` on the CPU the faster of vmap and a loop over tasks,
    timed over a few meta-steps of a probe learner (shown on stderr unless ``--quiet``)."""
    if args.strategy != "auto":
        return args.strategy
    if device.type != "cpu" or args.compile:  # a compiled loop would unroll every task
        return "vmap"
    probe = _learner(args, fm, model, tasks.loss, "auto")
    meta = probe.init()
    generator = torch.Generator().manual_seed(10**6 + args.seed)
    rng = torch.get_rng_state()
    share = -(-args.meta_batch // distributed.world_size())  # the largest share of a process
    progress = Progress(
        _TRIALS, 0, enabled=not args.quiet, label="choosing how to batch tasks (vmap or loop):"
    )
    progress.update(0, "trial meta-steps")
    chosen: list[Any] = []
    for trial in range(1, _TRIALS + 1):  # until the probe's task map has decided
        episode = tasks.sample("train", share, generator, device)
        probe.meta_grad(meta, episode.support, episode.query)
        chosen = [m for m in probe._maps.values() if getattr(m, "strategy", None)]
        if chosen:
            progress.update(trial, f"trial meta-steps: {chosen[0].strategy} ({chosen[0].reason})")
            break
        progress.update(trial, "trial meta-steps")
    progress.close()
    torch.set_rng_state(rng)
    return chosen[0].strategy if chosen else "vmap"
