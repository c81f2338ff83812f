"""The cache store format, in one place: layout, ``FORMAT_VERSION``, attrs, byte planning.

A store is one Zarr v3 group per (teacher, split). ``pipeline/store/README.md`` shows an
example of its attrs.

    from pipeline.store.schema import Layout, plan_bytes, read_attrs
    layout = Layout(num_samples=60_000, num_classes=10, num_views=2)
    print(plan_bytes(layout, teachers=6))
    attrs = read_attrs("caches/train/ce.zarr")      # format and version checked

Blocks: the sample axis is cut into blocks of ``rows_per_block`` rows; a block of one view is
the unit of work, of ownership (one writer) and of reading. Every data array is chunked so that
a chunk is exactly one (view, block), so a block write never shares a chunk with another block
(no read-modify-write between writers, the data loss of zarr-python issues 3514/3682). There is
no sharding: a shard would have to be the block anyway, and chunk files per block are few.

Checksums: every data chunk of a block has a CRC-32 (``zlib.crc32``) of its chunk key (its path
inside the store, ``<array>/c.<view>.<block>[.0]``, UTF-8) followed by its bytes as written to the
chunk file (uncompressed little-endian, the last block padded to the full chunk with the fill
value), so a chunk's checksum holds only for its array, view and block: swapped, duplicated or
moved chunks fail it, their checksums moved with them or not (``chunk_crc_start``). They are kept
in the ``checksum`` array [V, num_blocks, A] (A = the block arrays in ``Layout.block_arrays()``
order), one (1, 1, A) chunk per block, written after the block's data and before its ``done``
marker. ``sample_id`` and ``label`` (written once, at creation) have a CRC-32 of their values, in
order, in the attrs section ``checksums``. Readers and ``kdcache verify`` recompute them. A
version-2 store's chunk checksums cover the bytes alone; it is read, verified and resumed under
that rule (``Layout.version``).

Mixed stores (views made with MixUp / CutMix, ``pipeline.data.mix``): two more block arrays,
``mix_partner`` (int64, the partner's sample id) and ``mix_lambda`` (float32, the effective lambda)
per (view, row), checksummed like the others; their ``p_gt`` is ``lam * p[y] + (1 - lam) *
p[y_partner]``. Such a store has format version ``MIXED_FORMAT_VERSION`` (4, and only 4), so a
kdcache that cannot train on mixed labels refuses it; every other store keeps version 3 (or 2),
byte for byte, and a version 4 without mixing is refused as a later version.

Storage kinds (``Layout.kind``, the ``--storage`` of ``kdcache cache``): each is one codec class,
looked up by name (``pipeline.store.codecs``), that declares its payload arrays; ``Layout`` adds
the arrays every store has. Class ids take the smallest unsigned type that holds C
(``index_dtype``); a store records its own in ``storage.index_dtype`` (a version-2 store from
before that key has uint16, int32 above 65535 classes, and reads as it is).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import UserError
from pipeline.store import codecs
from pipeline.store.codecs.base import Codec, legacy_index_dtype
from pipeline.store.location import file_sizes, store_path, zarr_store
from pipeline.store.stats import target_stats  # noqa: F401  (public here too: the targets every store keeps)

SCHEMA = "kdcache-store"
FORMAT_VERSION = 3               # 3: a chunk's checksum covers its key (array, view, block) and its bytes
READABLE_VERSIONS = (2, 3)       # 2: chunk checksums of the bytes alone (the `checksum` array, attrs `checksums`)
MIXED_FORMAT_VERSION = 4         # a store of mixed views: version 3 with the arrays MIX_ARRAYS (its only version)
MIX_ARRAYS = ("mix_partner", "mix_lambda")   # per (view, row): the partner's sample id, the effective lambda
KEYED_CHECKSUMS = 3              # the first version whose chunk checksums start from the chunk key
CHECKSUM = "checksum"            # the array of per-block chunk checksums
CHECKSUM_ALGORITHM = "crc32"

DEFAULT_MICRO_BATCH = 256
DEFAULT_ROWS_PER_BLOCK = 4096
MAX_CHUNK_BYTES = 16 * 2**20       # a logits chunk stays below this (rows_per_block shrinks for huge C)
MAX_PAYLOAD_BYTES = 4096           # a row with more values than classes (k > C) takes at most this, or 4C
METADATA_BYTES_PER_ARRAY = 600     # zarr.json of one array (measured: 450-600 bytes)
METADATA_BYTES_GROUP = 2500        # the group's zarr.json with the attrs below
DIRECTORY_BYTES = 4096             # one directory per array and the group (as `du -b` counts them)
# Chunk keys "c.<view>.<block>[.0]": every chunk of an array in one directory, no directory per
# block (with "/" a [V,N,C] array gets a directory per (view, block), 4 KiB each, as big as a
# whole fp16 chunk of a 10-class dataset).
CHUNK_SEPARATOR = "."

# Provenance fields compared when a store is reopened: (section, key). Any difference is an error.
PROVENANCE_FIELDS = (
    ("manifest", "sha256"), ("manifest", "split"), ("manifest", "num_samples"), ("manifest", "num_classes"),
    ("teacher", "checkpoint_sha256"),
    ("views", "count"), ("views", "spec"),
    ("storage", "kind"), ("storage", "k"), ("storage", "dtype"), ("storage", "rows_per_block"),
    ("storage", "micro_batch"), ("storage", "temperature"),
)
# Fields every store of a group read together must share: (section, key).
AGREEMENT_FIELDS = (
    ("manifest", "sha256"), ("manifest", "split"), ("manifest", "num_samples"), ("manifest", "num_classes"),
    ("views", "count"), ("views", "spec"),
)


def default_rows_per_block(num_classes: int, dtype: str = "float16", micro_batch: int = DEFAULT_MICRO_BATCH) -> int:
    """4096 rows, fewer when a logits chunk would exceed 16 MiB; always a multiple of ``micro_batch``."""
    row_bytes = num_classes * np.dtype(dtype).itemsize
    rows = min(DEFAULT_ROWS_PER_BLOCK, MAX_CHUNK_BYTES // max(row_bytes, 1))
    return max(micro_batch, rows // micro_batch * micro_batch)


@dataclass(frozen=True)
class Layout:
    """Shapes, chunks and dtypes of every array of a store."""

    num_samples: int
    num_classes: int
    num_views: int
    kind: str = codecs.DEFAULT_KIND      # the storage codec's name (pipeline.store.codecs)
    k: int | None = None
    dtype: str = "float16"
    rows_per_block: int | None = None
    micro_batch: int = DEFAULT_MICRO_BATCH
    temperature: float | None = None     # codecs that take one (sampled): default DEFAULT_TEMPERATURE
    index_dtype: str | None = None       # codecs that store class ids: default the smallest that holds C
    mixed: bool = False                  # views mixed with a partner (MIX_ARRAYS, MIXED_FORMAT_VERSION)
    version: int = field(default=FORMAT_VERSION, compare=False)   # the store's format version (its checksum rule)
    codec: Codec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        codecs.check_storage(self.kind, self.dtype)
        for name in ("num_samples", "num_classes", "num_views", "micro_batch"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name}: expected a positive integer, found {getattr(self, name)}")
        codec = codecs.make_codec(self.kind, num_classes=self.num_classes, dtype=self.dtype, k=self.k,
                                  temperature=self.temperature, index_dtype=self.index_dtype)
        object.__setattr__(self, "codec", codec)
        object.__setattr__(self, "temperature", codec.temperature)
        object.__setattr__(self, "index_dtype", codec.index_dtype)
        self._check_rows("micro_batch", int(self.micro_batch))       # the default block holds one at least
        if self.rows_per_block is None:
            object.__setattr__(self, "rows_per_block", default_rows_per_block(self.num_classes, self.dtype, self.micro_batch))
        if int(self.rows_per_block) < 1:
            raise UserError(f"rows_per_block: expected a positive integer, found {self.rows_per_block}")
        self._check_rows("rows_per_block", int(self.rows_per_block))
        self._check_payload()

    def _planned_bytes(self, rows_per_block: int) -> int:
        """The bytes of the store's row data (ids, labels, payload, targets) with blocks of this many rows."""
        padded = math.ceil(self.num_samples / rows_per_block) * rows_per_block
        return padded * (12 + self.num_views * (self.codec.payload_bytes_per_row() + 12 + 12 * self.mixed))

    def _check_payload(self) -> None:
        """More values per row than classes (``k`` draws of a sampled store) buy resolution only up to a
        point: such a row may take at most the exact float32 logits' bytes, or ``MAX_PAYLOAD_BYTES``."""
        if self.k is None or int(self.k) <= self.num_classes:
            return
        limit, found = max(4 * self.num_classes, MAX_PAYLOAD_BYTES), self.codec.payload_bytes_per_row()
        if found > limit:
            raise UserError(f"k: expected a logit payload of at most {limit} bytes per sample-view (the exact float32 "
                            f"logits of {self.num_classes} classes take {4 * self.num_classes}), found {found} "
                            f"({self.codec.describe()}: the store would take "
                            f"{human_bytes(self._planned_bytes(int(self.rows_per_block)))}; `kdcache plan` shows a "
                            "layout's bytes)")

    def _check_rows(self, name: str, rows: int) -> None:
        """A block (``rows_per_block``, or the default one that holds a ``micro_batch``) is stored whole,
        padded: more rows than the split's (or than the default block) are padding only, refused with
        the bytes the store would take."""
        bound = max(self.num_samples, DEFAULT_ROWS_PER_BLOCK)
        if rows <= bound:
            return
        raise UserError(f"{name}: expected at most {bound} (a block is stored whole: rows past the split's "
                        f"{self.num_samples}, or past {DEFAULT_ROWS_PER_BLOCK}, are padding), found {rows} (the "
                        f"store would take {human_bytes(self._planned_bytes(rows))}; `kdcache plan` shows a "
                        "layout's bytes)")

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_samples / self.rows_per_block)

    def block_rows(self, block: int) -> tuple[int, int]:
        """Row range [start, stop) of a block."""
        start = block * self.rows_per_block
        return start, min(start + self.rows_per_block, self.num_samples)

    def units(self) -> list[tuple[int, int]]:
        """Every (view, block) in the fixed order shards are cut from (view-major)."""
        return [(v, b) for v in range(self.num_views) for b in range(self.num_blocks)]

    def arrays(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], str]]:
        """name -> (shape, chunks, dtype). Chunks along the sample axis are exactly one block."""
        n, v, r = self.num_samples, self.num_views, self.rows_per_block
        out: dict[str, tuple[tuple[int, ...], tuple[int, ...], str]] = {
            "sample_id": ((n,), (r,), "int64"),
            "label": ((n,), (r,), "int32"),
        }
        for name, (row, dtype) in self.codec.payload().items():
            out[name] = ((v, n) + row, (1, r) + row, dtype)
        out["entropy"] = ((v, n), (1, r), "float32")
        out["p_gt"] = ((v, n), (1, r), "float32")
        out["pred"] = ((v, n), (1, r), "int32")
        if self.mixed:
            out["mix_partner"] = ((v, n), (1, r), "int64")
            out["mix_lambda"] = ((v, n), (1, r), "float32")
        out["done"] = ((v, self.num_blocks), (1, 1), "bool")
        out[CHECKSUM] = ((v, self.num_blocks, len(self.block_arrays())), (1, 1, len(self.block_arrays())), "uint32")
        return out

    def block_arrays(self) -> list[str]:
        """The data arrays a block write fills, in the order of the last axis of ``checksum``."""
        return self.payload_arrays() + ["entropy", "p_gt", "pred"] + (list(MIX_ARRAYS) if self.mixed else [])

    def payload_arrays(self) -> list[str]:
        """The arrays that hold the logits (the codec's), in checksum order."""
        return list(self.codec.payload())

    def chunk_crc_start(self, name: str, view: int | None, block: int) -> int:
        """What the CRC-32 of a chunk of (array ``name``, view, block) starts from: the CRC-32 of its
        chunk key (from version 3 on), or 0 (version 2: the bytes alone)."""
        if self.version < KEYED_CHECKSUMS:
            return 0
        return zlib.crc32(chunk_key(name, len(self.arrays()[name][0]), view, block).encode())

    def payload_bytes_per_row(self) -> int:
        """Bytes of one (sample, view) in the payload arrays (no padding, no metadata)."""
        return self.codec.payload_bytes_per_row()

    def storage_attrs(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k, "dtype": self.dtype, "rows_per_block": int(self.rows_per_block),
                "num_blocks": self.num_blocks, "micro_batch": int(self.micro_batch),
                "index_dtype": self.index_dtype, "temperature": self.temperature}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "Layout":
        s, m = attrs["storage"], attrs["manifest"]
        num_classes = int(m["num_classes"])
        index = s.get("index_dtype")
        if index is None and codecs.codec_class(s["kind"]).class_ids:
            index = legacy_index_dtype(num_classes)
        return cls(num_samples=int(m["num_samples"]), num_classes=num_classes,
                   num_views=int(attrs["views"]["count"]), kind=s["kind"], k=s.get("k"), dtype=s["dtype"],
                   rows_per_block=int(s["rows_per_block"]), micro_batch=int(s.get("micro_batch", DEFAULT_MICRO_BATCH)),
                   temperature=s.get("temperature"), index_dtype=index, mixed=is_mixed(attrs),
                   version=int(attrs.get("version", FORMAT_VERSION)))

    @property
    def format_version(self) -> int:
        """The version a new store of this layout is written with."""
        return MIXED_FORMAT_VERSION if self.mixed else FORMAT_VERSION


