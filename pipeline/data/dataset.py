"""``ViewDataset``: one split of a manifest as a torch Dataset of one view.

    from pipeline.data import open_split
    ds = open_split(manifest, "train", view=3)     # default views of the dataset
    x, label, row = ds[0]                          # float32 tensor, int, row index in the split
    ds.set_view(4)                                 # next epoch (affects workers created afterwards)
    ds.set_view(np.array([...]))                   # or a view per row (len(ds) of them)
    x, y = ds.get_batch(np.array([0, 5, 9]))       # fast path, only on in-memory data
    x = ds.batch_of(rows, [ds.samples.get(i) for i in rows])   # a batch of samples decoded by the caller

Row ``i`` is the i-th row of the split in manifest order, i.e. row ``i`` of a cache of that
split. Each item is a pure function of (views spec, sample_id, view): DataLoader workers,
batch order and separate processes all produce the same tensors. Views >= 1 with augmentations
recorded under another torchvision are refused (``pipeline.data.augment.check_replay``): their
pixels may differ. View 0 (evaluation) has none, so it is always served.

A spec that mixes views (MixUp / CutMix, ``pipeline.data.mix``) mixes each row's view ``v >= 1``
with its partner row's view ``v``: items and batches are the mixed images, and ``mixing(rows)`` says
with whom and how much (``mixed_targets`` gives the partner labels and lambdas a loss weighs).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.augment import check_replay
from pipeline.data.base import Samples
from pipeline.data.mix import Mixing, mix_batch
from pipeline.data.views import ViewSpec, apply_view, batch_view, output_shape, view_mixing
from pipeline.errors import UserError


class ViewDataset(Dataset):
    """One split, one view: ``ds[i] -> (x float32, label, i)``."""

    def __init__(self, samples: Samples, *, sample_ids: np.ndarray, labels: np.ndarray, num_classes: int,
                 views: ViewSpec, view: int = 0, split: str = "", manifest_sha256: str = ""):
        if samples.kind == "vector" and views.kind != "identity":
            raise UserError(f"views field 'kind': {views.kind!r} is for images; vector data takes 'identity'")
        if samples.kind == "image" and views.kind == "identity":
            raise UserError("views field 'kind': 'identity' is for vectors; images take 'pad_crop_flip' or 'rrc_flip_jitter'")
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
        self._row_views: np.ndarray | None = None
        self.set_view(view)

    @property
    def view(self) -> int | None:
        """The view of every row, or None when rows take views of their own (``row_views``)."""
        return self._view if self._row_views is None else None

    @property
    def row_views(self) -> np.ndarray:
        """The view of each row (int64 [len(self)])."""
        return np.full(len(self), self._view, dtype=np.int64) if self._row_views is None else self._row_views

    @view.setter
    def view(self, v: int) -> None:
        self.set_view(v)

    def set_view(self, v: int | np.ndarray) -> None:
        """One view for every row, or an array of one view per row (all equal: the same as one view)."""
        if np.ndim(v) == 1:
            views = np.asarray(v, dtype=np.int64)
            if len(views) != len(self.sample_ids):
                raise UserError(f"views per row: expected {len(self.sample_ids)}, found {len(views)}")
            if len(views) and views.min() < 0:
                raise UserError(f"view index must be >= 0, found {views.min()}")
            if len(views) and views.max() > 0:
                check_replay(self.views.params)
            if len(views) == 0 or (views == views[0]).all():
                self._view, self._row_views = int(views[0]) if len(views) else 0, None
            else:
                self._row_views = views
            return
        if int(v) < 0:
            raise UserError(f"view index must be >= 0, found {v}")
        if int(v) > 0:
            check_replay(self.views.params)
        self._view, self._row_views = int(v), None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = int(i)
        view = self._view if self._row_views is None else int(self._row_views[i])
        x = apply_view(self.views, self.samples.get(i), sample_id=int(self.sample_ids[i]), view=view)
        return self.mixed_item(x, i, view), int(self.labels[i]), i

    def mixing(self, rows: np.ndarray, views: np.ndarray | None = None) -> Mixing:
        """The mixing of ``rows`` in their views (``views``, default each row's own): partner rows,
        effective lambdas and CutMix boxes (``pipeline.data.mix``); unmixed specs: each row itself, 1."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        views = self.row_views[rows] if views is None else np.broadcast_to(np.asarray(views, np.int64), rows.shape)
        out = Mixing.unmixed(rows)
        for v in np.unique(views) if self.views.mixed else []:
            at = np.nonzero(views == v)[0]
            part = view_mixing(self.views, self.sample_ids[rows[at]], rows[at], view=int(v), num_rows=len(self),
                               size=self.input_shape[-2:])
            out.partner[at], out.lam[at], out.cut[at], out.box[at] = part.partner, part.lam, part.cut, part.box
        return out

    def mixed_targets(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(partner label [B] int64, lambda [B] float32) of ``rows`` in their views: the mixed label of
        a row is ``lam * onehot(label) + (1 - lam) * onehot(partner label)``."""
        m = self.mixing(rows)
        return torch.from_numpy(self.labels[m.partner].astype(np.int64)), torch.from_numpy(m.lam)

    def mixed_item(self, x: torch.Tensor, i: int, view: int) -> torch.Tensor:
        """Row ``i``'s unmixed view ``x`` mixed with its partner's view (the partner decoded here);
        ``x`` itself when the spec does not mix or the view is unmixed."""
        if view == 0 or not self.views.mixed:
            return x
        m = self.mixing(np.array([i]), np.array([view]))
        j = int(m.partner[0])
        if j == i:
            return x
        other = apply_view(self.views, self.samples.get(j), sample_id=int(self.sample_ids[j]), view=view)
        return mix_batch(x[None], other[None], m)[0]

    def batch_of(self, rows: np.ndarray, raw: list) -> torch.Tensor:
        """The inputs of ``rows`` in this dataset's view, equal to stacking ``self[i][0]``, from their raw
        samples ``raw`` (decoded by the caller, who may share them with datasets of other views): made a
        batch at a time (``batch_view``); a mixed view decodes the partners outside ``rows``."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        view = self._view
        if self._row_views is not None:
            raise UserError("batch_of: this dataset takes a view per row; set one view for every row")
        x = batch_view(self.views, raw, sample_ids=self.sample_ids[rows], view=view)
        if view == 0 or not self.views.mixed:
            return x
        m = self.mixing(rows)
        at = np.nonzero(m.partner != rows)[0]   # a row that is its own partner stays as it is, as in mixed_item
        if len(at) == 0:
            return x
        known = {int(row): sample for row, sample in zip(rows, raw)}
        partners = m.partner[at]
        partner_raw = [known[int(j)] if int(j) in known else self.samples.get(int(j)) for j in partners]
        partner_x = batch_view(self.views, partner_raw, sample_ids=self.sample_ids[partners], view=view)
        out = x.clone()
        out[torch.from_numpy(at)] = mix_batch(x[torch.from_numpy(at)], partner_x,
                                              Mixing(partners, m.lam[at], m.cut[at], m.box[at]))
        return out

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
        x = self._unmixed_batch(rows)
        if self.views.mixed and self.row_views[rows].max(initial=0) > 0:
            m = self.mixing(rows)
            x = mix_batch(x, self._unmixed_batch(m.partner, self.row_views[rows]), m)
        return x, y

    def _unmixed_batch(self, rows: np.ndarray, views: np.ndarray | None = None) -> torch.Tensor:
        """The unmixed views of ``rows`` (``views``: one per row, default each row's own)."""
        if views is None and self._row_views is None:
            return batch_view(self.views, self.samples.array[rows], sample_ids=self.sample_ids[rows], view=self._view)
        views = self.row_views[rows] if views is None else views
        parts = {int(v): np.nonzero(views == v)[0] for v in np.unique(views)}
        made = {v: batch_view(self.views, self.samples.array[rows[at]], sample_ids=self.sample_ids[rows[at]], view=v)
                for v, at in parts.items()}
        x = torch.empty((len(rows), *next(iter(made.values())).shape[1:]), dtype=torch.float32)
        for v, at in parts.items():
            x[torch.from_numpy(at)] = made[v]
        return x
