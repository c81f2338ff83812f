"""Parquet manifests: one row per sample, validated, with a content hash.

A manifest fixes which samples exist, their labels, their split and where their pixels live.
Its row order within a split is the row order of every cache built from it.

    kdcache manifest build --dataset cifar10 --root data/cifar --out data_manifests/cifar10.parquet
    kdcache manifest check data_manifests/cifar10.parquet

    from pipeline.manifest import load_manifest
    m = load_manifest("data_manifests/cifar10.parquet")
    rows = m.split("train")          # SplitRows: sample_id, label, source in manifest order

Columns: ``sample_id`` int64 (unique, >= 0), ``label`` int32 in [0, num_classes), ``split``
string, ``source`` string (a path relative to the root, ``file#index`` for container files, or
a row index). The schema metadata key ``kdcache.manifest`` holds JSON: format, version, dataset,
num_classes, class_names, splits, root, meta and sha256.

The sha256 covers the four columns in a canonical byte form plus the semantic metadata
(dataset, class names, splits, meta). It leaves out the root (where the data lies is not what
it is) and the Parquet encoding, so re-writing or rebuilding the same manifest gives the same
hash, and any changed row, label or class changes it. ``load_manifest`` recomputes it: a
mismatch means the file was edited by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.files import atomic_path

FORMAT = "kdcache-manifest"
FORMAT_VERSION = 1
METADATA_KEY = b"kdcache.manifest"
SPLIT_NAMES = ("train", "val", "test")

# Column name -> (arrow types accepted on read, canonical type, what to say when it is wrong).
_COLUMNS: dict[str, tuple[tuple[pa.DataType, ...], pa.DataType, str]] = {
    "sample_id": ((pa.int64(),), pa.int64(), "int64"),
    "label": ((pa.int32(),), pa.int32(), "int32"),
    # Strings may come back as large_string or dictionary from other writers; the hash uses
    # the values, not the encoding, so those are accepted and normalised.
    "split": ((pa.string(), pa.large_string()), pa.string(), "string"),
    "source": ((pa.string(), pa.large_string()), pa.string(), "string"),
}


@dataclass(frozen=True)
class SplitRows:
    """The rows of one split, in manifest order (which is the cache row order)."""

    name: str
    sample_id: np.ndarray  # int64 [N]
    label: np.ndarray  # int32 [N]
    source: np.ndarray  # object (str) [N]

    def __len__(self) -> int:
        return len(self.sample_id)


@dataclass(frozen=True, eq=False)
class Manifest:
    """A validated manifest. ``root`` is the absolute dataset root that ``source`` resolves against."""

    path: Path
    dataset: str
    num_classes: int
    class_names: tuple[str, ...]
    sha256: str
    root: str
    meta: dict
    table: pa.Table
    splits: tuple[str, ...] = field(default=SPLIT_NAMES)

    def split(self, name: str) -> SplitRows:
        """Rows of split ``name``; a ``UserError`` naming the file and split if it has none."""
        mask = pc.equal(self.table.column("split"), name).to_numpy(zero_copy_only=False)
        if not mask.any():
            have = ", ".join(self.splits)
            raise UserError(
                f"{self.path}: split {name!r} has no rows (field 'split'); this manifest has: {have}"
            )
        return SplitRows(
            name=name,
            sample_id=self.table.column("sample_id").to_numpy()[mask],
            label=self.table.column("label").to_numpy()[mask],
            source=self.table.column("source").to_numpy(zero_copy_only=False)[mask],
        )

    def split_sizes(self) -> dict[str, int]:
        counts = pc.value_counts(self.table.column("split")).to_pylist()
        found = {c["values"]: c["counts"] for c in counts}
        return {name: int(found.get(name, 0)) for name in self.splits}

    @property
    def root_path(self) -> Path:
        return Path(self.root)


def _string_bytes(column: pa.ChunkedArray) -> tuple[bytes, bytes]:
    """(int64 lengths, utf-8 data) of a string column: the canonical form, whatever its chunking."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    arr = arr.cast(pa.large_string())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype="<i8")[arr.offset : arr.offset + n + 1]
    data_buf = arr.buffers()[2]
    data = b"" if data_buf is None else data_buf.to_pybytes()[int(offsets[0]) : int(offsets[-1])]
    return np.diff(offsets).astype("<i8").tobytes(), data


