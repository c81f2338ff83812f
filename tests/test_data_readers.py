"""Dataset readers on tiny files in their real formats: IDX (.gz and raw), CIFAR pickles, ImageFolder.

    .venv/bin/pytest tests/test_data_readers.py -q
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.data import READERS, ViewSpec, build_manifest, check_files, open_split
from pipeline.data.base import carve_val
from pipeline.data.fashion import read_idx
from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from tests.support.data import write_cifar10, write_cifar100, write_idx_dataset, write_imagefolder

PLAIN = ViewSpec("pad_crop_flip", params={"pad": 0})  # view 0 = raw pixels / 255


def _pixels(ds) -> np.ndarray:
    """uint8 NHWC from view 0 of an unnormalised dataset."""
    x = torch.stack([ds[i][0] for i in range(len(ds))]).numpy()
    return np.rint(x * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def test_registry_lists_every_dataset() -> None:
    assert READERS.names() == ["cifar10", "cifar100", "fashion-mnist", "imagefolder", "synthetic"]
    with pytest.raises(UserError, match="expected one of"):
        READERS.create("mnist")


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_idx(tmp_path: Path, gz: bool) -> None:
    root = write_idx_dataset(tmp_path / "fm", n_train=30, n_test=10, gz=gz)
    m = build_manifest("fashion-mnist", root, tmp_path / "fm.parquet", seed=0)
    assert m.split_sizes() == {"train": 27, "val": 3, "test": 10} and m.num_classes == 10
    assert m.class_names[0] == "T-shirt/top"
    suffix = ".gz" if gz else ""
    train_images = read_idx(root / f"train-images-idx3-ubyte{suffix}")
    test = open_split(m, "test", views=PLAIN)
    assert test.input_shape == (1, 28, 28)
    np.testing.assert_array_equal(test.sample_ids, 30 + np.arange(10))
    np.testing.assert_array_equal(test.labels, np.arange(10) % 10)
    val = open_split(m, "val", views=PLAIN)
    np.testing.assert_array_equal(_pixels(val)[..., 0], train_images[val.sample_ids])
    np.testing.assert_array_equal(val.labels, val.sample_ids % 10)
    assert check_files(load_manifest(m.path)).sha256 == m.sha256


def test_gz_and_raw_hold_the_same_pixels(tmp_path: Path) -> None:
    a = build_manifest("fashion-mnist", write_idx_dataset(tmp_path / "a", gz=True), tmp_path / "a.parquet")
    b = build_manifest("fashion-mnist", write_idx_dataset(tmp_path / "b", gz=False), tmp_path / "b.parquet")
    xa, xb = open_split(a, "train", view=2).get_batch(np.arange(5)), open_split(b, "train", view=2).get_batch(np.arange(5))
    assert torch.equal(xa[0], xb[0]) and torch.equal(xa[1], xb[1])


def test_bad_idx_files(tmp_path: Path) -> None:
    root = write_idx_dataset(tmp_path / "fm", gz=False)
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte\[\.gz\] not found"):
        build_manifest("fashion-mnist", root, tmp_path / "m.parquet")
    write_idx_dataset(root, gz=False)
    data = (root / "train-images-idx3-ubyte").read_bytes()
    (root / "train-images-idx3-ubyte").write_bytes(data[:-7])
    with pytest.raises(UserError, match="train-images-idx3-ubyte: IDX payload"):
        build_manifest("fashion-mnist", root, tmp_path / "m.parquet")
    with gzip.open(root / "x.gz", "wb") as f:
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(root / "x.gz")


def test_changed_container_file_is_caught_at_load(tmp_path: Path) -> None:
    root = write_idx_dataset(tmp_path / "fm", gz=True)
    m = build_manifest("fashion-mnist", root, tmp_path / "m.parquet")
    write_idx_dataset(root, gz=True, seed=1)  # same layout, other pixels
    with pytest.raises(UserError, match="changed since the manifest was built"):
        open_split(m, "train")


@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10(tmp_path: Path, point_at_folder: bool) -> None:
    import pickle

    root = write_cifar10(tmp_path / "c", per_batch=6, n_test=8)
    if point_at_folder:
        root = root / "cifar-10-batches-py"
    m = build_manifest("cifar10", root, tmp_path / "c.parquet", val_fraction=0.2, seed=3)
    assert m.split_sizes() == {"train": 24, "val": 6, "test": 8}
    assert m.class_names[:2] == ("airplane", "automobile")
    assert m.split("test").source[0].endswith("test_batch#0")
    with open(tmp_path / "c/cifar-10-batches-py/data_batch_2", "rb") as f:
        batch2 = pickle.load(f, encoding="bytes")
    train = open_split(m, "train", views=PLAIN)
    assert train.input_shape == (3, 32, 32)
    pos = int(np.nonzero((train.sample_ids >= 6) & (train.sample_ids < 12))[0][0])
    k = int(train.sample_ids[pos]) - 6  # sample_id = index over the concatenated batches
    np.testing.assert_array_equal(_pixels(train)[pos], batch2[b"data"][k].reshape(3, 32, 32).transpose(1, 2, 0))
    assert train.labels[pos] == batch2[b"labels"][k]


def test_cifar10_class_restriction(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path / "c", per_batch=20)
    (tmp_path / "classes.txt").write_text("cat\n# comment\nairplane\n")
    full = build_manifest("cifar10", root, tmp_path / "full.parquet")
    m = build_manifest("cifar10", root, tmp_path / "two.parquet", classes=tmp_path / "classes.txt")
    assert m.class_names == ("cat", "airplane") and m.num_classes == 2
    ids = m.table.column("sample_id").to_numpy()
    old = dict(zip(full.table.column("sample_id").to_numpy(), full.table.column("label").to_numpy()))
    assert all({3: 0, 0: 1}[old[i]] == lab for i, lab in zip(ids, m.table.column("label").to_numpy()))
    (tmp_path / "bad.txt").write_text("cat\nzebra\n")
    with pytest.raises(UserError, match="'zebra'"):
        build_manifest("cifar10", root, tmp_path / "bad.parquet", classes=tmp_path / "bad.txt")


def test_cifar100(tmp_path: Path) -> None:
    m = build_manifest("cifar100", write_cifar100(tmp_path / "c", n_train=20, n_test=8), tmp_path / "c.parquet")
    assert m.num_classes == 100 and m.split_sizes() == {"train": 18, "val": 2, "test": 8}
    ds = open_split(m, "val", view=1)
    assert ds.input_shape == (3, 32, 32) and ds.views.params["mean"][0] == pytest.approx(0.5071)
    assert ds.get_batch(np.arange(2))[0].shape == (2, 3, 32, 32)


def test_imagefolder_train_val_means_val_is_test(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "r", dirs={"train": 5, "val": 2})
    m = build_manifest("imagefolder", root, tmp_path / "m.parquet", val_fraction=0.2, seed=0)
    assert m.class_names == ("cat", "dog", "owl")
    assert m.split_sizes() == {"train": 12, "val": 3, "test": 6}
    assert all(s.startswith("val/") for s in m.split("test").source)
    assert all(s.startswith("train/") for s in m.split("val").source)
    assert m.meta["split_dirs"] == {"train": "train", "test": "val"}
    ds = open_split(m, "test", views=ViewSpec("rrc_flip_jitter", params={"size": 8, "resize": 8, "mean": None,
                                                                           "std": None}))
    assert ds[0][0].shape == (3, 8, 8) and ds.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagefolder_with_test_dir_and_classes_file(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "r", dirs={"train": 3, "val": 1, "test": 2})
    (tmp_path / "classes.txt").write_text("owl\ncat\n")
    m = build_manifest("imagefolder", root, tmp_path / "m.parquet", classes=tmp_path / "classes.txt")
    assert m.class_names == ("owl", "cat")
    assert m.split_sizes() == {"train": 6, "val": 2, "test": 4}
    train = m.split("train")
    assert train.source[0].startswith("train/owl/") and train.label.tolist() == [0, 0, 0, 1, 1, 1]
    # Without a class list, a val class unknown to train is an error.
    (root / "val" / "emu").mkdir()
    with pytest.raises(UserError, match="emu: class directory not in"):
        build_manifest("imagefolder", root, tmp_path / "m2.parquet")


def test_imagefolder_unreadable_image_is_one_line(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "r", dirs={"train": 2, "val": 1})
    m = build_manifest("imagefolder", root, tmp_path / "m.parquet", val_fraction=0.0)
    (root / "val" / "cat" / "img_0.png").write_bytes(b"not a png")
    ds = open_split(m, "test", views=ViewSpec("rrc_flip_jitter", params={"size": 8, "resize": 8}))
    with pytest.raises(UserError, match=r"img_0\.png: cannot decode image") as err:
        ds[0]
    assert "\n" not in str(err.value)
    # Raised in a DataLoader worker, it comes back as the same single line, without the traceback.
    message = _first_error(DataLoader(ds, num_workers=1))
    assert message.startswith(str(root / "val" / "cat" / "img_0.png")) and "Traceback" not in message


def _first_error(loader: DataLoader) -> str:
    # Keep only the message: a kept traceback would keep the worker alive until teardown (5 s).
    try:
        next(iter(loader))
    except UserError as err:
        return str(err)
    raise AssertionError("expected a UserError")


def test_carved_val_is_deterministic() -> None:
    a, b, c = carve_val(100, fraction=0.1, seed=4), carve_val(100, fraction=0.1, seed=4), carve_val(100, fraction=0.1, seed=5)
    assert a.sum() == 10 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert carve_val(100, fraction=0.0, seed=4).sum() == 0
    with pytest.raises(UserError, match="val_fraction"):
        carve_val(10, fraction=1.5, seed=0)


def test_imagefolder_image_size_sets_the_views_crop(tmp_path):
    root = write_imagefolder(tmp_path / "imgs", dirs={"train": 3, "val": 2}, classes=("cat", "dog"))
    small = build_manifest("imagefolder", root, tmp_path / "small.parquet", image_size=32)
    default = build_manifest("imagefolder", root, tmp_path / "default.parquet")
    assert open_split(default, "train").input_shape == (3, 224, 224)
    ds = open_split(small, "train")
    assert ds.input_shape == (3, 32, 32)
    x0 = ds[0][0]
    ds.set_view(1)
    x1 = ds[0][0]
    assert x0.shape == x1.shape == (3, 32, 32) and not torch.equal(x0, x1)
    with pytest.raises(UserError, match="image_size"):
        build_manifest("imagefolder", root, tmp_path / "bad.parquet", image_size=4)