def is_mixed(attrs: dict[str, Any]) -> bool:
    """Whether a store's views are mixed (its views spec has ``mix``)."""
    spec = attrs["views"].get("spec") if isinstance(attrs.get("views"), dict) else None
    params = spec.get("params") if isinstance(spec, dict) else None
    return isinstance(params, dict) and "mix" in params


def chunk_key(name: str, ndim: int, view: int | None, block: int) -> str:
    """Path, inside the store, of the chunk of (view, block) of array ``name`` (view None: 1-D arrays)."""
    coords = (block,) if ndim == 1 else (view, block) + (0,) * (ndim - 2)
    return f"{name}/c" + "".join(f"{CHUNK_SEPARATOR}{c}" for c in coords)


def fill_value(dtype: str) -> Any:
    """Missing chunks read as NaN (floats) or an impossible index, so a hole never looks like data."""
    if dtype.startswith("float"):
        return float("nan")
    if dtype == "bool":
        return False
    if np.dtype(dtype).kind == "u":
        return int(np.iinfo(dtype).max)
    return -1


def chunk_crc32(values: np.ndarray, *, rows: int, dtype: str, start: int = 0) -> int:
    """CRC-32 of a chunk's file as kdcache writes it, from the values of its ``len(values)`` rows,
    continuing from ``start`` (``Layout.chunk_crc_start``: the chunk key's CRC-32, or 0).

    The file is the values in little-endian ``dtype``, uncompressed, padded with the fill value to
    ``rows`` rows (the chunk's row count: only the last block has fewer values than that).
    """
    data = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    crc = zlib.crc32(data.reshape(-1).view(np.uint8), start)
    if len(data) < rows:
        pad = np.full((rows - len(data),) + data.shape[1:], fill_value(dtype), dtype=data.dtype)
        crc = zlib.crc32(pad.reshape(-1).view(np.uint8), crc)
    return crc


