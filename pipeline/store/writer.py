"""Create or reopen a cache store and write it block by block: resumable, one owner per block.

    from pipeline.store.writer import cache_teacher
    cache_teacher(teacher="models/ce.pt", manifest="data_manifests/synthetic.parquet",
                  split="train", views=2, out="caches/train/ce.zarr")

``kdcache cache`` and the DVC stage call ``cache_teacher``; tests call ``write_cache`` with a fake
block computer. The rules (DESIGN.md, "The cache store"):

- Metadata and the sample_id/label arrays are created once, atomically (built in a temporary
  directory, then renamed into place), so concurrent ``--shard i/n`` jobs can all start at once.
  Reopening with other provenance is a ``UserError`` naming the field.
- A (view, block) is written by one owner, whole: its chunk of every array, then its ``done``
  marker. A rerun computes only the blocks without a marker; a block's batches are fixed by the
  layout, so the bytes do not depend on who computed it or when.
- ``finalize`` sets ``status.complete`` only after every marker and every chunk is checked.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline import __version__
from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.compute import BlockComputer, ComputerFactory


@dataclass(frozen=True)
class Provenance:
    """What a store was computed from; the attrs sections ``manifest``, ``teacher``, ``views``."""

    manifest: dict[str, Any]   # path, sha256, split, num_samples, num_classes, dataset
    teacher: dict[str, Any]    # name, arch, checkpoint_sha256, train_loss, path
    views: dict[str, Any]      # count, seed, spec


@dataclass
class CacheResult:
    store: Path
    computed: int                      # (view, block) units written by this run
    missing: int                       # units still without a marker (other shards, failures)
    complete: bool
    stats: dict[str, Any] | None = field(default=None)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _create(path: Path, *, attrs: dict[str, Any], layout: schema.Layout, sample_id: np.ndarray,
            label: np.ndarray) -> None:
    group = zarr.create_group(str(path), attributes=attrs, overwrite=True)
    for name, (shape, chunks, dtype) in layout.arrays().items():
        group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=None, filters=None,
                           fill_value=schema.fill_value(dtype), config={"write_empty_chunks": True},
                           chunk_key_encoding={"name": "default", "separator": schema.CHUNK_SEPARATOR})
    group["sample_id"][:] = np.asarray(sample_id, dtype=np.int64)
    group["label"][:] = np.asarray(label, dtype=np.int32)


def open_or_create(out: str | Path, *, provenance: Provenance, layout: schema.Layout, sample_id: np.ndarray,
                   label: np.ndarray, overwrite: bool = False) -> dict[str, Any]:
    """Create the store (atomically) or check that the existing one has this provenance; return its attrs."""
    out = Path(out)
    wanted = schema.build_attrs(manifest=provenance.manifest, teacher=provenance.teacher, views=provenance.views,
                                layout=layout, created=_now(), kdcache_version=__version__)
    if len(sample_id) != layout.num_samples or len(label) != layout.num_samples:
        raise UserError(f"{out}: field manifest.num_samples: expected {layout.num_samples} sample ids and labels, "
                        f"found {len(sample_id)} and {len(label)}")
    if overwrite and out.exists():
        shutil.rmtree(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.creating-{uuid.uuid4().hex[:8]}"
        try:
            _create(tmp, attrs=wanted, layout=layout, sample_id=sample_id, label=label)
            os.rename(tmp, out)            # atomic; fails if another job created the store first
        except OSError:
            if not (out / "zarr.json").exists():
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    existing = read_attrs(out)
    schema.check_provenance(existing, wanted, str(out))
    return existing


def read_attrs(store: str | Path) -> dict[str, Any]:
    store = Path(store)
    if not (store / "zarr.json").is_file():
        raise UserError(f"{store}: field zarr.json: expected a kdcache store (Zarr v3 group), found no zarr.json")
    try:
        group = zarr.open_group(str(store), mode="r")
    except Exception as err:  # noqa: BLE001 - a user's broken file, reported in one line
        raise UserError(f"{store}: field zarr.json: expected a Zarr v3 group, found an unreadable store ({err})")
    attrs = dict(group.attrs)
    schema.check_format(attrs, str(store))
    return attrs


class BlockWriter:
    """Writes (view, block) units into an existing store; one instance per process."""

    def __init__(self, store: str | Path) -> None:
        self.store = Path(store)
        self.attrs = read_attrs(self.store)
        self.layout = schema.Layout.from_attrs(self.attrs)
        self.group = zarr.open_group(str(self.store), mode="r+")
        self.arrays = {name: self.group[name] for name in self.layout.arrays()}
        self.labels = self.arrays["label"][:]

    def missing(self) -> list[tuple[int, int]]:
        done = self.arrays["done"][:]
        return [(v, b) for v, b in self.layout.units() if not done[v, b]]

    def compute(self, computer: BlockComputer, view: int, block: int) -> int:
        """Compute one block with ``computer`` and write it; returns the number of rows."""
        start, stop = self.layout.block_rows(block)
        logits = np.asarray(computer(view, start, stop), dtype=np.float32)
        self.write(view, block, logits)
        return stop - start

    def write(self, view: int, block: int, logits: np.ndarray) -> None:
        """Write a block's arrays from its full float32 logits, then its done marker."""
        lay = self.layout
        start, stop = lay.block_rows(block)
        where = f"{self.store}: view {view}, rows {start}:{stop}"
        if logits.shape != (stop - start, lay.num_classes):
            raise UserError(f"{where}: field logits: expected shape {(stop - start, lay.num_classes)}, found {logits.shape}")
        if not np.isfinite(logits).all():
            raise UserError(f"{where}: field logits: expected finite teacher logits, found NaN/Inf "
                            f"({int((~np.isfinite(logits)).sum())} values); no marker written")
        stats = schema.target_stats(logits, self.labels[start:stop])
        if lay.kind == "dense":
            stored = {"logits": self._cast(logits, where)}
        else:
            values, index = schema.topk(logits, lay.k)
            stored = {"topk_values": self._cast(values, where), "topk_index": index.astype(schema.index_dtype(lay.num_classes)),
                      "logsumexp": stats["logsumexp"]}
        stored.update(entropy=stats["entropy"], p_gt=stats["p_gt"], pred=stats["pred"])
        for name, value in stored.items():
            self.arrays[name][view, start:stop] = value
        self.arrays["done"][view, block] = True       # only after every array of the block is written

    def _cast(self, values: np.ndarray, where: str) -> np.ndarray:
        with np.errstate(over="ignore"):
            out = values.astype(self.layout.dtype)
        if not np.isfinite(out).all():
            raise UserError(f"{where}: field logits: expected values within {self.layout.dtype} range, found "
                            f"|logit| up to {float(np.abs(values).max()):.4g}; use --dtype float32")
        return out


