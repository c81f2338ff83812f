"""The files a caching job's teachers read, shipped to dask workers that share no filesystem with
the caller: each teacher's manifest and weights go with the tasks, not by path.

    kdcache cache --teacher models/ce.pt --manifest data_manifests/c.parquet --views 16 \\
        --scheduler tcp://head:8786 --out s3://bucket/caches/train/ce.zarr     # shipped (--scheduler's default)
    kdcache cache ... --scheduler tcp://head:8786 --worker-data-root /mnt/datasets/cifar10

    shipped, files = ship_factory(factory, data_root=None)   # caller: the factory with shipped:<sha256>/<name> paths
    payloads = client.scatter(read_files(files))            # sha256 -> the future of the file's bytes
    local = unship(shipped, payloads)                         # worker: written once under its own folder

The client reads each file once (its sha256 names it) and scatters its bytes; a task takes the
payloads as arguments, so a worker fetches each from a peer or the client once and keeps a copy
in its local directory (``kdcache-inputs/<sha256>/<name>``), checked against the sha256. The
factory records where the workers find the data: the manifest's root as the caller resolves it
(a relative root is relative to the manifest's folder, which a worker's copy is not in), or
``data_root``. What is not a file is not shipped: a ``module:function`` teacher's code must be importable
on the workers (``pip install`` it there, or ``client.upload_file``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline.cache.teacher import TeacherFactory
from pipeline.errors import UserError
from pipeline.files import file_sha256, os_error_text
from pipeline.manifest import load_manifest

PREFIX = "shipped:"


def map_teachers(factory: Any, fn: Callable[[TeacherFactory], TeacherFactory]) -> Any:
    """``factory`` with each of its ``TeacherFactory``s (itself, ``.factory`` or ``.teachers``) replaced by ``fn``'s."""
    if isinstance(factory, TeacherFactory):
        return fn(factory)
    if isinstance(getattr(factory, "teachers", None), tuple):
        return dataclasses.replace(factory, teachers=tuple(map_teachers(t, fn) for t in factory.teachers))
    if dataclasses.is_dataclass(getattr(factory, "factory", None)):
        return dataclasses.replace(factory, factory=map_teachers(factory.factory, fn))
    return factory


def ship_factory(factory: Any, *, data_root: str | None = None) -> tuple[Any, dict[str, str]]:
    """``factory`` with every manifest and weights file named by content (``shipped:<sha256>/<name>``)
    and each manifest's data root fixed (``data_root``, else the caller's absolute root), and the
    files to send: sha256 -> the caller's path."""
    files: dict[str, str] = {}

    def shipped(path: str) -> str:
        sha = file_sha256(path)
        files[sha] = path
        return f"{PREFIX}{sha}/{Path(path).name}"

    def ship(teacher: TeacherFactory) -> TeacherFactory:
        root = data_root or load_manifest(teacher.manifest).root
        source = teacher.teacher
        if source.weights_file is not None:
            source = source.with_weights_file(shipped(source.weights_file))
        return dataclasses.replace(teacher, teacher=source, manifest=shipped(teacher.manifest), data_root=str(root))

    return map_teachers(factory, ship), files


def read_files(files: Mapping[str, str]) -> dict[str, bytes]:
    """sha256 -> the bytes of each file, checked against its name (a file changed since it was hashed is refused)."""
    out = {}
    for sha, path in files.items():
        data = Path(path).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise UserError(f"{path}: changed while the job started (sha256 {sha[:12]}... expected); rerun")
        out[sha] = data
    return out


def _worker_folder() -> Path:
    try:
        from distributed import get_worker

        return Path(get_worker().local_directory) / "kdcache-inputs"
    except (ImportError, ValueError):
        return Path(tempfile.gettempdir()) / "kdcache-inputs"


def _materialize(name: str, payloads: Mapping[str, bytes], folder: Path) -> str:
    """The local path of the shipped file ``name``, written under ``folder`` if it is not there yet."""
    sha, _, base = name[len(PREFIX):].partition("/")
    path = folder / sha / base
    if path.is_file():
        return str(path)
    data = payloads[sha]
    if hashlib.sha256(data).hexdigest() != sha:
        raise UserError(f"{base}: expected the shipped bytes of sha256 {sha[:12]}..., found others")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{base}.{os.getpid()}.partial")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    except OSError as err:
        raise UserError(f"{os_error_text(err, path)}: a worker could not keep the shipped {base}") from None
    finally:
        temp.unlink(missing_ok=True)
    return str(path)


def unship(factory: Any, payloads: Mapping[str, bytes], *, folder: Path | None = None) -> Any:
    """``factory`` with every ``shipped:`` path replaced by a copy of its bytes in this worker's
    folder (``folder``, default the dask worker's local directory)."""
    folder = folder or _worker_folder()

    def local(teacher: TeacherFactory) -> TeacherFactory:
        source = teacher.teacher
        weights = source.weights_file
        if weights is not None and weights.startswith(PREFIX):
            source = source.with_weights_file(_materialize(weights, payloads, folder))
        manifest = teacher.manifest
        if manifest.startswith(PREFIX):
            manifest = _materialize(manifest, payloads, folder)
        return dataclasses.replace(teacher, teacher=source, manifest=manifest)

    return map_teachers(factory, local)
