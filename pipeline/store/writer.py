"""Create or reopen a cache store and write it block by block: resumable, one owner per block.

    from pipeline.store.writer import BlockWriter, finalize, open_or_create
    open_or_create("caches/train/ce.zarr", provenance=prov, layout=layout, sample_id=ids, label=labels)
    writer = BlockWriter("caches/train/ce.zarr")
    for view, block in writer.missing():
        writer.write(view, block, logits_of_that_block)      # float32 [rows, C]
    finalize("caches/train/ce.zarr")

What computes the logits (a teacher, over which blocks, in which processes) is the caching job's
business (``pipeline.cache``); this module only writes the format. The rules:

- Metadata and the sample_id/label arrays are created once, atomically (built in a temporary
  directory, then renamed into place), so concurrent ``--shard i/n`` jobs can all start at once.
  Reopening with other provenance is a ``UserError`` naming the field. In a bucket the store's
  objects are PUT in place, the group's zarr.json last, under a creation claim (the object
  ``.creating``, the wanted attrs) taken before any other: a job of other provenance finding the
  claim is refused before it writes anything, one of the same provenance writes the same bytes.
- A (view, block) is written by one owner, whole: its chunk of every array, then the CRC-32 of
  each of those chunks (its chunk of ``checksum``; from format version 3 on, the CRC-32 of the
  chunk key followed by the bytes, so it holds only in its place), then its ``done`` marker.
  A store of an older readable version is resumed under the checksum rule of its version. A rerun computes
  only the blocks without a marker; a block's batches are fixed by the layout, so the bytes do
  not depend on who computed it or when.
- ``finalize`` sets ``status.complete`` only after every marker and every chunk is checked.
- A block's payload arrays are its float32 logits encoded by the store's codec
  (``pipeline.store.codecs``); a codec that draws (sampled storage) seeds its generator with the
  store's seed (the attrs ``views.seed``), the view and the block: its bytes, too, depend only on
  the block's logits.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer.cpu import Buffer
from zarr.core.sync import sync

from pipeline import __version__, faults
from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.location import ObjectPath, create_exclusive, is_local, remove_tree, store_path, zarr_store
from pipeline.store.stats import label_agreement, labels_of, target_stats

MARKER = b"\x01"                   # the file of a set done marker (a bool chunk of one value)
CREATING = ".creating"             # a bucket store's creation claim (a dot name: not part of the store)


@dataclass(frozen=True)
class Provenance:
    """What a store was computed from; the attrs sections ``manifest``, ``teacher``, ``views``."""

    manifest: dict[str, Any]   # path, sha256, split, num_samples, num_classes, dataset
    teacher: dict[str, Any]    # name, arch, checkpoint_sha256, train_loss, path
    views: dict[str, Any]      # count, seed, spec


@dataclass
class CacheResult:
    store: Path | ObjectPath
    computed: int                      # (view, block) units written by this run
    missing: int                       # units still without a marker (other shards, failures)
    complete: bool
    stats: dict[str, Any] | None = field(default=None)


def _create(path: Path | ObjectPath, *, attrs: dict[str, Any], layout: schema.Layout, sample_id: np.ndarray,
            label: np.ndarray) -> None:
    """The store's metadata built in memory, then every file of the new store (metadata, sample ids,
    labels) written at ``path`` one after another, each write finished before the next: a failed
    one (a full disk) leaves no other write in flight that would go on filling the folder being
    removed, or report its own failure later."""
    files: dict[str, Buffer] = {}
    group = zarr.create_group(zarr.storage.MemoryStore(files), attributes=attrs, overwrite=True)
    for name, (shape, chunks, dtype) in layout.arrays().items():
        group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=None, filters=None,
                           fill_value=schema.fill_value(dtype), config={"write_empty_chunks": True},
                           chunk_key_encoding={"name": "default", "separator": schema.CHUNK_SEPARATOR})
    # the checksum array names its last axis, so that the store describes itself
    group[schema.CHECKSUM].attrs.update(algorithm=schema.CHECKSUM_ALGORITHM, arrays=layout.block_arrays())
    for name, values in (("sample_id", sample_id), ("label", label)):
        _, chunks, dtype = layout.arrays()[name]
        for block in range(layout.num_blocks):
            start, stop = layout.block_rows(block)
            data = schema.chunk_bytes(np.asarray(values[start:stop]), rows=chunks[0], dtype=dtype)
            files[schema.chunk_key(name, 1, None, block)] = Buffer.from_array_like(data)
    if not is_local(path):
        _publish(path, files)
        return
    disk = zarr.storage.LocalStore(str(path))
    for key in sorted(files):
        sync(disk.set(key, files[key]))


def _publish(path: ObjectPath, files: dict[str, Buffer]) -> None:
    """A new store's objects PUT one after another, the group's zarr.json last and only if no other
    job created it first (a conditional PUT): until then there is no store at ``path``. A failed
    write deletes what this call wrote, unless another job's store is there meanwhile."""
    written = []
    try:
        for key in sorted(files):
            if key != "zarr.json":
                (path / key).write_bytes(files[key].to_bytes())
                written.append(key)
        create_exclusive(path / "zarr.json", files["zarr.json"].to_bytes())
    except BaseException:
        if not (path / "zarr.json").is_file():
            for key in written:
                (path / key).unlink(missing_ok=True)
        raise


