"""CIFAR-10 and CIFAR-100 from the python pickle batches, loaded into memory as uint8 HWC.

    kdcache manifest build --dataset cifar10  --root data/cifar --out data_manifests/cifar10.parquet
    kdcache manifest build --dataset cifar100 --root data/cifar --out data_manifests/cifar100.parquet

The root is either the extracted folder itself or its parent:
``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``cifar-100-python/{train, test, meta}`` (CIFAR-100 uses the 100 fine labels). Splits: the
official test set is ``test``; ``val_fraction`` (default 0.1) of train, chosen by ``seed``,
is ``val``. sample_id = index in the concatenated train batches, or 50 000 + test index;
source = ``FILE#INDEX`` relative to the root.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from pipeline.data.base import (DEFAULT_VAL_FRACTION, READERS, Reader, Samples, Scan, load_container_images,
                                record_files, split_train_val_test)
from pipeline.data.views import ViewSpec
from pipeline.errors import UserError
from pipeline.manifest import Manifest, SplitRows


def read_batch(path: Path, *, label_key: bytes | None = None) -> dict[bytes, Any]:
    """One pickled batch (``encoding="bytes"``, as the files were written by python 2)."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise UserError(f"{path}: cannot read CIFAR pickle ({err})") from None
    if not isinstance(batch, dict):
        raise UserError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    if label_key is not None:
        for key in (b"data", label_key):
            if key not in batch:
                raise UserError(f"{path}: field {key.decode()!r} missing from the CIFAR batch")
    return batch


def read_images(path: Path) -> np.ndarray:
    """uint8 [N, 32, 32, 3] from a batch's ``data`` field ([N, 3072], channel-major rows)."""
    data = np.asarray(read_batch(path).get(b"data"))
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise UserError(f"{path}: field 'data' has shape {data.shape} {data.dtype}, expected [N, 3072] uint8")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


class _CifarReader(Reader):
    folder: ClassVar[str]
    train_files: ClassVar[tuple[str, ...]]
    test_file: ClassVar[str]
    meta_file: ClassVar[str]
    label_key: ClassVar[bytes]
    names_key: ClassVar[bytes]
    mean: ClassVar[list[float]]
    std: ClassVar[list[float]]
    options = {"val_fraction": DEFAULT_VAL_FRACTION}

    def _prefix(self, root: Path) -> str:
        """'' if the root is the extracted folder, else the folder name + '/'."""
        if (root / self.meta_file).is_file():
            return ""
        if (root / self.folder / self.meta_file).is_file():
            return self.folder + "/"
        raise UserError(f"{root}: {self.meta_file} not found (expected ROOT/{self.folder}/ or the folder itself)")

    def scan(self, root: Path, *, classes: Sequence[str] | None, seed: int, progress: bool = False,
             **options: Any) -> Scan:
        opts = self.resolve_options(options)
        prefix = self._prefix(root)
        meta_batch = read_batch(root / (prefix + self.meta_file))
        if self.names_key not in meta_batch:
            raise UserError(f"{root / (prefix + self.meta_file)}: field {self.names_key.decode()!r} missing")
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta_batch[self.names_key]]
        labels, sources = {}, {}
        for part, files in (("train", self.train_files), ("test", (self.test_file,))):
            part_labels, part_sources = [], []
            for name in files:
                rel = prefix + name
                batch = read_batch(root / rel, label_key=self.label_key)
                lab = np.asarray(batch[self.label_key], dtype=np.int64)
                if len(lab) != len(batch[b"data"]):
                    raise UserError(f"{root / rel}: {len(lab)} labels for {len(batch[b'data'])} images")
                if lab.size and (lab.min() < 0 or lab.max() >= len(class_names)):
                    raise UserError(f"{root / rel}: field {self.label_key.decode()!r} has a value outside "
                                    f"[0, {len(class_names)})")
                part_labels.append(lab)
                part_sources += [f"{rel}#{i}" for i in range(len(lab))]
            labels[part], sources[part] = np.concatenate(part_labels), part_sources
        n_train = len(labels["train"])
        ids, label, split, source, names, splits = split_train_val_test(
            train_labels=labels["train"], test_labels=labels["test"], train_source=sources["train"],
            test_source=sources["test"], test_id_offset=n_train, class_names=class_names, classes=classes,
            seed=seed, val_fraction=float(opts["val_fraction"]), what=self.name,
        )
        files = [prefix + f for f in (*self.train_files, self.test_file)]
        meta = {"val_fraction": float(opts["val_fraction"]), "seed": int(seed), "files": record_files(root, files)}
        return Scan(ids, label, split, source, names, splits, meta)

    def load(self, manifest: Manifest, rows: SplitRows) -> Samples:
        return Samples(kind="image", native_shape=(32, 32, 3), array=load_container_images(manifest, rows, read=read_images))

    def default_views(self, manifest: Manifest, *, seed: int = 0) -> ViewSpec:
        return ViewSpec("pad_crop_flip", seed=seed, params={"pad": 4, "mean": self.mean, "std": self.std})


@READERS.register("cifar10")
class Cifar10Reader(_CifarReader):
    name = "cifar10"
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_file = "test_batch"
    meta_file = "batches.meta"
    label_key = b"labels"
    names_key = b"label_names"
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


@READERS.register("cifar100")
class Cifar100Reader(_CifarReader):
    name = "cifar100"
    folder = "cifar-100-python"
    train_files = ("train",)
    test_file = "test"
    meta_file = "meta"
    label_key = b"fine_labels"
    names_key = b"fine_label_names"
    mean, std = [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]
