"""Tiny on-disk datasets for the data-layer tests (written into a test's tmp_path).

    from tests.support.data import write_idx_dataset, write_cifar10, write_imagefolder
    root = write_idx_dataset(tmp_path / "fm", n_train=30, n_test=10, gz=True)

The default CIFAR-10 folder is also the session fixture ``cifar10_root`` (tests/conftest.py).

Each writer produces the real file layout of its format with random pixels, so the readers
are tested on the bytes they will meet, at a size that takes milliseconds.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    """An IDX file of unsigned bytes (magic 00 00 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_idx_dataset(root: Path, *, n_train: int = 30, n_test: int = 10, gz: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz=gz)
        write_idx(root / f"{part}-labels-idx1-ubyte", np.arange(n) % 10, gz=gz)
    return root


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, *, per_batch: int = 6, n_test: int = 8, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` with 5 train batches of ``per_batch`` images each."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _pickle(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch})
    for i in range(1, 6):
        _pickle(folder / f"data_batch_{i}", {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
        })
    _pickle(folder / "test_batch", {
        b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in np.arange(n_test) % 10],
    })
    return root


def write_cifar100(root: Path, *, n_train: int = 20, n_test: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    _pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                              b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    for name, n in (("train", n_train), ("test", n_test)):
        _pickle(folder / name, {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                                b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)]})
    return root


def write_imagefolder(root: Path, *, dirs: dict[str, int] | None = None, classes: tuple[str, ...] = ("cat", "dog", "owl"),
                      size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    """``root/<dir>/<class>/img_<k>.png`` with ``dirs[dir]`` images per class (RGB and one grayscale)."""
    rng = np.random.default_rng(seed)
    for d, per_class in (dirs or {"train": 4, "val": 2}).items():
        for c in classes:
            (root / d / c).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                img = Image.fromarray(pixels)
                if k == 1:  # a grayscale file, to check the reader converts to RGB
                    img = img.convert("L")
                img.save(root / d / c / f"img_{k}.png")
    return root