def check_claim(out: ObjectPath, attrs: dict[str, Any]) -> bool:
    """Whether the bucket store ``out`` has a creation claim; a claim of other provenance than
    ``attrs`` is a ``UserError`` naming the field (a job creating it, or a store copy into it)."""
    try:
        data = (out / CREATING).read_bytes()
    except FileNotFoundError:
        return False
    try:
        claimed = json.loads(data)
    except ValueError:
        claimed = {}
    schema.check_provenance(claimed if isinstance(claimed, dict) else {}, attrs, str(out),
                            found=f"claimed by another job creating the store, {out / CREATING}",
                            hint="if no job is creating it, --overwrite replaces it")
    return True


def _create_claimed(out: ObjectPath, *, attrs: dict[str, Any], layout: schema.Layout, sample_id: np.ndarray,
                    label: np.ndarray) -> None:
    """Create the bucket store ``out`` under its creation claim, written before any other object and
    removed once the store's zarr.json is there (or when this job's own creation failed). A claim
    of the same provenance (a job creating the same bytes, or a killed one's) is gone along with it."""
    claim = out / CREATING
    while True:
        mine = create_exclusive(claim, json.dumps(attrs, sort_keys=True).encode())
        if mine or check_claim(out, attrs):          # else the claim vanished meanwhile: claim again
            break
    try:
        if not (out / "zarr.json").is_file():         # created (and its claim removed) meanwhile
            _create(out, attrs=attrs, layout=layout, sample_id=sample_id, label=label)
    finally:
        if mine or (out / "zarr.json").is_file():
            claim.unlink(missing_ok=True)


def _wanted_attrs(out: Path | ObjectPath, provenance: Provenance, layout: schema.Layout, sample_id: np.ndarray,
                  label: np.ndarray) -> dict[str, Any]:
    """The attrs a store of this provenance is created with; its ids and labels counted."""
    if len(sample_id) != layout.num_samples or len(label) != layout.num_samples:
        raise UserError(f"{out}: field manifest.num_samples: expected {layout.num_samples} sample ids and labels, "
                        f"found {len(sample_id)} and {len(label)}")
    return schema.build_attrs(manifest=provenance.manifest, teacher=provenance.teacher, views=provenance.views,
                              layout=layout, kdcache_version=__version__,
                              checksums=schema.ids_checksums(sample_id, label))


def check_target(out: str | Path, *, provenance: Provenance, layout: schema.Layout, sample_id: np.ndarray,
                 label: np.ndarray, overwrite: bool = False) -> None:
    """What ``open_or_create`` would refuse, checked without writing anything: the ids and labels, a
    regular file on the way to ``out``, and an existing store of other provenance (kept unless
    ``overwrite``). Callers creating several stores check them all first."""
    out = store_path(out)
    wanted = _wanted_attrs(out, provenance, layout, sample_id, label)
    if not is_local(out):
        if overwrite:
            return
        if not (out / "zarr.json").is_file():
            check_claim(out, wanted)
            return
        schema.check_provenance(schema.read_attrs(out), wanted, str(out))
        return
    for above in [out, *out.parents]:
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                raise UserError(f"--out {out}: {above}: exists and is not a folder (ENOTDIR)")
            break
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    schema.check_provenance(schema.read_attrs(out), wanted, str(out))


