"""The caching job: run frozen teachers over a split's views and write their stores.

    kdcache cache --teacher models/ce.pt --manifest data_manifests/synthetic.parquet --split train \\
        --views 2 --out caches/train/ce.zarr

    from pipeline.cache import cache_teacher
    cache_teacher(teacher="models/ce.pt", manifest="data_manifests/synthetic.parquet",
                  split="train", views=2, out="caches/train/ce.zarr")

    teacher.py  block computers: the frozen teacher over a split's views, block by block
    run.py      which blocks this job computes (--shard i/n, dask), then finalize

The store format itself (schema, writer, reader, verify) is ``pipeline.store``; tests drive
``write_cache`` with a fake block computer.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cache.run import parse_shard, write_cache
from pipeline.cache.teacher import TeacherFactory, default_threads
from pipeline.checkpoint import load_checkpoint
from pipeline.data import check_files, default_views, open_split
from pipeline.data.views import ViewSpec
from pipeline.errors import UserError
from pipeline.files import file_sha256
from pipeline.manifest import load_manifest
from pipeline.store import schema
from pipeline.store.writer import CacheResult, Provenance

__all__ = ["cache_teacher", "parse_shard", "write_cache"]


def cache_teacher(*, teacher: str | Path, manifest: str | Path, split: str, views: int, out: str | Path,
                  dtype: str = "float16", storage: str = "dense", k: int | None = None,
                  rows_per_block: int | None = None, micro_batch: int = schema.DEFAULT_MICRO_BATCH,
                  shard: str | tuple[int, int] | None = None, scheduler: str | None = None,
                  local_workers: int | None = None, overwrite: bool = False, device: str = "auto",
                  threads: int | None = None, workers: int = 0, view_seed: int = 0,
                  view_spec: dict | None = None, name: str | None = None, progress: bool = True) -> CacheResult:
    """Run the frozen teacher ``teacher`` over ``views`` views of ``split`` and write the store ``out``.

    ``view_spec`` (a ``ViewSpec.to_dict()``) defaults to the dataset's standard views with seed
    ``view_seed``. ``threads`` fixes torch's CPU threads while blocks are computed (default: torch's own; for
    ``local_workers`` the cores shared out), which with the fixed batches of a block makes the
    bytes independent of who computed each block. Returns what was computed and whether the
    store is complete (it is not while other shards still run).
    """
    teacher, manifest_path = Path(teacher).resolve(), Path(manifest).resolve()
    meta = load_checkpoint(teacher)["meta"]
    man = check_files(load_manifest(manifest_path))  # a missing image must stop us before the store exists
    rows = man.split(split)
    if int(meta["num_classes"]) != man.num_classes:
        raise UserError(f"{teacher}: field num_classes: expected {man.num_classes} (manifest {manifest_path}), "
                        f"found {meta['num_classes']}")
    if int(views) < 1:
        raise UserError(f"--views: expected a positive number of views, found {views}")
    spec = ViewSpec.from_dict(view_spec) if view_spec else default_views(man, seed=view_seed)
    shape = tuple(open_split(man, split, views=spec, view=0).input_shape)
    if tuple(meta["input_shape"]) != shape:        # before any store is created
        raise UserError(f"{teacher}: field input_shape: expected {shape} (split {split} with views {spec.kind}), "
                        f"found {tuple(meta['input_shape'])}")
    layout = schema.Layout(num_samples=len(rows.sample_id), num_classes=man.num_classes, num_views=int(views),
                           kind=storage, k=k, dtype=dtype, rows_per_block=rows_per_block, micro_batch=micro_batch)
    provenance = Provenance(
        manifest={"path": str(manifest_path), "sha256": man.sha256, "split": split, "num_samples": layout.num_samples,
                  "num_classes": man.num_classes, "dataset": man.dataset},
        teacher={"name": name or teacher.stem, "arch": meta["arch"], "checkpoint_sha256": file_sha256(teacher),
                 "train_loss": meta.get("loss"), "path": str(teacher), "manifest_sha256": meta.get("manifest_sha256")},
        views={"count": int(views), "seed": spec.seed, "spec": spec.to_dict()},
    )
    factory = TeacherFactory(checkpoint=str(teacher), manifest=str(manifest_path), split=split,
                             views=json.dumps(spec.to_dict(), sort_keys=True), micro_batch=layout.micro_batch,
                             device=device, threads=threads or default_threads(local_workers),
                             workers=workers)
    return write_cache(out, factory=factory, provenance=provenance, layout=layout, sample_id=rows.sample_id,
                       label=rows.label, shard=shard, scheduler=scheduler, local_workers=local_workers,
                       overwrite=overwrite, progress=progress)
