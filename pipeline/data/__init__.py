"""The data layer: dataset readers behind one interface, and deterministic views.

    from pipeline.manifest import load_manifest
    from pipeline.data import open_split, default_views

    m = load_manifest("data_manifests/cifar10.parquet")
    ds = open_split(m, "train", views=default_views(m, seed=0), view=1)
    x, label, row = ds[0]

Readers (registered in ``pipeline.data.base.READERS`` by the imports below): synthetic,
fashion-mnist (IDX), cifar10 / cifar100 (python pickles), imagefolder (PIL, lazy).
"""

from __future__ import annotations

# Each import registers its reader(s).
from pipeline.data import cifar, fashion, imagefolder, synthetic  # noqa: F401
from pipeline.data.base import READERS
from pipeline.data.dataset import InMemoryViewDataset, ViewDataset
from pipeline.data.views import ViewSpec
from pipeline.manifest import Manifest

__all__ = ["READERS", "ViewDataset", "ViewSpec", "default_views", "open_split"]


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
