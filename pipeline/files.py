"""Files written whole or not at all, and their content hashes.

    with atomic_path("models/ce.pt") as tmp:    # a temporary file beside the target
        torch.save(blob, tmp)                    # on success it replaces the target in one rename;
                                                 # on an error the target is untouched, tmp removed
    file_sha256("models/ce.pt")                  # how caches and manifests name the files they used
    write_json("metrics/kd.json", {"top1": 0.8})  # metrics and logs, written the same atomic way
    write_history("metrics/kd.csv", rows)         # one CSV row per dict
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same folder, so the rename is atomic); replace
    ``path`` with it when the block succeeds. ``suffix`` ends the temporary name (``np.savez``
    appends ``.npz`` to names without it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes; an unreadable file is a UserError naming it."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    return digest.hexdigest()


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_history(path: str | Path, rows: list[dict]) -> None:
    """One CSV row per dict (columns: the union of the rows' keys, ``epoch`` first)."""
    columns = ["epoch"] + sorted({k for row in rows for k in row} - {"epoch"})
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
