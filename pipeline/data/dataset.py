"""``ViewDataset``: one split of a manifest as a torch Dataset of one view.

    from pipeline.data import open_split
    ds = open_split(manifest, "train", view=3)     # default views of the dataset
    x, label, row = ds[0]                          # float32 tensor, int, row index in the split
    ds.set_view(4)                                 # next epoch (affects workers created afterwards)
    x, y = ds.get_batch(np.array([0, 5, 9]))       # fast path, only on in-memory data

Row ``i`` is the i-th row of the split in manifest order, i.e. row ``i`` of a cache of that
split. Each item is a pure function of (views spec, sample_id, view): DataLoader workers,
batch order and separate processes all produce the same tensors. Views with augmentations recorded
under another torchvision are refused (``pipeline.data.augment.check_replay``): their pixels may differ.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.augment import check_replay
from pipeline.data.base import Samples
from pipeline.data.views import ViewSpec, apply_view, batch_view, output_shape
from pipeline.errors import UserError


class ViewDataset(Dataset):
    """One split, one view: ``ds[i] -> (x float32, label, i)``."""

    def __init__(self, samples: Samples, *, sample_ids: np.ndarray, labels: np.ndarray, num_classes: int,
                 views: ViewSpec, view: int = 0, split: str = "", manifest_sha256: str = ""):
        if samples.kind == "vector" and views.kind != "identity":
            raise UserError(f"views field 'kind': {views.kind!r} is for images; vector data takes 'identity'")
        if samples.kind == "image" and views.kind == "identity":
            raise UserError("views field 'kind': 'identity' is for vectors; images take 'pad_crop_flip' or 'rrc_flip_jitter'")
        check_replay(views.params)
        self.samples = samples
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.num_classes = int(num_classes)
        self.views = views
        self.split = split
        self.manifest_sha256 = manifest_sha256
        self.input_shape = output_shape(views, samples.native_shape)
        if None in self.input_shape:
            raise UserError(f"views field 'params.size': images of this dataset vary in size; "
                            f"{views.kind!r} needs an explicit size")
        self._view = 0
        self.set_view(view)

    @property
    def view(self) -> int:
        return self._view

    @view.setter
    def view(self, v: int) -> None:
        self.set_view(v)

    def set_view(self, v: int) -> None:
        if int(v) < 0:
            raise UserError(f"view index must be >= 0, found {v}")
        self._view = int(v)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = int(i)
        x = apply_view(self.views, self.samples.get(i), sample_id=int(self.sample_ids[i]), view=self._view)
        return x, int(self.labels[i]), i

    def __repr__(self) -> str:
        return (f"ViewDataset(split={self.split!r}, n={len(self)}, input_shape={self.input_shape}, "
                f"views={self.views.kind!r}, view={self.view})")


class InMemoryViewDataset(ViewDataset):
    """A ``ViewDataset`` whose samples are one array in memory: adds the ``get_batch`` fast path.

    Lazily decoded datasets do not have ``get_batch``, so callers that test for it keep
    decoding in DataLoader workers.
    """

    def get_batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [B, ...] float32, y [B] int64): equal to stacking ``ds[i][0]`` for i in rows."""
        rows = np.asarray(rows, dtype=np.int64)
        y = torch.from_numpy(self.labels[rows].astype(np.int64))
        x = batch_view(self.views, self.samples.array[rows], sample_ids=self.sample_ids[rows], view=self._view)
        return x, y
