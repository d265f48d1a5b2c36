"""The few-shot readers: miniImageNet, tieredImageNet, CIFAR-FS and FC100 from tiny files written
here in each released format, and ``LabelledImages.from_pixels``.

Checked: pixels round-trip exactly (uint8 storage, no float copy, memory-mapped npz), labels and
class names, the published class splits (counts, disjointness, superclasses), episodes drawn from
each reader (shapes, labels 0..N-1, determinism, values equal to the hand-normalised pixels of the
drawn rows), and the layout errors. Oracles: the arrays written into the files, the literature's
normalisation constants typed in here, and the CIFAR-100 superclass table below.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_helpers import _gen
from PIL import Image

from metafunc.data import (
    CIFAR_FS_SPLIT,
    FC100_SPLIT,
    EncodedImages,
    EpisodeSampler,
    LabelledImages,
    _files,
    load_cifar_fs,
    load_fc100,
    load_miniimagenet,
    load_tieredimagenet,
)

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGENET = (
    np.array([120.39586422, 115.59361427, 104.54012653]) / 255,
    np.array([70.68188272, 68.27635443, 72.54505529]) / 255,
)
CIFAR = (
    np.array([129.37731888, 124.10583864, 112.47758569]) / 255,
    np.array([68.20947949, 65.43124043, 70.45866994]) / 255,
)

# CIFAR-100's superclasses and their classes (Krizhevsky 2009, the dataset's own table)
SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


def _pixels(n: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _dump(obj, file: Path) -> None:
    with open(file, "wb") as f:
        pickle.dump(obj, f)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _normalised(pixels: np.ndarray, stats) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float64, normalised by hand."""
    x = pixels.astype(np.float64) / 255
    return torch.from_numpy(((x - stats[0]) / stats[1]).transpose(0, 3, 1, 2).copy())


# ------------------------------------------------------------------------------ miniImageNet
def _mini_cache(folder: Path, split: str, counts=(3, 4, 2), seed=0):
    """mini-imagenet-cache-{split}.pkl with classes n0..n2; rows interleaved, not grouped."""
    n = sum(counts)
    images = _pixels(n, 84, seed)
    order = np.random.default_rng(seed).permutation(n)
    class_dict, start = {}, 0
    for c, k in enumerate(counts):
        class_dict[f"n0{2 - c}"] = order[start : start + k].tolist()  # names not in label order
        start += k
    _dump(
        {"image_data": images, "class_dict": class_dict},
        folder / f"mini-imagenet-cache-{split}.pkl",
    )
    return images, class_dict


