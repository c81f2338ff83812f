"""Fake stores and tiny synthetic teachers for the store, reader and cache tests.

    from tests.support.stores import FakeFactory, make_fake_store, make_synthetic_teacher
    make_fake_store(tmp_path / "s.zarr", num_samples=700, views=1)   # any layout, through write_cache
    manifest, ckpt = make_synthetic_teacher(tmp_path)                # 3000 samples, a confident MLP
    swap_blocks(store, view=0, a=0, b=1)                             # damage with checksums moved along
    rewrite_chunk(store, "mix_lambda", view=1, block=0, values=lam)  # new values with their checksum

``FakeFactory`` is a deterministic stand-in teacher (logits a pure function of seed, view and
row), so a store written in any block order or by any shards has the same bytes. The defaults
are also fixtures (tests/conftest.py): ``fake_store`` and ``synthetic_teacher``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.cache import write_cache
from pipeline.checkpoint import save_checkpoint
from pipeline.data import build_manifest
from pipeline.manifest import load_manifest
from pipeline.models import create_model
from pipeline.store import schema
from pipeline.store.writer import Provenance


@dataclass(frozen=True)
class FakeFactory:
    """Logits that are a pure function of (seed, view, row): any block layout gives the same values."""

    num_classes: int
    seed: int = 0
    scale: float = 4.0

    def build(self) -> "FakeComputer":
        return FakeComputer(self)


class FakeComputer:
    """The built block computer: ``(view, start, stop) -> float32 logits``, recording each call."""

    def __init__(self, factory: FakeFactory) -> None:
        self.factory = factory
        self.num_classes = factory.num_classes
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, view: int, start: int, stop: int) -> np.ndarray:
        self.calls.append((view, start, stop))
        rows = np.arange(start, stop, dtype=np.float64)[:, None]
        cls = np.arange(self.num_classes, dtype=np.float64)[None, :]
        z = np.sin(rows * 0.7311 + cls * 1.913 + view * 0.377 + self.factory.seed * 2.1) * self.factory.scale
        z += np.cos(rows * 0.0137 * (cls + 1)) * 0.5
        return z.astype(np.float32)


def fake_provenance(num_samples: int, num_classes: int, views: int, *, manifest_sha: str = "m" * 64,
                    teacher_sha: str = "t" * 64, name: str = "fake") -> Provenance:
    """What ``write_cache`` records about a fake store's manifest, teacher and views."""
    return Provenance(
        manifest={"path": "fake.parquet", "sha256": manifest_sha, "split": "train", "num_samples": num_samples,
                  "num_classes": num_classes, "dataset": "fake"},
        teacher={"name": name, "arch": "fake", "checkpoint_sha256": teacher_sha, "train_loss": "ce", "path": "fake.pt"},
        views={"count": views, "seed": 0, "spec": {"kind": "identity", "seed": 0, "params": {}}},
    )


