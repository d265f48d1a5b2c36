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

from ._episode import Episode
from ._glyphs import procedural_glyphs
from ._labelled import LabelledImages
from ._omniglot import load_omniglot
from ._sampler import EpisodeSampler
from ._sinusoid import Sinusoid
from ._split import OMNIGLOT_SPLIT, split_classes

__all__ = [
    "OMNIGLOT_SPLIT",
    "Episode",
    "EpisodeSampler",
    "LabelledImages",
    "Sinusoid",
    "load_omniglot",
    "procedural_glyphs",
    "split_classes",
]
