"""The caching job: run frozen teachers over a split's views and write their stores.

    kdcache cache --teacher models/ce.pt --manifest data_manifests/synthetic.parquet --split train \\
        --views 2 --out caches/train/ce.zarr

    from pipeline.cache import CacheConfig, cache_teacher
    cache_teacher(CacheConfig(teacher="models/ce.pt", manifest="data_manifests/synthetic.parquet",
                              split="train", views=2, out="caches/train/ce.zarr"))

A classroom in one pass: the views are decoded and augmented once and every teacher runs on them;
each store is byte for byte what caching its teacher alone writes (resumable, shardable, claimed
per store the same way):

    kdcache cache --teacher models/ce.pt --teacher models/mse.pt --out-dir caches/train ...   # caches/train/ce.zarr, mse.zarr
    kdcache cache --teacher models/ce.pt models/mse.pt --out caches/a.zarr caches/b.zarr ...  # one --out per teacher

    from pipeline.cache import cache_teachers, classroom_configs
    cache_teachers(classroom_configs(["models/ce.pt", "models/mse.pt"], out_dir="caches/train",
                                     manifest="data_manifests/synthetic.parquet", views=2))

``cache_teachers`` takes one ``CacheConfig`` per teacher; they differ only in ``teacher``,
``weights``, ``name``, ``out`` and ``view_spec`` (every other setting is one for all). Teachers
with the same views (``view_spec``: resolution and normalization) share their inputs; teachers
with other views get theirs from the same decoded images.

Three forms of teacher (``--teacher``, ``CacheConfig.teacher``):

    kdcache cache --teacher models/ce.pt ...                               # a kdcache checkpoint
    kdcache cache --teacher resnet18 --weights weights/r18.pt ...          # an arch name + a weights file
    kdcache cache --teacher timm:resnet50 --weights weights/r50.pt ...     # timm (pip install 'kdcache[timm]')
    kdcache cache --teacher my_models:build_teacher [--weights w.pt] ...   # your code, like a torch.hub entry point

An arch name is kdcache's own (``pipeline.models.MODELS``), any torchvision classification model
(``torchvision:NAME`` to insist on torchvision's), or ``timm:NAME``; it is built untrained (no
download) with the manifest's class count, and ``--weights`` must fit it key for key and shape
for shape (a head trained for another class count is refused naming ``num_classes``).
``module:function`` is imported from ``sys.path`` or the current folder and called with no
arguments; it must return an ``nn.Module``, and the same weights every call (dask workers and
shard jobs rebuild it). Weights files are read as data only: ``torch.load(weights_only=True)``
(or a ``.safetensors`` file with the safetensors package), a bare state_dict or a dict holding
one under ``state_dict`` or ``model``; a file that would need arbitrary unpickling (a pickled
whole model) is refused, never run. Only ``module:function`` runs code of yours. The store's
``teacher`` section records ``source`` (checkpoint | arch | callable), ``arch`` (the name or
``module:function``), ``checkpoint_sha256`` (of the weights file; for a callable without weights,
of its state_dict's tensors in key order) and ``preprocessing``; reopening a store with another
teacher is refused.

The views replay geometry, not preprocessing: what a store fixes per sample and view is the crop
box and the flip (a pure function of the view spec, the sample id and the view index), and a
student trained from the store replays exactly those. The resolution and the normalization are a
property of each model: the teacher saw the split's view 0 input shape and the view spec's mean
and std, and both are recorded in the store's ``teacher.preprocessing`` (``mean``, ``std``,
``input_shape``), so a teacher that expects other inputs (another resolution, ImageNet statistics)
is cached with a view spec giving them (``CacheConfig.view_spec``).

    config.py   CacheConfig: the settings of a caching job
    teacher.py  block computers: the frozen teacher over a split's views, block by block
    classroom.py  several teachers over one pass of the views (the images decoded once)
    run.py      which blocks this job computes (--shard i/n, dask), then finalize

The store format itself (schema, writer, reader, verify) is ``pipeline.store``; tests drive
``write_cache`` with a fake block computer.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Sequence

from pipeline.cache.classroom import ClassroomFactory
from pipeline.cache.config import CacheConfig
from pipeline.cache.run import OneStore, StoreTarget, parse_shard, write_cache, write_caches
from pipeline.cache.teacher import TeacherFactory, default_threads
from pipeline.checkpoint import load_checkpoint
from pipeline.data import check_files, default_views, open_split
from pipeline.data.views import ViewSpec
from pipeline.errors import UserError
from pipeline.files import file_sha256, os_error_text
from pipeline.manifest import Manifest, load_manifest
from pipeline.models import TeacherSpec, load_teacher, state_sha256, teacher_spec
from pipeline.store import schema
from pipeline.store.provenance import path_for_store
from pipeline.store.writer import CacheResult, Provenance

__all__ = ["CacheConfig", "cache_teacher", "cache_teachers", "classroom_configs", "parse_shard", "store_paths",
           "teacher_name", "write_cache", "write_caches"]

PER_TEACHER = ("teacher", "weights", "name", "out", "view_spec")   # the CacheConfig fields teachers of a pass may differ in


def teacher_name(spec: TeacherSpec) -> str:
    """A teacher's default name: its checkpoint's or weights file's stem, else its function's name."""
    if spec.source == "checkpoint":
        return Path(spec.name).stem
    if spec.weights is not None:
        return Path(spec.weights).stem
    return spec.name.rpartition(":")[2].rpartition(".")[2]


def _read_teacher(cfg: CacheConfig) -> tuple[TeacherSpec, dict]:
    spec = teacher_spec(cfg.teacher, cfg.weights)
    return spec, load_checkpoint(Path(spec.name))["meta"] if spec.source == "checkpoint" else {}


def _open_manifest(cfg: CacheConfig) -> tuple[Path, Manifest]:
    manifest_path = Path(cfg.manifest).resolve()
    return manifest_path, check_files(load_manifest(manifest_path))  # a missing image must stop us before any store exists


def _prepare(cfg: CacheConfig, spec: TeacherSpec, meta: dict, manifest_path: Path,
             man: Manifest) -> tuple[StoreTarget, TeacherFactory]:
    """Check the teacher against the manifest and the views; the store it writes and its block computer's factory."""
    teacher = Path(spec.name)
    rows = man.split(cfg.split)
    if spec.source == "checkpoint" and int(meta["num_classes"]) != man.num_classes:
        raise UserError(f"{teacher}: field num_classes: expected {man.num_classes} (manifest {manifest_path}), "
                        f"found {meta['num_classes']}")
    trained_on = meta.get("manifest_sha256")
    if trained_on is not None and trained_on != man.sha256:  # as `kdcache evaluate` does: allowed, but said
        warnings.warn(f"{teacher}: field 'manifest_sha256': trained on {trained_on}, caching {manifest_path} "
                      f"({man.sha256})", stacklevel=3)
    views = ViewSpec.from_dict(cfg.view_spec) if cfg.view_spec else default_views(man, seed=cfg.views_seed)
    shape = tuple(open_split(man, cfg.split, views=views, view=0).input_shape)
    state_digest = None
    if spec.source == "checkpoint":
        if tuple(meta["input_shape"]) != shape:        # before any store is created
            raise UserError(f"{teacher}: field input_shape: expected {shape} (split {cfg.split} with views "
                            f"{views.kind}), found {tuple(meta['input_shape'])}")
        arch, weights_path, digest = meta["arch"], str(teacher), file_sha256(teacher)
    else:
        # Built here once, before any store exists: weights that do not fit, a callable returning no
        # module, a wrong class count are refused now, not in a worker.
        model, meta = load_teacher(spec, num_classes=man.num_classes, input_shape=shape)
        arch, weights_path = spec.name, spec.weights
        if weights_path is not None:
            digest = file_sha256(weights_path)
        else:
            digest = state_digest = state_sha256(model)
            again = state_sha256(load_teacher(spec, num_classes=man.num_classes, input_shape=shape)[0])
            if again != digest:  # workers rebuild it: an unseeded random init would cache another teacher's logits
                raise UserError(f"--teacher {spec.name}: expected the same weights every call (workers and shard "
                                f"jobs rebuild it), found two calls giving state_dict sha256 {digest[:12]} and "
                                f"{again[:12]}; load trained weights in it, or pass --weights")
        del model
    layout = schema.Layout(num_samples=len(rows.sample_id), num_classes=man.num_classes, num_views=cfg.views,
                           kind=cfg.storage, k=cfg.k, dtype=cfg.dtype, rows_per_block=cfg.rows_per_block,
                           micro_batch=cfg.micro_batch, temperature=cfg.temperature)
    provenance = Provenance(
        manifest={"path": path_for_store(manifest_path, cfg.out), "sha256": man.sha256, "split": cfg.split,
                  "num_samples": layout.num_samples, "num_classes": man.num_classes, "dataset": man.dataset},
        teacher={"name": cfg.name or teacher_name(spec), "source": spec.source, "arch": arch,
                 "checkpoint_sha256": digest, "train_loss": meta.get("loss"),
                 "path": path_for_store(weights_path, cfg.out) if weights_path else None,
                 "manifest_sha256": meta.get("manifest_sha256"),
                 "preprocessing": {"mean": views.params.get("mean"), "std": views.params.get("std"),
                                   "input_shape": list(shape)}},
        views={"count": cfg.views, "seed": views.seed, "spec": views.to_dict()},
    )
    factory = TeacherFactory(teacher=spec.name, manifest=str(manifest_path), split=cfg.split,
                             views=json.dumps(views.to_dict(), sort_keys=True), micro_batch=layout.micro_batch,
                             device=cfg.device, threads=cfg.threads or default_threads(cfg.local_workers),
                             workers=cfg.workers, source=spec.source, weights=spec.weights,
                             state_sha256=state_digest)
    target = StoreTarget(Path(cfg.out), provenance, layout, rows.sample_id, rows.label)
    return target, factory


