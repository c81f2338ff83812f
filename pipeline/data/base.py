"""The dataset-reader interface and the registry every reader joins.

A reader does two things: ``scan`` a dataset root into manifest rows (at ``manifest build``
time), and ``load`` the samples of one split of a manifest (at training / caching time).

    from pipeline.data.base import READERS
    READERS.names()          # ['cifar10', 'cifar100', 'fashion-mnist', 'imagefolder', 'synthetic']

Readers register themselves in their modules, imported by ``pipeline/data/__init__.py``.
Shared helpers live here: the deterministic val split carved from train, class restriction,
and file hashes recorded in the manifest meta so a changed data file is caught at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np

from pipeline.errors import UserError
from pipeline.files import file_sha256
from pipeline.registry import Registry

if TYPE_CHECKING:
    from pipeline.data.views import ViewSpec
    from pipeline.manifest import Manifest, SplitRows

READERS: Registry["Reader"] = Registry("dataset")


DEFAULT_VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Scan:
    """What a reader found under a root: the manifest's columns and metadata."""

    sample_id: np.ndarray
    label: np.ndarray
    split: np.ndarray  # object (str)
    source: np.ndarray  # object (str)
    class_names: tuple[str, ...]
    splits: tuple[str, ...]
    meta: dict


@dataclass
class Samples:
    """The raw samples of one split, indexed by position in the split (manifest order).

    ``array`` holds everything in memory (uint8 images [N, H, W(, 3)] or float32 vectors [N, d]);
    otherwise ``load_one(i)`` decodes sample ``i`` lazily (a PIL image).
    """

    kind: str  # "vector" | "image"
    native_shape: tuple[int, ...]  # (d,) or (H, W, C) with C = 1 or 3; None entries = varies
    array: np.ndarray | None = None
    load_one: Callable[[int], Any] | None = None

    def get(self, i: int) -> Any:
        return self.array[i] if self.array is not None else self.load_one(i)


class Reader:
    """Base class: subclasses set ``name``/``options`` and implement ``scan``, ``load``, ``default_views``."""

    name: ClassVar[str] = ""
    # Reader-specific options with their defaults; anything else is a user error.
    options: ClassVar[dict[str, Any]] = {}

    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise UserError(f"dataset {self.name!r}: unknown option {unknown[0]!r}; expected one of: {known}")
        return {**self.options, **given}

    def scan(self, root: Path, *, classes: Sequence[str] | None, seed: int, progress: bool = False,
             **options: Any) -> Scan:
        raise NotImplementedError

    def load(self, manifest: "Manifest", rows: "SplitRows") -> Samples:
        raise NotImplementedError

    def default_views(self, manifest: "Manifest", *, seed: int = 0) -> "ViewSpec":
        raise NotImplementedError

    def check_files(self, manifest: "Manifest", *, contents: bool = False) -> None:
        """Every data file the manifest needs exists (and is unchanged where its hash is recorded);
        ``contents``: also read each file through where that is not already implied (image files)."""
        check_recorded_files(manifest)


def record_files(root: Path, names: Sequence[str]) -> dict[str, str]:
    """{relative name: sha256} for the container files a manifest depends on."""
    return {name: file_sha256(root / name) for name in names}


def check_recorded_files(manifest: "Manifest", names: Sequence[str] | None = None) -> None:
    """UserError if a file listed in ``meta['files']`` is missing or its content changed."""
    files: dict[str, str] = manifest.meta.get("files", {})
    for name in names if names is not None else sorted(files):
        path = Path(manifest.root) / name
        if not path.is_file():
            raise UserError(f"{manifest.path}: data file {path} not found (field 'source', root {manifest.root})")
        if name in files and file_sha256(path) != files[name]:
            raise UserError(
                f"{manifest.path}: data file {path} changed since the manifest was built (meta 'files' sha256); "
                "rebuild the manifest"
            )


