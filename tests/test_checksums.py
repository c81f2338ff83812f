"""Chunk checksums: one changed byte in any chunk is found by verify, by every read and by distill.

    .venv/bin/pytest tests/test_checksums.py -q

Each case flips one byte inside a chunk file of a complete store (its size unchanged, so the
cheap completeness check passes) and expects one ``UserError`` line naming the store, the array,
the view and the block, from the readers in both modes and from ``kdcache distill``, and a
``checksum:`` problem from ``kdcache verify``.
"""

from __future__ import annotations

import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.reader import StoreGroup
from pipeline.store.verify import verify_store
from pipeline.train.targets import CachedTargets
from tests.support.cli import one_error_line
from tests.support.distill import cache
from tests.support.stores import make_fake_store

N, C, RPB = 300, 10, 128                    # 3 blocks, the last one 44 rows (its chunk padded to 128)

# (case id, store arguments, array whose chunk is changed): every array of every storage kind
CASES = [
    ("dense-float16", {"dtype": "float16"}, "logits"),
    ("dense-float32", {"dtype": "float32"}, "logits"),
    ("topk_values", {"kind": "topk", "k": 3}, "topk_values"),
    ("topk_index", {"kind": "topk", "k": 3}, "topk_index"),
    ("logsumexp", {"kind": "topk", "k": 3}, "logsumexp"),
    ("int8-logits_q", {"dtype": "int8"}, "logits_q"),
    ("logits_scale", {"dtype": "int8"}, "logits_scale"),
    ("logits_offset", {"dtype": "int8"}, "logits_offset"),
    ("sample_index", {"kind": "sampled", "k": 3}, "sample_index"),
    ("sample_count", {"kind": "sampled", "k": 3}, "sample_count"),
    ("entropy", {}, "entropy"),
    ("p_gt", {}, "p_gt"),
    ("pred", {}, "pred"),
]
IDS = [c[0] for c in CASES]


def _store_kwargs(extra: dict) -> dict:
    return dict(num_samples=N, num_classes=C, views=2, rows_per_block=RPB, micro_batch=64, **extra)


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> dict[str, Path]:
    """One complete fake store per storage variant, shared read-only (tests damage copies)."""
    root = tmp_path_factory.mktemp("intact")
    out = {}
    for key, extra in (("float16", {"dtype": "float16"}), ("float32", {"dtype": "float32"}),
                       ("topk", {"kind": "topk", "k": 3}), ("int8", {"dtype": "int8"}),
                       ("sampled", {"kind": "sampled", "k": 3})):
        make_fake_store(root / f"{key}.zarr", **_store_kwargs(extra))
        out[key] = root / f"{key}.zarr"
    return out


def _variant(extra: dict) -> str:
    return extra["kind"] if extra.get("kind") in ("topk", "sampled") else extra.get("dtype", "float16")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _chunk(store: Path, name: str, view: int, block: int) -> Path:
    ndim = zarr.open_array(str(store / name), mode="r").ndim
    return store / schema.chunk_key(name, ndim, view, block)


def flip_byte(store: Path, name: str, view: int, block: int, *, in_padding: bool = False) -> None:
    """XOR one byte of a chunk file: in the middle of its rows' data, or in the padding of the last block."""
    arr = zarr.open_array(str(store / name), mode="r")
    lay = schema.Layout.from_attrs(schema.read_attrs(store))
    start, stop = lay.block_rows(block)
    data_bytes = (stop - start) * int(np.prod(arr.chunks[2:], dtype=np.int64)) * arr.dtype.itemsize
    path = _chunk(store, name, view, block)
    raw = bytearray(path.read_bytes())
    at = (data_bytes + len(raw)) // 2 if in_padding else data_bytes // 2 + 1
    assert (at >= data_bytes) == in_padding and at < len(raw)
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


@pytest.mark.parametrize("key", ["float16", "float32", "topk", "int8", "sampled"])
def test_each_checksum_is_the_crc32_of_the_chunk_file_as_written(intact, key):
    store = intact[key]
    group = zarr.open_group(str(store), mode="r")
    lay = schema.Layout.from_attrs(schema.read_attrs(store))
    names = lay.block_arrays()
    assert group["checksum"].attrs["arrays"] == names and group["checksum"].dtype == np.uint32
    assert group["checksum"].shape == (2, lay.num_blocks, len(names))
    expected = group["checksum"][:]
    for v, b in lay.units():
        start, stop = lay.block_rows(b)
        for i, name in enumerate(names):
            path = _chunk(store, name, v, b)
            assert zlib.crc32(path.read_bytes()) == expected[v, b, i], (name, v, b)   # the bytes on disk
            values = group[name][v, start:stop]                                      # ... and their values
            assert schema.chunk_crc32(values, rows=RPB, dtype=str(group[name].dtype)) == expected[v, b, i]
    assert len(set(expected.reshape(-1).tolist())) == expected.size           # not one constant
    attrs = schema.read_attrs(store)
    assert attrs["checksums"] == schema.ids_checksums(group["sample_id"][:], group["label"][:])
    report = verify_store(store)
    assert report.ok, str(report)
    assert report.chunks_checked == 2 * lay.num_blocks * len(names)
    for mode in ("memory", "stream"):                                          # an intact store reads
        cached = CachedTargets([store], mode=mode, window_blocks=1, max_lag_batches=1)
        for rows in cached.batches(1, batch_size=50, seed=0):
            got = cached.group.targets(1, rows)
            np.testing.assert_array_equal(got["entropy"][0].numpy(), group["entropy"][1][rows])
        cached.close()


