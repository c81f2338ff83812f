"""Cached teacher targets in your own training loop: ``DistillLoader``.

    from pipeline.losses import ca_wkd_loss
    from pipeline.models import create_model
    from pipeline.train.loader import DistillLoader

    with DistillLoader(["caches/train/a.zarr", "caches/train/b.zarr"], "data_manifests/synthetic.parquet",
                       batch_size=128, seed=0, workers=2) as loader:
        student = create_model("mlp", num_classes=loader.num_classes, input_shape=loader.input_shape)
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
        for epoch in range(10):
            for x, y, t in loader.epoch(epoch):       # t["logits"] [K,B,C], t["entropy"] [K,B], t["p_gt"] [K,B]
                loss = ca_wkd_loss(student(x), t["logits"], y, T=4)
                opt.zero_grad(); loss.backward(); opt.step()

What ``loader.epoch(e)`` yields is what ``kdcache distill`` trains on in epoch ``e``:

- the rows: ``CachedTargets.batches(e, ...)`` (``pipeline.train.sampling``: shuffled in memory,
  block-windowed when the cache streams), this rank's share when ``rank``/``world_size`` are
  given, else those of ``torch.distributed`` when it is initialised, else all of them. Every
  rank gets disjoint rows and the same number of batches. ``epoch(e).batches`` are the row
  arrays (indices into the split, the cache's row order), in the order the items come;
- ``x``: the split's inputs in view ``e mod V`` (``view_schedule="cycle"``, the default), or with
  ``view_schedule="random"`` each row in its own view drawn per epoch from ``seed``
  (``pipeline.train.sampling.ViewSchedule``; ``epoch(e).views`` holds every row's view), decoded
  by a torch DataLoader with ``workers`` processes, or in this process with ``workers=0``
  (the same tensors either way); ``y``: the labels (int64);
- ``targets``: the mentors' fields for the same rows, each in its row's view, float32, gathered in this
  process from the in-memory or streamed cache (block reads only, never per-row Zarr reads).

The stores are checked against the manifest first (``CachedTargets.open``: class count,
content hash, sample order, completeness, agreement): a mismatch is one ``UserError``. A
streamed cache serves one epoch at a time: finish (or drop) one epoch's iterator before
starting the next. ``x``, ``y`` and the targets are on ``device`` (default the CPU).

A store of mixed views (``kdcache cache --mix``: MixUp / CutMix, ``pipeline.data.mix``): ``x`` is
each row's view mixed with its partner's, and ``targets`` also holds, per row, ``mix_partner`` (the
partner's sample id, int64), ``mix_label`` (its label, int64) and ``mix_lambda`` (float32, the weight
of the row's own label); the mixed label is ``pipeline.data.mix.mixed_labels(y, t["mix_label"],
t["mix_lambda"], loader.num_classes)``, and cross-entropy against it is ``lam * CE(y) + (1 - lam) *
CE(y_partner)``. Other stores' targets have no such keys.

A sampled store (``kdcache cache --storage sampled``) holds draws from the teacher's softmax at its
temperature ``T_s``, an unbiased KD target at ``T = T_s`` only: such stores need ``temperature=``
(your loss's T), and a loader whose temperature is not ``T_s`` is refused in one line.

A student of another resolution or normalization than the teachers (a 160 px student of a 224 px
teacher's cache): ``input_size=160`` (and ``input_mean``/``input_std``) gives ``x`` the same crop
boxes and flips as the teachers saw, resized to 160 px (``pipeline.data.views.for_model``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from pipeline.data import open_split
from pipeline.data.dataset import ViewDataset
from pipeline.data.views import ViewSpec, for_model
from pipeline.errors import UserError
from pipeline.manifest import Manifest, load_manifest
from pipeline.runtime import Runtime
from pipeline.store.reader import FIELDS
from pipeline.train.loop import iter_batches
from pipeline.train.sampling import VIEW_SCHEDULES, RankBatches, ViewSchedule
from pipeline.train.targets import CachedTargets

Item = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else those of an initialised process group, else one process."""
    if (rank is None) != (world_size is None):
        raise UserError(f"rank/world_size: expected both or neither, found rank={rank}, world_size={world_size}")
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank/world_size: expected 0 <= rank < world_size, found rank={rank}, "
                        f"world_size={world_size}")
    return int(rank), int(world_size)


