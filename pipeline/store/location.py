"""Where a store lives: a local folder (a ``Path``, read and written exactly as always) or an object
store URL (``s3://bucket/prefix/t.zarr``, ``gs://...``, ``memory://...``: any fsspec scheme).

    path = store_path("s3://bucket/caches/ce.zarr")   # ObjectPath; "caches/ce.zarr" gives a Path
    (path / "zarr.json").read_bytes()                   # one GET; FileNotFoundError when absent
    zarr.open_group(zarr_store(path), mode="r")         # zarr's own FsspecStore over it
    create_exclusive(path / ".claims" / "0.3", data)    # True for exactly one of several writers

An ``ObjectPath`` answers the few ``Path`` calls the store code makes (``/``, ``read_bytes``,
``write_bytes``, ``is_file``, ``exists``, ``unlink``), so the writer, the readers, verify and the
block claims run unchanged on both; the few operations a filesystem and an object store do
differently are the functions below. On an object store:

- An object is written by one PUT, which is atomic: a reader sees the old object, the new one or
  none, never part of one. So nothing is written to a temporary name first, and there are no
  ``.partial`` files to clean up.
- ``create_exclusive`` is a conditional PUT (``If-None-Match: *``): of several writers of a name
  exactly one succeeds. A server that ignores or refuses the condition (``exclusive_writes``
  probes it) would let two jobs both claim a block: the caching job says so in one line
  (``CONDITIONAL_WRITES``) and jobs then need disjoint ``--shard``s (their bytes stay whole:
  a block's objects are the same whoever writes them).
- Credentials and the endpoint come from the libraries' own environment variables and config
  files (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``~/.aws/``;
  ``GOOGLE_APPLICATION_CREDENTIALS``), never from kdcache options.
- A missing library, missing credentials, an unreachable endpoint, a missing bucket and a
  denied request are each one ``UserError`` naming the URL.
"""

from __future__ import annotations

import atexit
import io
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from pipeline.errors import UserError
from pipeline.files import atomic_path

_REACHED: set[tuple[str, str]] = set()         # (scheme, bucket) found reachable by this process
_EXCLUSIVE: dict[tuple[str, str], bool] = {}   # (scheme, bucket) -> its server honours If-None-Match
_OPEN_CLIENTS: set[Any] = set()                # asynchronous filesystems handed to zarr, closed at exit
URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
EXTRAS = {"s3": "s3", "s3a": "s3"}        # scheme -> the kdcache extra installing its library (others: fsspec's hint)
CONDITIONAL_WRITES = ("the server ignores conditional writes (If-None-Match: *), so block claims cannot keep two "
                      "jobs off one block: give each job of this store a disjoint --shard i/n")


def is_url(store: str | Path) -> bool:
    return isinstance(store, str) and URL.match(store) is not None and not store.startswith("file://")


def child(folder: str | Path, name: str) -> str:
    """``folder/name`` for a folder or a URL (a ``Path`` would fold ``s3://`` into ``s3:/``)."""
    return f"{folder.rstrip('/')}/{name}" if is_url(folder) else str(Path(folder) / name)


def store_path(store: "str | Path | ObjectPath") -> "Path | ObjectPath":
    """A local store as a ``Path`` (as it always was); a URL as an ``ObjectPath`` whose bucket was found."""
    if isinstance(store, (Path, ObjectPath)):
        return store
    if not is_url(store):
        return Path(store)
    path = ObjectPath.from_url(store.rstrip("/"))
    if (path.scheme, path.bucket) not in _REACHED:
        path.check_reachable()
        _REACHED.add((path.scheme, path.bucket))
    return path


def is_local(path: "Path | ObjectPath") -> bool:
    return isinstance(path, Path)


def local_twin(store: "str | Path | ObjectPath") -> Path:
    """The local path a store's recorded file paths are relative to: a local store's own, and for
    ``s3://bucket/caches/t.zarr`` the same key under the working folder (``caches/t.zarr``), so
    that a store cached to a bucket records the bytes the same store cached locally there does,
    and finds its manifest and teacher again once copied there (``kdcache store copy``)."""
    if isinstance(store, ObjectPath) or is_url(store):
        match = URL.match(str(store))
        return Path(match.group(2).partition("/")[2] or ".")
    return Path(store)