def open_or_create(out: str | Path, *, provenance: Provenance, layout: schema.Layout, sample_id: np.ndarray,
                   label: np.ndarray, overwrite: bool = False) -> dict[str, Any]:
    """Create the store (atomically) or check that the existing one has this provenance; return its attrs."""
    out = store_path(out)
    wanted = _wanted_attrs(out, provenance, layout, sample_id, label)
    if not is_local(out):
        if overwrite:
            remove_tree(out)
        if not (out / "zarr.json").is_file():
            _create_claimed(out, attrs=wanted, layout=layout, sample_id=sample_id, label=label)
        existing = schema.read_attrs(out)
        schema.check_provenance(existing, wanted, str(out))
        return existing
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
    existing = schema.read_attrs(out)
    schema.check_provenance(existing, wanted, str(out))
    return existing


class BlockWriter:
    """Writes (view, block) units into an existing store; one instance per process.

    A block's chunk files are written through the zarr store (its atomic write: a temporary
    ``.partial`` file renamed over the chunk's key), not through the arrays: every chunk is
    exactly one block, so the file is the block's values as they are (``schema.chunk_bytes``).
    """

    def __init__(self, store: str | Path) -> None:
        self.store = store_path(store)
        self.attrs = schema.read_attrs(self.store)
        self.layout = schema.Layout.from_attrs(self.attrs)
        self.group = zarr.open_group(zarr_store(self.store, read_only=False), mode="r+")
        self.specs = self.layout.arrays()
        self.arrays = {name: self.group[name] for name in self.specs}
        self.labels = self.arrays["label"][:]
        self.sample_ids = self.arrays["sample_id"][:] if self.layout.mixed else None
        self._id_order = None if self.sample_ids is None else np.argsort(self.sample_ids, kind="stable")

    def missing(self) -> list[tuple[int, int]]:
        done = self.arrays["done"][:]
        return [(v, b) for v, b in self.layout.units() if not done[v, b]]

    def marked(self, view: int, block: int) -> bool:
        """Whether (view, block) has its done marker, read afresh (another job may have set it)."""
        try:
            return (self.store / schema.chunk_key("done", 2, view, block)).read_bytes() == MARKER
        except FileNotFoundError:
            return False

    def write(self, view: int, block: int, logits: np.ndarray, mixing: dict[str, np.ndarray] | None = None) -> None:
        """Write a block's arrays from its full float32 logits, then their checksums, then its done marker.

        ``mixing``: a mixed store's ``schema.MIX_ARRAYS`` of the block's rows (the partners' sample ids
        and the lambdas, what its views mixed), required there and refused elsewhere; p_gt is then
        the probability of each row's mixed label.

        The logit arrays go to disk from a second thread while the stats are computed; the
        checksums are written once every chunk of the block is in place, the marker after them.
        """
        lay = self.layout
        start, stop = lay.block_rows(block)
        where = f"{self.store}: view {view}, rows {start}:{stop}"
        if logits.shape != (stop - start, lay.num_classes):
            raise UserError(f"{where}: field logits: expected shape {(stop - start, lay.num_classes)}, found {logits.shape}")
        if not np.isfinite(logits).all():
            raise UserError(f"{where}: field logits: expected finite teacher logits, found NaN/Inf "
                            f"({int((~np.isfinite(logits)).sum())} values); no marker written")
        if (mixing is not None) != lay.mixed or (mixing is not None and set(mixing) != set(schema.MIX_ARRAYS)):
            raise ValueError(f"{where}: expected {'the ' + ', '.join(schema.MIX_ARRAYS) if lay.mixed else 'no'} "
                             f"mixing arrays, found {sorted(mixing or {})}")
        # the codec's arrays; those named like an exact target (top-k's logsumexp) come with the stats
        payload = lay.codec.encode(logits, seed=self.attrs["views"].get("seed", 0), view=view, block=block,
                                   where=where)
        with ThreadPoolExecutor(max_workers=1) as pool:
            written = {name: pool.submit(self._put_chunk, name, view, block, values)
                       for name, values in payload.items()}
            targets = dict(mixing or {})
            mixed = None if mixing is None else (self.partner_labels(mixing["mix_partner"]), mixing["mix_lambda"])
            targets.update(target_stats(logits, self.labels[start:stop], mixed=mixed))
            written.update({name: pool.submit(self._put_chunk, name, view, block, targets[name])
                            for name in lay.block_arrays() if name not in written})
            crcs = np.array([written[name].result() for name in lay.block_arrays()], np.uint32)
        self._put_chunk(schema.CHECKSUM, view, block, crcs[None])
        faults.point("marker")
        self._put_chunk("done", view, block, np.ones(1, bool))      # only after every array of the block is written

    def partner_labels(self, partner_ids: np.ndarray) -> np.ndarray:
        """The labels of the rows whose sample ids are ``partner_ids`` (any shape)."""
        return labels_of(partner_ids, self.sample_ids, self._id_order, self.labels)

    def _put_chunk(self, name: str, view: int, block: int, values: np.ndarray) -> int:
        """Write the chunk of (view, block) of array ``name`` from its rows' values; the CRC-32 of its file."""
        shape, chunks, dtype = self.specs[name]
        data = schema.chunk_bytes(values, rows=chunks[1], dtype=dtype)
        sync(self.group.store.set(schema.chunk_key(name, len(shape), view, block), Buffer.from_array_like(data)))
        return zlib.crc32(data, self.layout.chunk_crc_start(name, view, block))