class LoaderEpoch:
    """One epoch of a ``DistillLoader``: ``len`` is its batch count; iterating yields
    ``(x, y, targets)`` per batch of ``batches`` (iterating again yields the same items)."""

    def __init__(self, loader: "DistillLoader", epoch: int) -> None:
        self.epoch = int(epoch)
        self.views = loader.schedule.views(self.epoch)    # the view of every row of the split
        self.view = int(self.views[0]) if loader.schedule.one_view_per_epoch and len(self.views) else None
        self.batches: RankBatches = loader.cached.batches(self.epoch, batch_size=loader.batch_size,
                                                          seed=loader.seed, rank=loader.rank,
                                                          world_size=loader.world_size, drop_last=loader.drop_last)
        # A copy per epoch shares the decoded samples but fixes its own view, so DataLoader
        # workers (which pickle the dataset when an iteration starts) and the main process agree.
        self.dataset = copy.copy(loader.dataset)
        self.dataset.set_view(self.views)
        self._loader = loader
        loader._latest += 1
        self._token = loader._latest   # a streamed cache serves the latest epoch only

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Item]:
        loader = self._loader
        group, runtime = loader.cached.group, loader.runtime
        for x, y, rows in iter_batches(self.dataset, self.batches, runtime=runtime, workers=loader.workers):
            if group.mode == "stream" and self._token != loader._latest:
                raise UserError(f"epoch {self.epoch}: the streamed cache now serves a later loader.epoch() call; a "
                                "streamed cache serves one epoch at a time: finish an epoch's batches before asking "
                                "for the next epoch (or use cache_mode='memory')")
            targets = group.targets(self.views[rows], rows, fields=loader.fields)
            if self.dataset.views.mixed:
                targets.update(self._mixing(rows))
            yield x, y, {name: runtime.to_device(value) for name, value in targets.items()}

    def _mixing(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """``mix_partner``, ``mix_label`` and ``mix_lambda`` of ``rows`` in their views (a mixed cache)."""
        m = self.dataset.mixing(rows)
        ds = self.dataset
        return {"mix_partner": torch.from_numpy(ds.sample_ids[m.partner]),
                "mix_label": torch.from_numpy(ds.labels[m.partner].astype(np.int64)),
                "mix_lambda": torch.from_numpy(m.lam)}


class DistillLoader:
    """Inputs, labels and cached targets of K teacher stores, batch by batch; see the module docstring."""

    def __init__(self, stores: Sequence[str | Path], manifest: str | Path | Manifest, *, batch_size: int,
                 seed: int = 0, workers: int = 0, rank: int | None = None, world_size: int | None = None,
                 cache_mode: str = "auto", memory_budget_mb: int | None = None, drop_last: bool = False,
                 device: str | torch.device = "cpu", fields: Sequence[str] = FIELDS, input_size: int | None = None,
                 input_mean: Sequence[float] | None = None, input_std: Sequence[float] | None = None,
                 temperature: float | None = None, view_schedule: str = "cycle") -> None:
        if isinstance(stores, (str, Path)) or not stores:
            raise UserError(f"stores: expected a non-empty list of cache stores, found {stores!r}")
        for name, value, least in (("batch_size", batch_size, 1), ("workers", workers, 0),
                                   ("memory_budget_mb", 1 if memory_budget_mb is None else memory_budget_mb, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"{name}: expected an integer >= {least}, found {value!r}")
        if view_schedule not in VIEW_SCHEDULES:
            raise UserError(f"view_schedule: expected {' or '.join(VIEW_SCHEDULES)}, found {view_schedule!r}")
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown or not fields:
            raise UserError(f"fields: expected some of {list(FIELDS)}, found {list(fields)}")
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        self.batch_size, self.seed, self.workers, self.drop_last = batch_size, int(seed), workers, drop_last
        self.fields = tuple(fields)
        self._latest = 0   # the number of epochs asked for: only the latest may read a streamed cache
        self.cached = CachedTargets.open(list(stores), self.manifest, cache_mode=cache_mode,
                                         memory_budget_mb=memory_budget_mb, workers=workers)
        try:
            _check_sample_temperature(self.cached.group.paths, self.cached.group.layouts, temperature)
            self.spec = for_model(self.cached.view_spec, input_size=input_size, mean=input_mean, std=input_std)
            self.dataset: ViewDataset = open_split(self.manifest, self.cached.split, views=self.spec, view=0)
            self.cached.check_mixing(self.dataset)
            self.runtime = Runtime.for_model(device, tuple(self.dataset.input_shape))
            self.schedule = ViewSchedule(view_schedule, num_views=self.cached.num_views, seed=self.seed,
                                         sample_ids=self.dataset.sample_ids)
            self.cached.use_schedule(self.schedule)
        except BaseException:
            self.cached.close()
            raise

    def epoch(self, epoch: int) -> LoaderEpoch:
        """Epoch ``epoch`` (0-based): its batches, each row in its view of ``schedule.views(epoch)``."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise UserError(f"epoch: expected an integer >= 0, found {epoch!r}")
        return LoaderEpoch(self, epoch)

    @property
    def num_mentors(self) -> int:
        return self.cached.num_mentors

    @property
    def names(self) -> list[str]:
        """The teachers' names, one per store (mentor k = store k)."""
        return list(self.cached.names)

    @property
    def num_views(self) -> int:
        return self.cached.num_views

    @property
    def view_spec(self) -> ViewSpec:
        """The views ``x`` is made with: the teachers' crops and flips at this loader's input size."""
        return self.spec

    @property
    def mixed(self) -> bool:
        """Whether the cache's views are mixed (``targets`` then hold ``mix_partner``, ``mix_label``,
        ``mix_lambda``)."""
        return self.spec.mixed

    @property
    def split(self) -> str:
        return self.cached.split

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input ``x[i]`` (for ``create_model``)."""
        return tuple(self.dataset.input_shape)

    def close(self) -> None:
        """Stop any cache stream (its reading thread); the loader is not used afterwards."""
        self.cached.close()

    def __enter__(self) -> "DistillLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DistillLoader({self.num_mentors} mentors {self.names}, split={self.split!r}, "
                f"batch_size={self.batch_size}, rank {self.rank}/{self.world_size}, mode={self.cached.group.mode})")


def _check_sample_temperature(paths: Sequence[Path], layouts: Sequence, temperature: float | None) -> None:
    """A store of draws at ``T_s`` (sampled storage) gives an unbiased KD loss only at ``T = T_s``: such a
    store needs ``temperature`` (the T of the loop's loss) and it must be ``T_s``."""
    for path, layout in zip(paths, layouts):
        t_s = layout.codec.sample_temperature
        if t_s is None:
            continue
        if temperature is None:
            raise UserError(f"{path}: field storage.temperature: its targets are draws at T = {t_s:g}, right for a "
                            f"loss at that temperature only; pass temperature={t_s:g} (your loss's T) to DistillLoader")
        if float(temperature) != float(t_s):
            raise UserError(f"{path}: field storage.temperature: expected {float(temperature):g} (temperature of this "
                            f"loader), found {t_s:g} (the store's draws); cache it again with --temperature "
                            f"{float(temperature):g}, or train at T = {t_s:g}")
