"""``procedural_glyphs``: a few-shot image dataset drawn on the fly, needing no files."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import describe, int_at_least, number_at_least
from ._labelled import LabelledImages

__all__ = ["procedural_glyphs"]

_CALL = "procedural_glyphs(num_classes, examples_per_class, seed=...)"
_MAX_STROKES = 4
_POINTS = 16  # points per (quadratic Bezier) stroke
_EXTENT = 0.7  # glyph control points lie in [-_EXTENT, _EXTENT]^2; the image spans [-1, 1]^2
_HALF_WIDTH = 0.08  # stroke half-width, in image half-widths (about 1.1 pixels at 28 x 28)
_SIGMA = 0.06  # width of the Gaussians whose sum along a stroke gives its distance field
_CHUNK = 1024  # images rendered at once


def _uniform(shape: tuple[int, ...], low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return torch.empty(shape).uniform_(low, high, generator=g)


def _strokes(num_classes: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's strokes as points ``(num_classes, _MAX_STROKES, _POINTS, 2)``, and which
    strokes it uses, ``(num_classes, _MAX_STROKES)`` bool."""
    count = torch.randint(2, _MAX_STROKES + 1, (num_classes,), generator=g)
    start = _uniform((num_classes, _MAX_STROKES, 2), -_EXTENT, _EXTENT, g)
    angle = _uniform((num_classes, _MAX_STROKES), 0.0, 2 * math.pi, g)
    length = _uniform((num_classes, _MAX_STROKES), 0.6, 1.4, g)
    bend = _uniform((num_classes, _MAX_STROKES), -0.6, 0.6, g)
    direction = torch.stack([angle.cos(), angle.sin()], dim=-1)
    end = (start + length[..., None] * direction).clamp(-_EXTENT, _EXTENT)
    normal = torch.stack([-direction[..., 1], direction[..., 0]], dim=-1)
    control = (start + end) / 2 + (bend * length)[..., None] * normal
    t = torch.linspace(0.0, 1.0, _POINTS)[:, None]  # (points, 1)
    s, c, e = (p[..., None, :] for p in (start, control, end))  # (classes, strokes, 1, 2)
    points = (1 - t) ** 2 * s + 2 * (1 - t) * t * c + t**2 * e  # (classes, strokes, points, 2)
    return points, torch.arange(_MAX_STROKES) < count[:, None]


def _render(
    points: torch.Tensor, used: torch.Tensor, half_width: torch.Tensor, size: int
) -> torch.Tensor:
    """Anti-aliased strokes through ``points`` ``(n, strokes, points, 2)``: ``(n, size, size)``.

    The distance ``d`` to a stroke comes from a sum of Gaussians along it, each weighted by its
    share of the stroke's length: along a straight stroke the sum is ``exp(-d^2 / 2 sigma^2)``
    (the integral of a Gaussian across a line), so ``d = sigma sqrt(-2 log sum)``. The sum is
    separable in x and y, hence one batched matrix product per image. A pixel is the fraction of
    it within ``half_width`` of the stroke, for a one-pixel ramp.
    """
    n = points.shape[0]
    step = (points[:, :, 1:] - points[:, :, :-1]).norm(dim=-1)  # (n, strokes, points - 1)
    spacing = F.pad(step, (0, 1)) + F.pad(step, (1, 0))
    weight = (spacing * used[..., None]).reshape(n, -1, 1)  # each point's share of its stroke
    weight *= 0.5 / (math.sqrt(2 * math.pi) * _SIGMA)
    points = points.reshape(n, -1, 2)
    centres = (torch.arange(size, dtype=points.dtype) * 2 + 1) / size - 1

    def gauss(coordinate: torch.Tensor) -> torch.Tensor:  # (n, k) -> (n, k, size)
        return (centres - coordinate[..., None]).square_().mul_(-0.5 / _SIGMA**2).exp_()

    field = torch.bmm(gauss(points[..., 1]).mul_(weight).transpose(1, 2), gauss(points[..., 0]))
    dist = field.clamp_min_(1e-30).log_().mul_(-2.0).clamp_min_(0.0).sqrt_().mul_(_SIGMA)
    pixel = 2.0 / size  # one pixel, in image half-widths
    return dist.sub_(half_width.view(-1, 1, 1)).mul_(-1.0 / pixel).add_(0.5).clamp_(0.0, 1.0)