def chunk_bytes(values: np.ndarray, *, rows: int, dtype: str) -> np.ndarray:
    """A chunk's file as kdcache writes it (uint8, the bytes ``chunk_crc32`` checks), from the values
    of its ``len(values)`` rows: little-endian ``dtype``, uncompressed, padded with the fill value to
    ``rows`` rows. No copy when ``values`` already are whole, contiguous and little-endian."""
    data = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    if len(data) < rows:
        padded = np.full((rows,) + data.shape[1:], fill_value(dtype), dtype=data.dtype)
        padded[:len(data)] = data
        data = padded
    return data.reshape(-1).view(np.uint8)


def ids_checksums(sample_id: np.ndarray, label: np.ndarray) -> dict[str, Any]:
    """The attrs section ``checksums``: CRC-32 of the sample_id (int64) and label (int32) values, little-endian."""
    return {"algorithm": CHECKSUM_ALGORITHM,
            "sample_id": zlib.crc32(np.ascontiguousarray(sample_id, dtype="<i8").view(np.uint8)),
            "label": zlib.crc32(np.ascontiguousarray(label, dtype="<i4").view(np.uint8))}


def check_ids_checksums(store: str | Path, attrs: dict[str, Any], **values: np.ndarray) -> None:
    """``sample_id=``/``label=`` values against the attrs ``checksums``; ``UserError`` naming the array otherwise."""
    found = ids_checksums(values.get("sample_id", np.zeros(0)), values.get("label", np.zeros(0)))
    for name in values:
        expected = attrs["checksums"].get(name)
        if expected != found[name]:
            shown = f"{expected:08x}" if isinstance(expected, int) else repr(expected)
            raise UserError(f"{store}: field checksums.{name}: expected crc32 {shown}, found {found[name]:08x} "
                            "(the array changed after the store was created; recompute the store: rerun its "
                            "`kdcache cache` command with --overwrite)")


