"""``StoreGroup``: the targets of several cache stores for training, never a random gather from Zarr.

    group = StoreGroup(["caches/train/ce.zarr", "caches/train/mse.zarr"])
    t = group.targets(view, rows)       # logits [K,B,C], entropy [K,B], p_gt [K,B] float32 (memory mode)

The stores must agree (manifest sha256 and split, sample order, views, num_classes) and be
complete (status.complete, every marker, every chunk); otherwise ``UserError`` names the store
and field. Mentor k is the k-th store given (mentor 0 = the teacher, by convention).

Every chunk read is checked against its CRC-32 (schema.py), every data chunk of the block, the
``pred`` one too, in every store: a block whose bytes or place changed after it was written is a
``UserError`` naming the store, array, view and block, never a silently wrong target. Every
store's ``sample_id`` and ``label`` are checked against its attrs ``checksums`` and must equal
the first store's. Memory mode checks every block once,
at load; streaming checks each window as it loads, on the prefetch thread.

Two modes, chosen by ``mode="auto"`` from ``memory_budget_bytes`` (default: a quarter of RAM):
- memory: every block of every store is read once, whole, into NumPy (float16 stays float16);
  ``targets`` is one vectorized gather per batch, converted to float32.
- stream: the caller (``pipeline.train.targets``, with the batch order of ``pipeline.train.sampling``)
  cuts a shuffled block order into windows of ``window_width`` blocks and opens them with
  ``stream(view, windows)``; the stream loads the next window on a thread while the current
  one is served. Two windows stay readable (current and previous), so a DataLoader may run its
  sampler up to a window ahead of ``targets``; the width is sized for that (``max_lag_batches``).
  Asking for a row outside them is an error, never a slow read.

Every kind of store is served as dense float32 logits [K, B, C], decoded by its codec
(``pipeline.store.codecs``: int8 within ``scale / 2`` per logit; top-k with the exact tail mass
spread uniformly; sampled as ``T_s * log(count / k)``); entropy and p_gt are always the exact
stored values. Payloads that already are dense float logits stay as stored until a batch is
gathered. When some store's codec has a temperature of its own (sampled: softmax at ``T_s`` of
its logits is the sampled distribution, and ``kd_kl`` at ``T_s`` the unbiased estimator of
``pipeline.losses.sampled_kd_loss``), ``targets`` also gives ``sample_temperature`` [K] (``T_s``
per store, 0 for the others), which the methods check against their own temperature.
"""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import zarr

from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.chunks import raw_meta, read_small
from pipeline.store.location import ObjectPath, open_read, store_path, zarr_store
from pipeline.store.verify import check_complete

FIELDS = ("logits", "entropy", "p_gt")
SAMPLE_TEMPERATURE = "sample_temperature"     # the extra field of groups with a sampled store
READERS = 4                                   # threads reading the chunk files of a streaming window


