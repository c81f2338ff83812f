"""Is what a store was computed from still what it says? Warnings about provenance that drifted.

    from pipeline.store.provenance import changed_teachers
    for line in changed_teachers(read_attrs("caches/train/ce.zarr"), store="caches/train/ce.zarr"):
        warnings.warn(line)

A store records its teacher checkpoint's path and sha256 (``teacher.path``,
``teacher.checkpoint_sha256``). When that file still exists but its bytes changed (retrained in
place, overwritten by another run), the store's targets are no longer the teacher's of that name:
the store is not damaged, so this is a warning, not an error. A checkpoint that is gone (the store
was copied to another machine) says nothing. The checkpoint is hashed in full, once per call
(what is recorded is a sha256; a size or time check would miss a same-size rewrite).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.files import file_sha256
from pipeline.store.location import local_twin


def path_for_store(path: str | Path, store: str | Path) -> str:
    """``path`` as a store records it: relative to the store's folder, so that a checkout moved or
    cloned elsewhere writes the same attrs (the same bytes) and still finds its files. A store in a
    bucket records them as the same store at its key under the working folder would (``local_twin``)."""
    return os.path.relpath(Path(path).resolve(), local_twin(store).resolve().parent)


def recorded_path(path: str | None, store: str | Path | None) -> Path | None:
    """A path from a store's attrs as a usable path (relative ones are relative to the store's
    folder; stores written before recorded absolute paths); None when there is none to use."""
    if not path:
        return None
    if Path(path).is_absolute():
        return Path(path)
    return (local_twin(store).resolve().parent / path).resolve() if store is not None else None


def changed_teachers(attrs: dict[str, Any], *, store: str | Path | None = None) -> list[str]:
    """Warning lines (``<store>: field teacher.checkpoint_sha256: ...``) for a recorded teacher
    checkpoint that exists but whose sha256 is no longer the one recorded; empty when it matches
    or is not there."""
    teacher = attrs.get("teacher") or {}
    path, recorded = recorded_path(teacher.get("path"), store), teacher.get("checkpoint_sha256")
    if path is None or not recorded or not path.is_file():
        return []
    found = file_sha256(path)
    if found == recorded:
        return []
    where = f"{store}: " if store is not None else ""
    return [f"{where}field teacher.checkpoint_sha256: expected {recorded} (the teacher when cached), found "
            f"{found} in {path}: the checkpoint changed after caching; recache it, or restore the checkpoint"]