def test_miniimagenet_pickle_round_trip_labels_and_uint8_storage(tmp_path):
    images, class_dict = _mini_cache(tmp_path, "val")
    data = load_miniimagenet(tmp_path, "val")
    assert data.class_names == ["n00", "n01", "n02"]
    assert data.images.dtype == torch.uint8 and tuple(data.images.shape) == (9, 3, 84, 84)
    assert torch.equal(data.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    for label, name in enumerate(data.class_names):
        assert sorted((data.labels == label).nonzero().flatten().tolist()) == sorted(
            class_dict[name]
        )
    rows = torch.tensor([[0, 5], [8, 2]])
    got = data.gather(rows)
    want = _normalised(images[rows.flatten().numpy()], IMAGENET).reshape(2, 2, 3, 84, 84)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    plain = load_miniimagenet(tmp_path, "val", normalize=False)
    torch.testing.assert_close(
        plain.gather(torch.tensor([4])).double()[0],
        torch.from_numpy(images[4].transpose(2, 0, 1) / 255),
        rtol=0,
        atol=1e-6,
    )


def test_miniimagenet_csv_layout_round_trip_and_resize(tmp_path):
    (tmp_path / "images").mkdir()
    images = _pixels(4, 84, 1)
    lines = ["filename,label"]
    for i, (name, label) in enumerate(
        [("a.png", "n02"), ("b.png", "n01"), ("c.png", "n02"), ("d.png", "n01")]
    ):
        Image.fromarray(images[i]).save(tmp_path / "images" / name)
        lines.append(f"{name},{label}")
    Image.new("RGB", (100, 90), (10, 200, 30)).save(tmp_path / "images" / "big.png")
    lines.append("big.png,n03")
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    data = load_miniimagenet(tmp_path, "test")
    assert data.class_names == ["n01", "n02", "n03"] and data.labels.tolist() == [1, 0, 1, 0, 2]
    assert data.images.dtype == torch.uint8
    assert torch.equal(data.images[:4], torch.from_numpy(images).permute(0, 3, 1, 2))
    # resized to 84 x 84: a constant image stays that constant
    assert tuple(data.images[4].shape) == (3, 84, 84)
    assert data.images[4].flatten(1).unique(dim=1).tolist() == [[10], [200], [30]]


def test_miniimagenet_errors(tmp_path):
    layout = r"Expected either the released pickles"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*downloads nothing"):
        load_miniimagenet(tmp_path / "nowhere")
    (tmp_path / "file.tar").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"file.tar.*is a file, not a folder"):
        load_miniimagenet(tmp_path / "file.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=rf"mini-imagenet-cache-train.pkl \(or train.csv\) not found.*it is empty.*{layout}",
    ):
        load_miniimagenet(tmp_path / "empty")
    _mini_cache(tmp_path, "train")
    with pytest.raises(
        FileNotFoundError,
        match=r"cache-test.pkl \(or test.csv\).*holds empty/, file.tar, mini-imagenet",
    ):
        load_miniimagenet(tmp_path, "test")
    with pytest.raises(ValueError, match=r"split to be 'train', 'val' or 'test'.*'valid'"):
        load_miniimagenet(tmp_path, "valid")
    with pytest.raises(TypeError, match=r"path to be a str or os.PathLike"):
        load_miniimagenet(3)  # type: ignore[arg-type]
    _dump({"image_data": _pixels(2, 84, 0)}, tmp_path / "mini-imagenet-cache-val.pkl")
    with pytest.raises(
        ValueError, match=r"has no 'class_dict' entry; its keys are \['image_data'\]"
    ):
        load_miniimagenet(tmp_path, "val")
    _dump(
        {"image_data": _pixels(3, 84, 0), "class_dict": {"a": [0, 1]}},
        tmp_path / "mini-imagenet-cache-val.pkl",
    )
    with pytest.raises(ValueError, match=r"1 of the 3 images .* are in no class"):
        load_miniimagenet(tmp_path, "val")
    _dump(
        {"image_data": np.zeros((2, 84, 84), np.uint8), "class_dict": {"a": [0, 1]}},
        tmp_path / "mini-imagenet-cache-val.pkl",
    )
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\) array"):
        load_miniimagenet(tmp_path, "val")
    # the CSV layout
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "val.csv").write_text("filename,label\nx.png,n01\n")
    with pytest.raises(
        FileNotFoundError, match=r"the images/ folder \(beside val.csv\) not found.*holds val.csv"
    ):
        load_miniimagenet(csv_dir, "val")
    (csv_dir / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=r"val.csv lists 'x.png', which is not in"):
        load_miniimagenet(csv_dir, "val")
    (csv_dir / "val.csv").write_text("name,class\nx.png,n01\n")
    with pytest.raises(ValueError, match="header 'filename,label'"):
        load_miniimagenet(csv_dir, "val")


# ------------------------------------------------------------------------------ tieredImageNet
def _tiered_labels(folder: Path, split: str, specific, general=None, strings=True) -> None:
    labels = {"label_specific": np.array(specific)}
    if general is not None:
        labels["label_general"] = np.array(general)
    if strings:
        labels["label_specific_str"] = [f"n{v:02d}" for v in range(max(specific) + 1)]
        labels["label_general_str"] = ["animal", "device"]
    _dump(labels, folder / f"{split}_labels.pkl")


