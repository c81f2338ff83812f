"""Where a student's targets come from, behind one protocol: cache stores or live teachers.

    targets = CachedTargets.open(stores, manifest)                 # offline: the stores, checked
    targets = LiveTargets([teacher_source("models/ce.pt")], manifest, runtime=rt, ...)   # online: teachers per batch
    for rows in targets.batches(epoch, batch_size=128, seed=0): ...    # this rank's rows of the epoch
    t = targets.targets(batch, ("logits", "p_gt"))    # logits [K,B,C], entropy [K,B], p_gt [K,B], float32

Both give the same fields for the same rows and view, and the same batches for one seed (the
in-memory order of ``pipeline.train.sampling``, key ``(seed, epoch, view)``; a streamed cache
shuffles by blocks instead), so one method runs on either and an online run equals a float32
cache run. Row ``i`` of epoch ``e`` uses view ``targets.schedule.views(e)[i]``
(``pipeline.train.sampling.ViewSchedule``; by default ``cycle``: view ``e mod num_views``); set
another with ``use_schedule``. A streamed cache serves one view per epoch, so it takes ``cycle`` only.

The checks here are the user-facing ones of ``kdcache distill``: each store built from this
manifest (class count, then content hash), complete and agreeing with the others (the store
reader), its split and views those asked for; live teachers (any ``kdcache cache --teacher``:
a checkpoint, an arch name with weights, ``timm:NAME``, ``module:function``, built and checked by
``pipeline.teachers.check_teacher``) with the manifest's class count and the dataset's input shape.
Each is a one-line ``UserError``. A store whose teacher checkpoint changed on disk after caching
is a warning (``pipeline.store.provenance``). After a non-finite loss, ``nonfinite(view, ...)``
names the mentor and rows whose targets are NaN/Inf, if any.

Each mentor's ``provenance`` (the student checkpoint's meta ``mentors``) holds its name, source
(checkpoint | arch | callable), arch, weights sha256, train loss and preprocessing (mean, std,
input shape); a store written before stores recorded source and preprocessing gives None for them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
import zarr

from pipeline.data.views import ViewSpec
from pipeline.errors import UserError
from pipeline.manifest import Manifest
from pipeline.methods.kd import entropy, gt_prob
from pipeline.runtime import Runtime
from pipeline.store.provenance import changed_teachers
from pipeline.store.reader import FIELDS, StoreGroup, default_memory_budget
from pipeline.store.schema import read_attrs
from pipeline.teachers import TeacherSource, check_teacher
from pipeline.train.loop import Batch, iter_batches
from pipeline.train.sampling import RankBatches, ViewSchedule, permutation, windowed_permutation


class Targets(Protocol):
    """What the student task needs from a source of targets."""

    split: str                  # the split the targets cover
    view_spec: ViewSpec         # the views the targets were computed on
    num_views: int
    provenance: list[dict]      # per mentor, for the student's checkpoint meta
    names: list[str]            # per mentor, for the mentor-stats CSV
    schedule: ViewSchedule      # the view of each row per epoch (default: cycle)

    @property
    def num_mentors(self) -> int: ...

    def use_schedule(self, schedule: ViewSchedule) -> None:
        """Rows take their views from ``schedule`` (a one-line ``UserError`` where it cannot serve it)."""

    def batches(self, epoch: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> RankBatches:
        """This rank's batches of row indices for ``epoch``."""

    def targets(self, batch: Batch, fields: Sequence[str]) -> dict[str, torch.Tensor]:
        """The mentors' ``fields`` for the batch (float32; on the CPU or the batch's device)."""

    def nonfinite(self, view: int, *, dataset: Any, batches: Callable[[], Iterable[np.ndarray]],
                  runtime: Runtime) -> str | None:
        """After a non-finite loss: a line naming the mentor and rows whose targets of ``view`` are
        NaN/Inf, or None when they are all finite (then the student itself diverged)."""

    def close(self) -> None: ...


