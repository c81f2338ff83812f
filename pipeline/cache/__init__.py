"""The caching job: run frozen teachers over a split's views and write their stores.

    kdcache cache --teacher models/ce.pt --manifest data_manifests/synthetic.parquet --split train \\
        --views 2 --out caches/train/ce.zarr

    from pipeline.cache import CacheConfig, cache_teacher
    cache_teacher(CacheConfig(teacher="models/ce.pt", manifest="data_manifests/synthetic.parquet",
                              split="train", views=2, out="caches/train/ce.zarr"))

    config.py   CacheConfig: the settings of a caching job
    teacher.py  block computers: the frozen teacher over a split's views, block by block
    run.py      which blocks this job computes (--shard i/n, dask), then finalize

The store format itself (schema, writer, reader, verify) is ``pipeline.store``; tests drive
``write_cache`` with a fake block computer.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from pipeline.cache.config import CacheConfig
from pipeline.cache.run import parse_shard, write_cache
from pipeline.cache.teacher import TeacherFactory, default_threads
from pipeline.checkpoint import load_checkpoint
from pipeline.data import check_files, default_views, open_split
from pipeline.data.views import ViewSpec
from pipeline.errors import UserError
from pipeline.files import file_sha256, os_error_text
from pipeline.manifest import load_manifest
from pipeline.store import schema
from pipeline.store.writer import CacheResult, Provenance

__all__ = ["CacheConfig", "cache_teacher", "parse_shard", "write_cache"]


def cache_teacher(cfg: CacheConfig) -> CacheResult:
    """Run the frozen teacher ``cfg.teacher`` over ``cfg.views`` views of ``cfg.split`` and write the store ``cfg.out``.

    ``threads`` fixes torch's CPU threads while blocks are computed (default: torch's own; for
    ``local_workers`` the cores shared out), which with the fixed batches of a block makes the
    bytes independent of who computed each block. Returns what was computed and whether the
    store is complete (it is not while other shards still run). A teacher trained on another
    manifest (same class count) is a warning; an ``OSError`` while the store is written (a full
    disk, a read-only folder) is a ``UserError`` naming the path, and leaves the store incomplete.
    """
    teacher, manifest_path = Path(cfg.teacher).resolve(), Path(cfg.manifest).resolve()
    meta = load_checkpoint(teacher)["meta"]
    man = check_files(load_manifest(manifest_path))  # a missing image must stop us before the store exists
    rows = man.split(cfg.split)
    if int(meta["num_classes"]) != man.num_classes:
        raise UserError(f"{teacher}: field num_classes: expected {man.num_classes} (manifest {manifest_path}), "
                        f"found {meta['num_classes']}")
    trained_on = meta.get("manifest_sha256")
    if trained_on is not None and trained_on != man.sha256:  # as `kdcache evaluate` does: allowed, but said
        warnings.warn(f"{teacher}: field 'manifest_sha256': trained on {trained_on}, caching {manifest_path} "
                      f"({man.sha256})", stacklevel=2)
    spec = ViewSpec.from_dict(cfg.view_spec) if cfg.view_spec else default_views(man, seed=cfg.views_seed)
    shape = tuple(open_split(man, cfg.split, views=spec, view=0).input_shape)
    if tuple(meta["input_shape"]) != shape:        # before any store is created
        raise UserError(f"{teacher}: field input_shape: expected {shape} (split {cfg.split} with views {spec.kind}), "
                        f"found {tuple(meta['input_shape'])}")
    layout = schema.Layout(num_samples=len(rows.sample_id), num_classes=man.num_classes, num_views=cfg.views,
                           kind=cfg.storage, k=cfg.k, dtype=cfg.dtype, rows_per_block=cfg.rows_per_block,
                           micro_batch=cfg.micro_batch)
    provenance = Provenance(
        manifest={"path": str(manifest_path), "sha256": man.sha256, "split": cfg.split,
                  "num_samples": layout.num_samples, "num_classes": man.num_classes, "dataset": man.dataset},
        teacher={"name": cfg.name or teacher.stem, "arch": meta["arch"], "checkpoint_sha256": file_sha256(teacher),
                 "train_loss": meta.get("loss"), "path": str(teacher), "manifest_sha256": meta.get("manifest_sha256")},
        views={"count": cfg.views, "seed": spec.seed, "spec": spec.to_dict()},
    )
    factory = TeacherFactory(checkpoint=str(teacher), manifest=str(manifest_path), split=cfg.split,
                             views=json.dumps(spec.to_dict(), sort_keys=True), micro_batch=layout.micro_batch,
                             device=cfg.device, threads=cfg.threads or default_threads(cfg.local_workers),
                             workers=cfg.workers)
    try:
        return write_cache(cfg.out, factory=factory, provenance=provenance, layout=layout, sample_id=rows.sample_id,
                           label=rows.label, shard=cfg.shard, scheduler=cfg.scheduler,
                           local_workers=cfg.local_workers, overwrite=cfg.overwrite, progress=cfg.progress)
    except OSError as err:
        # A full disk, a read-only folder, a file where the store's folder should be: the store is
        # left incomplete (blocks with markers are kept), and the same command completes it later.
        raise UserError(f"{os_error_text(err, cfg.out)}; --out {cfg.out} is not complete: fix that and rerun "
                        "the same command (finished blocks are kept)") from None