@pytest.mark.parametrize("variant", ["npz", "npz_compressed", "png"])
def test_tieredimagenet_variants_round_trip(tmp_path, variant):
    images = _pixels(6, 84, 2)
    if variant == "png":
        _dump(
            [np.frombuffer(_png(im), np.uint8) for im in images], tmp_path / "train_images_png.pkl"
        )
    else:
        save = np.savez if variant == "npz" else np.savez_compressed
        save(tmp_path / "train_images.npz", images=images)
    _tiered_labels(tmp_path, "train", [2, 0, 2, 1, 0, 1], [1, 0, 1, 0, 0, 0])
    data = load_tieredimagenet(tmp_path, "train")
    assert data.labels.tolist() == [2, 0, 2, 1, 0, 1]
    assert data.class_names == ["n00", "n01", "n02"]
    assert data.class_groups == ["animal", "animal", "device"]
    assert data.images.dtype == torch.uint8 and tuple(data.images.shape) == (6, 3, 84, 84)
    if variant == "png":
        assert isinstance(data.images, EncodedImages)  # decoded per episode, not at load
    got = data.gather(torch.arange(6)).double()
    torch.testing.assert_close(got, _normalised(images, IMAGENET), rtol=0, atol=1e-5)


def test_tieredimagenet_npz_is_memory_mapped_when_stored(tmp_path):
    images = _pixels(3, 84, 3)
    np.savez(tmp_path / "stored.npz", images=images, other=np.arange(3))
    np.savez_compressed(tmp_path / "packed.npz", images=images)
    mapped = _files.load_npz_member("t", tmp_path / "stored.npz", "images")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, images)
    packed = _files.load_npz_member("t", tmp_path / "packed.npz", "images")
    assert not isinstance(packed, np.memmap) and np.array_equal(packed, images)
    with pytest.raises(ValueError, match=r"has no 'pixels' array; it has \['images', 'other'\]"):
        _files.load_npz_member("t", tmp_path / "stored.npz", "pixels")


def test_tieredimagenet_metaoptnet_labels_variant(tmp_path):
    np.savez(tmp_path / "test_images.npz", images=_pixels(4, 84, 4))
    _dump({"labels": [7, 7, 3, 3]}, tmp_path / "test_labels.pkl")
    data = load_tieredimagenet(tmp_path, "test")
    assert data.class_names == ["3", "7"] and data.labels.tolist() == [1, 1, 0, 0]
    assert data.class_groups is None


