"""ImageFolder datasets (ImageNet, ImageNet-100, ...): ``ROOT/<split dir>/<class>/**/*.jpg``, decoded lazily.

    kdcache manifest build --dataset imagefolder --root data/imagenet \\
        --classes data_manifests/imagenet100.txt --out data_manifests/imagenet100.parquet

Classes: the sub-directories of ``ROOT/train`` in sorted order, or with ``--classes FILE``
exactly the classes listed there, in that order (others are skipped everywhere).
Splits:
- ``ROOT/train`` is ``train`` (required);
- with ``ROOT/test`` present: ``ROOT/test`` is ``test`` and ``ROOT/val`` is ``val``;
- without it: ``ROOT/val`` is ``test`` (the ImageNet convention: its val set is the held-out
  set papers report on);
- when no directory became ``val``, ``val_fraction`` (default 0.1) of train, chosen by ``seed``,
  is ``val`` (0 leaves no val split).
ImageNet's val images must be sorted into class folders first (as torchvision expects).
sample_id numbers the files in (split dir, class, path) order; source = path relative to ROOT.
Images are decoded with PIL in the DataLoader workers and converted to RGB.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.base import DEFAULT_VAL_FRACTION, READERS, Reader, Samples, Scan, carve_val
from pipeline.data.views import ViewSpec
from pipeline.errors import DataError, UserError
from pipeline.manifest import Manifest, SplitRows

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_dirs(directory: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def _images_under(directory: Path, root: Path) -> list[str]:
    """Image paths under ``directory``, relative to ``root``, sorted (walks sub-directories)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        found += [f"{rel}/{f}".replace(os.sep, "/") for f in filenames if f.lower().endswith(EXTENSIONS)]
    return sorted(found)


def split_dirs(root: Path) -> dict[str, str]:
    """{split name: directory name} following the rules in the module docstring."""
    if not (root / "train").is_dir():
        raise UserError(f"{root}: directory 'train' not found (expected ROOT/train/<class>/...)")
    dirs = {"train": "train"}
    if (root / "test").is_dir():
        dirs["test"] = "test"
        if (root / "val").is_dir():
            dirs["val"] = "val"
    elif (root / "val").is_dir():
        dirs["test"] = "val"
    return dirs


class LazyImages:
    """Picklable ``i -> PIL RGB image`` for DataLoader workers."""

    def __init__(self, root: str, sources: np.ndarray, *, manifest_path: str):
        self.root, self.sources, self.manifest_path = root, sources, manifest_path

    def __call__(self, i: int) -> Image.Image:
        path = os.path.join(self.root, self.sources[i])
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"{path}: image file not found (manifest {self.manifest_path}, field 'source')") from None
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: cannot decode image ({err}) (manifest {self.manifest_path}, field 'source')") from None


@READERS.register("imagefolder")
class ImageFolderReader(Reader):
    name = "imagefolder"
    # image_size: the square side the views crop to (224, ImageNet); small images want e.g. 32.
    options = {"val_fraction": DEFAULT_VAL_FRACTION, "image_size": 224}

    def scan(self, root: Path, *, classes: Sequence[str] | None, seed: int, progress: bool = False,
             **options: Any) -> Scan:
        opts = self.resolve_options(options)
        size = opts["image_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise UserError(f"imagefolder option 'image_size': expected an integer >= 8, found {size!r}")
        dirs = split_dirs(root)
        train_classes = _class_dirs(root / "train")
        if classes is None:
            class_names = train_classes
            if not class_names:
                raise UserError(f"{root / 'train'}: no class directories found")
        else:
            missing = [c for c in classes if c not in set(train_classes)]
            if missing:
                raise UserError(f"--classes: class {missing[0]!r} has no directory {root / 'train' / missing[0]}")
            class_names = list(classes)
        labels, split, source = [], [], []
        for split_name in ("train", "val", "test"):
            if split_name not in dirs:
                continue
            directory = root / dirs[split_name]
            if classes is None:
                extra = sorted(set(_class_dirs(directory)) - set(class_names))
                if extra:
                    raise UserError(f"{directory / extra[0]}: class directory not in {root / 'train'}")
            bar = tqdm(class_names, desc=f"scan {dirs[split_name]}/", unit="class", leave=False,
                       disable=not (progress and sys.stderr.isatty()))
            for label, name in enumerate(bar):
                if not (directory / name).is_dir():
                    continue
                files = _images_under(directory / name, root)
                source += files
                labels += [label] * len(files)
                split += [split_name] * len(files)
        if not source:
            raise UserError(f"{root}: no image files ({', '.join(EXTENSIONS)}) under the class directories")
        split_arr = np.asarray(split, dtype=object)
        is_train = split_arr == "train"
        if not is_train.any():
            raise UserError(f"{root / 'train'}: no image files in the selected classes")
        if "val" not in dirs:
            carved = carve_val(int(is_train.sum()), fraction=float(opts["val_fraction"]), seed=seed)
            train_rows = np.nonzero(is_train)[0]
            split_arr[train_rows[carved]] = "val"
        splits = tuple(s for s in ("train", "val", "test") if (split_arr == s).any())
        meta = {"val_fraction": float(opts["val_fraction"]), "seed": int(seed), "split_dirs": dirs,
                "image_size": int(size)}
        return Scan(
            sample_id=np.arange(len(source), dtype=np.int64),
            label=np.asarray(labels, dtype=np.int32),
            split=split_arr,
            source=np.asarray(source, dtype=object),
            class_names=tuple(class_names),
            splits=splits,
            meta=meta,
        )

    def load(self, manifest: Manifest, rows: SplitRows) -> Samples:
        return Samples(kind="image", native_shape=(None, None, 3),
                       load_one=LazyImages(manifest.root, rows.source, manifest_path=str(manifest.path)))

    def default_views(self, manifest: Manifest, *, seed: int = 0) -> ViewSpec:
        size = int(manifest.meta.get("image_size", 224))
        if size == 224:
            return ViewSpec("rrc_flip_jitter", seed=seed)
        # The eval transform keeps ImageNet's ratio: resize the shorter side to 256/224 of the crop.
        return ViewSpec("rrc_flip_jitter", seed=seed, params={"size": size, "resize": round(size * 256 / 224)})

    def check_files(self, manifest: Manifest, *, contents: bool = False) -> None:
        """Every image file exists; with ``contents``, each is also read through (PIL's ``verify``:
        a truncated or corrupt PNG or JPEG is found without decoding the pixels)."""
        root = manifest.root
        sources = manifest.table.column("source").to_numpy(zero_copy_only=False)
        for row, src in enumerate(tqdm(sources, desc="check files", unit="file", leave=False,
                                       disable=len(sources) < (5_000 if contents else 50_000))):
            path = os.path.join(root, src)
            if not os.path.isfile(path):
                raise UserError(f"{manifest.path}: column 'source' row {row}: image file {path} not found (root {root})")
            if contents:
                try:
                    with Image.open(path) as image:
                        image.verify()
                except Exception as err:  # PIL raises OSError, SyntaxError, ValueError ... for a bad file
                    raise UserError(f"{manifest.path}: column 'source' row {row}: image file {path}: expected a "
                                    f"readable image, found {type(err).__name__}: {err}") from None