@pytest.mark.parametrize("case, extra, name", CASES, ids=IDS)
def test_one_changed_byte_is_reported_by_verify_and_refused_by_readers(intact, tmp_path, case, extra, name):
    store = _copy(intact[_variant(extra)], tmp_path / "s.zarr")
    flip_byte(store, name, view=1, block=2)
    where = f"{name} view 1 block 2"

    report = verify_store(store)
    assert not report.ok
    bad = [p for p in report.problems if p.startswith("checksum:")]
    assert len(bad) == 1 and bad[0].startswith(f"checksum: {where}: expected crc32"), report.problems  # that one
    result = CliRunner().invoke(cli, ["verify", str(store)])
    assert result.exit_code == 1 and "NOT OK" in result.output and f"checksum: {where}" in result.output

    with pytest.raises(UserError) as err:                  # memory mode: checked at load
        CachedTargets([store], mode="memory")
    _one_line(err, str(store), f"field checksum: {where}: expected crc32")

    cached = CachedTargets([store], mode="stream", window_blocks=1, max_lag_batches=1)
    assert cached.group.mode == "stream"
    with pytest.raises(UserError) as err:                  # streaming: when the window with block 2 loads
        for rows in cached.batches(1, batch_size=50, seed=0):
            cached.group.targets(1, rows)
    cached.close()
    _one_line(err, str(store), f"field checksum: {where}: expected crc32")
    cached = CachedTargets([store], mode="stream", window_blocks=1)
    assert sum(len(cached.group.targets(0, rows)["p_gt"][0]) for rows in cached.batches(0, batch_size=50, seed=0)) == N
    cached.close()                                         # view 0 is intact: it streams


def test_the_advice_of_the_error_recomputes_the_block(intact, tmp_path):
    store = _copy(intact["float16"], tmp_path / "s.zarr")
    flip_byte(store, "entropy", view=0, block=1)
    with pytest.raises(UserError) as err:
        StoreGroup([store])
    marker = Path(re.search(r"delete (\S+) and rerun the same `kdcache cache` command", str(err.value)).group(1))
    assert marker == store / "done" / "c.0.1" and marker.is_file()
    marker.unlink()
    result = make_fake_store(store, **_store_kwargs({"dtype": "float16"}))     # the same command again
    assert result.computed == 1 and result.complete
    assert verify_store(store).ok
    assert (store / "entropy" / "c.0.1").read_bytes() == (intact["float16"] / "entropy" / "c.0.1").read_bytes()
    StoreGroup([store])


def test_a_changed_byte_in_the_padding_of_the_last_block_is_found(intact, tmp_path):
    store = _copy(intact["float16"], tmp_path / "s.zarr")
    flip_byte(store, "logits", view=0, block=2, in_padding=True)
    assert any(p.startswith("checksum: logits view 0 block 2:") for p in verify_store(store).problems)
    with pytest.raises(UserError) as err:
        StoreGroup([store], mode="memory")
    _one_line(err, "checksum: logits view 0 block 2")


def test_mixed_dtype_groups_and_the_zarr_path_check_too(intact, tmp_path):
    store = _copy(intact["float16"], tmp_path / "s.zarr")
    flip_byte(store, "logits", view=0, block=0)
    with pytest.raises(UserError) as err:             # float16 + float32: read through bytes, then cast
        StoreGroup([intact["float32"], store], mode="memory")
    _one_line(err, str(store), "checksum: logits view 0 block 0")
    group = StoreGroup([store], mode="stream")        # a store zarr decodes (not a raw chunk file)
    blocks = group._blocks[0]
    blocks.raw = False
    out = {"logits": np.empty((RPB, C), np.float16)}
    with pytest.raises(UserError) as err:
        blocks.read_into(0, 0, out)
    _one_line(err, "checksum: logits view 0 block 0")
    blocks.read_into(1, 0, out)                       # an intact block passes the same path
    np.testing.assert_array_equal(out["logits"], zarr.open_group(str(store), mode="r")["logits"][1, :RPB])


