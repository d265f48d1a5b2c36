"""Image data: :func:`metafunc.data.load_omniglot` from a folder, and ``procedural_glyphs``.

Omniglot: classes, names and groups, inversion and rotations, resizing, greyscale and both
background/evaluation folders, splits that keep rotations together, and errors. Procedural glyphs:
shapes, ranges and labels, determinism, classes that are learnable but not trivial, and errors.

Oracles: PNG files drawn here with known rectangles, whose expected tensors are built by hand
(inversion, counter-clockwise rotation by index arithmetic, area resizing by block means); a
nearest-class-mean classifier for the procedural glyphs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from _data_helpers import _flat, _gen

from metafunc.data import (
    EpisodeSampler,
    LabelledImages,
    load_omniglot,
    procedural_glyphs,
    split_classes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


SIDE = 105  # Omniglot drawings are 105 x 105


def _rect(a: int, c: int, d: int) -> tuple[int, int, int, int]:
    """The black rectangle (top, left, bottom, right; inclusive) of drawing d of character c of
    alphabet a: off-centre and not square, so that each rotation is told apart."""
    top, left = 6 + 11 * d, 9 + 8 * c + 20 * a
    return top, left, top + 9, left + 24


def _write_omniglot(root: Path, alphabets=("Alpha", "Beta"), characters=3, drawings=4, mode="1"):
    from PIL import Image, ImageDraw

    for a, alphabet in enumerate(alphabets):
        for c in range(characters):
            folder = root / alphabet / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(drawings):
                image = Image.new(mode, (SIDE, SIDE), 255 if mode == "L" else 1)
                top, left, bottom, right = _rect(a, c, d)
                ImageDraw.Draw(image).rectangle([left, top, right, bottom], fill=0)
                image.save(folder / f"{1000 + 20 * c + d}_{d + 1:02d}.png")
    return root


def _expected(a: int, c: int, d: int) -> torch.Tensor:
    """The unrotated, unresized drawing as the loader must give it: strokes 1, paper 0."""
    top, left, bottom, right = _rect(a, c, d)
    image = torch.zeros(SIDE, SIDE)
    image[top : bottom + 1, left : right + 1] = 1.0
    return image


def _of_class(data: LabelledImages, name: str) -> torch.Tensor:
    return data.images[data.labels == data.class_names.index(name), 0]


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    return _write_omniglot(tmp_path_factory.mktemp("omniglot") / "images_background")


def test_omniglot_classes_names_groups(omniglot_root):
    data = load_omniglot(omniglot_root)
    assert data.num_classes == 2 * 3 * 4 and len(data) == 2 * 3 * 4 * 4
    assert data.images.shape[1:] == (1, 28, 28) and data.images.dtype == torch.float32
    assert torch.equal(data.labels, torch.arange(24).repeat_interleave(4))
    assert data.class_names[:5] == [
        "Alpha/character01/rot0",
        "Alpha/character01/rot90",
        "Alpha/character01/rot180",
        "Alpha/character01/rot270",
        "Alpha/character02/rot0",
    ]
    assert data.class_names[-1] == "Beta/character03/rot270"
    assert data.class_groups is not None
    assert data.class_groups[:5] == ["Alpha/character01"] * 4 + ["Alpha/character02"]
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    # the parent folder of images_background is accepted as well
    parent = load_omniglot(omniglot_root.parent, rotations=(0,))
    assert parent.num_classes == 6 and parent.class_names[0] == "Alpha/character01/rot0"


def test_omniglot_content_inversion_and_rotations(omniglot_root):
    data = load_omniglot(omniglot_root, image_size=SIDE)
    for a, alphabet in enumerate(("Alpha", "Beta")):
        for c in range(3):
            name = f"{alphabet}/character{c + 1:02d}"
            upright = _of_class(data, f"{name}/rot0")
            for d in range(4):
                assert torch.equal(upright[d], _expected(a, c, d))  # exact: 1-bit strokes are 1
            for angle in (90, 180, 270):
                rotated = _of_class(data, f"{name}/rot{angle}")
                assert torch.equal(rotated, torch.rot90(upright, angle // 90, dims=(-2, -1)))
            # counter-clockwise: pixel (r, c) of the drawing lands at (SIDE - 1 - c, r)
            r, col = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
            by_hand = torch.zeros(SIDE, SIDE)
            by_hand[SIDE - 1 - col, r] = _expected(a, c, 0)
            assert torch.equal(_of_class(data, f"{name}/rot90")[0], by_hand)


def test_omniglot_resizing_is_area_averaging(omniglot_root):
    data = load_omniglot(omniglot_root, rotations=(0, 90), image_size=35)  # 105 = 3 * 35
    block_means = _expected(1, 2, 3).view(35, 3, 35, 3).mean(dim=(1, 3))
    upright = _of_class(data, "Beta/character03/rot0")[3]
    torch.testing.assert_close(upright, block_means)
    torch.testing.assert_close(
        _of_class(data, "Beta/character03/rot90")[3], torch.rot90(block_means, 1, dims=(0, 1))
    )
    # 28 x 28 (105 / 28 = 3.75: area bins overlap by a pixel, so ink is about conserved)
    small = load_omniglot(omniglot_root, rotations=(0,))
    assert small.images.shape == (24, 1, 28, 28)
    ink = small.images[small.labels == 0].sum(dim=(1, 2, 3)) * (SIDE / 28) ** 2
    expected = torch.stack([_expected(0, 0, d).sum() for d in range(4)])
    torch.testing.assert_close(ink, expected, rtol=0.1, atol=0.0)
    top, left, bottom, right = (round(v * 28 / SIDE) for v in _rect(0, 0, 0))
    assert small.images[0, 0, top + 1 : bottom, left + 1 : right].min() > 0.99  # inside: ink
    assert small.images[0, 0, bottom + 2 :].max() == 0  # below: paper


def test_omniglot_greyscale_and_both_folders(tmp_path):
    from PIL import Image

    _write_omniglot(tmp_path / "images_background", ("Alpha",), 2, 2, mode="L")
    _write_omniglot(tmp_path / "images_evaluation", ("Gamma",), 1, 2, mode="L")
    grey = tmp_path / "images_evaluation" / "Gamma" / "character01"
    Image.new("L", (SIDE, SIDE), 51).save(grey / "9999_03.png")  # a grey drawing: 1 - 0.2
    Image.new("L", (2 * SIDE, 2 * SIDE), 0).save(grey / "9999_04.png")  # a larger, all ink
    data = load_omniglot(tmp_path, rotations=(0, 180), image_size=SIDE)
    assert data.class_names == [
        "Alpha/character01/rot0",
        "Alpha/character01/rot180",
        "Alpha/character02/rot0",
        "Alpha/character02/rot180",
        "Gamma/character01/rot0",
        "Gamma/character01/rot180",
    ]
    assert torch.equal(_of_class(data, "Alpha/character02/rot0")[1], _expected(0, 1, 1))
    gamma = _of_class(data, "Gamma/character01/rot0")
    assert gamma.shape == (4, SIDE, SIDE)
    torch.testing.assert_close(gamma[2], torch.full((SIDE, SIDE), 1 - 51 / 255))
    assert torch.equal(gamma[3], torch.ones(SIDE, SIDE))  # resized to image_size like the rest
    # rotations of one character stay in one split
    train, val, test = split_classes(data, (1, 1, 1), seed=0)
    for part in (train, val, test):
        assert (
            len(part) == 2
            and data.class_names[part[0]].rsplit("/", 1)[0]
            == (data.class_names[part[1]].rsplit("/", 1)[0])
        )


def test_omniglot_split_keeps_rotations_together(omniglot_root):
    data = load_omniglot(omniglot_root)
    for seed in range(5):
        parts = split_classes(data, (0.5, 0.0, 0.5), seed=seed)
        assert sorted(_flat(parts)) == list(range(24))
        characters = [{data.class_names[c].rsplit("/", 1)[0] for c in p} for p in parts]
        assert characters[0].isdisjoint(characters[2])
        assert len(parts[0]) == 12 and len(characters[0]) == 3
    sampler = EpisodeSampler(data, parts[0], ways=5, shots=1, queries=3)
    assert sampler.sample(2, generator=_gen(0)).support[0].shape == (2, 5, 1, 28, 28)


def test_omniglot_errors(tmp_path, omniglot_root, monkeypatch):
    layout = r"<path>/<alphabet>/<character>/\*\.png"
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"omniglot.*nowhere.*does not exist.*{layout}"):
        load_omniglot(missing)
    (tmp_path / "file.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"file.zip.*is a file, not a folder"):
        load_omniglot(tmp_path / "file.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"empty.*is empty.*{layout}"):
        load_omniglot(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"PNG files directly.*one character's folder"):
        load_omniglot(omniglot_root / "Alpha" / "character01")
    with pytest.raises(ValueError, match=r"PNG files directly, one level too shallow"):
        load_omniglot(omniglot_root / "Alpha")
    (tmp_path / "nopng" / "Alpha" / "character01").mkdir(parents=True)
    (tmp_path / "nopng" / "Alpha" / "character01" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"character01.*holds no \.png files"):
        load_omniglot(tmp_path / "nopng")
    deep = _write_omniglot(tmp_path / "deep" / "python" / "omniglot", ("Alpha",), 1, 1)
    with pytest.raises(ValueError, match="one level too high"):
        load_omniglot(deep.parent.parent)
    (tmp_path / "noletters" / "Alpha").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no character folders"):
        load_omniglot(tmp_path / "noletters")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no alphabet folders"):
        load_omniglot(tmp_path / "loose")
    broken = _write_omniglot(tmp_path / "broken", ("Alpha",), 1, 1)
    (broken / "Alpha" / "character01" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read .*bad\.png"):
        load_omniglot(broken)
    twice = tmp_path / "twice"
    _write_omniglot(twice / "images_background", ("Alpha",), 1, 1)
    _write_omniglot(twice / "images_evaluation", ("Alpha",), 1, 1)
    with pytest.raises(ValueError, match="'Alpha/character01' is in two folders"):
        load_omniglot(twice)
    with pytest.raises(ValueError, match=r"distinct rotations among 0, 90, 180 and 270.*45"):
        load_omniglot(omniglot_root, rotations=(0, 45))
    with pytest.raises(ValueError, match="distinct rotations"):
        load_omniglot(omniglot_root, rotations=(90, 90))
    with pytest.raises(TypeError, match="rotations to be a non-empty tuple"):
        load_omniglot(omniglot_root, rotations=())
    with pytest.raises(ValueError, match="image_size to be an int >= 1, got 0"):
        load_omniglot(omniglot_root, image_size=0)
    with pytest.raises(TypeError, match=r"path to be a str or os.PathLike"):
        load_omniglot(3)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        load_omniglot(omniglot_root)


def test_glyphs_shape_range_labels():
    data = procedural_glyphs(7, 5, seed=0)
    assert data.images.shape == (35, 1, 28, 28) and data.images.dtype == torch.float32
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    assert torch.equal(data.labels, torch.arange(7).repeat_interleave(5))
    assert data.class_names == [f"glyph{c}" for c in range(7)] and data.class_groups is None
    ink = data.images.mean(dim=(1, 2, 3))
    assert (ink > 0.03).all() and (ink < 0.4).all()  # strokes on a dark background
    # noise-free pixels are mostly exact paper (0) or ink (1): strokes, not blobs
    clean = procedural_glyphs(7, 5, seed=0, noise=0.0).images
    assert ((clean == 0) | (clean == 1)).float().mean() > 0.85
    assert procedural_glyphs(3, 2, seed=0, image_size=40).images.shape == (6, 1, 40, 40)
    assert procedural_glyphs(2000, 1, seed=0).images.shape == (2000, 1, 28, 28)  # fast enough


def test_glyphs_determinism():
    a = procedural_glyphs(10, 4, seed=3)
    assert torch.equal(a.images, procedural_glyphs(10, 4, seed=3).images)
    assert not torch.equal(a.images, procedural_glyphs(10, 4, seed=4).images)
    # the glyphs are a function of (seed, num_classes): clean copies are the same classes
    clean = procedural_glyphs(10, 3, seed=3, jitter=0.0, noise=0.0).images
    assert torch.equal(clean[0::3], clean[1::3])  # no jitter: every example is the glyph
    assert torch.equal(clean[0::3], procedural_glyphs(10, 1, seed=3, jitter=0, noise=0).images)
    assert not torch.equal(a.images[0], a.images[1])  # jittered examples differ


def test_glyphs_classes_are_learnable_not_trivial():
    ways = 20
    clean = procedural_glyphs(ways, 1, seed=1, jitter=0.0, noise=0.0).images.flatten(1)
    data = procedural_glyphs(ways, 10, seed=1)
    x = data.images.flatten(1)
    by_template = torch.cdist(x, clean).argmin(1)
    accuracy = (by_template == data.labels).float().mean().item()
    assert 0.6 < accuracy  # chance is 0.05
    # nearest class mean over 5 jittered examples, on 5 others
    examples = data.images.view(ways, 10, -1)
    means = examples[:, :5].mean(1)
    queries = examples[:, 5:].reshape(ways * 5, -1)
    truth = torch.arange(ways).repeat_interleave(5)
    accuracy = (torch.cdist(queries, means).argmin(1) == truth).float().mean().item()
    assert 0.6 < accuracy
    # not trivial: a jittered example is far from its clean glyph, on the scale of the ink
    distance = (x - clean[data.labels]).abs().sum(1)
    assert (distance > 0.3 * clean[data.labels].sum(1)).float().mean() > 0.5


def test_glyphs_errors():
    with pytest.raises(ValueError, match=r"procedural_glyphs.*num_classes to be an int >= 1"):
        procedural_glyphs(0, 5, seed=0)
    with pytest.raises(TypeError, match="examples_per_class to be an int"):
        procedural_glyphs(5, 2.0, seed=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed to be an int"):
        procedural_glyphs(5, 2, seed="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="jitter to be a finite number >= 0"):
        procedural_glyphs(5, 2, seed=0, jitter=-1.0)
    with pytest.raises(ValueError, match="noise to be a finite number >= 0"):
        procedural_glyphs(5, 2, seed=0, noise=math.nan)
    with pytest.raises(ValueError, match="image_size"):
        procedural_glyphs(5, 2, seed=0, image_size=0)
