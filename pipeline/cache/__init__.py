"""The caching job: run frozen teachers over a split's views and write their stores.

    kdcache cache --teacher models/ce.pt --manifest data_manifests/synthetic.parquet --split train \\
        --views 2 --out caches/train/ce.zarr

    from pipeline.cache import CacheConfig, cache_teacher
    cache_teacher(CacheConfig(teacher="models/ce.pt", manifest="data_manifests/synthetic.parquet",
                              split="train", views=2, out="caches/train/ce.zarr"))

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
from pipeline.models import load_teacher, state_sha256, teacher_spec
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
    manifest_path = Path(cfg.manifest).resolve()
    spec = teacher_spec(cfg.teacher, cfg.weights)
    meta: dict = {}
    if spec.source == "checkpoint":
        teacher = Path(spec.name)
        meta = load_checkpoint(teacher)["meta"]
    man = check_files(load_manifest(manifest_path))  # a missing image must stop us before the store exists
    rows = man.split(cfg.split)
    if spec.source == "checkpoint" and int(meta["num_classes"]) != man.num_classes:
        raise UserError(f"{teacher}: field num_classes: expected {man.num_classes} (manifest {manifest_path}), "
                        f"found {meta['num_classes']}")
    trained_on = meta.get("manifest_sha256")
    if trained_on is not None and trained_on != man.sha256:  # as `kdcache evaluate` does: allowed, but said
        warnings.warn(f"{teacher}: field 'manifest_sha256': trained on {trained_on}, caching {manifest_path} "
                      f"({man.sha256})", stacklevel=2)
    views = ViewSpec.from_dict(cfg.view_spec) if cfg.view_spec else default_views(man, seed=cfg.views_seed)
    shape = tuple(open_split(man, cfg.split, views=views, view=0).input_shape)
    state_digest = None
    if spec.source == "checkpoint":
        if tuple(meta["input_shape"]) != shape:        # before any store is created
            raise UserError(f"{teacher}: field input_shape: expected {shape} (split {cfg.split} with views "
                            f"{views.kind}), found {tuple(meta['input_shape'])}")
        arch, weights_path, digest, default_name = meta["arch"], str(teacher), file_sha256(teacher), teacher.stem
    else:
        # Built here once, before any store exists: weights that do not fit, a callable returning no
        # module, a wrong class count are refused now, not in a worker.
        model, meta = load_teacher(spec, num_classes=man.num_classes, input_shape=shape)
        arch, weights_path = spec.name, spec.weights
        if weights_path is not None:
            digest, default_name = file_sha256(weights_path), Path(weights_path).stem
        else:
            digest = state_digest = state_sha256(model)
            again = state_sha256(load_teacher(spec, num_classes=man.num_classes, input_shape=shape)[0])
            if again != digest:  # workers rebuild it: an unseeded random init would cache another teacher's logits
                raise UserError(f"--teacher {spec.name}: expected the same weights every call (workers and shard "
                                f"jobs rebuild it), found two calls giving state_dict sha256 {digest[:12]} and "
                                f"{again[:12]}; load trained weights in it, or pass --weights")
            default_name = spec.name.rpartition(":")[2].rpartition(".")[2]
        del model
    layout = schema.Layout(num_samples=len(rows.sample_id), num_classes=man.num_classes, num_views=cfg.views,
                           kind=cfg.storage, k=cfg.k, dtype=cfg.dtype, rows_per_block=cfg.rows_per_block,
                           micro_batch=cfg.micro_batch)
    provenance = Provenance(
        manifest={"path": str(manifest_path), "sha256": man.sha256, "split": cfg.split,
                  "num_samples": layout.num_samples, "num_classes": man.num_classes, "dataset": man.dataset},
        teacher={"name": cfg.name or default_name, "source": spec.source, "arch": arch, "checkpoint_sha256": digest,
                 "train_loss": meta.get("loss"), "path": weights_path, "manifest_sha256": meta.get("manifest_sha256"),
                 "preprocessing": {"mean": views.params.get("mean"), "std": views.params.get("std"),
                                   "input_shape": list(shape)}},
        views={"count": cfg.views, "seed": views.seed, "spec": views.to_dict()},
    )
    factory = TeacherFactory(teacher=spec.name, manifest=str(manifest_path), split=cfg.split,
                             views=json.dumps(views.to_dict(), sort_keys=True), micro_batch=layout.micro_batch,
                             device=cfg.device, threads=cfg.threads or default_threads(cfg.local_workers),
                             workers=cfg.workers, source=spec.source, weights=spec.weights,
                             state_sha256=state_digest)
    try:
        return write_cache(cfg.out, factory=factory, provenance=provenance, layout=layout, sample_id=rows.sample_id,
                           label=rows.label, shard=cfg.shard, scheduler=cfg.scheduler,
                           local_workers=cfg.local_workers, overwrite=cfg.overwrite, progress=cfg.progress)
    except OSError as err:
        # A full disk, a read-only folder, a file where the store's folder should be: the store is
        # left incomplete (blocks with markers are kept), and the same command completes it later.
        raise UserError(f"{os_error_text(err, cfg.out)}; --out {cfg.out} is not complete: fix that and rerun "
                        "the same command (finished blocks are kept)") from None
