"""``split_classes``: disjoint meta-train / meta-val / meta-test class splits."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from .._checks import describe, int_at_least
from ._checks import check_labels
from ._labelled import LabelledImages

__all__ = ["OMNIGLOT_SPLIT", "split_classes"]

OMNIGLOT_SPLIT: tuple[int, int, None] = (1200, 0, None)
"""The Omniglot convention of Vinyals et al. 2016: 1200 characters (with all their rotations)
meta-train, none meta-val, the rest (423 of the 1623) meta-test. Pass it as ``sizes`` to
:func:`split_classes` with the dataset of both Omniglot folders."""

_CALL = "split_classes(classes, sizes, seed=...)"


def _class_list(classes: object) -> list[int]:
    if isinstance(classes, int) and not isinstance(classes, bool):
        return list(range(int_at_least(_CALL, "classes", classes, minimum=1)))
    out = check_labels(
        _CALL, classes, "a number of classes, a list of integer labels or a LabelledImages"
    )
    if not out:
        raise ValueError(f"{_CALL}: expected at least one class, got an empty list.")
    return out


def _counts(sizes: object, num_groups: int, unit: str) -> list[int]:
    """Three counts summing to ``num_groups``, from fractions or counts (one ``None`` = rest)."""
    example = "sizes=(0.7, 0.1, 0.2) (fractions) or sizes=(1200, 0, None) (counts, None = rest)"
    if not isinstance(sizes, (tuple, list)) or len(sizes) != 3:
        raise TypeError(
            f"{_CALL}: expected sizes to be three numbers (train, val, test), got "
            f"{describe(sizes)}. Pass {example}."
        )
    is_int = [isinstance(s, int) and not isinstance(s, bool) for s in sizes]
    is_float = [isinstance(s, float) for s in sizes]
    if any(is_float) and all(a or b for a, b in zip(is_int, is_float)):
        fractions = [float(s) for s in sizes]
        if any(not math.isfinite(f) or f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(
                f"{_CALL}: expected fractions >= 0 summing to 1, got {tuple(sizes)!r}. Pass "
                f"{example}."
            )
        # largest remainder: floor each share, hand the leftover out by largest fractional part
        raw = [f * num_groups for f in fractions]
        counts = [math.floor(r) for r in raw]
        order = sorted(range(3), key=lambda i: -(raw[i] - counts[i]))
        for i in order[: num_groups - sum(counts)]:
            counts[i] += 1
        return counts
    nones = [s is None for s in sizes]
    if not all(a or b for a, b in zip(is_int, nones)) or sum(nones) > 1:
        raise TypeError(
            f"{_CALL}: expected sizes to be three floats (fractions) or three ints (counts, at "
            f"most one None for the rest), got {tuple(sizes)!r}. Pass {example}."
        )
    given = [s for s in sizes if s is not None]
    if any(s < 0 for s in given):
        raise ValueError(f"{_CALL}: expected counts >= 0, got {tuple(sizes)!r}.")
    rest = num_groups - sum(given)
    if rest < 0 or (rest != 0 and not any(nones)):
        raise ValueError(
            f"{_CALL}: the counts {tuple(sizes)!r} must add up to the number of {unit}, "
            f"{num_groups}{' (at most)' if any(nones) else ''}. Fix the counts, put None for "
            "the rest, or pass fractions."
        )
    return [rest if s is None else s for s in sizes]


def split_classes(
    classes: int | Sequence[int] | torch.Tensor | LabelledImages,
    sizes: Sequence[float] | Sequence[int | None],
    *,
    seed: int,
    groups: Sequence[Hashable] | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Splits classes at random into disjoint, covering (train, val, test) lists of labels.

    ``classes`` is a number of classes (labels ``0 .. classes - 1``), a list of labels, or a
    :class:`LabelledImages` (all its classes, grouped by its ``class_groups``). ``sizes`` is three
    fractions summing to 1 (floats, rounded to whole classes) or three counts (ints; one of them
    may be ``None``: the rest). ``groups`` gives each class a group key: the groups are split,
    never the classes of one group, and counts then count groups (for Omniglot, characters: the
    rotations of a character are one group, see :data:`OMNIGLOT_SPLIT`). The split is a
    function of ``seed`` and the classes; each list is sorted.

    Example:
        >>> from metafunc.data import split_classes
        >>> train, val, test = split_classes(10, (0.6, 0.2, 0.2), seed=0)
        >>> len(train), len(val), len(test), sorted(train + val + test) == list(range(10))
        (6, 2, 2, True)
        >>> groups = [0, 0, 1, 1, 2, 2, 3, 3]  # 4 groups of two classes
        >>> train, val, test = split_classes(8, (2, 1, None), seed=0, groups=groups)
        >>> len(train), len(val), len(test)  # 2, 1 and the remaining 1 group
        (4, 2, 2)
    """
    if isinstance(classes, LabelledImages):
        if groups is None:
            groups = classes.class_groups
        class_list = list(range(classes.num_classes))
        if not class_list:
            raise ValueError(f"{_CALL}: the LabelledImages has no classes.")
    else:
        class_list = _class_list(classes)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{_CALL}: expected seed to be an int, got {describe(seed)}.")
    if groups is None:
        keys: list[Hashable] = list(range(len(class_list)))
    else:
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
            raise TypeError(
                f"{_CALL}: expected groups to be a list with one group key per class, got "
                f"{describe(groups)}."
            )
        if len(groups) != len(class_list):
            raise ValueError(
                f"{_CALL}: expected one group key per class, {len(class_list)}, got {len(groups)}."
            )
        keys = list(groups)
    members: dict[Hashable, list[int]] = {}
    for key, c in zip(keys, class_list):
        members.setdefault(key, []).append(c)
    unit = "classes" if groups is None else "groups"
    counts = _counts(sizes, len(members), unit)
    order = torch.randperm(len(members), generator=torch.Generator().manual_seed(seed)).tolist()
    grouped = list(members.values())
    splits: list[list[int]] = []
    start = 0
    for n in counts:
        splits.append(sorted(c for g in order[start : start + n] for c in grouped[g]))
        start += n
    return splits[0], splits[1], splits[2]