def procedural_glyphs(
    num_classes: int,
    examples_per_class: int,
    *,
    image_size: int = 28,
    seed: int,
    jitter: float = 1.0,
    noise: float = 0.05,
) -> LabelledImages:
    """A procedurally drawn, Omniglot-like few-shot dataset: no files, no download.

    Each class is a random glyph of 2 to 4 pen strokes (quadratic Bezier curves), drawn
    anti-aliased from a distance field, white (1) on black (0) like :func:`load_omniglot`. Each
    example redraws its class's glyph under a random small affine map (rotation up to 15 degrees,
    scale 0.9 to 1.1 per axis, shift up to 6 % of the image; all times ``jitter``), with a
    stroke width varying by up to 20 % (times ``jitter``), plus Gaussian pixel noise of standard
    deviation ``noise``, clipped to [0, 1]. Classes are learnable but not trivially separable.

    The result is a function of the arguments: the glyphs depend only on ``seed`` and
    ``num_classes`` (so ``jitter=0, noise=0`` gives the clean glyphs of the same classes).
    Images are ``(num_classes * examples_per_class, 1, image_size, image_size)`` float32, ordered
    by class; class names are ``"glyph0"``, ``"glyph1"``, ...

    Example:
        >>> from metafunc.data import procedural_glyphs
        >>> data = procedural_glyphs(100, 5, seed=0)
        >>> data
        LabelledImages(500 images of shape (1, 28, 28), 100 classes)
        >>> data.labels[:3], data.labels[-1], data.class_names[:2]
        (tensor([0, 0, 0]), tensor(99), ['glyph0', 'glyph1'])
        >>> bool(data.images.min() >= 0) and bool(data.images.max() <= 1)
        True
    """
    int_at_least(_CALL, "num_classes", num_classes, minimum=1)
    int_at_least(_CALL, "examples_per_class", examples_per_class, minimum=1)
    int_at_least(_CALL, "image_size", image_size, minimum=1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{_CALL}: expected seed to be an int, got {describe(seed)}.")
    fix = "Pass 0 for none, 1.0 for the default strength."
    number_at_least(_CALL, "jitter", jitter, minimum=0.0, fix=fix)
    number_at_least(_CALL, "noise", noise, minimum=0.0, fix=fix)
    g = torch.Generator().manual_seed(seed)
    glyphs, used = _strokes(num_classes, g)  # drawn first: independent of examples and jitter
    n = num_classes * examples_per_class
    angle = _uniform((n,), -1.0, 1.0, g) * math.radians(15) * jitter
    scale = torch.exp(_uniform((n, 2), -1.0, 1.0, g) * math.log(1.1) * jitter)
    shift = _uniform((n, 2), -1.0, 1.0, g) * 0.12 * jitter
    width = _HALF_WIDTH * torch.exp(_uniform((n,), -1.0, 1.0, g) * math.log(1.2) * jitter)
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    affine = rotation * scale[:, None, :]  # R @ diag(scale), (n, 2, 2)

    labels = torch.arange(num_classes).repeat_interleave(examples_per_class)
    images = torch.empty(n, 1, image_size, image_size)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        moved = torch.einsum("mij,mspj->mspi", affine[lo:hi], glyphs[labels[lo:hi]])
        moved = moved + shift[lo:hi, None, None, :]
        image = _render(moved, used[labels[lo:hi]], width[lo:hi], image_size)
        if noise > 0:
            image.add_(torch.randn(image.shape, generator=g), alpha=noise).clamp_(0.0, 1.0)
        images[lo:hi, 0] = image
    names = [f"glyph{c}" for c in range(num_classes)]
    return LabelledImages(images, labels, names)