def finalize(store: str | Path) -> CacheResult:
    """Check every marker and chunk; when all are there, record stats and ``status.complete``."""
    from pipeline.store.verify import missing_chunks, remove_partial_files

    store = Path(store)
    writer = BlockWriter(store)
    lay, arrays = writer.layout, writer.arrays
    missing = writer.missing()
    if missing:
        return CacheResult(store, 0, len(missing), False)
    holes = missing_chunks(store, lay)
    if holes:
        name, view, block = holes[0]
        raise UserError(f"{store}: field {name}: expected a chunk for every marked block, found none for view {view} "
                        f"block {block} ({len(holes)} missing); remove the store or its done markers and rerun")
    entropy, p_gt, pred = arrays["entropy"][:], arrays["p_gt"][:], arrays["pred"][:]
    if not (np.isfinite(entropy).all() and np.isfinite(p_gt).all()):
        raise UserError(f"{store}: field entropy/p_gt: expected finite values, found NaN/Inf")
    labels = writer.labels
    per_view = [{
        "accuracy": round(float((pred[v] == labels).mean()), 6),
        "mean_entropy": round(float(entropy[v].mean()), 6),
        "mean_normalized_entropy": round(float(entropy[v].mean() / np.log(lay.num_classes)), 6) if lay.num_classes > 1 else 0.0,
        "mean_p_gt": round(float(p_gt[v].mean()), 6),
        "nll": round(float(-np.log(np.maximum(p_gt[v], 1e-30)).mean()), 6),
    } for v in range(lay.num_views)]
    stats = {key: round(float(np.mean([s[key] for s in per_view])), 6) for key in per_view[0]}
    stats["per_view"] = per_view
    remove_partial_files(store)
    writer.group.attrs["status"] = {"complete": True, "finalized": _now(), "stats": stats}
    return CacheResult(store, 0, 0, True, stats)


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n (SLURM: ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
    if text is None:
        return 0, 1
    if isinstance(text, tuple):
        i, n = text
    else:
        try:
            i, n = (int(part) for part in str(text).split("/"))
        except ValueError:
            raise UserError(f"--shard: expected i/n with integers (e.g. 0/4), found {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard: expected 0 <= i < n, found {i}/{n}")
    return i, n


def write_cache(out: str | Path, *, factory: ComputerFactory, provenance: Provenance, layout: schema.Layout,
                sample_id: np.ndarray, label: np.ndarray, shard: str | tuple[int, int] | None = None,
                scheduler: str | None = None, local_workers: int | None = None, overwrite: bool = False,
                progress: bool = True) -> CacheResult:
    """Create/reopen ``out``, compute this run's missing blocks, finalize when every marker is set.

    ``shard=(i, n)`` takes every n-th (view, block) unit; ``scheduler``/``local_workers`` run one
    dask task per block (each worker builds the computer once with ``factory``).
    """
    from pipeline.store import distribute

    i, n = parse_shard(shard)
    if overwrite and n > 1:
        raise UserError("--overwrite: expected a single job (it would delete blocks other shards are writing), "
                        f"found --shard {i}/{n}; remove the store once before starting the array job")
    if scheduler and local_workers:
        raise UserError("--scheduler/--local-workers: expected one of them, found both")
    out = Path(out)
    attrs = open_or_create(out, provenance=provenance, layout=layout, sample_id=sample_id, label=label,
                           overwrite=overwrite)
    writer = BlockWriter(out)
    todo = [unit for j, unit in enumerate(layout.units()) if j % n == i]
    missing = set(writer.missing())
    todo = [unit for unit in todo if unit in missing]
    if not todo and attrs["status"].get("complete"):
        return CacheResult(out, 0, 0, True, attrs["status"].get("stats"))
    if scheduler or local_workers:
        computed = distribute.run_dask(out, factory, todo, scheduler=scheduler, local_workers=local_workers,
                                       progress=progress)
    else:
        computed = distribute.run_local(writer, factory, todo, progress=progress)
    result = finalize(out)
    result.computed = computed
    return result


def cache_teacher(*, teacher: str | Path, manifest: str | Path, split: str, views: int, out: str | Path,
                  dtype: str = "float16", storage: str = "dense", k: int | None = None,
                  rows_per_block: int | None = None, micro_batch: int = schema.DEFAULT_MICRO_BATCH,
                  shard: str | tuple[int, int] | None = None, scheduler: str | None = None,
                  local_workers: int | None = None, overwrite: bool = False, device: str = "auto",
                  threads: int | None = None, loader_workers: int = 0, view_seed: int = 0,
                  view_spec: dict | None = None, name: str | None = None, progress: bool = True) -> CacheResult:
    """Run the frozen teacher ``teacher`` over ``views`` views of ``split`` and write the store ``out``.

    ``view_spec`` (a ``ViewSpec.to_dict()``) defaults to the dataset's standard views with seed
    ``view_seed``. ``threads`` fixes torch's CPU threads (default: torch's own; for
    ``local_workers`` the cores shared out), which with the fixed batches of a block makes the
    bytes independent of who computed each block. Returns what was computed and whether the
    store is complete (it is not while other shards still run).
    """
    import json

    from pipeline.checkpoint import load_checkpoint
    from pipeline.files import file_sha256
    from pipeline.data import default_views, open_split
    from pipeline.data.views import ViewSpec
    from pipeline.manifest import load_manifest
    from pipeline.store.compute import TeacherFactory, default_threads

    teacher, manifest_path = Path(teacher).resolve(), Path(manifest).resolve()
    meta = load_checkpoint(teacher)["meta"]
    man = load_manifest(manifest_path, check_files=True)  # a missing image must stop us before the store exists
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
                             loader_workers=loader_workers)
    return write_cache(out, factory=factory, provenance=provenance, layout=layout, sample_id=rows.sample_id,
                       label=rows.label, shard=shard, scheduler=scheduler, local_workers=local_workers,
                       overwrite=overwrite, progress=progress)
