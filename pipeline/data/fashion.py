"""Fashion-MNIST from its IDX files (``.gz`` or uncompressed), loaded into memory as uint8.

    apt-get install dataset-fashion-mnist     # Debian: /usr/share/datasets/fashion-mnist/
    kdcache manifest build --dataset fashion-mnist --root /usr/share/datasets/fashion-mnist \\
        --out data_manifests/fashion-mnist.parquet [--val-fraction 0.1] [--seed 0]

Files under the root: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz`` (an
uncompressed file wins when both exist). Splits: the 10 000 t10k images are ``test``;
``val_fraction`` (default 0.1) of the 60 000 train images, chosen by ``seed``, are ``val``.
sample_id = index in train, or 60 000 + index in t10k; source = ``FILE#INDEX``.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.data.base import (DEFAULT_VAL_FRACTION, READERS, Reader, Samples, Scan, load_container_images,
                                record_files, split_train_val_test)
from pipeline.data.views import ViewSpec
from pipeline.errors import UserError
from pipeline.files import settled_version
from pipeline.manifest import Manifest, SplitRows

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MEAN, STD = [0.2860], [0.3530]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (type 0x08) as a (read-only) uint8 array of its declared shape.

    Decoded once per process while the file is unchanged (``pipeline.files.settled_version``): a
    caching or training run opens the same split several times.
    """
    try:
        version = settled_version(path)
    except OSError as err:
        raise UserError(f"{path}: cannot read IDX file ({err})") from None
    return _decode_idx(path) if version is None else _decoded_idx(path, version)


@functools.lru_cache(maxsize=len(FILES))
def _decoded_idx(path: Path, version: tuple) -> np.ndarray:
    return _decode_idx(path)


def _decode_idx(path: Path) -> np.ndarray:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise UserError(f"{path}: cannot read IDX file ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UserError(f"{path}: not an IDX file (magic bytes 00 00 expected)")
    if data[2] != 0x08:
        raise UserError(f"{path}: IDX type code 0x{data[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(data[4:header], dtype=">u4"))
    expected = int(np.prod(shape)) if shape else 0
    if len(data) - header != expected:
        raise UserError(f"{path}: IDX payload is {len(data) - header} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_file(root: Path, base: str) -> str:
    """The name under root of an IDX file: ``base`` if present, else ``base.gz``."""
    for name in (base, base + ".gz"):
        if (root / name).is_file():
            return name
    raise UserError(f"{root}: Fashion-MNIST file {base}[.gz] not found under the root")


@READERS.register("fashion-mnist")
class FashionMnistReader(Reader):
    name = "fashion-mnist"
    options = {"val_fraction": DEFAULT_VAL_FRACTION}

    def scan(self, root: Path, *, classes: Sequence[str] | None, seed: int, progress: bool = False,
             **options: Any) -> Scan:
        opts = self.resolve_options(options)
        names = {key: find_file(root, base) for key, base in FILES.items()}
        arrays = {key: read_idx(root / name) for key, name in names.items()}
        for part in ("train", "test"):
            images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise UserError(f"{root / names[part + '_images']}: shape {images.shape} does not match "
                                f"{names[part + '_labels']} shape {labels.shape} (expected [N, H, W] and [N])")
            if labels.size and labels.max() >= len(CLASS_NAMES):
                raise UserError(f"{root / names[part + '_labels']}: label {labels.max()} outside [0, 10)")
        n_train = len(arrays["train_labels"])
        ids, labels, split, source, class_names, splits = split_train_val_test(
            train_labels=arrays["train_labels"], test_labels=arrays["test_labels"],
            train_source=[f"{names['train_images']}#{i}" for i in range(n_train)],
            test_source=[f"{names['test_images']}#{i}" for i in range(len(arrays["test_labels"]))],
            test_id_offset=n_train, class_names=CLASS_NAMES, classes=classes, seed=seed,
            val_fraction=float(opts["val_fraction"]), what="Fashion-MNIST",
        )
        meta = {"val_fraction": float(opts["val_fraction"]), "seed": int(seed),
                "files": record_files(root, sorted(names.values()))}
        return Scan(ids, labels, split, source, class_names, splits, meta)

    def load(self, manifest: Manifest, rows: SplitRows) -> Samples:
        return Samples(kind="image", native_shape=(28, 28, 1), array=load_container_images(manifest, rows, read=read_idx))

    def default_views(self, manifest: Manifest, *, seed: int = 0) -> ViewSpec:
        return ViewSpec("pad_crop_flip", seed=seed, params={"pad": 2, "mean": MEAN, "std": STD})

