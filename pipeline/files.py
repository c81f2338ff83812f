"""Files written whole or not at all, and their content hashes.

    with atomic_path("models/ce.pt") as tmp:    # a temporary file beside the target
        torch.save(blob, tmp)                    # on success it replaces the target in one rename;
                                                 # on an error the target is untouched, tmp removed
    file_sha256("models/ce.pt")                  # how caches and manifests name the files they used
    write_json("metrics/kd.json", {"top1": 0.8})  # metrics and logs, written the same atomic way
    write_history("metrics/kd.csv", rows)         # one CSV row per dict
    check_writable("models/ce.pt", what="--out")  # before hours of work: the folder exists and takes a file
    os_error_text(err)                            # "<path>: No space left on device (ENOSPC)"
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

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


def os_error_text(err: OSError, path: str | Path | None = None) -> str:
    """One line for an OS error: the path it names (else ``path``), the reason and the errno name
    (``/data/c.zarr/logits/c.0.1.0: No space left on device (ENOSPC)``)."""
    where = err.filename if err.filename is not None else path
    reason = err.strerror or str(err) or type(err).__name__
    if isinstance(err, FileExistsError):  # mkdir of a folder whose name is taken by a file
        reason = "exists and is not a folder"
    name = errno.errorcode.get(err.errno or 0, "")
    text = f"{reason} ({name})" if name else reason
    return f"{where}: {text}" if where is not None else text


URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_local(path: str | Path, *, what: str) -> None:
    """A ``UserError`` for a URL given where a local path is expected (``s3://bucket/t.zarr`` would
    otherwise be written as a folder named ``s3:`` in the current directory)."""
    if isinstance(path, str) and URL_SCHEME.match(path):
        scheme = path.split("://", 1)[0]
        raise UserError(f"{what} {path}: expected a local path, found a {scheme}:// URL (stores and files are read "
                        "and written on a local or shared filesystem; copy the object there first)")


def check_distinct(outputs: Mapping[str, str], inputs: Mapping[str, str]) -> None:
    """Refuse, in one line naming both options, an output that is the same path as another output or
    an input, or lies inside one, or holds one (``--out data_manifests/x.parquet --manifest
    data_manifests/x.parquet``; ``--out X.csv --metrics X.json``, whose history is ``X.csv``)."""
    named = [(what, Path(path).resolve(), True) for what, path in outputs.items() if path] + \
            [(what, Path(path).resolve(), False) for what, path in inputs.items() if path]
    for i, (what, path, written) in enumerate(named):
        for other, other_path, other_written in named[:i]:
            if not (written or other_written):
                continue
            if path == other_path:
                if written and other_written:
                    raise UserError(f"{other} and {what} name the same file ({path}); give each its own path")
                out, into = (what, other) if written else (other, what)
                raise UserError(f"{out} would overwrite {into} ({path}); give the output another path")
            if other_path in path.parents or path in other_path.parents:
                (inner, inner_path), (outer, outer_path) = sorted(
                    [(what, path), (other, other_path)], key=lambda item: -len(item[1].parts))
                raise UserError(f"{inner} lies inside {outer} ({inner_path} in {outer_path}); give each its own path")


def check_writable(path: str | Path, *, what: str) -> None:
    """Make sure a file can be written at ``path`` before long work starts: its folder is created
    and a temporary file is written and removed there. An ``OSError`` (a file where a folder should
    be, a read-only folder, a full disk) is a ``UserError`` naming ``what`` (e.g. ``--out``) and the path."""
    path = Path(path)
    try:
        if path.is_dir():
            raise UserError(f"{path}: {what}: expected a file name, found a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=path.parent)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise UserError(f"{os_error_text(err, path)}; {what} {path} cannot be written there") from None


_SETTLED_S = 2        # a file last changed longer ago than this is told apart from a changed one by its times
_HASHED: dict[tuple, str] = {}
_HASHED_MAX = 64


def settled_version(path: str | Path, st: os.stat_result | None = None) -> tuple | None:
    """``(real path, inode, size, mtime, ctime)`` of a file that changed over ``_SETTLED_S`` seconds
    ago, else None: what a process may key a file's hash or decoded contents on. Any later change
    alters those times; a change within the file system's timestamp tick of the last one might not,
    so a recently changed file has no version (it is read afresh each time)."""
    st = st or os.stat(path)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < _SETTLED_S * 10**9:
        return None
    return os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes; an unreadable file is a UserError naming it. A process hashes
    a settled file (``settled_version``) once: a caching run checks its data files and teacher
    more than once."""
    try:
        with open(path, "rb") as fh:
            key = settled_version(path, os.fstat(fh.fileno()))
            if key in _HASHED:
                return _HASHED[key]
            digest = hashlib.sha256()
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    if key is not None:
        if len(_HASHED) >= _HASHED_MAX:
            _HASHED.pop(next(iter(_HASHED)))
        _HASHED[key] = digest.hexdigest()
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
