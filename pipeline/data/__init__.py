"""The data layer: dataset readers behind one interface, and deterministic views.

    from pipeline.data import build_manifest, check_files, default_views, open_split
    from pipeline.manifest import load_manifest

    build_manifest("cifar10", "data/cifar", "data_manifests/cifar10.parquet")
    m = load_manifest("data_manifests/cifar10.parquet")
    check_files(m)                                   # every file the manifest names is there
    ds = open_split(m, "train", views=default_views(m, seed=0), view=1)
    x, label, row = ds[0]

Readers (registered in ``pipeline.data.base.READERS`` by the imports below): synthetic,
fashion-mnist (IDX), cifar10 / cifar100 (python pickles), imagefolder (PIL, lazy).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

# Each import registers its reader(s).
from pipeline.data import cifar, fashion, imagefolder, synthetic  # noqa: F401
from pipeline.data.base import READERS, Scan
from pipeline.data.dataset import InMemoryViewDataset, ViewDataset
from pipeline.data.views import ViewSpec
from pipeline.errors import UserError
from pipeline.manifest import Manifest, load_manifest, make_table, read_class_list, write_manifest

__all__ = ["READERS", "ViewDataset", "ViewSpec", "build_manifest", "check_files", "default_views", "open_split"]


def default_views(manifest: Manifest, *, seed: int = 0) -> ViewSpec:
    """The dataset's standard augmentation (identity for vectors, pad-crop-flip for 28/32 px
    images, random-resized-crop + flip + jitter for ImageFolder), with its normalisation."""
    return READERS.create(manifest.dataset).default_views(manifest, seed=seed)


def open_split(manifest: Manifest, split: str, *, views: ViewSpec | None = None, view: int = 0) -> ViewDataset:
    """Split ``split`` of ``manifest`` as a dataset of view ``view`` (0 = evaluation transform).

    Small datasets load into memory here (and get ``get_batch``); ImageFolder decodes lazily.
    """
    rows = manifest.split(split)
    reader = READERS.create(manifest.dataset)
    if views is None:
        views = reader.default_views(manifest, seed=0)
    samples = reader.load(manifest, rows)
    cls = InMemoryViewDataset if samples.array is not None else ViewDataset
    return cls(samples, sample_ids=rows.sample_id, labels=rows.label, num_classes=manifest.num_classes,
               views=views, view=view, split=split, manifest_sha256=manifest.sha256)


def subset_scan(scan: Scan, subset: Mapping[str, int], *, seed: int) -> Scan:
    """``scan`` with ``subset[split]`` rows of each named split, drawn without replacement by
    ``numpy.random.default_rng(seed)`` (rows keep their order; recorded as meta ``subset``)."""
    keep = np.ones(len(scan.sample_id), dtype=bool)
    rng = np.random.default_rng(seed)
    for split, count in sorted(subset.items()):
        rows = np.flatnonzero(scan.split == split)
        if split not in scan.splits:
            raise UserError(f"subset: no split {split!r} (splits: {', '.join(scan.splits)})")
        if not isinstance(count, int) or isinstance(count, bool) or not 0 < count <= len(rows):
            raise UserError(f"subset.{split}: expected a number of rows in [1, {len(rows)}], found {count!r}")
        keep[rows] = False
        keep[np.sort(rng.choice(rows, size=count, replace=False))] = True
    return replace(scan, sample_id=scan.sample_id[keep], label=scan.label[keep], split=scan.split[keep],
                   source=scan.source[keep], meta={**scan.meta, "subset": dict(sorted(subset.items()))})


def check_files(manifest: Manifest, *, contents: bool = False) -> Manifest:
    """Check that every data file ``manifest`` names exists (and is unchanged); returns it.

    A ``UserError`` naming the first missing file (``kdcache manifest check`` and ``kdcache cache``
    run it, so a missing image stops them before anything is written). ``contents`` (``manifest check``):
    also read every image through, so a truncated one is found before a long job meets it."""
    READERS.create(manifest.dataset).check_files(manifest, contents=contents)
    return manifest


def build_manifest(
    dataset: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    classes: str | os.PathLike | Sequence[str] | None = None,
    seed: int = 0,
    subset: Mapping[str, int] | None = None,
    progress: bool = False,
    **options: Any,
) -> Manifest:
    """Scan ``root`` with the reader registered as ``dataset``, write ``out``, return it loaded.

    ``classes``: a class-list file or a list of names; restricts to those classes, in that order.
    ``subset``: ``{split: n}`` keeps a random ``n`` rows of that split (``subset_scan``), for a
    shorter experiment on a real dataset. ``options`` go to the reader (e.g. ``val_fraction``;
    synthetic: ``num_samples``, ``dim``, ``num_classes``, ``sigma2``); unknown ones are a ``UserError``.
    """
    reader = READERS.create(dataset)
    if classes is not None and not isinstance(classes, (list, tuple)):
        classes = read_class_list(classes)
    scan = reader.scan(Path(root), classes=classes, seed=seed, progress=progress, **options)
    if subset:
        scan = subset_scan(scan, subset, seed=seed)
    table = make_table(sample_id=scan.sample_id, label=scan.label, split=scan.split, source=scan.source)
    write_manifest(out, table, dataset=dataset, class_names=scan.class_names, root=root, meta=scan.meta,
                   splits=scan.splits)
    return load_manifest(out)
