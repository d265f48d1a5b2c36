"""``python -m metafunc train`` on the few-shot benchmarks: ``--task miniimagenet / tieredimagenet /
cifarfs / fc100`` read from ``--data-path``, ``--backbone``, ``--image-size``, ``--augment`` and
the head algorithms ProtoNet, R2-D2 and MetaOptNet.

The data are tiny files written in each benchmark's own format into ``tmp_path`` (a few classes
of a few random images per split); runs are 2 meta-steps of 2 tasks, 2-way 1-shot, at 16x16 with
narrow backbones. Oracles: the networks of :mod:`metafunc.models` built directly (the
checkpoint's meta-parameters have their names and shapes), the runner's models as they were
written before they moved (same parameters from the same seed), and the same run without
``--augment`` (the test tasks, drawn without augmentation, are the same).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import _load, _run
from torch import nn

from metafunc import _train, models
from metafunc._train import _models
from metafunc.data import CIFAR_FS_SPLIT, FC100_SPLIT

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 meta-steps of 2 tasks, 2-way 1-shot 1-query at 16x16, validated at the end, 2 test tasks
TINY = ["--steps", "2", "--meta-batch", "2", "--eval-tasks", "2", "--val-tasks", "2"]
TINY += ["--eval-every", "2", "--ways", "2", "--shots", "1", "--queries", "1"]
TINY += ["--image-size", "16", "--strategy", "loop", "--threads", "1", "--quiet", "--no-plot"]
NARROW = {"conv4": "4", "resnet12": "2", "wrn28_10": "1"}  # --hidden: a narrow backbone


def _dump(obj, file: Path) -> None:
    with open(file, "wb") as f:
        pickle.dump(obj, f)


def _pixels(n: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _miniimagenet(folder: Path, classes: int = 3, per_class: int = 3) -> Path:
    """mini-imagenet-cache-{split}.pkl: 84x84 images, ``classes`` classes per split."""
    folder.mkdir()
    for i, split in enumerate(("train", "val", "test")):
        n = classes * per_class
        rows = {f"n{i}{c}": list(range(c * per_class, (c + 1) * per_class)) for c in range(classes)}
        _dump({"image_data": _pixels(n, 84, i), "class_dict": rows},
              folder / f"mini-imagenet-cache-{split}.pkl")  # fmt: skip
    return folder


def _tieredimagenet(folder: Path, classes: int = 3, per_class: int = 3) -> Path:
    """{split}_images.npz (84x84, stored: memory-mapped) and {split}_labels.pkl."""
    folder.mkdir()
    for i, split in enumerate(("train", "val", "test")):
        np.savez(folder / f"{split}_images.npz", images=_pixels(classes * per_class, 84, i))
        specific = np.repeat(np.arange(classes), per_class)
        _dump({"label_specific": specific, "label_general": specific * 0},
              folder / f"{split}_labels.pkl")  # fmt: skip
    return folder


def _cifar100(folder: Path) -> Path:
    """cifar-100-python/{meta,train,test}: the 100 class names of CIFAR-FS's split, the 20
    superclasses of FC100's (5 classes each, by position), 2 + 1 images of each class."""
    fine = [c for split in ("train", "val", "test") for c in CIFAR_FS_SPLIT[split]]
    coarse = [s for split in ("train", "val", "test") for s in FC100_SPLIT[split]]
    inner = folder / "cifar-100-python"
    inner.mkdir(parents=True)
    _dump({"fine_label_names": fine, "coarse_label_names": coarse}, inner / "meta")
    rng = np.random.default_rng(0)
    for name, k in (("train", 2), ("test", 1)):
        labels = np.repeat(np.arange(100), k)
        data = rng.integers(0, 256, (labels.size, 3072), dtype=np.uint8)
        _dump({"data": data, "fine_labels": labels.tolist(),
               "coarse_labels": (labels // 5).tolist()}, inner / name)  # fmt: skip
    return folder


WRITERS = {
    "miniimagenet": _miniimagenet,
    "tieredimagenet": _tieredimagenet,
    "cifarfs": _cifar100,
    "fc100": _cifar100,
}


def _data(tmp_path: Path, task: str) -> str:
    return str(WRITERS[task](tmp_path / f"{task}-data"))


def _backbone(backbone: str, ways: int | None) -> nn.Module:
    """The narrow backbone of NARROW, built from metafunc.models directly."""
    if backbone == "resnet12":
        return models.ResNet12(ways, channels=(2, 5, 10, 20), image_size=16)
    if backbone == "wrn28_10":
        return models.WideResNet(ways, depth=28, widen=1)
    return models.WarpConv4(ways, in_channels=3, hidden=4, image_size=16, warp=False)


@pytest.mark.parametrize(
    ("algorithm", "task", "backbone"),
    [
        ("protonet", "miniimagenet", "conv4"),
        ("r2d2", "tieredimagenet", "resnet12"),
        ("metaoptnet", "cifarfs", "conv4"),
        ("protonet", "fc100", "wrn28_10"),
        ("maml", "cifarfs", "resnet12"),
        ("anil", "miniimagenet", "wrn28_10"),
    ],
)
def test_each_algorithm_family_trains_a_metafunc_models_backbone_on_each_format(
    algorithm, task, backbone, tmp_path
):
    out = tmp_path / "run"
    flags = ["--algorithm", algorithm, "--task", task, "--data-path", _data(tmp_path, task)]
    results = _run(out, *flags, "--backbone", backbone, "--hidden", NARROW[backbone], *TINY)
    config = results["config"]
    assert config["backbone"] == backbone and config["image_size"] == 16
    assert config["augment"] is False and config["data_path"].endswith("-data")
    heads = algorithm in _train.HEAD_ALGORITHMS
    assert ("inner_lr" in config) is not heads and ("inner_steps" in config) is not heads
    for when in ("test_before", "test_after"):
        assert results[when].keys() == {"loss", "accuracy"}
        assert 0 <= results[when]["accuracy"]["mean"] <= 1
    assert len(results["history"]["val_accuracy"]) == 1
    _, checkpoint = _load(out)
    expected = _backbone(backbone, None if heads else 2)
    shapes = [p.shape for _, p in sorted(expected.named_parameters())]  # optree sorts keys
    extra = {"r2d2": 3, "metaoptnet": 1}.get(algorithm, 0)  # meta["head"], sorted first
    assert [t.shape for t in checkpoint["meta"][extra:]] == shapes


def test_augment_changes_the_training_episodes_only(tmp_path):
    flags = ["--algorithm", "protonet", "--task", "fc100", "--data-path", _data(tmp_path, "fc100")]
    plain = _run(tmp_path / "plain", *flags, "--hidden", "4", *TINY)
    augmented = _run(tmp_path / "augmented", *flags, "--hidden", "4", "--augment", *TINY)
    assert augmented["config"]["augment"] is True
    assert augmented["test_before"] == plain["test_before"]  # the test tasks: not augmented
    assert augmented["history"]["meta_loss"] != plain["history"]["meta_loss"]


def test_episodes_are_resized_to_image_size_and_augmented_in_place(tmp_path):
    path = _data(tmp_path, "miniimagenet")
    generator = torch.Generator().manual_seed(0)
    for flags in ([], ["--augment"]):
        args = _train.parse(["--task", "miniimagenet", "--data-path", path, *TINY, *flags])
        tasks = _train.Tasks(args)
        for split in ("train", "test"):
            episode = tasks.sample(split, 2, generator, "cpu")
            assert episode.support[0].shape == (2, 2, 3, 16, 16)
            assert episode.query[0].shape == (2, 2, 3, 16, 16)
    path = _data(tmp_path, "cifarfs")
    args = _train.parse(["--task", "cifarfs", "--data-path", path, "--queries", "1"])
    assert args.image_size == 32 and args.backbone == "conv4" and args.hidden == 32
    assert (args.meta_batch, args.ways, args.shots, args.inner_lr) == (4, 5, 1, 0.01)
    episode = _train.Tasks(args).sample("val", 1, generator, "cpu")
    assert episode.support[0].shape == (1, 5, 3, 32, 32)  # stored at 32: no resize


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--algorithm", "protonet", "--task", "glyphs", "--inner-lr", "0.1"],
         "--inner-lr applies to --algorithm maml / fomaml"),
        (["--algorithm", "r2d2", "--task", "glyphs", "--inner-steps", "2"],
         "--inner-steps applies to --algorithm maml"),
        (["--algorithm", "metaoptnet"], "--algorithm metaoptnet fits a classifier head per task"),
        (["--algorithm", "warpgrad", "--task", "glyphs", "--backbone", "resnet12"],
         "--algorithm warpgrad needs --backbone conv4"),
        (["--backbone", "resnet12"], "--backbone applies to --task glyphs / omniglot / mini"),
        (["--task", "glyphs", "--augment"], "--augment applies to --task miniimagenet / tiered"),
        (["--task", "glyphs", "--image-size", "32"], "--image-size applies to --task miniimag"),
        (["--task", "cifarfs", "--image-size", "8"],
         "--image-size 8: --backbone conv4 halves the image four times; pass --image-size 16"),
        (["--task", "fc100", "--backbone", "vgg"], "argument --backbone: invalid choice: 'vgg'"),
    ],
)  # fmt: skip
def test_flags_that_do_not_apply_or_do_not_fit_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        _train.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m metafunc train") and message in err


