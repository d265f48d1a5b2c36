"""The task family of a run: its train/val/test splits, and the seeds of the fixed held-out
tasks."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from .. import data
from ._errors import RunError

# the fixed val/test tasks' generator seeds: far from the small --seed values people use, so that
# sinusoid's held-out tasks never come from the training tasks' stream (there is no class split)
_VAL_SEED, _TEST_SEED = 2_000_000_011, 2_000_000_029


class Tasks:
    """Samples meta-batches from the train/val/test splits of a task family."""

    def __init__(self, args: argparse.Namespace):
        self.kind = args.task
        self.shots, self.queries = args.shots, args.queries
        if args.task == "sinusoid":
            self.sinusoid = data.Sinusoid()
            self.loss = "mse"
            return
        self.loss = "cross_entropy"
        if args.task == "glyphs":
            dataset = data.procedural_glyphs(args.classes, 20, seed=args.data_seed)
            sizes: Any = (0.64, 0.16, 0.2)
        else:
            if args.data_path is None:
                raise RunError(
                    "--task omniglot needs --data-path, the folder that holds "
                    "images_background/ and images_evaluation/ (or one of them). There is no "
                    "download; use --task glyphs for a built-in image task.",
                    2,
                )
            try:
                dataset = data.load_omniglot(args.data_path)
            except (OSError, ValueError, ImportError) as e:
                raise RunError(f"--data-path {args.data_path}: {e}", 2) from None
            # Vinyals et al. 2016: 1200 characters for meta-training (here 1100 + 100 for
            # validation), the rest for testing; a character's rotations stay together
            n_chars = len(set(dataset.class_groups or range(dataset.num_classes)))
            sizes = (1100, 100, None) if n_chars > 1300 else (0.6, 0.1, 0.3)
        splits = data.split_classes(dataset, sizes, seed=args.data_seed)
        self.samplers = {}
        for name, classes in zip(("train", "val", "test"), splits):
            try:
                self.samplers[name] = data.EpisodeSampler(
                    dataset, classes, ways=args.ways, shots=args.shots, queries=args.queries
                )
            except ValueError as e:
                more = "raise --classes" if args.task == "glyphs" else "use more characters"
                raise RunError(
                    f"the meta-{name} split has {len(classes)} of the "
                    f"{dataset.num_classes} classes and cannot give --ways {args.ways} --shots "
                    f"{args.shots} --queries {args.queries} episodes ({e}). Lower --ways, "
                    f"--shots or --queries, or {more}.",
                    2,
                ) from None

    def sample(self, split: str, n: int, generator: torch.Generator, device) -> data.Episode:
        if self.kind == "sinusoid":
            return self.sinusoid.sample(
                n, self.shots, self.queries, generator=generator, device=device
            )
        return self.samplers[split].sample(n, generator=generator, device=device)