@pytest.mark.parametrize("name", ["sample_id", "label"])
def test_changed_sample_ids_or_labels_are_found(intact, tmp_path, name):
    store = _copy(intact["float16"], tmp_path / "s.zarr")
    path = store / name / "c.1"
    raw = bytearray(path.read_bytes())
    raw[8] ^= 0x01
    path.write_bytes(bytes(raw))
    assert any(p.startswith(f"checksums.{name}: expected crc32") for p in verify_store(store).problems)
    with pytest.raises(UserError) as err:
        StoreGroup([store])
    _one_line(err, str(store), f"field checksums.{name}: expected crc32")


def test_verify_options_sample_rows_and_no_checksums(intact, tmp_path):
    store = _copy(intact["float16"], tmp_path / "s.zarr")
    full = verify_store(store)
    assert full.ok and full.rows_recomputed > 0 and full.chunks_checked > 0
    quick = verify_store(store, sample_rows=0)
    assert quick.ok and quick.rows_recomputed == 0 and quick.chunks_checked == full.chunks_checked
    runner = CliRunner()
    one_error_line(runner.invoke(cli, ["verify", "--sample-rows", "-5", str(store)]), "--sample-rows", "-5")
    with pytest.raises(UserError, match="sample-rows"):
        verify_store(store, sample_rows=-5)
    flip_byte(store, "pred", view=0, block=1)        # a wrong pred value: only the CRC or recomputation sees it
    assert not verify_store(store, sample_rows=0).ok
    assert verify_store(store, sample_rows=0, checksums=False).ok          # skipped, as asked
    out = runner.invoke(cli, ["verify", "--sample-rows", "0", "--no-checksums", str(store)])
    assert out.exit_code == 0 and "checksums not checked" in out.output
    out = runner.invoke(cli, ["verify", "--sample-rows", "0", str(store)])
    assert out.exit_code == 1 and "checksum: pred view 0 block 1" in out.output


def test_a_version_1_store_is_refused_with_how_to_recompute_it(intact, tmp_path):
    store = _copy(intact["float16"], tmp_path / "s.zarr")
    zarr.open_group(str(store), mode="r+").attrs["version"] = 1
    needles = (str(store), "field version: expected 2, found 1", "without chunk checksums", "--overwrite")
    for call in (lambda: verify_store(store), lambda: StoreGroup([store]), lambda: schema.read_attrs(store)):
        with pytest.raises(UserError) as err:
            call()
        _one_line(err, *needles)
    one_error_line(CliRunner().invoke(cli, ["verify", str(store)]), *needles)
    with pytest.raises(UserError, match="found 1"):                  # the cache job will not resume it ...
        make_fake_store(store, **_store_kwargs({"dtype": "float16"}))
    make_fake_store(store, overwrite=True, **_store_kwargs({"dtype": "float16"}))     # ... --overwrite does
    assert schema.read_attrs(store)["version"] == 2 and verify_store(store).ok


# --- kdcache distill on real caches -------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_caches(synthetic_teacher, tmp_path_factory) -> dict[str, Path]:
    """``kdcache cache`` stores of the synthetic teacher's train split (150 rows, blocks of 64, 1 view)."""
    manifest, teacher = synthetic_teacher
    root = tmp_path_factory.mktemp("real")
    return {"float16": cache(teacher, manifest, root / "f16.zarr", views=1),
            "float32": cache(teacher, manifest, root / "f32.zarr", views=1, dtype="float32"),
            "topk": cache(teacher, manifest, root / "top.zarr", views=1, storage="topk", k=2),
            "int8": cache(teacher, manifest, root / "i8.zarr", views=1, dtype="int8"),
            "sampled": cache(teacher, manifest, root / "smp.zarr", views=1, storage="sampled", k=2)}


@pytest.mark.parametrize("case, extra, name", CASES, ids=IDS)
def test_distill_stops_with_one_line_on_a_changed_chunk(synthetic_teacher, real_caches, tmp_path, case, extra, name):
    manifest, _ = synthetic_teacher
    store = _copy(real_caches[_variant(extra)], tmp_path / "c.zarr")
    flip_byte(store, name, view=0, block=1)
    for mode in ("memory", "stream"):
        result = CliRunner().invoke(cli, [
            "distill", "--method", "kd", "--mentors", str(store), "--manifest", str(manifest), "--student", "mlp",
            "--epochs", "1", "--batch-size", "32", "--cache-mode", mode, "--no-progress", "--device", "cpu",
            "--option", "T=1", "--out", str(tmp_path / f"{mode}.pt")])
        one_error_line(result, str(store), f"field checksum: {name} view 0 block 1: expected crc32")
        assert not (tmp_path / f"{mode}.pt").exists()