def default_memory_budget() -> int:
    """A quarter of physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


class _Store:
    """The metadata and small arrays of one store: read straight from its files when every array
    is raw-encoded (no zarr round trip), else through zarr."""

    def __init__(self, path: Path | ObjectPath, layout: schema.Layout) -> None:
        self.path, self.layout = path, layout
        names = layout.block_arrays() + [schema.CHECKSUM, "sample_id", "label"]
        self.meta = {name: raw_meta(path, name) for name in names}
        self.raw = path.is_dir() and all(meta is not None for meta in self.meta.values())
        self._group: zarr.Group | None = None

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(zarr_store(self.path, read_only=True), mode="r")
        return self._group

    def read(self, name: str) -> np.ndarray:
        return read_small(self.path, name, self.layout) if self.raw else self.group[name][:]

    def attributes(self, name: str) -> dict:
        return dict(self.meta[name].get("attributes", {})) if self.raw else dict(self.group[name].attrs)


class _Buffer:
    """Targets of K stores for R rows (all rows of a view, or the slots of the streaming windows)."""

    def __init__(self, layouts: Sequence[schema.Layout], rows: int) -> None:
        self.layouts = layouts
        k_count, c = len(layouts), layouts[0].num_classes
        self.entropy = np.empty((k_count, rows), np.float32)
        self.p_gt = np.empty((k_count, rows), np.float32)
        self.all_dense = all(lay.codec.dense_array is not None for lay in layouts)
        # torch views of the same memory: index_select + float() is 3x faster than NumPy's fp16 astype
        self._entropy_t, self._p_gt_t = torch.from_numpy(self.entropy), torch.from_numpy(self.p_gt)
        if self.all_dense:
            dtype = np.result_type(*[np.dtype(lay.arrays()[lay.codec.dense_array][2]) for lay in layouts])
            self.logits = np.empty((k_count, rows, c), dtype)
            self._logits_t = torch.from_numpy(self.logits)
        else:
            self.parts = [{name: np.empty((rows,) + chunks[2:], dtype) for name, (_, chunks, dtype)
                           in lay.arrays().items() if name in lay.payload_arrays()} for lay in layouts]
        own = [lay.codec.sample_temperature for lay in layouts]
        self.temperatures = None if all(t is None for t in own) else \
            torch.tensor([t or 0.0 for t in own], dtype=torch.float32)

    def views(self, k: int, at: slice) -> dict[str, np.ndarray]:
        """Where store k's arrays go for rows ``at``: writable views into this buffer."""
        out = {"entropy": self.entropy[k, at], "p_gt": self.p_gt[k, at]}
        if self.all_dense:
            out[self.layouts[k].codec.dense_array] = self.logits[k, at]
        else:
            out.update({name: values[at] for name, values in self.parts[k].items()})
        return out

    def gather(self, pos: np.ndarray, fields: Sequence[str]) -> dict[str, torch.Tensor]:
        out = {}
        index = torch.from_numpy(pos)
        if "logits" in fields:
            if self.all_dense:
                out["logits"] = self._logits_t.index_select(1, index).float()
            else:
                out["logits"] = torch.from_numpy(np.stack([
                    lay.codec.decode({name: values[pos] for name, values in part.items()})
                    for lay, part in zip(self.layouts, self.parts)]))
            if self.temperatures is not None:
                out[SAMPLE_TEMPERATURE] = self.temperatures.clone()
        if "entropy" in fields:
            out["entropy"] = self._entropy_t.index_select(1, index)
        if "p_gt" in fields:
            out["p_gt"] = self._p_gt_t.index_select(1, index)
        return out


class _Blocks:
    """Whole (view, block) reads of one store, each chunk checked against its CRC-32.

    kdcache writes every array uncompressed and little-endian (schema.py), so a block is read
    straight from its chunk file into the buffer (one ``readinto``, no Python work per value, the
    GIL released during the read and the CRC; an object in a bucket is fetched whole by one GET,
    several at once on the stream's reader threads); any other encoding goes through zarr, and
    the CRC is taken over the values encoded as kdcache writes them.
    """

    check_checksums = True     # False only for the benchmark's baseline (bench/reader.py)

    def __init__(self, store: _Store) -> None:
        self.path, self.layout = store.path, store.layout
        self.names = self.layout.block_arrays()               # every array with a checksum, in its order
        self.specs = self.layout.arrays()
        self.raw, self._store, self._arrays = store.raw, store, None
        found = list(store.attributes(schema.CHECKSUM).get("arrays", []))
        if found != self.names:
            raise UserError(f"{self.path}: field checksum.arrays: expected {self.names}, found {found}")
        self.expected = store.read(schema.CHECKSUM)           # [V, num_blocks, A] uint32, a few KiB

    @property
    def arrays(self) -> dict[str, zarr.Array]:
        """The block arrays through zarr (opened on first use: raw stores read their files instead)."""
        if self._arrays is None:
            self._arrays = {name: self._store.group[name] for name in self.names}
        return self._arrays

    def read_into(self, view: int, block: int, out: dict[str, np.ndarray]) -> None:
        """Fill ``out`` (some of the block arrays) with (view, block); every array of the block is checked."""
        start, stop = self.layout.block_rows(block)
        for i, name in enumerate(self.names):
            dst = out.get(name)
            if self.raw:
                found = self._read_raw(name, view, block, dst, stop - start)
            else:
                arr = self.arrays[name]
                values = arr[view, start:stop]
                if dst is not None:
                    dst[...] = values
                found = schema.chunk_crc32(values, rows=self.layout.rows_per_block, dtype=str(arr.dtype),
                                           start=self.layout.chunk_crc_start(name, view, block)) \
                    if self.check_checksums else None
            expected = int(self.expected[view, block, i])
            if found is not None and found != expected:
                raise schema.checksum_error(self.path, name, view, block, expected=expected, found=found)

    def _read_raw(self, name: str, view: int, block: int, dst: np.ndarray | None, rows: int) -> int | None:
        """Read one chunk file (its rows into ``dst`` when given); its CRC-32, or None when checks are off."""
        check = self.check_checksums
        shape, chunks, dtype_name = self.specs[name]
        dtype = np.dtype(dtype_name)
        want = rows * int(np.prod(chunks[2:], dtype=np.int64)) * dtype.itemsize
        direct = dst is not None and dst.dtype == dtype and dst.flags.c_contiguous
        if dst is None and not check:
            return None
        with open_read(self.path / schema.chunk_key(name, len(shape), view, block)) as fh:
            if direct:
                head = dst.reshape(-1).view(np.uint8)
                got = fh.readinto(head)
                tail = fh.read() if check else b""            # the padding of the last block, if any
            else:                                             # not wanted, or another dtype: via bytes
                head, tail = fh.read(), b""
                got = min(len(head), want)
        if got != want:
            raise UserError(f"{self.path}: field {name}: expected a chunk of at least {want} bytes "
                            f"for view {view} block {block}, found {got}")
        if dst is not None and not direct:
            dst[...] = np.frombuffer(head, dtype=dtype.newbyteorder("<"), count=dst.size).reshape(dst.shape)
        return zlib.crc32(tail, zlib.crc32(head, self.layout.chunk_crc_start(name, view, block))) if check else None


