"""The few-shot evaluation protocol on miniImageNet, tieredImageNet, CIFAR-FS or FC100: meta-train
a learner on the train classes, then report its mean accuracy on 600+ test episodes (5-way,
1- or 5-shot, 15 queries per class) with a 95 % confidence interval.

The datasets are read by metafunc.data (load_miniimagenet, load_tieredimagenet, load_cifar_fs,
load_fc100) from ``--data-path``; nothing downloads. The learner is one of ``ALGORITHMS`` (MAML,
ProtoNet, R2-D2, MetaOptNet; a row there adds another) on a ``--backbone`` of metafunc.models:
``conv4`` (Conv-4 of Finn et al. 2017: four blocks of 3x3 conv with ``--filters`` channels,
BatchNorm with batch statistics, ReLU, 2x2 max-pool), ``resnet12`` (MetaOptNet's, first block
``--filters`` wide) or ``wrn28_10`` (``--filters``: the widening factor); MAML adds a linear head,
the others fit theirs per task on the features. MAML follows Finn et al. 2017, 5.2: 5 inner SGD
steps at lr 0.01 when training, 10 when testing, outer Adam at 1e-3, meta-batch 4 (2 for 5-shot);
the heads train on meta-batches of 8 episodes (MetaOptNet's). The confidence interval is 1.96
standard errors of the per-episode accuracies, as in the papers. The published numbers it is
compared with are in ``PUBLISHED`` and in benchmarks/README.md; none was reproduced on these
machines (no real data).

``--quick`` writes a tiny dataset in the format of ``--dataset`` into a temporary folder (random
pixels, so the accuracy is chance: the run checks the plumbing, not the learning) and runs the
protocol on it with a small budget (3 steps, 100 test episodes) in under a minute.

Run: ``python benchmarks/reproduce_fewshot.py --dataset miniimagenet --data-path DIR
[--algorithm maml] [--backbone conv4] [--shots 1] [--steps 60000] [--episodes 600]
[--device cuda]``
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pickle
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import torch
from torch import nn

import metafunc
from metafunc import algorithms, data, models

Z95 = 1.959963984540054

DATASETS: dict[str, Callable[..., data.LabelledImages]] = {
    "miniimagenet": data.load_miniimagenet,
    "tieredimagenet": data.load_tieredimagenet,
    "cifar-fs": data.load_cifar_fs,
    "fc100": data.load_fc100,
}


# ------------------------------------------------------------------------------ algorithms
@dataclasses.dataclass(frozen=True)
class Algorithm:
    """How to build a learner for training and one for testing (its test-time settings)."""

    build: Callable[[metafunc.FunctionalModel, argparse.Namespace], algorithms.MetaLearner]
    for_test: Callable[[algorithms.MetaLearner, argparse.Namespace], algorithms.MetaLearner]
    meta_batch: Callable[[int], int]  # tasks per meta-step, given the shots
    head: bool = True  # the backbone ends in a linear head of ``ways`` outputs (else: features)


def _maml(model: metafunc.FunctionalModel, args: argparse.Namespace) -> algorithms.MetaLearner:
    # the loop: second order through training-mode BatchNorm is exact per task, not under vmap
    return algorithms.MAML(
        model, "cross_entropy", inner_lr=args.inner_lr, steps=args.inner_steps, strategy="loop"
    )


def _same(learner: algorithms.MetaLearner, args: argparse.Namespace) -> algorithms.MetaLearner:
    return learner


ALGORITHMS: dict[str, Algorithm] = {
    "maml": Algorithm(
        build=_maml,
        for_test=lambda learner, args: dataclasses.replace(learner, steps=args.test_inner_steps),
        meta_batch=lambda shots: 4 if shots == 1 else 2,
    ),
    "protonet": Algorithm(
        build=lambda model, args: algorithms.ProtoNet(model, ways=args.ways),
        for_test=_same,
        meta_batch=lambda shots: 8,
        head=False,
    ),
    "r2d2": Algorithm(  # the initial ridge penalty 50 (MetaOptNet's R2-D2 head), learned
        build=lambda model, args: algorithms.R2D2(model, ways=args.ways),
        for_test=_same,
        meta_batch=lambda shots: 8,
        head=False,
    ),
    "metaoptnet": Algorithm(  # C = 0.1 (Lee et al. 2019); a solve short of tol is used as is
        build=lambda model, args: algorithms.MetaOptNet(
            model, ways=args.ways, if_not_converged="ignore"
        ),
        for_test=_same,
        meta_batch=lambda shots: 8,
        head=False,
    ),
}

# (algorithm, backbone, dataset, shots): (accuracy %, 95 % CI), source
PUBLISHED: dict[tuple[str, str, str, int], tuple[float, float, str]] = {
    ("maml", "conv4", "miniimagenet", 1): (48.70, 1.84, "Finn et al. 2017, Table 1"),
    ("maml", "conv4", "miniimagenet", 5): (63.11, 0.92, "Finn et al. 2017, Table 1"),
    ("protonet", "conv4", "miniimagenet", 1): (49.42, 0.78, "Snell et al. 2017, Table 2"),
    ("protonet", "conv4", "miniimagenet", 5): (68.20, 0.66, "Snell et al. 2017, Table 2"),
    ("metaoptnet", "resnet12", "miniimagenet", 1): (62.64, 0.61, "Lee et al. 2019, Table 1"),
    ("metaoptnet", "resnet12", "miniimagenet", 5): (78.63, 0.46, "Lee et al. 2019, Table 1"),
    ("metaoptnet", "resnet12", "tieredimagenet", 1): (65.99, 0.72, "Lee et al. 2019, Table 1"),
    ("metaoptnet", "resnet12", "tieredimagenet", 5): (81.56, 0.53, "Lee et al. 2019, Table 1"),
    ("metaoptnet", "resnet12", "cifar-fs", 1): (72.0, 0.7, "Lee et al. 2019, Table 2"),
    ("metaoptnet", "resnet12", "cifar-fs", 5): (84.2, 0.5, "Lee et al. 2019, Table 2"),
    ("metaoptnet", "resnet12", "fc100", 1): (41.1, 0.6, "Lee et al. 2019, Table 2"),
    ("metaoptnet", "resnet12", "fc100", 5): (55.5, 0.6, "Lee et al. 2019, Table 2"),
}


# ------------------------------------------------------------------------------ model
# --filters when not given: Conv-4's channels (MAML's 32), ResNet-12's first block (64), the WRN's
# widening factor (10); --quick's narrow versions
WIDTHS = {"conv4": 32, "resnet12": 64, "wrn28_10": 10}
QUICK_WIDTHS = {"conv4": 4, "resnet12": 2, "wrn28_10": 1}


def backbone(args: argparse.Namespace, channels: int, side: int, head: bool) -> nn.Module:
    """``--backbone`` from metafunc.models, ``--filters`` wide; a linear head when ``head``."""
    ways = args.ways if head else None
    f = args.filters
    if args.backbone == "resnet12":
        widths = (f, int(2.5 * f), 5 * f, 10 * f)
        return models.ResNet12(ways, in_channels=channels, channels=widths, image_size=side)
    if args.backbone == "wrn28_10":
        return models.WideResNet(ways, depth=28, widen=f, in_channels=channels)
    return models.Conv4(ways, in_channels=channels, hidden=f, image_size=side)


# ------------------------------------------------------------------------------ protocol
def train(learner, meta, sampler, args, generator) -> None:
    leaves = optree.tree_leaves(meta)
    outer = torch.optim.Adam(leaves, lr=args.outer_lr)
    batch = ALGORITHMS[args.algorithm].meta_batch(args.shots)
    t0, report = time.perf_counter(), max(args.steps // 10, 1)
    for step in range(1, args.steps + 1):
        episode = sampler.sample(batch, generator=generator, device=args.device)
        grads, metrics = learner.meta_grad(meta, episode.support, episode.query)
        for leaf, g in zip(leaves, optree.tree_leaves(grads)):
            leaf.grad = g
        outer.step()
        if step % report == 0 or step == args.steps:
            print(
                f"  step {step}/{args.steps}: train query accuracy "
                f"{100 * metrics['accuracy'].mean().item():.1f} %, "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )


def evaluate(learner, meta, sampler, args, generator) -> torch.Tensor:
    """Per-episode query accuracies on ``args.episodes`` test episodes."""
    accuracies, left = [], args.episodes
    while left > 0:
        n = min(left, args.eval_batch)
        episode = sampler.sample(n, generator=generator, device=args.device)
        accuracies.append(learner.evaluate(meta, episode.support, episode.query)["accuracy"].cpu())
        left -= n
    return torch.cat(accuracies).double()


def summary(accuracies: torch.Tensor) -> tuple[float, float]:
    """Mean accuracy and the half-width of its 95 % confidence interval, in %."""
    n = accuracies.numel()
    mean = accuracies.mean().item()
    ci = Z95 * accuracies.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return 100 * mean, 100 * ci


def run(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    load = DATASETS[args.dataset]
    train_set, test_set = load(path, "train"), load(path, "test")
    channels, side = int(train_set.images.shape[1]), int(train_set.images.shape[2])
    print(f"{args.dataset}: train {train_set}, test {test_set}")
    sampler_args = {"ways": args.ways, "shots": args.shots, "queries": args.queries}
    train_sampler = data.EpisodeSampler(train_set, **sampler_args)
    test_sampler = data.EpisodeSampler(test_set, **sampler_args)
    spec = ALGORITHMS[args.algorithm]
    model = backbone(args, channels, side, spec.head).to(args.device)
    learner = spec.build(metafunc.functionalize(model), args)
    meta = learner.init()
    train(learner, meta, train_sampler, args, torch.Generator().manual_seed(args.seed))
    accuracies = evaluate(
        spec.for_test(learner, args),
        meta,
        test_sampler,
        args,
        torch.Generator().manual_seed(args.eval_seed),
    )
    mean, ci = summary(accuracies)
    return {"mean": mean, "ci95": ci, "episodes": accuracies.numel()}


# ------------------------------------------------------------------------------ --quick data
def write_tiny(dataset: str, folder: Path, classes: int, per_class: int, seed: int = 0) -> None:
    """A tiny dataset of random pixels in the released file format of ``dataset``."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def dump(obj: Any, file: Path) -> None:
        with open(file, "wb") as f:
            pickle.dump(obj, f)

    if dataset in ("miniimagenet", "tieredimagenet"):
        for split in ("train", "val", "test"):
            n = classes * per_class
            images = rng.integers(0, 256, (n, 84, 84, 3), dtype=np.uint8)
            labels = np.repeat(np.arange(classes), per_class)
            if dataset == "miniimagenet":
                class_dict = {f"{split}{c:03d}": list(range(c * per_class, (c + 1) * per_class))
                              for c in range(classes)}  # fmt: skip
                dump({"image_data": images, "class_dict": class_dict},
                     folder / f"mini-imagenet-cache-{split}.pkl")  # fmt: skip
            else:
                np.savez(folder / f"{split}_images.npz", images=images)
                dump({"label_specific": labels, "label_general": labels // 2},
                     folder / f"{split}_labels.pkl")  # fmt: skip
        return
    # CIFAR-100 python pickles: every class present (the splits are built in), per_class images
    # in train and none more in test (an empty test file is still read)
    fine = [c for s in data.CIFAR_FS_SPLIT.values() for c in s]
    fine_sorted = sorted(fine)
    coarse = sorted(c for s in data.FC100_SPLIT.values() for c in s)
    cifar = folder / "cifar-100-python"
    cifar.mkdir()
    dump({"fine_label_names": fine_sorted, "coarse_label_names": coarse}, cifar / "meta")
    fine_labels = np.repeat(np.arange(100), per_class)
    for name, rows in (("train", fine_labels), ("test", fine_labels[:0])):
        dump(
            {
                "data": rng.integers(0, 256, (rows.size, 3072), dtype=np.uint8),
                "fine_labels": rows.tolist(),
                "coarse_labels": (rows % 20).tolist(),  # not CIFAR's real table: FC100 needs
            },  # only some classes under each superclass, which this gives
            cifar / name,
        )


# ------------------------------------------------------------------------------ main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATASETS), default="miniimagenet")
    p.add_argument("--data-path", type=Path, help="the folder of the dataset's files")
    p.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="maml")
    p.add_argument("--backbone", choices=sorted(WIDTHS), default="conv4")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15, help="query examples per class")
    p.add_argument("--steps", type=int, default=60000, help="meta-training steps")
    p.add_argument("--episodes", type=int, default=600, help="test episodes (at least 600)")
    p.add_argument("--eval-batch", type=int, default=20, help="test episodes per evaluate call")
    p.add_argument(
        "--filters",
        type=int,
        help="the backbone's width: Conv-4's channels (default 32, MAML's), ResNet-12's first "
        "block (default 64), the WRN's widening factor (default 10)",
    )
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--test-inner-steps", type=int, default=10)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=2017)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: a tiny generated dataset, 3 steps"
    )
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.filters is None:
        args.filters = (QUICK_WIDTHS if args.quick else WIDTHS)[args.backbone]
    if args.quick:  # 100 test episodes: WRN-28-1 at 84x84 stays under a minute on 2 cores
        args.steps, args.episodes = min(args.steps, 3), min(args.episodes, 100)
        args.inner_steps, args.test_inner_steps, args.queries = 1, 2, min(args.queries, 3)
    elif args.data_path is None:
        parser().error("--data-path is required (or --quick, which writes its own tiny data)")
    elif args.episodes < 600:
        print(f"note: --episodes {args.episodes} is below the protocol's 600", file=sys.stderr)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.data_path
        if args.quick:
            path = Path(tmp)
            write_tiny(
                args.dataset, path, classes=args.ways + 1, per_class=args.shots + args.queries
            )
            print(f"--quick: a tiny random {args.dataset} written to {path}")
        result = run(args, path)
    key = (args.algorithm, args.backbone, args.dataset, args.shots)
    print(
        "\n| dataset | algorithm | backbone | setting | episodes | accuracy (95 % CI) | published |"
    )
    print("|---|---|---|---|---:|---:|---|")
    ref = PUBLISHED.get(key)
    published = f"{ref[0]:.2f} ± {ref[1]:.2f} % ({ref[2]})" if ref else "-"
    print(f"| {args.dataset}{' (tiny random, --quick)' if args.quick else ''} | {args.algorithm} "
          f"| {args.backbone}-{args.filters} | {args.ways}-way {args.shots}-shot | "
          f"{result['episodes']} | {result['mean']:.2f} ± {result['ci95']:.2f} % | "
          f"{published} |")  # fmt: skip
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return result


if __name__ == "__main__":
    main()
