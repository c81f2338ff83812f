"""The caching job: check each teacher against the manifest, create its store, compute its blocks.

    from pipeline.cache.job import cache_teacher, cache_teachers, one_pass_configs
    cache_teacher(CacheConfig(teacher="models/ce.pt", manifest="data_manifests/synthetic.parquet",
                              split="train", views=2, out="caches/train/ce.zarr"))
    cache_teachers(one_pass_configs(["models/ce.pt", "models/mse.pt"], out_dir="caches/train",
                                    manifest="data_manifests/synthetic.parquet", views=2))

Every teacher is read by ``pipeline.teachers`` (its source parsed once, checked against the
manifest's class count and the split's input shape, its provenance and name); this module turns
the checked teachers into store targets and block-computer factories and runs them
(``pipeline.cache.run``). The package docstring (``pipeline.cache``) says what a store holds.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

from pipeline.cache.config import CacheConfig
from pipeline.cache.one_pass import OnePassFactory
from pipeline.cache.run import OneStore, StoreTarget, write_caches
from pipeline.cache.teacher import TeacherFactory, default_threads
from pipeline.data import check_files, default_views, open_split
from pipeline.data.views import ViewSpec, with_view_options
from pipeline.errors import UserError
from pipeline.files import os_error_text
from pipeline.manifest import Manifest, load_manifest
from pipeline.runtime import resolve_device
from pipeline.store import schema
from pipeline.store.location import child, is_url, store_path
from pipeline.store.provenance import path_for_store
from pipeline.store.writer import CacheResult, Provenance
from pipeline.teachers import TeacherSource, check_teacher, teacher_name, teacher_source

PER_TEACHER = ("teacher", "weights", "name", "out", "view_spec")   # the CacheConfig fields teachers of a pass may differ in


def _check_device(cfg: CacheConfig) -> None:
    """The device of a job computed on this machine (not one sent to a ``--scheduler``'s workers) exists."""
    if cfg.scheduler is None:
        resolve_device(cfg.device)


def _open_manifest(cfg: CacheConfig) -> tuple[Path, Manifest]:
    manifest_path = Path(cfg.manifest).resolve()
    return manifest_path, check_files(load_manifest(manifest_path))  # a missing image must stop us before any store exists


def _prepare(cfg: CacheConfig, source: TeacherSource, manifest_path: Path,
             man: Manifest) -> tuple[StoreTarget, TeacherFactory]:
    """Check the teacher against the manifest and the views; the store it writes and its block computer's factory."""
    rows = man.split(cfg.split)
    views = ViewSpec.from_dict(cfg.view_spec) if cfg.view_spec else default_views(man, seed=cfg.views_seed)
    views = with_view_options(views, cfg)
    shape = tuple(open_split(man, cfg.split, views=views, view=0).input_shape)
    # Checked here once, before any store exists: weights that do not fit, a callable returning no
    # module or other weights every call, a wrong class count are refused now, not in a worker.
    teacher = check_teacher(source, manifest=man, input_shape=shape, split=cfg.split, views=views,
                            same_every_call=True)
    trained_on = teacher.meta.get("manifest_sha256")
    if trained_on is not None and trained_on != man.sha256:  # as `kdcache evaluate` does: allowed, but said
        warnings.warn(f"{source.spec}: field 'manifest_sha256': trained on {trained_on}, caching {manifest_path} "
                      f"({man.sha256})", stacklevel=3)
    layout = schema.Layout(num_samples=len(rows.sample_id), num_classes=man.num_classes, num_views=cfg.views,
                           kind=cfg.storage, k=cfg.k, dtype=cfg.dtype, rows_per_block=cfg.rows_per_block,
                           micro_batch=cfg.micro_batch, temperature=cfg.temperature, mixed=views.mixed)
    weights = source.weights_file
    provenance = Provenance(
        manifest={"path": path_for_store(manifest_path, cfg.out), "sha256": man.sha256, "split": cfg.split,
                  "num_samples": layout.num_samples, "num_classes": man.num_classes, "dataset": man.dataset},
        teacher=teacher.provenance(views=views, input_shape=shape, name=cfg.name,
                                   path=path_for_store(weights, cfg.out) if weights else None,
                                   manifest_sha256=trained_on),
        views={"count": cfg.views, "seed": views.seed, "spec": views.to_dict()},
    )
    factory = TeacherFactory(teacher=source, manifest=str(manifest_path), split=cfg.split,
                             views=json.dumps(views.to_dict(), sort_keys=True), micro_batch=layout.micro_batch,
                             device=cfg.device, threads=cfg.threads or default_threads(cfg.local_workers),
                             workers=cfg.workers, state_sha256=teacher.sha256 if weights is None else None)
    target = StoreTarget(store_path(cfg.out), provenance, layout, rows.sample_id, rows.label)
    return target, factory


def _run(cfg: CacheConfig, targets: list[StoreTarget], factory: Any) -> list[CacheResult]:
    """``write_caches`` with ``cfg``'s run settings; an ``OSError`` is a ``UserError`` naming the path."""
    try:
        return write_caches(targets, factory=factory, shard=cfg.shard, scheduler=cfg.scheduler,
                            local_workers=cfg.local_workers, overwrite=cfg.overwrite, progress=cfg.progress,
                            ship=cfg.ship_inputs, data_root=cfg.worker_data_root)
    except OSError as err:
        # A full disk, a read-only folder, a file where the store's folder should be: the stores are
        # left incomplete (blocks with markers are kept), and the same command completes them later.
        outs = " ".join(f"--out {target.out}" for target in targets)
        raise UserError(f"{os_error_text(err, targets[0].out)}; {outs} {'is' if len(targets) == 1 else 'are'} not "
                        "complete: fix that and rerun the same command (finished blocks are kept)") from None


def cache_teacher(cfg: CacheConfig) -> CacheResult:
    """Run the frozen teacher ``cfg.teacher`` over ``cfg.views`` views of ``cfg.split`` and write the store ``cfg.out``.

    ``threads`` fixes torch's CPU threads while blocks are computed (default: torch's own; for
    ``local_workers`` the cores shared out), which with the fixed batches of a block makes the
    bytes independent of who computed each block. Returns what was computed and whether the
    store is complete (it is not while other shards still run). A teacher trained on another
    manifest (same class count) is a warning; an ``OSError`` while the store is written (a full
    disk, a read-only folder) is a ``UserError`` naming the path, and leaves the store incomplete.
    """
    _check_device(cfg)
    source = teacher_source(cfg.teacher, cfg.weights)
    manifest_path, man = _open_manifest(cfg)
    target, factory = _prepare(cfg, source, manifest_path, man)
    return _run(cfg, [target], OneStore(factory))[0]


def _check_pass(configs: Sequence[CacheConfig]) -> None:
    """One setting for every teacher (but ``PER_TEACHER``), and one store per teacher."""
    first = configs[0]
    for field in dataclasses.fields(CacheConfig):
        if field.name in PER_TEACHER:
            continue
        for cfg in configs[1:]:
            if getattr(cfg, field.name) != getattr(first, field.name):
                raise UserError(f"{field.name}: expected one setting for every teacher of a pass, found "
                                f"{getattr(first, field.name)!r} (--teacher {first.teacher}) and "
                                f"{getattr(cfg, field.name)!r} (--teacher {cfg.teacher})")
    seen: dict[Path | str, str] = {}
    for cfg in configs:
        key = cfg.out if is_url(cfg.out) else Path(cfg.out).resolve()
        if key in seen:
            raise UserError(f"--out {cfg.out}: expected one store per teacher, found it for --teacher {seen[key]} "
                            f"and --teacher {cfg.teacher}")
        seen[key] = cfg.teacher


def cache_teachers(configs: Sequence[CacheConfig]) -> list[CacheResult]:
    """Cache several teachers over one pass of the views: one result per config, in order.

    Each block's images are decoded and augmented once (once per distinct view spec) and every
    teacher whose store misses the block runs on them; each store is exactly what
    ``cache_teacher`` writes for its config alone. The configs differ only in ``PER_TEACHER``
    fields; the device, every teacher and every store are checked before the first store is
    created, and every store is created before any block is computed.
    """
    configs = list(configs)
    if not configs:
        raise UserError("--teacher: expected at least one teacher, found none")
    if len(configs) == 1:
        return [cache_teacher(configs[0])]
    _check_pass(configs)
    _check_device(configs[0])
    sources = [teacher_source(cfg.teacher, cfg.weights) for cfg in configs]
    manifest_path, man = _open_manifest(configs[0])
    jobs = [_prepare(cfg, source, manifest_path, man) for cfg, source in zip(configs, sources)]
    return _run(configs[0], [target for target, _ in jobs], OnePassFactory(tuple(f for _, f in jobs)))


def store_paths(out_dir: str | Path, teachers: Sequence[str], weights: Sequence[str | None] = ()) -> list[str]:
    """``<out_dir>/<teacher_name>.zarr`` per teacher; two teachers of one name are refused."""
    named: dict[str, str] = {}
    paths = []
    for teacher, w in zip(teachers, list(weights) or [None] * len(teachers)):
        name = teacher_name(teacher_source(teacher, w))
        if name in named:
            raise UserError(f"--out-dir {out_dir}: expected one store name per teacher, found {name!r} for "
                            f"--teacher {named[name]} and --teacher {teacher}; give one --out per teacher instead")
        named[name] = teacher
        paths.append(child(out_dir, f"{name}.zarr"))
    return paths


def _each(flag: str, values: Sequence[Any], teachers: int) -> list[Any]:
    if not values:
        return [None] * teachers
    if len(values) != teachers:
        raise UserError(f"{flag}: expected none or one per teacher ({teachers} teachers), found {len(values)}; "
                        f"give one {flag} per --teacher, in the same order")
    return list(values)


def one_pass_configs(teachers: Sequence[str], *, out: Sequence[str] = (), out_dir: str | None = None,
                     weights: Sequence[str] = (), names: Sequence[str] = (), **settings: Any) -> list[CacheConfig]:
    """The configs of ``kdcache cache --teacher T ...``: one store per teacher, either ``out``
    (one per teacher, in order) or ``out_dir`` (``store_paths``); ``weights`` and ``names`` none
    or one per teacher; ``settings`` (the other ``CacheConfig`` fields) are every teacher's."""
    if not teachers:
        raise UserError("--teacher: expected at least one teacher, found none")
    if out and out_dir:
        raise UserError(f"--out/--out-dir: expected one of them, found both (--out-dir {out_dir})")
    weights_each = _each("--weights", weights, len(teachers))
    if out_dir:
        out = store_paths(out_dir, teachers, weights_each)
    elif len(out) != len(teachers):
        raise UserError(f"--out: expected one store per --teacher ({len(teachers)}), found {len(out)}"
                        + ("" if out else "; or give --out-dir DIR"))
    return [CacheConfig(teacher=t, weights=w, name=n, out=o, **settings)
            for t, w, n, o in zip(teachers, weights_each, _each("--name", names, len(teachers)), out)]