def _semantic(dataset: str, num_classes: int, *, class_names: Sequence[str], splits: Sequence[str], meta: dict) -> dict:
    return {
        "dataset": dataset,
        "num_classes": int(num_classes),
        "class_names": list(class_names),
        "splits": list(splits),
        "meta": meta,
    }


def content_sha256(table: pa.Table, semantic: dict) -> str:
    """Hash of the columns (canonical bytes, in row order) and the semantic metadata."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}/{FORMAT_VERSION}\n".encode())
    h.update(json.dumps(semantic, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    h.update(len(table).to_bytes(8, "little"))
    for name in ("sample_id", "label"):
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(table.column(name).to_numpy(), dtype=_dtype(name)).tobytes())
    for name in ("split", "source"):
        h.update(name.encode() + b"\0")
        lengths, data = _string_bytes(table.column(name))
        h.update(lengths)
        h.update(data)
    return h.hexdigest()


def _dtype(name: str) -> str:
    return "<i8" if name == "sample_id" else "<i4"


def make_table(*, sample_id: np.ndarray, label: np.ndarray, split: Sequence[str], source: Sequence[str]) -> pa.Table:
    """The four columns with their canonical types."""
    return pa.table(
        {
            "sample_id": pa.array(np.asarray(sample_id, dtype=np.int64), type=pa.int64()),
            "label": pa.array(np.asarray(label, dtype=np.int32), type=pa.int32()),
            "split": pa.array(list(split) if not isinstance(split, np.ndarray) else split, type=pa.string()),
            "source": pa.array(list(source) if not isinstance(source, np.ndarray) else source, type=pa.string()),
        }
    )


def write_manifest(
    out: str | os.PathLike,
    table: pa.Table,
    *,
    dataset: str,
    class_names: Sequence[str],
    root: str | os.PathLike,
    meta: dict,
    splits: Sequence[str],
) -> str:
    """Write atomically (tmp file + os.replace); returns the content sha256.

    A relative ``root`` is stored relative to the manifest's directory so the manifest keeps
    working from any working directory; an absolute root is stored as is.
    """
    out = Path(out)
    root = Path(root)
    stored_root = str(root) if root.is_absolute() else os.path.relpath(root.resolve(), out.parent.resolve())
    semantic = _semantic(dataset, len(class_names), class_names=class_names, splits=splits, meta=meta)
    sha = content_sha256(table, semantic)
    info = {"format": FORMAT, "version": FORMAT_VERSION, **semantic, "root": stored_root, "sha256": sha}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(info, ensure_ascii=False).encode()})
    try:
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
    except OSError as err:
        raise UserError(f"{out}: cannot write the manifest ({err.strerror or err})") from None
    return sha


def _read(path: Path) -> tuple[pa.Table, dict]:
    if not path.is_file():
        raise UserError(f"{path}: manifest file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise UserError(f"{path}: metadata field {METADATA_KEY.decode()!r} missing: not a kdcache manifest")
    try:
        info = json.loads(raw)
    except ValueError:
        raise UserError(f"{path}: metadata field {METADATA_KEY.decode()!r} is not valid JSON") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{path}: metadata field 'format': expected {FORMAT!r}, found {info.get('format')!r}")
    if info.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: metadata field 'version': expected {FORMAT_VERSION}, found {info.get('version')!r}")
    for key, kind in (("dataset", str), ("num_classes", int), ("class_names", list), ("splits", list),
                      ("root", str), ("meta", dict), ("sha256", str)):
        if not isinstance(info.get(key), kind):
            raise UserError(f"{path}: metadata field {key!r} missing or not a {kind.__name__}")
    return table, info


def _check_columns(path: Path, table: pa.Table) -> pa.Table:
    columns = {}
    for name, (accepted, canonical, expected) in _COLUMNS.items():
        if name not in table.column_names:
            raise UserError(f"{path}: missing column {name!r} (expected {expected})")
        col = table.column(name)
        if pa.types.is_dictionary(col.type) and col.type.value_type in accepted:
            col = col.cast(col.type.value_type)
        if col.type not in accepted:
            raise UserError(f"{path}: column {name!r} has type {col.type}, expected {expected}")
        if col.null_count:
            raise UserError(f"{path}: column {name!r} has {col.null_count} null values")
        columns[name] = col.cast(canonical)
    return pa.table(columns)


def _check_rows(path: Path, table: pa.Table, info: dict) -> None:
    if len(table) == 0:
        raise UserError(f"{path}: manifest has no rows")
    num_classes, names = info["num_classes"], info["class_names"]
    if num_classes < 1 or len(names) != num_classes:
        raise UserError(f"{path}: metadata field 'class_names' has {len(names)} names, expected num_classes={num_classes}")
    if len(set(names)) != len(names):
        raise UserError(f"{path}: metadata field 'class_names' has duplicate names")
    ids = table.column("sample_id").to_numpy()
    if (ids < 0).any():
        row = int(np.argmax(ids < 0))
        raise UserError(f"{path}: column 'sample_id' row {row}: value {ids[row]} is negative, expected >= 0")
    order = np.argsort(ids, kind="stable")
    dup = np.nonzero(ids[order][1:] == ids[order][:-1])[0]
    if len(dup):
        a, b = sorted((int(order[dup[0]]), int(order[dup[0] + 1])))
        raise UserError(f"{path}: column 'sample_id' has duplicate value {ids[a]} (rows {a} and {b})")
    labels = table.column("label").to_numpy()
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(
            f"{path}: column 'label' row {row}: value {labels[row]} is outside [0, {num_classes}) (num_classes)"
        )
    splits = info["splits"]
    present = set(pc.unique(table.column("split")).to_pylist())  # arrow: fast on millions of rows
    unknown = sorted(present - set(splits))
    if unknown:
        raise UserError(f"{path}: column 'split' has value {unknown[0]!r}, expected one of {splits} (metadata 'splits')")
    for name in splits:
        if name not in present:
            raise UserError(f"{path}: split {name!r} has no rows (field 'split'), but metadata 'splits' lists it")


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest; ``UserError`` (one line: file + field) on any problem.

    Whether the data files it names exist is the dataset reader's check
    (``pipeline.data.check_files``), as is building one (``pipeline.data.build_manifest``).
    """
    path = Path(path)
    table, info = _read(path)
    table = _check_columns(path, table)
    _check_rows(path, table, info)
    semantic = _semantic(info["dataset"], info["num_classes"], class_names=info["class_names"], splits=info["splits"],
                         meta=info["meta"])
    sha = content_sha256(table, semantic)
    if sha != info["sha256"]:
        raise UserError(
            f"{path}: metadata field 'sha256' is {info['sha256'][:12]}..., content hashes to {sha[:12]}...: "
            "the file was edited; rebuild it with `kdcache manifest build`"
        )
    root = Path(info["root"])
    if not root.is_absolute():
        root = (path.resolve().parent / root).resolve()
    return Manifest(
        path=path,
        dataset=info["dataset"],
        num_classes=int(info["num_classes"]),
        class_names=tuple(info["class_names"]),
        sha256=sha,
        root=str(root),
        meta=info["meta"],
        table=table,
        splits=tuple(info["splits"]),
    )


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class names from a file, one per line (blank lines and ``#`` comments ignored)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read class list ({err.strerror})") from None
    names = [line.split("#", 1)[0].strip() for line in lines]
    names = [n for n in names if n]
    if not names:
        raise UserError(f"{path}: class list is empty")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise UserError(f"{path}: class {n!r} is listed twice")
        seen.add(n)
    return names