def _filesystem(url: str, **options: Any) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` (listings never cached: markers and claims change under us)."""
    scheme = URL.match(url).group(1)
    try:
        import fsspec
        return fsspec.url_to_fs(url, use_listings_cache=False, **options)
    except (ImportError, ValueError) as err:
        extra = EXTRAS.get(scheme)
        hint = f"pip install 'kdcache[{extra}]'" if extra else f"install the fsspec backend of {scheme}://"
        raise UserError(f"{url}: expected a {scheme}:// store library, found none ({hint}; {err})") from None


class ObjectPath:
    """A key (or a prefix) in an object store, with the ``Path`` calls the store code makes."""

    def __init__(self, fs: Any, key: str, url: str) -> None:
        self.fs, self.key, self.url = fs, key.rstrip("/"), url.rstrip("/")
        self.scheme = URL.match(url).group(1)

    @classmethod
    def from_url(cls, url: str) -> "ObjectPath":
        fs, key = _filesystem(url)
        return cls(fs, key, url)

    def __truediv__(self, name: str) -> "ObjectPath":
        return ObjectPath(self.fs, f"{self.key}/{name}", f"{self.url}/{name}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def bucket(self) -> str:
        return self.key.lstrip("/").partition("/")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(self.fs, self.key.rpartition("/")[0], self.url.rpartition("/")[0])

    def _call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """``fn`` of the filesystem; its errors other than a missing object as one ``UserError`` line."""
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError):
            raise
        except Exception as err:  # noqa: BLE001 - botocore's and gcsfs's errors have no common base
            raise UserError(f"{self}: {access_error(err)}") from None

    def read_bytes(self) -> bytes:
        return self._call(self.fs.cat_file, self.key)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        self._call(self.fs.pipe_file, self.key, bytes(data))

    def is_file(self) -> bool:
        return self._call(self.fs.isfile, self.key)

    def is_dir(self) -> bool:
        return bool(self._call(self.fs.find, self.key + "/", maxdepth=1))

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._call(self.fs.rm_file, self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def check_reachable(self) -> None:
        """Fail early, in one line, when the bucket is missing, denied or unreachable."""
        bucket = self.bucket
        if self.scheme == "memory":
            return
        try:
            self._call(self.fs.ls, bucket, detail=False)
        except FileNotFoundError:
            raise UserError(f"{self}: expected an existing bucket, found no bucket {bucket!r} at the endpoint "
                            "(create it first)") from None


def access_error(err: Exception) -> str:
    """What an object store error means to the user, with the variables that set what was tried."""
    kind = type(err).__name__
    if kind in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
        return (f"expected credentials, found none ({err}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or a profile in ~/.aws)")
    if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or \
            isinstance(err, (ConnectionError, TimeoutError)):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
        return f"expected a reachable endpoint, found none at {endpoint} ({err})"
    if isinstance(err, PermissionError):
        return f"expected access, found it denied ({err}; check the credentials' permissions on the bucket)"
    return f"expected a readable and writable object store, found an error ({kind}: {err})"


def read_many(paths: "list[Path | ObjectPath]") -> "dict[Path | ObjectPath, bytes]":
    """The files or objects of ``paths`` (all of one store) that exist, with their bytes: local files
    read one by one, objects fetched concurrently (one batch of GETs)."""
    if not paths:
        return {}
    if is_local(paths[0]):
        return {path: path.read_bytes() for path in paths if path.is_file()}
    got = paths[0]._call(paths[0].fs.cat, [p.key for p in paths], on_error="return")
    out = {}
    for path in paths:
        data = got.get(path.key)
        if isinstance(data, FileNotFoundError):
            continue
        if isinstance(data, Exception):
            raise UserError(f"{path}: {access_error(data)}")
        out[path] = data
    return out


def zarr_store(path: "Path | ObjectPath", *, read_only: bool) -> Any:
    """What ``zarr.open_group`` opens: a local folder's path as a string (zarr's LocalStore, as
    always), or zarr's FsspecStore over the object store's filesystem."""
    if is_local(path):
        return str(path)
    from zarr.storage import FsspecStore
    if not path.fs.async_impl:             # memory:// and other synchronous filesystems: zarr wraps them
        return FsspecStore.from_url(path.url, storage_options={"use_listings_cache": False}, read_only=read_only)
    fs, key = _filesystem(path.url, asynchronous=True)
    if not _OPEN_CLIENTS:
        atexit.register(_close_clients)
    _OPEN_CLIENTS.add(fs)
    return FsspecStore(fs, path=key, read_only=read_only)


def _close_clients() -> None:
    """Close the HTTP sessions of the filesystems zarr used, on zarr's event loop, at exit (left
    open, aiohttp reports each one on stderr as the interpreter ends)."""
    from zarr.core.sync import sync
    for fs in list(_OPEN_CLIENTS):
        client = getattr(fs, "_s3", None)
        if client is not None:
            try:
                sync(client.close())
            except Exception:  # noqa: BLE001 - closing at exit: nothing left to report it to
                pass
    _OPEN_CLIENTS.clear()


@contextmanager
def open_read(path: "Path | ObjectPath") -> Iterator[BinaryIO]:
    """A file to read whole: the local file itself, or the object fetched in one GET."""
    if is_local(path):
        with open(path, "rb") as fh:
            yield fh
    else:
        yield io.BytesIO(path.read_bytes())


def create_exclusive(path: "Path | ObjectPath", data: bytes, *, tmp: str | None = None) -> bool:
    """Create ``path`` with ``data`` unless it exists; True when this call created it. Locally the
    data goes to the private temporary name ``tmp`` (in the same folder) first, hard-linked to
    ``path`` (``os.link`` fails when the name exists; a reader never sees a half-written file);
    on an object store, a conditional PUT. FileNotFoundError when the local folder vanished."""
    if not is_local(path):
        if not exclusive_writes(path.parent):      # best effort: whoever writes last owns the name
            if path.is_file():
                return False
            path.write_bytes(data)
            return True
        try:
            path._call(path.fs.pipe_file, path.key, bytes(data), mode="create")
        except FileExistsError:
            return False
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / (tmp or f".tmp-{uuid.uuid4().hex}")
    try:
        temp.write_bytes(data)
        os.link(temp, path)
    except FileExistsError:
        return False
    finally:
        temp.unlink(missing_ok=True)
    return True


def exclusive_writes(folder: "Path | ObjectPath") -> bool:
    """Whether writes under ``folder`` can be exclusive: always in a local folder; in a bucket when
    its server refuses a second conditional PUT of one name (probed once per bucket and process)."""
    if is_local(folder):
        return True
    bucket = (folder.scheme, folder.bucket)
    if bucket not in _EXCLUSIVE:
        probe = folder / f".probe-{uuid.uuid4().hex}"
        try:
            probe._call(probe.fs.pipe_file, probe.key, b"", mode="create")
            try:
                probe._call(probe.fs.pipe_file, probe.key, b"", mode="create")
                _EXCLUSIVE[bucket] = False         # the condition was ignored
            except FileExistsError:
                _EXCLUSIVE[bucket] = True
        except UserError:                          # the condition was refused (501 Not Implemented ...)
            _EXCLUSIVE[bucket] = False
        finally:
            probe.unlink(missing_ok=True)
    return _EXCLUSIVE[bucket]


def write_whole(path: "Path | ObjectPath", data: bytes) -> None:
    """Write ``path`` whole or not at all: a local file through a temporary name in its folder,
    renamed over it; an object by one PUT."""
    if not is_local(path):
        path.write_bytes(data)
        return
    with atomic_path(path) as temp:
        temp.write_bytes(data)


def modified(path: "Path | ObjectPath") -> float:
    """When ``path`` was last written (epoch seconds); FileNotFoundError when it is gone."""
    if is_local(path):
        return path.stat().st_mtime
    info = path._call(path.fs.info, path.key)
    stamp = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created")
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or time.time())


def touch(path: "Path | ObjectPath", *, data: bytes | None = None, age_out: bool = False) -> None:
    """Mark ``path`` as written now (``age_out``: long ago), if it still exists. An object's time
    cannot be set: it is written again (with ``data``, which says it is aged out when ``age_out``)."""
    if is_local(path):
        try:
            os.utime(path, (0, 0) if age_out else None)
        except FileNotFoundError:
            pass
        return
    if path.is_file():
        path.write_bytes(data if data is not None else path.read_bytes())


def list_names(folder: "Path | ObjectPath") -> list[str]:
    """The names in ``folder``; FileNotFoundError when it does not exist (or has no object)."""
    if is_local(folder):
        return os.listdir(folder)
    found = folder._call(folder.fs.find, folder.key + "/", maxdepth=1)
    if not found:
        raise FileNotFoundError(str(folder))
    return [key.rpartition("/")[2] for key in found]


def remove_folder(folder: "Path | ObjectPath") -> None:
    """Remove an empty local folder (an object store has none); OSError when it is not empty."""
    if is_local(folder):
        folder.rmdir()


def remove_tree(path: "Path | ObjectPath") -> None:
    """Delete a store whole (``--overwrite``)."""
    if is_local(path):
        shutil.rmtree(path)
    elif path.is_dir():
        path._call(path.fs.rm, path.key, recursive=True)


def file_sizes(path: "Path | ObjectPath") -> dict[str, int]:
    """Relative key -> size in bytes of every file (object) of the store."""
    found = {}
    if not is_local(path):
        listed = path._call(path.fs.find, path.key + "/", detail=True)
        return {key[len(path.key) + 1:]: int(info["size"]) for key, info in listed.items()}
    for root, _, files in os.walk(path):
        rel = os.path.relpath(root, path)
        for name in files:
            key = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
            found[key] = os.path.getsize(os.path.join(root, name))
    return found