def _run(cfg: CacheConfig, targets: list[StoreTarget], factory: Any) -> list[CacheResult]:
    """``write_caches`` with ``cfg``'s run settings; an ``OSError`` is a ``UserError`` naming the path."""
    try:
        return write_caches(targets, factory=factory, shard=cfg.shard, scheduler=cfg.scheduler,
                            local_workers=cfg.local_workers, overwrite=cfg.overwrite, progress=cfg.progress)
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
    spec, meta = _read_teacher(cfg)
    manifest_path, man = _open_manifest(cfg)
    target, factory = _prepare(cfg, spec, meta, manifest_path, man)
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
    seen: dict[Path, str] = {}
    for cfg in configs:
        key = Path(cfg.out).resolve()
        if key in seen:
            raise UserError(f"--out {cfg.out}: expected one store per teacher, found it for --teacher {seen[key]} "
                            f"and --teacher {cfg.teacher}")
        seen[key] = cfg.teacher


def cache_teachers(configs: Sequence[CacheConfig]) -> list[CacheResult]:
    """Cache several teachers over one pass of the views: one result per config, in order.

    Each block's images are decoded and augmented once (once per distinct view spec) and every
    teacher whose store misses the block runs on them; each store is exactly what
    ``cache_teacher`` writes for its config alone. The configs differ only in ``PER_TEACHER``
    fields; every teacher is checked, and every store created, before any block is computed.
    """
    configs = list(configs)
    if not configs:
        raise UserError("--teacher: expected at least one teacher, found none")
    if len(configs) == 1:
        return [cache_teacher(configs[0])]
    _check_pass(configs)
    teachers = [_read_teacher(cfg) for cfg in configs]
    manifest_path, man = _open_manifest(configs[0])
    jobs = [_prepare(cfg, spec, meta, manifest_path, man) for cfg, (spec, meta) in zip(configs, teachers)]
    return _run(configs[0], [target for target, _ in jobs], ClassroomFactory(tuple(f for _, f in jobs)))


def store_paths(out_dir: str | Path, teachers: Sequence[str], weights: Sequence[str | None] = ()) -> list[str]:
    """``<out_dir>/<teacher_name>.zarr`` per teacher; two teachers of one name are refused."""
    named: dict[str, str] = {}
    paths = []
    for teacher, w in zip(teachers, list(weights) or [None] * len(teachers)):
        name = teacher_name(teacher_spec(teacher, w))
        if name in named:
            raise UserError(f"--out-dir {out_dir}: expected one store name per teacher, found {name!r} for "
                            f"--teacher {named[name]} and --teacher {teacher}; give one --out per teacher instead")
        named[name] = teacher
        paths.append(str(Path(out_dir) / f"{name}.zarr"))
    return paths


def _each(flag: str, values: Sequence[Any], teachers: int) -> list[Any]:
    if not values:
        return [None] * teachers
    if len(values) != teachers:
        raise UserError(f"{flag}: expected none or one per teacher ({teachers} teachers), found {len(values)}; "
                        f"give one {flag} per --teacher, in the same order")
    return list(values)


def classroom_configs(teachers: Sequence[str], *, out: Sequence[str] = (), out_dir: str | None = None,
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