def fake_labels(num_samples: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Random int32 labels, the same for the same arguments."""
    return np.random.default_rng(seed).integers(0, num_classes, num_samples).astype(np.int32)


def make_fake_store(out: Path, *, num_samples: int = 1000, num_classes: int = 10, views: int = 2,
                    kind: str = "dense", k: int | None = None, dtype: str = "float16", rows_per_block: int = 256,
                    micro_batch: int = 64, seed: int = 0, teacher_sha: str = "t" * 64, **kw):
    """A complete ``FakeFactory`` store at ``out`` (``kw`` go to ``write_cache``: shard, overwrite ...);
    returns ``write_cache``'s result."""
    layout = schema.Layout(num_samples=num_samples, num_classes=num_classes, num_views=views, kind=kind, k=k,
                           dtype=dtype, rows_per_block=rows_per_block, micro_batch=micro_batch)
    return write_cache(out, factory=FakeFactory(num_classes, seed=seed),
                       provenance=fake_provenance(num_samples, num_classes, views, teacher_sha=teacher_sha),
                       layout=layout, sample_id=np.arange(num_samples, dtype=np.int64) * 3 + 7,
                       label=fake_labels(num_samples, num_classes), progress=False, **kw)


def block_files(store: Path, view: int, block: int) -> list[Path]:
    """The chunk files of (view, block): every block array's, then its ``checksum`` chunk."""
    lay = schema.Layout.from_attrs(schema.read_attrs(store))
    specs = lay.arrays()
    return [Path(store) / schema.chunk_key(name, len(specs[name][0]), view, block)
            for name in lay.block_arrays() + [schema.CHECKSUM]]


def swap_blocks(store: Path, *, view: int, a: int, b: int) -> None:
    """Swap two whole blocks of a view: their data chunks and their checksum chunks together."""
    for fa, fb in zip(block_files(store, view, a), block_files(store, view, b)):
        da, db = fa.read_bytes(), fb.read_bytes()
        fa.write_bytes(db)
        fb.write_bytes(da)


def duplicate_block(store: Path, *, view: int, source: int, target: int) -> None:
    """Copy a whole block (data and checksum chunks) over another block of the same view."""
    for src, dst in zip(block_files(store, view, source), block_files(store, view, target)):
        dst.write_bytes(src.read_bytes())


def move_chunk(store: Path, name: str, *, view: int, block: int, to: tuple[str, int, int]) -> None:
    """Copy the chunk of (``name``, view, block) over that of ``to`` = (array, view, block), and its
    checksum into the checksum chunk of ``to``'s block, at ``to``'s array: a chunk moved with its checksum."""
    lay = schema.Layout.from_attrs(schema.read_attrs(store))
    specs, names = lay.arrays(), lay.block_arrays()
    target, tview, tblock = to
    src = Path(store) / schema.chunk_key(name, len(specs[name][0]), view, block)
    (Path(store) / schema.chunk_key(target, len(specs[target][0]), tview, tblock)).write_bytes(src.read_bytes())
    crc_src = np.fromfile(Path(store) / schema.chunk_key(schema.CHECKSUM, 3, view, block), dtype="<u4")
    crc_file = Path(store) / schema.chunk_key(schema.CHECKSUM, 3, tview, tblock)
    crcs = np.fromfile(crc_file, dtype="<u4")
    crcs[names.index(target)] = crc_src[names.index(name)]
    crc_file.write_bytes(crcs.tobytes())


def rewrite_chunk(store: Path, name: str, *, view: int, block: int, values: np.ndarray) -> None:
    """Write ``values`` (the block's rows) as the chunk of (``name``, view, block) and their CRC-32 into
    the block's checksum chunk: a change that only the checks of the values themselves can find."""
    lay = schema.Layout.from_attrs(schema.read_attrs(store))
    shape, chunks, dtype = lay.arrays()[name]
    data = schema.chunk_bytes(values, rows=chunks[1], dtype=dtype)
    (Path(store) / schema.chunk_key(name, len(shape), view, block)).write_bytes(data.tobytes())
    crc_file = Path(store) / schema.chunk_key(schema.CHECKSUM, 3, view, block)
    crcs = np.fromfile(crc_file, dtype="<u4")
    crcs[lay.block_arrays().index(name)] = zlib.crc32(data, lay.chunk_crc_start(name, view, block))
    crc_file.write_bytes(crcs.tobytes())


def rewrite_as_version_2(store: Path) -> None:
    """Make a complete store what the version-2 writer wrote: each chunk's checksum the CRC-32 of its
    bytes alone, and attrs ``version`` 2 (tests/store/version2.zarr shows it gives that writer's bytes)."""
    lay = schema.Layout.from_attrs(schema.read_attrs(store))
    for view, block in lay.units():
        *chunks, crc_file = block_files(store, view, block)
        crc_file.write_bytes(np.array([zlib.crc32(c.read_bytes()) for c in chunks], "<u4").tobytes())
    zarr.open_group(str(store), mode="r+").attrs["version"] = 2


def store_files(store: Path) -> dict[str, bytes]:
    """Every file of a store by relative path, except the group's zarr.json (it holds timestamps)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(Path(store).rglob("*"))
            if p.is_file() and str(p.relative_to(store)) != "zarr.json"}


def store_bytes(store: Path) -> int:
    """Apparent size, files and directories, as ``du -sb`` counts it."""
    return Path(store).stat().st_size + sum(p.stat().st_size for p in Path(store).rglob("*"))


def synthetic_checkpoint(manifest: str | Path, out: str | Path, *, torch_seed: int = 0,
                         scale: float = 8.0) -> Path:
    """An untrained MLP for a synthetic ``manifest`` (last layer scaled so it is confident), saved at ``out``."""
    m = load_manifest(manifest)
    torch.manual_seed(torch_seed)
    net = create_model("mlp", num_classes=m.num_classes, input_shape=(30,))
    with torch.no_grad():
        last = [mod for mod in net.modules() if isinstance(mod, torch.nn.Linear)][-1]
        last.weight.mul_(scale)
    save_checkpoint(out, model=net, meta={"arch": "mlp", "num_classes": m.num_classes, "input_shape": (30,),
                                          "loss": "ce", "manifest_sha256": m.sha256})
    return Path(out)


def make_synthetic_teacher(root: Path, *, num_samples: int = 3000, seed: int = 0, scale: float = 8.0,
                           torch_seed: int = 0, name: str = "teacher.pt") -> tuple[Path, Path]:
    """A synthetic manifest (``root/synthetic.parquet``, reused if there) and a ``synthetic_checkpoint`` beside it."""
    manifest = root / "synthetic.parquet"
    if not manifest.exists():
        build_manifest("synthetic", root / "synthetic", manifest, num_samples=num_samples, seed=seed)
    return manifest, synthetic_checkpoint(manifest, root / name, torch_seed=torch_seed, scale=scale)


class Recording:
    """A factory whose computers are FakeFactory's (``num_classes``), recording (view, block) into
    ``calls`` for blocks of ``rows_per_block`` rows; ``first`` runs before the first block a computer
    computes."""

    def __init__(self, calls: list, first=None, *, num_classes: int, rows_per_block: int) -> None:
        self.calls, self.first, self.num_classes, self.rows_per_block = calls, first, num_classes, rows_per_block

    def build(self):
        inner = FakeFactory(self.num_classes).build()
        calls, first, rows = self.calls, [self.first] if self.first else [], self.rows_per_block

        def compute(view: int, start: int, stop: int) -> np.ndarray:
            calls.append((view, start // rows))
            if first:
                first.pop()()
            return inner(view, start, stop)

        compute.num_classes = self.num_classes
        return compute


def two_jobs_on_one_store(cache, recording, *, wait: float) -> tuple[list, list, dict]:
    """Two caching jobs on one store, in threads: job A holds its first block until job B has moved
    past it. ``cache(factory)`` runs a job; ``recording(calls, first)`` makes its factory. Returns
    the (view, block) each job computed, in order, and each job's result; a job's error is raised."""
    import threading

    a_holds, b_skipped = threading.Event(), threading.Event()
    a_calls, b_calls, results, errors = [], [], {}, []

    def hold_until_b_moves_on():            # job A sits in its first block until job B went past it
        a_holds.set()
        assert b_skipped.wait(wait)

    def job(name, factory):
        try:
            results[name] = cache(factory)
        except BaseException as err:        # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(err)

    a = threading.Thread(target=job, args=("a", recording(a_calls, hold_until_b_moves_on)))
    a.start()
    assert a_holds.wait(wait)
    b = threading.Thread(target=job, args=("b", recording(b_calls, b_skipped.set)))
    b.start()
    a.join(2 * wait)
    b.join(2 * wait)
    if errors:
        raise errors[0]
    return a_calls, b_calls, results