def test_tieredimagenet_errors(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"val_labels.pkl not found.*it is empty.*Expected the released"
    ):
        load_tieredimagenet(tmp_path, "val")
    _tiered_labels(tmp_path, "val", [0, 1])
    with pytest.raises(
        FileNotFoundError,
        match=r"val_images_png.pkl \(or val_images.npz\) not found.*it holds val_labels.pkl",
    ):
        load_tieredimagenet(tmp_path, "val")
    np.savez(tmp_path / "val_images.npz", images=_pixels(3, 84, 0))
    with pytest.raises(ValueError, match=r"has 2 'label_specific' entries for 3 images"):
        load_tieredimagenet(tmp_path, "val")
    _tiered_labels(tmp_path, "val", [0, 0, 1], [0, 1, 1], strings=False)
    with pytest.raises(ValueError, match=r"class 0 .* is under two 'label_general' values"):
        load_tieredimagenet(tmp_path, "val")
    (tmp_path / "val_images.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"cannot read .*val_images.npz.* as an .npz"):
        load_tieredimagenet(tmp_path, "val")
    (tmp_path / "val_images.npz").unlink()
    _dump([b"not a png"], tmp_path / "val_images_png.pkl")
    with pytest.raises(ValueError, match="cannot decode image 0"):
        load_tieredimagenet(tmp_path, "val")
    _dump([np.frombuffer(_png(_pixels(1, 32, 0)[0]), np.uint8)], tmp_path / "val_images_png.pkl")
    with pytest.raises(ValueError, match="image 0 is 32x32, expected 84x84"):
        load_tieredimagenet(tmp_path, "val")


# ------------------------------------------------------------------------------ CIFAR-FS, FC100
FINE = sorted(c for classes in SUPERCLASSES.values() for c in classes)
COARSE = sorted(SUPERCLASSES)
COARSE_OF = {c: COARSE.index(s) for s, classes in SUPERCLASSES.items() for c in classes}


def _cifar100(folder: Path, per_class=(2, 1), seed=5) -> dict[str, np.ndarray]:
    """A CIFAR-100 python folder with per_class images of every class in train and in test;
    returns the pixels of each class, (n, 32, 32, 3), train ones first."""
    folder.mkdir(parents=True)
    _dump({"fine_label_names": FINE, "coarse_label_names": COARSE}, folder / "meta")
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[np.ndarray]] = {c: [] for c in FINE}
    for name, k in zip(("train", "test"), per_class):
        fine = np.repeat(np.arange(100), k)
        rng.shuffle(fine)
        data = rng.integers(0, 256, (fine.size, 3072), dtype=np.uint8)
        _dump(
            {
                "data": data,
                "fine_labels": fine.tolist(),
                "coarse_labels": [COARSE_OF[FINE[f]] for f in fine],
            },
            folder / name,
        )
        for row, f in zip(data, fine):
            by_class[FINE[f]].append(row.reshape(3, 32, 32).transpose(1, 2, 0))
    return {c: np.stack(v) for c, v in by_class.items()}