@pytest.mark.parametrize("task", ["miniimagenet", "tieredimagenet", "cifarfs", "fc100"])
def test_a_missing_or_wrong_data_path_names_the_expected_layout(task, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        _run(tmp_path / "a", "--task", task)
    assert info.value.code == 2
    assert f"--task {task} needs --data-path, the folder that holds " in str(info.value)
    assert "There is no download" in str(info.value)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "readme.txt").write_text("not the data")
    with pytest.raises(SystemExit) as info:
        _run(tmp_path / "b", "--task", task, "--data-path", str(wrong))
    message = str(info.value)
    assert info.value.code == 2 and message.startswith(f"--data-path {wrong}: ")
    assert "it holds readme.txt" in message and "Expected " in message  # the reader's layout
    assert "Traceback" not in capsys.readouterr().err


def test_new_flags_are_expressible_in_a_config_file_and_recorded(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'task = "tieredimagenet"\ndata-path = "d"\nbackbone = "resnet12"\nimage_size = 24\n'
        'augment = true\nalgorithm = "r2d2"\nhidden = 3\n'
    )
    from_file = vars(_train.parse(["--config", str(path)]))
    flags = ["--task", "tieredimagenet", "--data-path", "d", "--backbone", "resnet12"]
    flags += ["--image-size", "24", "--augment", "--algorithm", "r2d2", "--hidden", "3"]
    from_flags = vars(_train.parse(flags))
    assert from_file.pop("config") == str(path) and from_flags.pop("config") is None
    assert from_file == from_flags
    assert from_flags["inner_lr"] is None and from_flags["inner_steps"] is None