def checksum_error(store: str | Path, name: str, view: int, block: int, *, expected: int, found: int) -> UserError:
    """The one-line error of a data chunk whose bytes, or place, are not those its block was written with."""
    return UserError(f"{store}: field checksum: {name} view {view} block {block}: expected crc32 {expected:08x}, "
                     f"found {found:08x} (the chunk's bytes or its place changed after it was written; recompute "
                     f"the block: delete {store_path(store) / chunk_key('done', 2, view, block)} and rerun the same "
                     "`kdcache cache` command, or rerun it with --overwrite)")


def build_attrs(*, manifest: dict[str, Any], teacher: dict[str, Any], views: dict[str, Any], layout: Layout,
                kdcache_version: str, checksums: dict[str, Any]) -> dict[str, Any]:
    """The group attrs written once when a store is created (status.complete starts false);
    ``checksums`` is ``ids_checksums(sample_id, label)``. No dates: the same inputs make the same bytes."""
    return {
        "schema": SCHEMA,
        "version": layout.format_version,
        "kdcache_version": kdcache_version,
        "manifest": dict(manifest),
        "teacher": dict(teacher),
        "views": dict(views),
        "storage": layout.storage_attrs(),
        "checksums": dict(checksums),
        "status": {"complete": False},
    }


def check_format(attrs: dict[str, Any], store: str) -> None:
    """Schema name and version, with 'expected X, found Y'."""
    if attrs.get("schema") != SCHEMA:
        raise UserError(f"{store}: field schema: expected {SCHEMA!r}, found {attrs.get('schema')!r} (not a kdcache store)")
    version, mixed = attrs.get("version"), is_mixed(attrs)
    versions = (MIXED_FORMAT_VERSION,) if mixed else READABLE_VERSIONS
    readable = " or ".join(str(v) for v in versions)
    if isinstance(version, int) and not isinstance(version, bool) and 1 <= version < min(READABLE_VERSIONS):
        raise UserError(f"{store}: field version: expected {readable}, found {version} (a store of an older "
                        "kdcache, without chunk checksums; recompute it: rerun its `kdcache cache` command with --overwrite)")
    if isinstance(version, bool) or version not in versions:
        raise UserError(f"{store}: field version: expected {readable}{' (a store of mixed views)' if mixed else ''}, "
                        f"found {version!r}")
    for section in ("manifest", "teacher", "views", "storage", "checksums", "status"):
        if not isinstance(attrs.get(section), dict):
            raise UserError(f"{store}: field {section}: expected a mapping, found {attrs.get(section)!r}")
    if attrs["checksums"].get("algorithm") != CHECKSUM_ALGORITHM:
        raise UserError(f"{store}: field checksums.algorithm: expected {CHECKSUM_ALGORITHM!r}, "
                        f"found {attrs['checksums'].get('algorithm')!r}")
    check_fields(attrs, store)