def test_published_splits_counts_disjoint_superclasses():
    sizes = {s: len(CIFAR_FS_SPLIT[s]) for s in ("train", "val", "test")}
    assert sizes == {"train": 64, "val": 16, "test": 20}
    assert sorted(c for s in CIFAR_FS_SPLIT.values() for c in s) == FINE
    assert [len(FC100_SPLIT[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(c for s in FC100_SPLIT.values() for c in s) == COARSE


def test_cifar_fs_round_trip_split_and_groups(tmp_path):
    pixels = _cifar100(tmp_path / "cifar-100-python")
    names = {}
    for split in ("train", "val", "test"):
        data = load_cifar_fs(tmp_path, split)  # the parent of cifar-100-python works too
        names[split] = data.class_names
        assert data.class_names == list(CIFAR_FS_SPLIT[split])
        assert data.images.dtype == torch.uint8 and tuple(data.images.shape[1:]) == (3, 32, 32)
        assert len(data) == 3 * len(data.class_names)  # train and test images of each class
        assert data.class_groups == [COARSE[COARSE_OF[c]] for c in data.class_names]
        for label, name in enumerate(data.class_names):
            got = data.images[data.labels == label].permute(0, 2, 3, 1).numpy()
            assert sorted(map(bytes, got)) == sorted(map(bytes, pixels[name]))
    assert not set(names["train"]) & set(names["val"]) | set(names["train"]) & set(names["test"])
    data = load_cifar_fs(tmp_path / "cifar-100-python", "test")
    row = int((data.labels == 3).nonzero()[0])
    want = _normalised(data.images[row].permute(1, 2, 0).numpy()[None], CIFAR)
    torch.testing.assert_close(data.gather(torch.tensor([row])).double(), want, rtol=0, atol=1e-5)


def test_fc100_classes_follow_superclasses(tmp_path):
    _cifar100(tmp_path / "cifar-100-python")
    seen: set[str] = set()
    for split, count in (("train", 60), ("val", 20), ("test", 20)):
        data = load_fc100(tmp_path, split)
        assert data.num_classes == count and len(data) == 3 * count
        assert set(data.class_groups) == set(FC100_SPLIT[split])
        assert all(COARSE[COARSE_OF[c]] == g for c, g in zip(data.class_names, data.class_groups))
        assert not seen & set(data.class_names)
        seen |= set(data.class_names)
    assert seen == set(FINE)


def test_cifar_errors(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"the file 'meta' not found.*it is empty.*CIFAR-100 python"
    ):
        load_cifar_fs(tmp_path)
    _cifar100(tmp_path / "c")
    (tmp_path / "c" / "test").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"load_fc100.*the file 'test' not found.*holds meta, train"
    ):
        load_fc100(tmp_path / "c", "val")
    _dump({"fine_label_names": ["a"], "coarse_label_names": ["b"]}, tmp_path / "c" / "meta")
    (tmp_path / "c" / "test").write_bytes((tmp_path / "c" / "train").read_bytes())
    with pytest.raises(
        ValueError, match=r"classes \['whale', .*not in 'fine_label_names'.*CIFAR-100\?"
    ):
        load_cifar_fs(tmp_path / "c", "test")
    with pytest.raises(TypeError, match="normalize to be a bool"):
        load_cifar_fs(tmp_path / "c", normalize="yes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ episodes
def test_reader_episodes_shapes_labels_determinism_and_values(tmp_path):
    images, _ = _mini_cache(tmp_path, "train", counts=(4, 4, 4, 4))
    data = load_miniimagenet(tmp_path)
    sampler = EpisodeSampler(data, ways=3, shots=1, queries=2)
    episode = sampler.sample(5, generator=_gen(0))
    (xs, ys), (xq, yq) = episode.support, episode.query
    assert xs.shape == (5, 3, 3, 84, 84) and xq.shape == (5, 6, 3, 84, 84)
    assert xs.dtype == torch.float32
    assert ys.tolist() == [[0, 1, 2]] * 5 and yq.tolist() == [[0, 0, 1, 1, 2, 2]] * 5
    rows = episode.info["query_indices"]
    want = _normalised(images[rows.flatten().numpy()], IMAGENET).reshape(xq.shape)
    torch.testing.assert_close(xq.double(), want, rtol=0, atol=1e-5)
    assert all(
        (data.labels[rows[t]].view(3, 2) == episode.info["classes"][t][:, None]).all()
        for t in range(5)
    )
    again = sampler.sample(5, generator=_gen(0))
    assert torch.equal(again.support[0], xs) and torch.equal(again.query[0], xq)


def test_from_pixels_checks_and_float64_default(tmp_path):
    pixels = torch.arange(8, dtype=torch.uint8).reshape(2, 1, 2, 2)
    data = LabelledImages.from_pixels(pixels, torch.tensor([0, 1]), mean=(0.0,), std=(2.0,))
    assert data.images is pixels  # no copy
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = data.gather(torch.tensor([1]))
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == torch.float64
    assert torch.equal(got.flatten(), torch.tensor([4.0, 5, 6, 7], dtype=torch.float64) / 510)
    call = r"LabelledImages.from_pixels\(pixels"
    with pytest.raises(TypeError, match=rf"{call}.*4-d uint8 tensor.*permute\(0, 3, 1, 2\)"):
        LabelledImages.from_pixels(pixels.float(), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="or a PixelStore"):
        LabelledImages.from_pixels([1, 2], torch.tensor([0, 1]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mean to hold 1 finite numbers.*\(0.5, 0.5\)"):
        LabelledImages.from_pixels(pixels, torch.tensor([0, 1]), mean=(0.5, 0.5), std=(1.0,))
    with pytest.raises(ValueError, match="mean and std together or neither, got only mean"):
        LabelledImages.from_pixels(pixels, torch.tensor([0, 1]), mean=(0.5,))
    with pytest.raises(ValueError, match="std > 0"):
        LabelledImages.from_pixels(pixels, torch.tensor([0, 1]), mean=(0.5,), std=(0.0,))
    with pytest.raises(TypeError, match="mean to be a tuple of numbers"):
        LabelledImages.from_pixels(pixels, torch.tensor([0, 1]), mean="0", std=(1.0,))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"floating point.*LabelledImages.from_pixels"):
        LabelledImages(pixels, torch.tensor([0, 1]))