def carve_val(num_train: int, *, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask [num_train]: True for the rows moved from train to val.

    A pure function of (num_train, fraction, seed): ``round(fraction * num_train)`` rows chosen
    by a permutation from ``numpy.random.default_rng([seed, 0x7641])`` (the constant keeps this
    stream apart from other uses of the same seed).
    """
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"option 'val_fraction': expected a number in [0, 1), found {fraction}")
    n_val = int(round(fraction * num_train))
    mask = np.zeros(num_train, dtype=bool)
    if n_val:
        perm = np.random.default_rng([seed, 0x7641]).permutation(num_train)
        mask[perm[:n_val]] = True
    return mask


def restrict_classes(
    class_names: Sequence[str], labels: np.ndarray, *, wanted: Sequence[str] | None, what: str
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(new class names, new labels, keep mask): only the ``wanted`` classes, in that order."""
    if wanted is None:
        return tuple(class_names), labels.astype(np.int32), np.ones(len(labels), dtype=bool)
    index = {name: i for i, name in enumerate(class_names)}
    missing = [w for w in wanted if w not in index]
    if missing:
        raise UserError(f"--classes: class {missing[0]!r} is not in {what} (known: {', '.join(class_names)})")
    remap = np.full(len(class_names), -1, dtype=np.int64)
    for new, name in enumerate(wanted):
        remap[index[name]] = new
    new_labels = remap[labels]
    keep = new_labels >= 0
    return tuple(wanted), new_labels.astype(np.int32), keep


def split_train_val_test(
    *, train_labels: np.ndarray, test_labels: np.ndarray, train_source: Sequence[str], test_source: Sequence[str],
    test_id_offset: int, class_names: Sequence[str], classes: Sequence[str] | None, seed: int,
    val_fraction: float, what: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """Rows for datasets that ship train + test: val carved from train by seed.

    sample_id = index in the official train set, or ``test_id_offset`` + index in the test set,
    so ids do not depend on the class restriction or on the val split.
    Returns (sample_id, label, split, source, class_names, splits).
    """
    n_train, n_test = len(train_labels), len(test_labels)
    ids = np.concatenate([np.arange(n_train), test_id_offset + np.arange(n_test)]).astype(np.int64)
    labels = np.concatenate([train_labels, test_labels]).astype(np.int64)
    split = np.empty(n_train + n_test, dtype=object)
    split[:n_train] = "train"
    split[:n_train][carve_val(n_train, fraction=val_fraction, seed=seed)] = "val"
    split[n_train:] = "test"
    source = np.asarray(list(train_source) + list(test_source), dtype=object)
    names, labels, keep = restrict_classes(class_names, labels, wanted=classes, what=what)
    splits = tuple(s for s in ("train", "val", "test") if (split[keep] == s).any())
    return ids[keep], labels[keep], split[keep], source[keep], names, splits


def parse_container_sources(manifest: "Manifest", rows: "SplitRows") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Group ``file#index`` sources: {file: (positions in the split, indices in the file)}."""
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for pos, src in enumerate(rows.source):
        name, sep, idx = str(src).rpartition("#")
        if not sep or not idx.isdigit():
            raise UserError(f"{manifest.path}: column 'source' row value {src!r}: expected 'FILE#INDEX'")
        g = groups.setdefault(name, ([], []))
        g[0].append(pos)
        g[1].append(int(idx))
    return {name: (np.asarray(p, dtype=np.int64), np.asarray(i, dtype=np.int64)) for name, (p, i) in groups.items()}


def load_container_images(manifest: Manifest, rows: SplitRows, *, read: Callable[[Path], np.ndarray]) -> np.ndarray:
    """Images of ``rows`` gathered from their container files (``FILE#INDEX`` sources).

    ``read(path)`` returns all images of one file; each file is checked against the sha256
    recorded in the manifest before use.
    """
    out: np.ndarray | None = None
    for name, (positions, indices) in parse_container_sources(manifest, rows).items():
        check_recorded_files(manifest, [name])
        images = read(Path(manifest.root) / name)
        if indices.max() >= len(images):
            raise UserError(f"{manifest.path}: column 'source' index {indices.max()} is past the end of {name} "
                            f"({len(images)} images)")
        if out is None:
            out = np.empty((len(rows), *images.shape[1:]), dtype=np.uint8)
        out[positions] = images[indices]
    assert out is not None  # a split always has rows (Manifest.split guarantees it)
    return out