PROVENANCE = ("name", "source", "arch", "checkpoint_sha256", "train_loss", "preprocessing")   # per mentor


def _rows_text(rows: Sequence[int]) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:10])
    return f"[{shown}{', ...' if len(rows) > 10 else ''}]" + (f" ({len(rows)} rows)" if len(rows) > 10 else "")


def _bad_kind(values: np.ndarray | torch.Tensor) -> str:
    return "NaN" if bool(np.isnan(np.asarray(values, dtype=np.float64)).any()) else "Inf"


def _memory_batches(num_rows: int, epoch: int, num_views: int, *, batch_size: int, seed: int, rank: int,
                    world_size: int, drop_last: bool) -> RankBatches:
    order = permutation(num_rows, key=(seed, epoch, epoch % num_views))
    return RankBatches(order, batch_size=batch_size, rank=rank, world_size=world_size, drop_last=drop_last)


class CachedTargets:
    """Targets of K cache stores (a ``StoreGroup``), mentor k = the k-th store (0 = the teacher)."""

    def __init__(self, stores: Sequence[str | Path], *, memory_budget_bytes: int | None = None, mode: str = "auto",
                 window_blocks: int | None = None, max_lag_batches: int = 32) -> None:
        self.group = StoreGroup(stores, memory_budget_bytes=memory_budget_bytes, mode=mode,
                                window_blocks=window_blocks, max_lag_batches=max_lag_batches)
        self.split = self.group.split
        self.view_spec = ViewSpec.from_dict(self.group.views["spec"])
        self.num_views = self.group.num_views
        self.provenance = [{"store": str(p), **{k: a["teacher"].get(k) for k in PROVENANCE}}
                           for p, a in zip(self.group.paths, self.group.attrs)]
        self.names = [str(p["name"]) for p in self.provenance]
        self.schedule = ViewSchedule("cycle", num_views=self.num_views, seed=0,
                                     sample_ids=np.arange(self.group.num_samples))

    def use_schedule(self, schedule: ViewSchedule) -> None:
        """Rows take their views from ``schedule`` from now on (a streamed cache: one view per epoch only)."""
        if self.group.mode == "stream" and not schedule.one_view_per_epoch:
            raise UserError(f"view_schedule: {schedule.kind!r} gives the rows of an epoch several views and the "
                            f"cache streams (one view at a time); expected cycle, or the cache in memory "
                            f"(cache_mode memory, a larger memory_budget_mb), found {schedule.kind!r}")
        self.schedule = schedule

    @classmethod
    def open(cls, stores: Sequence[str | Path], manifest: Manifest, *, train_split: str | None = None,
             views: int | None = None, cache_mode: str = "auto", memory_budget_mb: int | None = None,
             workers: int = 0) -> "CachedTargets":
        """The stores of a distillation run, checked against ``manifest`` (and ``train_split``/``views``
        when given). The default memory budget is a quarter of RAM shared by the local DDP processes,
        each of which holds its own copy of an in-memory cache."""
        for path in stores:  # against this manifest first; completeness and agreement: the StoreGroup
            attrs = read_attrs(path)
            for line in changed_teachers(attrs, store=path):
                warnings.warn(line, stacklevel=2)
            found = attrs["manifest"]
            if int(found["num_classes"]) != manifest.num_classes:
                raise UserError(f"{path}: field manifest.num_classes: expected {manifest.num_classes} "
                                f"(--manifest {manifest.path}), found {found['num_classes']}")
            if found["sha256"] != manifest.sha256:
                raise UserError(f"{path}: field manifest.sha256: expected {manifest.sha256} "
                                f"(--manifest {manifest.path}), found {found['sha256']} (a cache of another manifest)")
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        budget = memory_budget_mb * 2**20 if memory_budget_mb else default_memory_budget() // local_processes
        # A DataLoader draws up to 2 * workers batches ahead of the step: the stream must allow that lag.
        out = cls(stores, memory_budget_bytes=budget, mode=cache_mode, max_lag_batches=max(32, 2 * workers + 2))
        try:
            if train_split is not None and train_split != out.split:
                raise UserError(f"{stores[0]}: field manifest.split: expected {train_split!r} (train_split), "
                                f"found {out.split!r}")
            if views is not None and views != out.num_views:
                raise UserError(f"{stores[0]}: field views.count: expected {views} (views), found {out.num_views}")
            if not np.array_equal(manifest.split(out.split).sample_id, out.group.sample_ids):
                raise UserError(f"{stores[0]}: field sample_id: expected the order of split {out.split!r} of "
                                f"{manifest.path}, found another")
        except UserError:
            out.close()
            raise
        return out

    @property
    def num_mentors(self) -> int:
        return self.group.num_mentors

    def batches(self, epoch: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> RankBatches:
        """In memory: the shuffled order of ``pipeline.train.sampling``; streaming: its block-windowed
        order, each window loaded (ahead, on a thread) before its first batch is served."""
        group, view = self.group, int(self.schedule.views(epoch)[0]) if self.group.num_samples else 0
        if group.mode == "memory":
            return _memory_batches(group.num_samples, epoch, self.num_views, batch_size=batch_size, seed=seed,
                                   rank=rank, world_size=world_size, drop_last=drop_last)
        layout = group.layouts[0]
        order, windows = windowed_permutation(layout.num_blocks, layout.block_rows,
                                              width=group.window_width(batch_size * world_size),
                                              key=(seed, epoch, view))
        return RankBatches(order, batch_size=batch_size, rank=rank, world_size=world_size, drop_last=drop_last,
                           start=lambda: group.stream(view, windows).ensure_position)

    def targets(self, batch: Batch, fields: Sequence[str] = FIELDS) -> dict[str, torch.Tensor]:
        return self.group.targets(self.schedule.views(batch.epoch)[batch.rows], batch.rows, fields=fields)

    def check_mixing(self, dataset: Any) -> None:
        """A mixed cache's partners and lambdas are those ``dataset`` (the split in the students' views)
        mixes its inputs with, view by view; a one-line ``UserError`` naming the first view that differs
        (its views were then cut at another size, or replay otherwise)."""
        if not self.view_spec.mixed:
            return
        rows = np.arange(len(dataset))
        for path, layout in zip(self.group.paths, self.group.layouts):
            group = zarr.open_group(str(path), mode="r")
            for view in range(layout.num_views):
                m = dataset.mixing(rows, np.full(len(rows), view))
                if not (np.array_equal(group["mix_partner"][view], dataset.sample_ids[m.partner])
                        and np.array_equal(group["mix_lambda"][view], m.lam)):
                    raise UserError(f"{path}: field mix_partner/mix_lambda: expected the partners and lambdas the "
                                    f"students' views mix with, found others in view {view} (the students' inputs "
                                    "would not be the images the teacher answered)")

    def nonfinite(self, view: int, *, dataset: Any = None, batches: Any = None, runtime: Any = None) -> str | None:
        """The first store whose stored floats of ``view`` hold NaN/Inf, and the rows (read block by
        block: only after a non-finite loss, never per step)."""
        for path, layout in zip(self.group.paths, self.group.layouts):
            group = zarr.open_group(str(path), mode="r")
            for name in layout.block_arrays():
                array = group[name]
                if array.dtype.kind != "f":
                    continue
                rows: list[int] = []
                kind = "Inf"
                for block in range(layout.num_blocks):
                    start, stop = layout.block_rows(block)
                    values = np.asarray(array[view, start:stop]).reshape(stop - start, -1)
                    bad = ~np.isfinite(values).all(axis=1)
                    if bad.any():
                        rows += (start + np.flatnonzero(bad)).tolist()
                        kind = "NaN" if kind == "NaN" or _bad_kind(values[bad]) == "NaN" else kind
                if rows:
                    return f"{path}: field {name}: expected finite values, found {kind} in rows {_rows_text(rows)} " \
                           f"of view {view}"
        return None

    def close(self) -> None:
        self.group.close()


class LiveTargets:
    """Teachers run on each batch's inputs: the targets a cache would hold, computed live.

    ``teachers`` are ``pipeline.teachers.TeacherSource`` (``teacher_source(...)``: what ``kdcache
    cache --teacher`` takes), built by ``check_teacher``. They run under the step's autocast (the
    precision policy of ``pipeline.runtime``, as the cache writer's do); logits are cast to
    float32, entropy and p_gt come from them at T = 1. With no teachers it only gives the
    batches (a student without mentors)."""

    def __init__(self, teachers: Sequence[TeacherSource], manifest: Manifest, *, runtime: Runtime, split: str,
                 view_spec: ViewSpec, num_views: int, input_shape: tuple[int, ...]) -> None:
        self.split, self.view_spec, self.num_views = split, view_spec, num_views
        self.num_samples = len(manifest.split(split).sample_id)
        self.models: list[torch.nn.Module] = []
        self.provenance: list[dict] = []
        shape = tuple(int(s) for s in input_shape)
        for source in teachers:
            teacher = check_teacher(source, manifest=manifest, input_shape=shape, split=split, views=view_spec,
                                    build=True)
            self.provenance.append({"checkpoint": source.weights_file,
                                    **teacher.provenance(views=view_spec, input_shape=shape)})
            model = runtime.prepare(teacher.model).eval()
            model.requires_grad_(False)
            self.models.append(model)
        self.names = [p["name"] for p in self.provenance]
        self.schedule = ViewSchedule("cycle", num_views=num_views, seed=0, sample_ids=np.arange(self.num_samples))

    def use_schedule(self, schedule: ViewSchedule) -> None:
        """Rows take their views from ``schedule`` (the teachers run on whatever view each input is in)."""
        self.schedule = schedule

    @property
    def num_mentors(self) -> int:
        return len(self.models)

    def batches(self, epoch: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> RankBatches:
        return _memory_batches(self.num_samples, epoch, self.num_views, batch_size=batch_size, seed=seed,
                               rank=rank, world_size=world_size, drop_last=drop_last)

    @torch.no_grad()
    def nonfinite(self, view: int, *, dataset: Any, batches: Callable[[], Iterable[np.ndarray]],
                  runtime: Runtime) -> str | None:
        """Run the teachers over the epoch's batches again until one gives NaN/Inf logits: that
        teacher's checkpoint and the rows (only after a non-finite loss, never per step)."""
        for x, _, rows in iter_batches(dataset, batches(), runtime=runtime):
            with runtime.autocast():
                outputs = [m(x).float() for m in self.models]
            for meta, z in zip(self.provenance, outputs):
                bad = ~torch.isfinite(z).all(dim=1)
                if bool(bad.any()):
                    found = sorted(rows[bad.cpu().numpy()].tolist())
                    return f"{meta['checkpoint'] or meta['arch']}: field logits: expected finite values, found " \
                           f"{_bad_kind(z[bad].cpu())} in rows {_rows_text(found)} of view {view}"
        return None

    @torch.no_grad()
    def targets(self, batch: Batch, fields: Sequence[str] = FIELDS) -> dict[str, torch.Tensor]:
        z = torch.stack([m(batch.x).float() for m in self.models])
        out: dict[str, Any] = {"logits": z} if "logits" in fields else {}
        if "entropy" in fields:
            out["entropy"] = entropy(z)
        if "p_gt" in fields:   # mixed views: the probability of the mixed label, as a mixed store holds
            out["p_gt"] = gt_prob(z, batch.y) if batch.mixed is None else (z.softmax(-1) * batch.mixed).sum(-1)
        return out

    def close(self) -> None:
        pass