def remove_partial_files(store: str | Path) -> None:
    """Remove the temporary files of chunk writes killed mid-way; called by ``finalize`` only
    once every marker is set.

    zarr's LocalStore writes a chunk to ``<key minus its last suffix>.<uuid>.partial`` in the
    array's folder and renames it over the key (``c.0.3.0`` -> ``c.0.3.<uuid>.partial``; for
    2-D arrays the block is not even in the name). Could one of them be another job's write in
    flight? A block's marker is written only after every chunk of the block is renamed into
    place, so the job that marked a block has no write of it in flight; the only other writer
    of a marked block would be a second owner of it. The cache job claims every block before
    computing it and reads the marker again once the claim is taken
    (``pipeline.cache.claims``), so with every marker set no job still starts or continues a
    chunk write: every ``.partial`` left is a dead writer's. (Were a duplicate writer still
    running, removing its file would make its rename fail, with the chunk in place whole.)
    Only chunk files: another job may be rewriting the group's zarr.json (its temporary file
    must be left alone). A store in a bucket has none: an object is written by one PUT.
    """
    if not is_local(store_path(store)):
        return
    for root, _, files in os.walk(store):
        for name in files:
            if name.startswith("c.") and name.endswith(".partial") and Path(root) != Path(store):
                Path(root, name).unlink(missing_ok=True)


def finalize(store: str | Path, *, writer: BlockWriter | None = None) -> CacheResult:
    """Check every marker and chunk; when all are there, record stats and ``status.complete``
    (``writer``: this process's open writer of the store, if any)."""
    store = store_path(store)
    writer = writer or BlockWriter(store)
    lay, arrays = writer.layout, writer.arrays
    missing = writer.missing()
    if missing:
        return CacheResult(store, 0, len(missing), False)
    holes = schema.missing_chunks(store, lay)
    if holes:
        name, view, block = holes[0]
        raise UserError(f"{store}: field {name}: expected a chunk for every marked block, found none for view {view} "
                        f"block {block} ({len(holes)} missing); remove the store or its done markers and rerun")
    entropy, p_gt, pred = arrays["entropy"][:], arrays["p_gt"][:], arrays["pred"][:]
    if not (np.isfinite(entropy).all() and np.isfinite(p_gt).all()):
        raise UserError(f"{store}: field entropy/p_gt: expected finite values, found NaN/Inf")
    # a mixed store's accuracy is against each (view, row)'s mixed label, as its p_gt (and so nll) is
    mixed = (writer.partner_labels(arrays["mix_partner"][:]), arrays["mix_lambda"][:]) if lay.mixed else None
    agree = label_agreement(pred, writer.labels, mixed)
    per_view = [{
        "accuracy": round(float(agree[v].mean()), 6),
        "mean_entropy": round(float(entropy[v].mean()), 6),
        "mean_normalized_entropy": round(float(entropy[v].mean() / np.log(lay.num_classes)), 6) if lay.num_classes > 1 else 0.0,
        "mean_p_gt": round(float(p_gt[v].mean()), 6),
        "nll": round(float(-np.log(np.maximum(p_gt[v], 1e-30)).mean()), 6),
    } for v in range(lay.num_views)]
    stats = {key: round(float(np.mean([s[key] for s in per_view])), 6) for key in per_view[0]}
    stats["per_view"] = per_view
    remove_partial_files(store)
    faults.point("finalize")
    writer.group.attrs["status"] = {"complete": True, "stats": stats}
    return CacheResult(store, 0, 0, True, stats)
