"""What the block writer's bytes rest on: the float16 cast, the tiled stats, the chunk files written
through the zarr store; and a split decoded once per caching run.

    .venv/bin/pytest tests/test_store_writer.py -q
"""

from __future__ import annotations

import gzip
import time
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache import teacher as teacher_module
from pipeline.cache.teacher import TeacherComputer, TeacherFactory
from pipeline.checkpoint import save_checkpoint
from pipeline.data import build_manifest, default_views
from pipeline.data.fashion import read_idx
from pipeline.manifest import load_manifest
from pipeline.models import create_model
from pipeline.store import schema, stats
from pipeline.store.codecs.base import to_float16
from pipeline.teachers import teacher_source
from tests.support.data import write_idx, write_idx_dataset
from tests.support.stores import make_fake_store


def hard_float32() -> np.ndarray:
    """float32 values where float16 rounding is delicate: ties, subnormals, signed zeros, the overflow edge."""
    edges = np.array([0.0, -0.0, 65504.0, 65519.996, 65520.0, -65520.0, 1e6, 2.0**-24, 2.0**-25, 2.0**-25 * 1.5,
                      6.1e-5, 5.96e-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 2049.0, 2051.0, -2049.0], np.float32)
    bits = np.random.default_rng(0).integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    wide = bits.view(np.float32)
    return np.concatenate([edges, wide[np.isfinite(wide)]])


def test_the_float16_cast_has_the_bits_of_numpy() -> None:
    z = hard_float32()
    with np.errstate(over="ignore"):
        want = z.astype(np.float16)
    got = to_float16(z)
    assert got.dtype == np.float16 and got.view(np.uint16).tobytes() == want.view(np.uint16).tobytes()
    assert np.isfinite(to_float16(np.array([65519.0, -65519.0], np.float32))).all()
    assert np.isinf(to_float16(np.array([65520.0, -65520.0], np.float32))).all()


@pytest.mark.parametrize("classes", [1, 3, 1000, 70_000])
def test_target_stats_of_a_row_do_not_depend_on_the_tiling(monkeypatch: pytest.MonkeyPatch, classes: int) -> None:
    rng = np.random.default_rng(classes)
    rows = max(3, 300_000 // classes)
    z = (rng.standard_normal((rows, classes)) * 10.0 ** rng.uniform(-6, 3, (rows, 1))).astype(np.float32)
    labels = rng.integers(0, classes, rows)
    tiled = stats.target_stats(z, labels)
    monkeypatch.setattr(stats, "STATS_TILE_VALUES", 1)           # one row per tile
    for name, values in stats.target_stats(z, labels).items():
        assert values.tobytes() == tiled[name].tobytes(), name
    monkeypatch.setattr(stats, "STATS_TILE_VALUES", 10**9)       # the whole block in one tile
    for name, values in stats.target_stats(z, labels).items():
        assert values.tobytes() == tiled[name].tobytes(), name


@pytest.mark.parametrize("kind,k,dtype", [("dense", None, "float16"), ("dense", None, "int8"), ("topk", 3, "float32"),
                                          ("sampled", 5, "float16")])
def test_every_chunk_file_is_the_padded_block_and_its_recorded_crc(tmp_path: Path, kind: str, k: int | None,
                                                                   dtype: str) -> None:
    store = tmp_path / "s.zarr"
    make_fake_store(store, num_samples=300, views=2, kind=kind, k=k, dtype=dtype, rows_per_block=128)
    group = zarr.open_group(str(store), mode="r")
    layout = schema.Layout.from_attrs(dict(group.attrs))
    crcs = group[schema.CHECKSUM][:]
    for i, name in enumerate(layout.block_arrays()):
        arr = group[name]
        for view in range(2):
            for block in range(layout.num_blocks):
                start, stop = layout.block_rows(block)
                data = (store / schema.chunk_key(name, arr.ndim, view, block)).read_bytes()
                want = schema.chunk_bytes(arr[view, start:stop], rows=128, dtype=str(arr.dtype))
                assert data == want.tobytes()
                assert schema.chunk_crc32(arr[view, start:stop], rows=128, dtype=str(arr.dtype),
                                          start=layout.chunk_crc_start(name, view, block)) == crcs[view, block, i]
    assert group["done"][:].all()
    assert not [p for p in store.rglob("*.partial")]


def test_a_fashion_file_is_decoded_once_until_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_idx_dataset(tmp_path / "fm", n_train=20, n_test=5)
    opened: list[str] = []
    real = gzip.open

    def reading(path, mode="rb", *args, **kwargs):
        if mode.startswith("r"):
            opened.append(str(path))
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(gzip, "open", reading)
    path = root / "train-images-idx3-ubyte.gz"
    assert read_idx(path) is not read_idx(path) and len(opened) == 2     # just written: read afresh each time
    now = time.time_ns
    monkeypatch.setattr("pipeline.files.time.time_ns", lambda: now() + 10**10)     # 10 s later: settled
    first = read_idx(path)
    assert read_idx(path) is first and len(opened) == 3
    write_idx(root / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), gz=True)
    assert read_idx(path).shape == (4, 28, 28) and len(opened) == 4


def test_a_teacher_computer_opens_its_split_once_for_every_view(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = tmp_path / "fm.parquet"
    build_manifest("fashion-mnist", write_idx_dataset(tmp_path / "fm", n_train=40), manifest, seed=0)
    man = load_manifest(manifest)
    torch.manual_seed(0)
    net = create_model("cnn", num_classes=10, input_shape=(1, 28, 28), width=4)
    save_checkpoint(tmp_path / "t.pt", model=net, meta={"arch": "cnn", "num_classes": 10, "input_shape": (1, 28, 28),
                                                        "arch_options": {"width": 4}, "loss": "ce"})
    factory = TeacherFactory(teacher=teacher_source(tmp_path / "t.pt"), manifest=str(manifest), split="train",
                             views=json.dumps(default_views(man).to_dict(), sort_keys=True), micro_batch=8,
                             device="cpu", threads=1)
    opened = []
    real = teacher_module.open_split
    monkeypatch.setattr(teacher_module, "open_split", lambda *a, **kw: opened.append(kw["view"]) or real(*a, **kw))
    computer = TeacherComputer(factory)
    logits = [computer(view, 0, 20) for view in range(3)]
    assert opened == [0] and [computer.dataset(v).view for v in range(3)] == [0, 1, 2]
    assert not np.array_equal(logits[1], logits[2])             # the views differ, and each is the split's own view
    rows = np.arange(20)
    for view in (1, 2):
        direct = real(man, "train", views=default_views(man), view=view)
        assert torch.equal(computer.dataset(view).get_batch(rows)[0], direct.get_batch(rows)[0])
