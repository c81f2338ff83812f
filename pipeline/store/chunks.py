"""A kdcache store's metadata and small arrays read straight from its files, without zarr's round trips.

    meta = raw_meta(store, "entropy")            # the array's zarr.json, or None: go through zarr
    done = read_small(store, "done", layout)     # a whole small array, missing chunks as the fill value

kdcache writes every array uncompressed (one ``bytes`` codec), a chunk per (view, block), so a
chunk's file is its values as they are; ``raw_meta`` says whether an array is stored that way (on
this machine's byte order), and only then are its files read directly. Readers of the targets
(``pipeline.store.reader``) and of the completeness checks (``pipeline.store.verify``) use these.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.location import ObjectPath, is_local, read_many


def array_signature(path: Path | ObjectPath, name: str) -> tuple[tuple[int, ...], tuple[int, ...], str] | None:
    """(shape, chunks, dtype) of array ``name`` from its zarr.json when it is raw-encoded, else None."""
    meta = raw_meta(path, name)
    if meta is None:
        return None
    chunks = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    return tuple(meta["shape"]), tuple(chunks or ()), str(np.dtype(meta["data_type"]))


def raw_meta(path: Path | ObjectPath, name: str) -> dict | None:
    """The zarr.json of array ``name`` when its chunk files are kdcache's raw encoding (one ``bytes``
    codec, little-endian or single-byte values, on a little-endian machine), else None."""
    meta_file = path / name / "zarr.json"
    if sys.byteorder != "little" or (is_local(meta_file) and not meta_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:                                 # an object store: one GET, no HEAD first
        return None
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "bytes":
        return None
    endian = (codecs[0].get("configuration") or {}).get("endian")
    return meta if endian == "little" or (endian is None and np.dtype(meta["data_type"]).itemsize == 1) else None


def read_small(path: Path | ObjectPath, name: str, layout: schema.Layout) -> np.ndarray:
    """A small raw-encoded array (ids, labels, checksums) read whole from its chunk files, one per
    (view, block); a missing chunk reads as the fill value, as through zarr."""
    shape, chunks, dtype = layout.arrays()[name]
    out = np.full(shape, schema.fill_value(dtype), np.dtype(dtype))
    per_chunk = int(np.prod(chunks, dtype=np.int64))
    axis = 0 if len(shape) == 1 else 1                       # the block axis
    views = [None] if axis == 0 else range(shape[0])
    little = np.dtype(dtype).newbyteorder("<")
    keys = {(view, block): path / schema.chunk_key(name, len(shape), view, block)
            for view in views for block in range(layout.num_blocks)}
    found = read_many(list(keys.values()))                   # the chunks that exist, each read whole
    for (view, block), chunk in keys.items():
        if chunk not in found:
            continue
        lead = () if view is None else (view,)
        data = found[chunk]
        values = np.frombuffer(data, dtype=little, count=min(len(data) // little.itemsize, per_chunk))
        if values.size != per_chunk:
            raise UserError(f"{path}: field {name}: expected a chunk of {per_chunk * values.itemsize} bytes for "
                            f"block {block}, found {values.size * values.itemsize}")
        start = block * chunks[axis]
        stop = min(start + chunks[axis], shape[axis])
        out[lead + (slice(start, stop),)] = values.reshape(chunks)[(0,) * axis + (slice(0, stop - start),)]
    return out