_COUNT = ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
_TEXT = ("a string", lambda v: isinstance(v, str) and v != "")
_OPTIONAL_COUNT = ("a positive integer or null", lambda v: v is None or _COUNT[1](v))
_OPTIONAL_TEXT = ("a string or null", lambda v: v is None or _TEXT[1](v))
_OPTIONAL_NUMBER = ("a positive number or null", lambda v: v is None or (
    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0))
_MAPPING = ("a mapping", lambda v: isinstance(v, dict))
# The attrs fields a store is read by: (section, key, required, (expected, test)). Optional ones may be
# absent (stores written before them: micro_batch, index_dtype, temperature).
ATTRS_FIELDS = (
    ("manifest", "sha256", True, _TEXT), ("manifest", "split", True, _TEXT),
    ("manifest", "num_samples", True, _COUNT), ("manifest", "num_classes", True, _COUNT),
    ("views", "count", True, _COUNT), ("views", "spec", True, _MAPPING),
    ("storage", "kind", True, _TEXT), ("storage", "dtype", True, _TEXT),
    ("storage", "rows_per_block", True, _COUNT), ("storage", "k", False, _OPTIONAL_COUNT),
    ("storage", "micro_batch", False, _COUNT), ("storage", "index_dtype", False, _OPTIONAL_TEXT),
    ("storage", "temperature", False, _OPTIONAL_NUMBER),
)


