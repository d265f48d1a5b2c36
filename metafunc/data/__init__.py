"""Few-shot tasks and data: sinusoid regression, N-way K-shot episodes, Omniglot, glyphs.

Every sampler returns an :class:`Episode` whose tensors carry a leading task dimension, ready for
:func:`metafunc.vmap_tasks`, and draws its random numbers from an explicit ``torch.Generator``
(or ``seed``): the same seed gives the same tasks.

- :class:`Sinusoid`: sinusoid regression tasks (Finn et al. 2017), generated on the fly.
- :class:`LabelledImages`, :func:`split_classes`, :class:`EpisodeSampler`: N-way K-shot
  classification episodes over any labelled dataset, with disjoint meta-train/val/test classes.
- :func:`load_omniglot`: Omniglot from its standard folders on disk (no download), with the
  rotations-as-new-classes augmentation; :func:`procedural_glyphs`: an Omniglot-like dataset
  drawn procedurally, needing no files.
- :func:`load_miniimagenet`, :func:`load_tieredimagenet`, :func:`load_cifar_fs`,
  :func:`load_fc100`: the standard few-shot benchmarks from the files users already have (no
  download), one standard class split per call, kept as uint8 pixels (memory-mapped where the
  format allows) and normalised per episode; :class:`EncodedImages` keeps PNG files encoded.
- :func:`compose`, :func:`random_crop`, :func:`random_flip`, :func:`random_rot90`,
  :func:`shuffle_examples`: episode transforms (per-task augmentation) for ``EpisodeSampler``.

Example:
    >>> import torch
    >>> from metafunc.data import EpisodeSampler, procedural_glyphs, split_classes
    >>> data = procedural_glyphs(50, 10, seed=0)
    >>> train, val, test = split_classes(data, (0.6, 0.2, 0.2), seed=0)
    >>> sampler = EpisodeSampler(data, train, ways=5, shots=1, queries=5)
    >>> episode = sampler.sample(16, generator=torch.Generator().manual_seed(0))
    >>> episode.support[0].shape, episode.query[1].shape
    (torch.Size([16, 5, 1, 28, 28]), torch.Size([16, 25]))
"""

from ._cifarfs import CIFAR_FS_SPLIT, FC100_SPLIT, load_cifar_fs, load_fc100
from ._encoded import EncodedImages
from ._episode import Episode
from ._glyphs import procedural_glyphs
from ._labelled import LabelledImages
from ._miniimagenet import load_miniimagenet
from ._omniglot import load_omniglot
from ._sampler import EpisodeSampler
from ._sinusoid import Sinusoid
from ._split import OMNIGLOT_SPLIT, split_classes
from ._tieredimagenet import load_tieredimagenet
from ._transforms import compose, random_crop, random_flip, random_rot90, shuffle_examples

__all__ = [
    "CIFAR_FS_SPLIT",
    "FC100_SPLIT",
    "OMNIGLOT_SPLIT",
    "EncodedImages",
    "Episode",
    "EpisodeSampler",
    "LabelledImages",
    "Sinusoid",
    "compose",
    "load_cifar_fs",
    "load_fc100",
    "load_miniimagenet",
    "load_omniglot",
    "load_tieredimagenet",
    "procedural_glyphs",
    "random_crop",
    "random_flip",
    "random_rot90",
    "shuffle_examples",
    "split_classes",
]
