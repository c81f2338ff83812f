"""Where distillation targets come from: the cache (``Classroom``) or live teachers (``LiveTeachers``).

    from pipeline.distill_sources import open_source
    source = open_source(cfg, manifest)          # checks stores / teachers against the manifest
    source.start(runtime=rt, input_shape=shape, batch_size=128, seed=0)
    for rows in source.batches(epoch): ...       # this rank's batches of row indices
    targets = source.targets(batch, ("logits", "p_gt"))   # logits [K,B,C], entropy [K,B], p_gt [K,B], float32

Both give the same fields for the same rows and view, so one method runs on either. The checks
here are the user-facing ones of ``kdcache distill``: each store complete, built from this
manifest (class count, then content hash), the stores agreeing (the reader), and live teachers
with the manifest's class count and the dataset's input shape; each a one-line ``UserError``.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipeline.errors import UserError

FIELDS = ("logits", "entropy", "p_gt")


class LiveTeachers:
    """Teacher checkpoints run on a batch's inputs: the targets a cache would hold, computed live.

    Logits are float32 (cast after the teacher's forward, which runs under the step's autocast
    like the cache writer's); entropy and p_gt come from those logits at T = 1.
    """

    def __init__(self, checkpoints: Sequence[str | Path], *, runtime: Any) -> None:
        from pipeline.checkpoint import load_model

        self.models, self.metas = [], []
        for path in checkpoints:
            model, meta = load_model(path, device="cpu")
            model = runtime.prepare(model).eval()
            model.requires_grad_(False)
            self.models.append(model)
            self.metas.append(meta)

    @property
    def num_mentors(self) -> int:
        return len(self.models)

    @torch.no_grad()
    def targets(self, x: torch.Tensor, y: torch.Tensor, *, fields: Sequence[str] = FIELDS) -> dict[str, torch.Tensor]:
        """``{"logits": [K,B,C], "entropy": [K,B], "p_gt": [K,B]}`` (float32) for the batch ``x``, labels ``y``."""
        from pipeline.methods.kd import entropy, gt_prob

        z = torch.stack([m(x).float() for m in self.models])
        out = {"logits": z} if "logits" in fields else {}
        if "entropy" in fields:
            out["entropy"] = entropy(z)
        if "p_gt" in fields:
            out["p_gt"] = gt_prob(z, y)
        return out


class _Steps:
    """The first ``steps`` batches of a sampler (``len`` included): equal step counts on every rank."""

    def __init__(self, sampler: Any, steps: int) -> None:
        self.sampler, self.steps = sampler, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[np.ndarray]:
        return itertools.islice(iter(self.sampler), self.steps)


@dataclass
class Source:
    """The targets of one distillation run and the facts the run needs about them."""

    split: str
    views: Any                        # ViewSpec of the pixels the targets were computed on
    num_views: int
    provenance: list[dict]            # per mentor, for the student's checkpoint meta
    names: list[str]                  # per mentor, for the mentor-stats CSV
    num_samples: int
    room: Any = None                  # Classroom (offline)
    teachers: tuple[str, ...] = ()    # checkpoints (online)
    live: LiveTeachers | None = None
    runtime: Any = None
    steps_per_epoch: int = 0
    _make: Any = field(default=None, repr=False)

    @property
    def num_mentors(self) -> int:
        return len(self.provenance)

    def start(self, *, runtime: Any, input_shape: tuple[int, ...], batch_size: int, seed: int) -> None:
        """Bind to the runtime: load live teachers, fix this rank's batch sampler and step count."""
        from pipeline.store.reader import BatchSampler, memory_batch_sampler

        self.runtime = runtime
        if self.teachers:
            self.live = LiveTeachers(self.teachers, runtime=runtime)
            for path, meta in zip(self.teachers, self.live.metas):
                if tuple(meta["input_shape"]) != tuple(input_shape):
                    raise UserError(f"{path}: field input_shape: expected {tuple(input_shape)} (split {self.split} "
                                    f"with views {self.views.kind}), found {tuple(meta['input_shape'])}")
        # Online (or without mentors) the rows come in the reader's in-memory order, so a live run
        # and a cached run of one seed see the same batches.
        world = runtime.world_size

        def make(epoch: int, rank: int) -> Any:
            kw = dict(batch_size=batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world, drop_last=False,
                      view=epoch % self.num_views)
            if self.room is None:
                return memory_batch_sampler(self.num_samples, **kw)
            return BatchSampler(self.room, **kw)

        # The reader gives a rank no last batch when fewer rows than ranks are left; every DDP rank
        # must step together, so those (< world_size) rows are skipped.
        self.steps_per_epoch = min(len(make(0, r)) for r in range(world))
        self._make = make

    def batches(self, epoch: int) -> _Steps:
        """This rank's batches of row indices for ``epoch`` (view ``epoch mod V``)."""
        return _Steps(self._make(epoch, self.runtime.rank), self.steps_per_epoch)

    def targets(self, batch: Any, fields: Sequence[str]) -> dict[str, torch.Tensor]:
        """The mentors' targets for the batch's rows (cache) or inputs (live), on the runtime's device."""
        if self.live is not None:
            return self.live.targets(batch.x, batch.y, fields=fields)
        got = self.room.targets(batch.epoch % self.num_views, batch.rows, fields=fields)
        return {k: v.to(self.runtime.device, non_blocking=True) for k, v in got.items()}

    def close(self) -> None:
        if self.room is not None:
            self.room.close()


def open_source(cfg: Any, manifest: Any) -> Source:
    """The cache stores (or live teachers) of a ``DistillConfig``, checked against ``manifest``."""
    from pipeline.data import default_views

    if cfg.mentors:
        return _open_cache(cfg, manifest)
    split = cfg.train_split or "train"
    rows = manifest.split(split)
    provenance, names = [], []
    for path in cfg.teachers:
        from pipeline.checkpoint import load_checkpoint
        from pipeline.files import file_sha256

        meta = load_checkpoint(path)["meta"]
        if int(meta["num_classes"]) != manifest.num_classes:
            raise UserError(f"{path}: field num_classes: expected {manifest.num_classes} (manifest {manifest.path}), "
                            f"found {meta['num_classes']}")
        names.append(Path(path).stem)
        provenance.append({"checkpoint": str(path), "name": Path(path).stem, "arch": meta["arch"],
                           "checkpoint_sha256": file_sha256(path), "train_loss": meta.get("loss")})
    return Source(split=split, views=default_views(manifest, seed=cfg.views_seed), num_views=cfg.views or 1,
                  provenance=provenance, names=names, num_samples=len(rows.sample_id), teachers=tuple(cfg.teachers))


def _open_cache(cfg: Any, manifest: Any) -> Source:
    from pipeline.data.views import ViewSpec
    from pipeline.store.reader import Classroom
    from pipeline.store.writer import read_attrs

    for path in cfg.mentors:  # against this manifest first; completeness and agreement: the Classroom
        found = read_attrs(path)["manifest"]
        if int(found["num_classes"]) != manifest.num_classes:
            raise UserError(f"{path}: field manifest.num_classes: expected {manifest.num_classes} "
                            f"(--manifest {manifest.path}), found {found['num_classes']}")
        if found["sha256"] != manifest.sha256:
            raise UserError(f"{path}: field manifest.sha256: expected {manifest.sha256} (--manifest {manifest.path}), "
                            f"found {found['sha256']} (a cache of another manifest)")
    from pipeline.store.reader import default_memory_budget

    # Every process of a machine holds its own copy of an in-memory cache: share the default budget.
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    budget = cfg.memory_budget_mb * 2**20 if cfg.memory_budget_mb else default_memory_budget() // local_processes
    room = Classroom(list(cfg.mentors), memory_budget_bytes=budget, mode=cfg.cache_mode,
                     max_lag_batches=max(32, 2 * cfg.workers + 2))  # the DataLoader draws 2 * workers batches ahead
    try:
        split = room.split
        if cfg.train_split is not None and cfg.train_split != split:
            raise UserError(f"{cfg.mentors[0]}: field manifest.split: expected {cfg.train_split!r} (train_split), "
                            f"found {split!r}")
        if cfg.views is not None and cfg.views != room.num_views:
            raise UserError(f"{cfg.mentors[0]}: field views.count: expected {cfg.views} (views), found {room.num_views}")
        if not np.array_equal(manifest.split(split).sample_id, room.sample_ids):
            raise UserError(f"{cfg.mentors[0]}: field sample_id: expected the order of split {split!r} of "
                            f"{manifest.path}, found another")
    except UserError:
        room.close()
        raise
    provenance = [{"store": str(p), **{k: a["teacher"].get(k) for k in ("name", "arch", "checkpoint_sha256", "train_loss")}}
                  for p, a in zip(cfg.mentors, room.attrs)]
    return Source(split=split, views=ViewSpec.from_dict(room.views["spec"]), num_views=room.num_views,
                  provenance=provenance, names=[str(p["name"]) for p in provenance], num_samples=room.num_samples,
                  room=room)


def write_mentor_stats(path: str | Path, history: list[dict], *, names: Sequence[str], stats: Sequence[str]) -> None:
    """One CSV row per (epoch, mentor): the epoch means of the per-mentor stats (``train_<stat>_<k>``)."""
    from pipeline.train import write_history

    rows = [{"epoch": row["epoch"], "mentor": k, "name": name, **{s: row.get(f"train_{s}_{k}") for s in stats}}
            for row in history for k, name in enumerate(names)]
    write_history(path, rows)
