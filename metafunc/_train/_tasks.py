"""The task family of a run: its train/val/test splits, and the seeds of the fixed held-out
tasks."""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from .. import data
from ..data._transforms import EpisodeTransform
from ._cli import FILE_TASKS
from ._errors import RunError

# the fixed val/test tasks' generator seeds: far from the small --seed values people use, so that
# sinusoid's held-out tasks never come from the training tasks' stream (there is no class split)
_VAL_SEED, _TEST_SEED = 2_000_000_011, 2_000_000_029
_READERS = {
    "miniimagenet": data.load_miniimagenet,
    "tieredimagenet": data.load_tieredimagenet,
    "cifarfs": data.load_cifar_fs,
    "fc100": data.load_fc100,
}
# what --data-path holds, for the message of a run without it
_LAYOUTS = {
    "omniglot": "images_background/ and images_evaluation/ (or one of them)",
    "miniimagenet": "mini-imagenet-cache-{train,val,test}.pkl, or images/ with train.csv, "
    "val.csv and test.csv",
    "tieredimagenet": "{train,val,test}_labels.pkl with {train,val,test}_images.npz (or "
    "_images_png.pkl)",
    "cifarfs": "cifar-100-python/ (or its train, test and meta files)",
    "fc100": "cifar-100-python/ (or its train, test and meta files)",
}
# MetaOptNet's random-crop padding at the benchmarks' own image sizes (84 and 32)
_CROP_PADDING = {"miniimagenet": (8, 84), "tieredimagenet": (8, 84), "cifarfs": (4, 32)}
_CROP_PADDING["fc100"] = _CROP_PADDING["cifarfs"]
# tasks evaluated a chunk at a time: 100 small tasks, or a meta-batch of natural images
_CHUNK = 100


def _resize(size: int) -> EpisodeTransform:
    """An episode transform: every image resized to ``size`` x ``size`` (bilinear, antialiased;
    no random numbers)."""

    def resize(episode: data.Episode, generator: torch.Generator) -> data.Episode:
        def one(x: torch.Tensor) -> torch.Tensor:
            flat = F.interpolate(
                x.flatten(0, 1), size=(size, size), mode="bilinear", antialias=True,
                align_corners=False,
            )  # fmt: skip
            return flat.reshape(*x.shape[:3], size, size)

        (sx, sy), (qx, qy) = episode.support, episode.query
        return data.Episode((one(sx), sy), (one(qx), qy), episode.info)

    return resize


def _transform(args: argparse.Namespace, split: str, side: int) -> EpisodeTransform | None:
    """The episode transform of ``split``: a resize to ``--image-size`` when the stored side
    differs, and with ``--augment`` (meta-training only) a random crop and flip."""
    steps = [] if side == args.image_size else [_resize(args.image_size)]
    if args.augment and split == "train":
        padding, at = _CROP_PADDING[args.task]
        padding = max(1, round(padding * args.image_size / at))
        steps += [data.random_crop(args.image_size, padding=padding), data.random_flip()]
    return data.compose(*steps) if steps else None


class Tasks:
    """Samples meta-batches from the train/val/test splits of a task family."""

    def __init__(self, args: argparse.Namespace):
        self.kind = args.task
        self.shots, self.queries = args.shots, args.queries
        self.chunk = args.meta_batch if args.task in FILE_TASKS else _CHUNK
        if args.task == "sinusoid":
            self.sinusoid = data.Sinusoid()
            self.loss = "mse"
            return
        self.loss = "cross_entropy"
        if args.task in ("omniglot", *FILE_TASKS) and args.data_path is None:
            raise RunError(
                f"--task {args.task} needs --data-path, the folder that holds "
                f"{_LAYOUTS[args.task]}. There is no download; use --task glyphs for a built-in "
                "image task.",
                2,
            )
        if args.task in FILE_TASKS:
            self._read_splits(args)
            return
        if args.task == "glyphs":
            dataset = data.procedural_glyphs(args.classes, 20, seed=args.data_seed)
            sizes: Any = (0.64, 0.16, 0.2)
        else:
            dataset = self._read(args)
            # Vinyals et al. 2016: 1200 characters for meta-training (here 1100 + 100 for
            # validation), the rest for testing; a character's rotations stay together
            n_chars = len(set(dataset.class_groups or range(dataset.num_classes)))
            sizes = (1100, 100, None) if n_chars > 1300 else (0.6, 0.1, 0.3)
        splits = data.split_classes(dataset, sizes, seed=args.data_seed)
        self.samplers = {}
        for name, classes in zip(("train", "val", "test"), splits):
            more = "raise --classes" if args.task == "glyphs" else "use more characters"
            self.samplers[name] = _sampler(args, name, dataset, classes, None, more)

    def _read(self, args: argparse.Namespace, split: str | None = None) -> data.LabelledImages:
        """The dataset in ``--data-path`` (one ``split`` of a benchmark), or a RunError that
        repeats the reader's message (which names the expected layout)."""
        try:
            if split is None:
                return data.load_omniglot(args.data_path)
            if args.task == "miniimagenet":  # its images folder is read at --image-size
                return data.load_miniimagenet(args.data_path, split, image_size=args.image_size)
            return _READERS[args.task](args.data_path, split)
        except (OSError, ValueError, TypeError, ImportError) as e:
            raise RunError(f"--data-path {args.data_path}: {e}", 2) from None

    def _read_splits(self, args: argparse.Namespace) -> None:
        """A benchmark's standard train/val/test class splits, each from its own files."""
        self.samplers = {}
        for name in ("train", "val", "test"):
            dataset = self._read(args, name)
            transform = _transform(args, name, dataset.images.shape[-1])
            more = f"check the files in --data-path {args.data_path}"
            self.samplers[name] = _sampler(args, name, dataset, None, transform, more)

    def sample(self, split: str, n: int, generator: torch.Generator, device) -> data.Episode:
        if self.kind == "sinusoid":
            return self.sinusoid.sample(
                n, self.shots, self.queries, generator=generator, device=device
            )
        return self.samplers[split].sample(n, generator=generator, device=device)


def _sampler(args, name: str, dataset, classes, transform, more: str) -> data.EpisodeSampler:
    """The episode sampler of split ``name``, or a RunError that says which flags to lower."""
    try:
        return data.EpisodeSampler(
            dataset, classes, ways=args.ways, shots=args.shots, queries=args.queries,
            transform=transform,
        )  # fmt: skip
    except ValueError as e:
        n = dataset.num_classes if classes is None else len(classes)
        raise RunError(
            f"the meta-{name} split has {n} of the {dataset.num_classes} classes and cannot "
            f"give --ways {args.ways} --shots {args.shots} --queries {args.queries} episodes "
            f"({e}). Lower --ways, --shots or --queries, or {more}.",
            2,
        ) from None
