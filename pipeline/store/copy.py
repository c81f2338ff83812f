"""Copy a complete store between a folder and a bucket (either way, or bucket to bucket), every
chunk checked against its checksum on the way; a rerun after an interruption copies what is left.

    copy_store("caches/train/ce.zarr", "s3://bucket/caches/train/ce.zarr")   # kdcache store copy SRC DST

The copy is the source's files byte for byte (the attrs included: its recorded paths stay
relative, ``pipeline.store.location.local_twin``). Order: the arrays' metadata and data chunks,
then the ``done`` markers, then the group's ``zarr.json`` last, so that until the copy is whole
there is no store at DST a reader would open (it has no ``zarr.json``), and a marker is never
there before its block. Each object is written whole (a folder: a temporary file renamed into
place; a bucket: one PUT). An object already at DST with the same bytes is skipped, so a rerun
resumes. A DST holding a store of other provenance, or being created with one by a caching
job (its creation claim), is refused, never mixed into.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.chunks import read_small
from pipeline.store.location import file_sizes, is_local, store_path, write_whole
from pipeline.store.verify import check_complete
from pipeline.store.writer import CREATING, check_claim


@dataclass
class CopyResult:
    copied: int          # objects written
    skipped: int         # objects already at DST with the same bytes
    bytes: int           # bytes written


def _checksums(src, layout: schema.Layout) -> dict[str, tuple[str, int, int, int]]:
    """Chunk key -> (array, view, block, CRC-32 recorded) of every block array's chunk."""
    expected = read_small(src, schema.CHECKSUM, layout)
    specs = layout.arrays()
    return {schema.chunk_key(name, len(specs[name][0]), view, block): (name, view, block, int(expected[view, block, i]))
            for view, block in layout.units() for i, name in enumerate(layout.block_arrays())}


def _order(keys: list[str]) -> list[str]:
    """Data and metadata first, then the done markers, the group's zarr.json last; no temporary
    files or claims (names starting with a dot, chunk writes left ``.partial``)."""
    keys = [k for k in keys if not any(part.startswith(".") for part in k.split("/")) and not k.endswith(".partial")]
    return sorted(keys, key=lambda k: (k == "zarr.json", k.startswith("done/c."), k))


def copy_store(src: str, dst: str) -> CopyResult:
    """Copy the complete store ``src`` to ``dst`` (see the module docstring)."""
    src_path, dst_path = store_path(src), store_path(dst)
    if str(src_path) == str(dst_path):
        raise UserError(f"store copy: expected two stores, found {src} twice")
    attrs, layout = check_complete(src_path)
    schema.check_ids_checksums(src_path, attrs, sample_id=read_small(src_path, "sample_id", layout),
                               label=read_small(src_path, "label", layout))
    if (dst_path / "zarr.json").is_file():
        schema.check_provenance(schema.read_attrs(dst_path), attrs, str(dst_path))
    elif not is_local(dst_path):
        check_claim(dst_path, attrs)          # a caching job creating a store of other provenance there
    crcs = _checksums(src_path, layout)
    result = CopyResult(0, 0, 0)
    for key in _order(list(file_sizes(src_path))):
        data = (src_path / key).read_bytes()
        if key in crcs:
            name, view, block, want = crcs[key]
            found = zlib.crc32(data, layout.chunk_crc_start(name, view, block))
            if found != want:
                raise schema.checksum_error(src_path, name, view, block, expected=want, found=found)
        try:
            if (dst_path / key).read_bytes() == data:
                result.skipped += 1
                continue
        except FileNotFoundError:
            pass
        write_whole(dst_path / key, data)
        result.copied += 1
        result.bytes += len(data)
    if not is_local(dst_path):
        (dst_path / CREATING).unlink(missing_ok=True)   # a creation claim of this provenance: the store is whole
    return result