def check_checksums(store: str | Path) -> tuple[dict, schema.Layout]:
    """The attrs and layout of a complete store whose every chunk, sample id and label still has the
    checksum it was written with (one pass over its chunk files); else the ``UserError`` line a
    training read gives. For readers that go through zarr (``kdcache inspect``)."""
    attrs, layout = check_complete(store)
    opened = _Store(store_path(store), layout)
    schema.check_ids_checksums(store, attrs, sample_id=opened.read("sample_id"), label=opened.read("label"))
    blocks = _Blocks(opened)
    for view, block in layout.units():
        blocks.read_into(view, block, {})
    return attrs, layout


class StoreGroup:
    """Targets of K agreeing, complete stores; see the module docstring."""

    def __init__(self, stores: Sequence[str | Path], *, memory_budget_bytes: int | None = None, mode: str = "auto",
                 window_blocks: int | None = None, max_lag_batches: int = 32) -> None:
        if isinstance(stores, (str, Path)) or not stores:
            raise UserError(f"mentors: expected a non-empty list of stores, found {stores!r}")
        if mode not in ("auto", "memory", "stream"):
            raise UserError(f"mode: expected auto, memory or stream, found {mode!r}")
        self.paths = [store_path(s) for s in stores]
        checked = [check_complete(p) for p in self.paths]
        self.attrs = [a for a, _ in checked]
        self.layouts = [lay for _, lay in checked]
        first = self.attrs[0]
        for path, attrs in zip(self.paths[1:], self.attrs[1:]):
            for section, key in schema.AGREEMENT_FIELDS:
                if attrs[section].get(key) != first[section].get(key):
                    raise UserError(f"{path}: field {section}.{key}: expected {first[section].get(key)!r} "
                                    f"(as {self.paths[0]}), found {attrs[section].get(key)!r}")
        stores = [_Store(p, lay) for p, lay in zip(self.paths, self.layouts)]
        self.sample_ids = stores[0].read("sample_id")
        self.labels = stores[0].read("label")
        schema.check_ids_checksums(self.paths[0], self.attrs[0], sample_id=self.sample_ids, label=self.labels)
        for path, store, attrs in zip(self.paths[1:], stores[1:], self.attrs[1:]):   # every mentor's own arrays
            ids, labels = store.read("sample_id"), store.read("label")
            schema.check_ids_checksums(path, attrs, sample_id=ids, label=labels)
            if not np.array_equal(ids, self.sample_ids):
                raise UserError(f"{path}: field sample_id: expected the sample order of {self.paths[0]}, found another")
            if not np.array_equal(labels, self.labels):
                raise UserError(f"{path}: field label: expected the labels of {self.paths[0]}, found others")
        self._blocks = [_Blocks(store) for store in stores]
        self.num_mentors = len(self.paths)
        self.num_samples = int(first["manifest"]["num_samples"])
        self.num_classes = int(first["manifest"]["num_classes"])
        self.num_views = int(first["views"]["count"])
        self.manifest_sha256 = str(first["manifest"]["sha256"])
        self.split = str(first["manifest"]["split"])
        self.views = dict(first["views"])
        self.teachers = [a["teacher"].get("name") for a in self.attrs]
        self.memory_bytes = sum(self._row_bytes(lay) for lay in self.layouts) * self.num_samples * self.num_views
        self.memory_budget_bytes = int(memory_budget_bytes or default_memory_budget())
        self.mode = mode if mode != "auto" else ("memory" if self.memory_bytes <= self.memory_budget_bytes else "stream")
        self.window_blocks = window_blocks
        self.max_lag_batches = int(max_lag_batches)
        self._memory: list[_Buffer] = []
        self._stream: Stream | None = None
        if self.mode == "memory":
            self._load_memory()
        elif len({lay.rows_per_block for lay in self.layouts}) > 1:
            raise UserError(f"{self.paths[-1]}: field storage.rows_per_block: expected {self.layouts[0].rows_per_block} "
                            f"(as {self.paths[0]}) to stream blocks together, found {self.layouts[-1].rows_per_block}")

    @staticmethod
    def _row_bytes(lay: schema.Layout) -> int:
        return lay.payload_bytes_per_row() + 8                        # + entropy, p_gt

    def _load_memory(self) -> None:
        for view in range(self.num_views):
            buf = _Buffer(self.layouts, self.num_samples)
            for k, blocks in enumerate(self._blocks):
                for block in range(self.layouts[k].num_blocks):
                    blocks.read_into(view, block, buf.views(k, slice(*self.layouts[k].block_rows(block))))
            self._memory.append(buf)

    def targets(self, view: int | np.ndarray, rows: np.ndarray | torch.Tensor | Sequence[int], *,
                fields: Sequence[str] = FIELDS) -> dict[str, torch.Tensor]:
        """``{"logits": [K,B,C], "entropy": [K,B], "p_gt": [K,B]}`` (float32) for ``rows`` of ``view``;
        ``view`` an int, or one view per row (memory mode: one gather per distinct view)."""
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"fields: expected some of {FIELDS}, found {sorted(unknown)}")
        if np.ndim(view) == 0:
            return self._targets_of(int(view), rows, fields)
        views = np.asarray(view, dtype=np.int64)
        if views.shape != rows.shape:
            raise ValueError(f"view: expected one view per row ({rows.shape}), found {views.shape}")
        distinct = np.unique(views)
        if len(distinct) <= 1:
            return self._targets_of(int(distinct[0]) if len(distinct) else 0, rows, fields)
        if self.mode != "memory":
            raise RuntimeError("stream mode: targets() takes one view per call (the open stream's)")
        parts = {int(v): np.nonzero(views == v)[0] for v in distinct}
        got = {v: self._targets_of(v, rows[at], fields) for v, at in parts.items()}
        out = {}
        for name, first in got[int(distinct[0])].items():   # [K, B_v, ...]: rows on axis 1
            value = torch.empty((first.shape[0], len(rows), *first.shape[2:]), dtype=first.dtype)
            for v, at in parts.items():
                value[:, torch.from_numpy(at)] = got[v][name]
            out[name] = value
        return out

    def _targets_of(self, view: int, rows: np.ndarray, fields: Sequence[str]) -> dict[str, torch.Tensor]:
        if not 0 <= view < self.num_views:
            raise ValueError(f"view: expected 0 <= view < {self.num_views}, found {view}")
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_samples):
            raise IndexError(f"rows: expected indices in [0, {self.num_samples}), found [{rows.min()}, {rows.max()}]")
        if self.mode == "memory":
            return self._memory[view].gather(rows, fields)
        if self._stream is None or self._stream.view != view:
            raise RuntimeError(f"stream mode: targets(view={view}) needs a stream of that view to be open (stream())")
        return self._stream.gather(rows, fields)

    def window_width(self, global_batch: int) -> int:
        """Blocks per streaming window: enough for ``max_lag_batches`` batches of lag, as many as
        three windows of the memory budget allow (at most 16), and a batch spans at most two windows."""
        lay = self.layouts[0]
        need = math.ceil((self.max_lag_batches + 1) * global_batch / lay.rows_per_block)
        block_bytes = sum(self._row_bytes(x) for x in self.layouts) * lay.rows_per_block
        fit = max(1, self.memory_budget_bytes // (3 * block_bytes))
        width = self.window_blocks or min(lay.num_blocks, max(need, min(fit, 16)))
        return max(width, math.ceil(global_batch / lay.rows_per_block))

    def stream(self, view: int, windows: Sequence[np.ndarray]) -> Stream:
        """Serve ``view`` window by window (block ids per window, in serving order); closes any
        stream before it. ``targets`` then reads from it."""
        if self.mode != "stream":
            raise RuntimeError("stream(): the group is in memory mode")
        self.close()
        self._stream = Stream(self, int(view), windows)
        return self._stream

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> "StoreGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"StoreGroup({self.num_mentors} stores {self.teachers}, {self.num_samples} samples, "
                f"{self.num_classes} classes, {self.num_views} views, mode={self.mode})")


class Stream:
    """Three window slots: previous and current are readable, the next one loads on a thread.

    ``windows`` are the block ids of each window in the order they are served; position ``p`` of
    the epoch's row order (the windows' rows, concatenated) lies in window ``searchsorted(window_end, p)``.
    """

    def __init__(self, group: StoreGroup, view: int, windows: Sequence[np.ndarray]) -> None:
        self.group, self.view, self.windows = group, view, [np.asarray(w) for w in windows]
        lay = group.layouts[0]
        self.window_rows = [np.concatenate([np.arange(*lay.block_rows(b)) for b in w]) for w in self.windows]
        self.window_end = np.cumsum([len(r) for r in self.window_rows])
        self.slot_rows = max(len(w) for w in self.windows) * lay.rows_per_block
        self.buffer = _Buffer(group.layouts, 3 * self.slot_rows)
        self.pos = np.full(group.num_samples, -1, np.int64)
        self.current = -1
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-prefetch")
        self.readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="kdcache-read")
        self.pending: dict[int, Future] = {}
        self._prefetch(0)

    def _load(self, j: int) -> None:
        """Window j into its slot: every (block, store) read on its own reader thread (the reads and
        the CRCs release the GIL, so the disk sees several requests at once); the first error is raised."""
        at = (j % 3) * self.slot_rows
        lay = self.group.layouts[0]
        units = []
        for block in self.windows[j]:
            start, stop = lay.block_rows(block)
            units += [(blocks, int(block), self.buffer.views(k, slice(at, at + stop - start)))
                      for k, blocks in enumerate(self.group._blocks)]
            at += stop - start
        for done in [self.readers.submit(blocks.read_into, self.view, block, out) for blocks, block, out in units]:
            done.result()

    def _prefetch(self, j: int) -> None:
        if j < len(self.windows) and j not in self.pending:
            self.pending[j] = self.pool.submit(self._load, j)

    def ensure_position(self, position: int) -> None:
        """Make the window holding order position ``position`` readable (waiting for it if needed)."""
        self.ensure(int(np.searchsorted(self.window_end, position, side="right")))

    def ensure(self, j: int) -> None:
        while self.current < j:
            nxt = self.current + 1
            self._prefetch(nxt)
            self.pending.pop(nxt).result()
            rows = self.window_rows[nxt]
            self.pos[rows] = (nxt % 3) * self.slot_rows + np.arange(len(rows))
            if nxt >= 2:                               # its slot is where the next window goes
                self.pos[self.window_rows[nxt - 2]] = -1
            self.current = nxt
            self._prefetch(nxt + 1)

    def gather(self, rows: np.ndarray, fields: Sequence[str]) -> dict[str, torch.Tensor]:
        pos = self.pos[rows]
        if (pos < 0).any():
            raise RuntimeError(f"stream mode: {int((pos < 0).sum())} rows are not in the current or previous window "
                               "(ask only for rows of the running batch order; a larger window_blocks or "
                               "max_lag_batches allows more lag)")
        return self.buffer.gather(pos, fields)

    def close(self) -> None:
        for fut in self.pending.values():
            fut.cancel()
        self.pool.shutdown(wait=True)
        self.readers.shutdown(wait=True)