def test_resume_checks_the_backbone_and_accepts_checkpoints_from_before_the_flag(tmp_path):
    out = tmp_path / "run"
    flags = ["--task", "glyphs", "--classes", "30", "--hidden", "4", *TINY[:-8], "--quiet"]
    flags += ["--no-plot", "--strategy", "loop", "--threads", "1"]
    _run(out, *flags)
    with pytest.raises(SystemExit) as info:
        _run(out, *flags, "--backbone", "resnet12", "--resume", "--steps", "3")
    assert info.value.code == 2
    assert "the checkpoint was made with --backbone conv4, this run asks for --backbone " in str(
        info.value
    )
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    del checkpoint["args"]["backbone"]  # as a checkpoint written before --backbone existed
    torch.save(checkpoint, out / "checkpoint.pt")
    results = _run(out, *flags[:-8], "--steps", "3", "--resume", *flags[-8:])
    assert results["history"]["step"] == [1, 2, 3]


def _old_mlp(warp: bool) -> nn.Sequential:
    """The runner's sinusoid MLP as it was written before it moved to metafunc.models."""
    layers: list[nn.Module] = [nn.Linear(1, 40), nn.ReLU()]
    if warp:
        layers += [nn.Linear(40, 40), nn.ReLU()]
    layers += [nn.Linear(40, 40), nn.ReLU()]
    if warp:
        layers += [nn.Linear(40, 40), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(40, 1))


class _OldConvNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _old_convnet(ways: int, hidden: int, warp: bool) -> nn.Module:
    """The runner's ConvNet as it was: biased conv blocks, a warp conv after blocks 1-3."""
    net = _OldConvNet()
    blocks: list[nn.Module] = []
    channels = 1
    for i in range(4):
        blocks.append(nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2),
        ))  # fmt: skip
        if warp and i < 3:
            blocks.append(nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU()))
        channels = hidden
    net.features = nn.Sequential(*blocks)
    net.head = nn.Linear(hidden, ways)
    return net


@pytest.mark.parametrize("warp", [False, True])
@pytest.mark.parametrize("task", ["sinusoid", "glyphs"])
def test_the_runners_models_are_metafunc_models_with_the_same_parameters(task, warp):
    algorithm = "warpgrad" if warp else "maml"
    args = _train.parse(["--task", task, "--algorithm", algorithm])
    torch.manual_seed(3)
    built = _models.build(args)
    torch.manual_seed(3)
    old = _old_mlp(warp) if task == "sinusoid" else _old_convnet(5, 32, warp)
    assert isinstance(built, models.MLP if task == "sinusoid" else models.WarpConv4)
    a, b = built.state_dict(), old.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, 1) if task == "sinusoid" else torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(built(x), old(x), rtol=0, atol=0)
    # the old runner's warp names: layers 2 and 6 of the MLP, features 1, 3 and 5 of the net
    warped = [
        n for n, _ in old.named_parameters()
        if n.split(".")[0] in ("2", "6") or n.split(".")[:2] in (["features", "1"],
                                                                ["features", "3"],
                                                                ["features", "5"])
    ]  # fmt: skip
    assert list(built.warp_names) == (warped if warp else [])