def check_fields(attrs: dict[str, Any], store: str) -> None:
    """Every field of ``ATTRS_FIELDS`` there and of its type, the storage kind a registered one;
    ``UserError`` naming the first that is not."""
    for section, key, required, (expected, ok) in ATTRS_FIELDS:
        if key not in attrs[section]:
            if required:
                raise UserError(f"{store}: field {section}.{key}: expected {expected}, found none")
            continue
        if not ok(attrs[section][key]):
            raise UserError(f"{store}: field {section}.{key}: expected {expected}, found {_short(attrs[section][key])}")
    kind = attrs["storage"]["kind"]
    if kind not in codecs.CODECS:
        raise UserError(f"{store}: field storage.kind: expected one of {', '.join(codecs.CODECS.names())}, "
                        f"found {kind!r}")


def check_provenance(existing: dict[str, Any], wanted: dict[str, Any], store: str, *, found: str = "in the store",
                     hint: str = "use --overwrite to replace the store") -> None:
    """Refuse to reopen a store for writing with different provenance; name the first differing field
    (``found``: where ``existing`` was read, ``hint``: what to do, both said in the error)."""
    check_format(existing, store)
    for section, key in PROVENANCE_FIELDS:
        have, want = existing[section].get(key), wanted[section].get(key)
        if have != want:
            raise UserError(f"{store}: field {section}.{key}: expected {_short(want)} (this run), "
                            f"found {_short(have)} ({found}); {hint}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def plan_bytes(layout: Layout, *, teachers: int = 1) -> dict[str, int]:
    """Bytes on disk per array for ``teachers`` stores of this layout (uncompressed, as written).

    Chunks are stored whole, so the last, partial block counts as a full block.
    """
    padded = layout.num_blocks * layout.rows_per_block
    out: dict[str, int] = {}
    for name, (shape, chunks, dtype) in layout.arrays().items():
        itemsize = np.dtype(dtype).itemsize
        if name in ("done", CHECKSUM):
            nbytes = int(np.prod(shape)) * itemsize
        else:
            per_row = int(np.prod(shape)) // layout.num_samples
            nbytes = padded * per_row * itemsize
        out[name] = teachers * (nbytes + METADATA_BYTES_PER_ARRAY + DIRECTORY_BYTES)
    out["attrs"] = teachers * (METADATA_BYTES_GROUP + DIRECTORY_BYTES)
    out["total"] = sum(out.values())
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def read_attrs(store: str | Path) -> dict[str, Any]:
    """The attrs of a kdcache store, its schema and version checked; UserError naming the store otherwise."""
    store = store_path(store)
    if not (store / "zarr.json").is_file():
        raise UserError(f"{store}: field zarr.json: expected a kdcache store (Zarr v3 group), found no zarr.json")
    try:
        group = zarr.open_group(zarr_store(store, read_only=True), mode="r")
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a user's broken file, reported in one line
        raise UserError(f"{store}: field zarr.json: expected a Zarr v3 group, found an unreadable store ({err})")
    attrs = dict(group.attrs)
    check_format(attrs, str(store))
    return attrs


def missing_chunks(store: str | Path, layout: Layout) -> list[tuple[str, int | None, int]]:
    """(array, view, block) for every data chunk without a whole file (view None for sample_id/label).

    kdcache writes chunks uncompressed (schema), so a chunk file holds exactly its chunk's bytes
    (edge chunks are padded): a shorter or longer file is a damaged write, counted as missing.
    """
    files = file_sizes(store_path(store))
    holes = []
    for name, (shape, chunks, dtype) in layout.arrays().items():
        if name == "done":
            continue
        size = int(np.prod(chunks)) * np.dtype(dtype).itemsize
        views = [None] if len(shape) == 1 else range(layout.num_views)
        for view in views:
            for block in range(layout.num_blocks):
                if files.get(chunk_key(name, len(shape), view, block)) != size:
                    holes.append((name, view, block))
    return holes
