"""Chunk checksums: one changed byte in any chunk, and any chunk out of its place, is found by verify,
by every read and by distill.

    .venv/bin/pytest tests/test_checksums.py -q

Each case flips one byte inside a chunk file of a complete store (its size unchanged, so the
cheap completeness check passes), or swaps, duplicates or moves chunks together with their
checksums, and expects one ``UserError`` line naming the store, the array, the view and the
block, from the readers in both modes and from ``kdcache distill`` (the damaged store as any
mentor), and a ``checksum:`` problem from ``kdcache verify``. A version-2 store
(``tests/store/version2.zarr``, written by that version's writer: checksums of the bytes alone)
still verifies, reads, trains and resumes under its own rule.
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
from tests.support.stores import (
    duplicate_block,
    make_fake_store,
    move_chunk,
    rewrite_as_version_2,
    store_files,
    swap_blocks,
)

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
def test_each_checksum_is_the_crc32_of_the_chunk_key_and_file_as_written(intact, key):
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
            key = str(path.relative_to(store)).encode()                              # the chunk key, then
            assert zlib.crc32(key + path.read_bytes()) == expected[v, b, i], (name, v, b)   # the bytes on disk
            assert zlib.crc32(path.read_bytes()) != expected[v, b, i], (name, v, b)  # (not the bytes alone)
            values = group[name][v, start:stop]                                      # ... and their values
            assert schema.chunk_crc32(values, rows=RPB, dtype=str(group[name].dtype),
                                      start=lay.chunk_crc_start(name, v, b)) == expected[v, b, i]
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
    needles = (str(store), "field version: expected 2 or 3, found 1", "without chunk checksums", "--overwrite")
    for call in (lambda: verify_store(store), lambda: StoreGroup([store]), lambda: schema.read_attrs(store)):
        with pytest.raises(UserError) as err:
            call()
        _one_line(err, *needles)
    one_error_line(CliRunner().invoke(cli, ["verify", str(store)]), *needles)
    with pytest.raises(UserError, match="found 1"):                  # the cache job will not resume it ...
        make_fake_store(store, **_store_kwargs({"dtype": "float16"}))
    make_fake_store(store, overwrite=True, **_store_kwargs({"dtype": "float16"}))     # ... --overwrite does
    assert schema.read_attrs(store)["version"] == schema.FORMAT_VERSION == 3 and verify_store(store).ok


def test_a_store_of_a_later_version_is_refused(intact, tmp_path):
    store = _copy(intact["float16"], tmp_path / "s.zarr")
    zarr.open_group(str(store), mode="r+").attrs["version"] = 4
    one_error_line(CliRunner().invoke(cli, ["verify", str(store)]), str(store), "field version: expected 2 or 3, found 4")


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


# --- a chunk's checksum holds only in its place (array, view, block) -------------------------------------

PLACE = {   # damage to a fake store (3 blocks, 2 views), every chunk it leaves out of place
    "two blocks swapped": (lambda s: swap_blocks(s, view=1, a=0, b=2), [(1, 0), (1, 2)]),
    "a block duplicated": (lambda s: duplicate_block(s, view=0, source=0, target=1), [(0, 1)]),
    "a chunk moved to another block": (lambda s: move_chunk(s, "entropy", view=0, block=0, to=("entropy", 0, 1)),
                                       [("entropy", 0, 1)]),
    "a chunk moved to another view": (lambda s: move_chunk(s, "logits", view=0, block=1, to=("logits", 1, 1)),
                                      [("logits", 1, 1)]),
    "a chunk moved to another array": (lambda s: move_chunk(s, "entropy", view=1, block=2, to=("p_gt", 1, 2)),
                                       [("p_gt", 1, 2)]),
}


def _places(store: Path, spots: list) -> set[str]:
    names = schema.Layout.from_attrs(schema.read_attrs(store)).block_arrays()
    out = set()
    for spot in spots:
        for name, v, b in [spot] if len(spot) == 3 else [(n, *spot) for n in names]:
            out.add(f"checksum: {name} view {v} block {b}")
    return out


@pytest.mark.parametrize("damage", list(PLACE))
def test_chunks_out_of_place_fail_verify_and_every_read(intact, tmp_path, damage):
    change, spots = PLACE[damage]
    store = _copy(intact["float16"], tmp_path / "s.zarr")
    change(store)
    report = verify_store(store)
    found = {p.split(": expected")[0] for p in report.problems if p.startswith("checksum:")}
    assert found == _places(store, spots), report.problems
    result = CliRunner().invoke(cli, ["verify", str(store)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert all(where in result.output for where in _places(store, spots))
    for mode in ("memory", "stream"):
        with pytest.raises(UserError) as err:
            cached = CachedTargets([intact["float32"], store], mode=mode, window_blocks=3)
            for v in range(2):
                for rows in cached.batches(v, batch_size=100, seed=0):
                    cached.group.targets(v, rows)
        _one_line(err, str(store), "field checksum:", "or its place changed")

    old = _copy(intact["float16"], tmp_path / "v2.zarr")    # the same damage is consistent bytes for version 2:
    rewrite_as_version_2(old)                               # the checksums did move along with the chunks
    change(old)
    assert not [p for p in verify_store(old, sample_rows=0).problems if p.startswith("checksum:")]


# --- stores of format version 2 ---------------------------------------------------------------------------

VERSION2 = Path(__file__).parent / "store" / "version2.zarr"      # written by the version-2 writer, with
V2_ARGS = dict(num_samples=40, num_classes=3, views=2, rows_per_block=16, micro_batch=8)   # make_fake_store(V2_ARGS)


def test_a_version_2_store_verifies_reads_and_resumes_under_its_own_rule(tmp_path):
    store = _copy(VERSION2, tmp_path / "v2.zarr")
    attrs = schema.read_attrs(store)
    lay = schema.Layout.from_attrs(attrs)
    assert attrs["version"] == lay.version == 2 and lay.chunk_crc_start("logits", 0, 1) == 0
    expected = zarr.open_group(str(store), mode="r")["checksum"][:]
    for v, b in lay.units():
        for i, name in enumerate(lay.block_arrays()):
            assert zlib.crc32(_chunk(store, name, v, b).read_bytes()) == expected[v, b, i]   # the bytes alone
    report = verify_store(store)
    assert report.ok and report.chunks_checked == 2 * 3 * 4, str(report)
    group = StoreGroup([store], mode="memory")
    rows = np.arange(40)
    np.testing.assert_array_equal(group.targets(1, rows)["logits"][0].numpy(),
                                  zarr.open_group(str(store), mode="r")["logits"][1].astype(np.float32))
    (store / "done" / "c.1.1").unlink()                   # resumed: the block is rewritten under rule 2
    result = make_fake_store(store, **V2_ARGS)
    assert result.computed == 1 and result.complete
    assert schema.read_attrs(store)["version"] == 2 and store_files(store) == store_files(VERSION2)
    flip_byte(store, "p_gt", view=1, block=2)             # and a changed byte is still found
    assert any(p.startswith("checksum: p_gt view 1 block 2:") for p in verify_store(store).problems)
    with pytest.raises(UserError) as err:
        StoreGroup([store])
    _one_line(err, str(store), "field checksum: p_gt view 1 block 2")


def test_rewrite_as_version_2_gives_the_version_2_writers_bytes(tmp_path):
    store = tmp_path / "s.zarr"
    make_fake_store(store, **V2_ARGS)                     # this version: keyed checksums, nothing else differs
    new, old = store_files(store), store_files(VERSION2)
    assert new.keys() == old.keys()
    assert {k for k in new if new[k] != old[k]} == {f"checksum/c.{v}.{b}.0" for v in range(2) for b in range(3)}
    rewrite_as_version_2(store)
    assert store_files(store) == old
    assert schema.read_attrs(store) == schema.read_attrs(VERSION2)


def test_distill_trains_from_a_version_2_store(synthetic_teacher, real_caches, tmp_path):
    manifest, _ = synthetic_teacher
    store = _copy(real_caches["float16"], tmp_path / "v2.zarr")
    rewrite_as_version_2(store)
    assert schema.read_attrs(store)["version"] == 2 and verify_store(store).ok
    result = CliRunner().invoke(cli, [
        "distill", "--method", "kd", "--mentors", str(store), "--manifest", str(manifest), "--student", "mlp",
        "--epochs", "1", "--batch-size", "32", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "s.pt")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.pt").is_file()


# --- every mentor is checked, not only the first -----------------------------------------------------------

REAL_PLACE = {
    "two blocks swapped": lambda s: swap_blocks(s, view=0, a=0, b=1),
    "a block duplicated": lambda s: duplicate_block(s, view=0, source=1, target=0),
    "a chunk moved": lambda s: move_chunk(s, "logits", view=0, block=1, to=("logits", 0, 0)),
}


def _aver(manifest: Path, mentors: list[Path], out: Path):
    return CliRunner().invoke(cli, [
        "distill", "--method", "aver", "--mentors", *map(str, mentors), "--manifest", str(manifest),
        "--student", "mlp", "--epochs", "1", "--batch-size", "32", "--no-progress", "--device", "cpu",
        "--out", str(out)])


@pytest.mark.parametrize("position", [0, 1])
@pytest.mark.parametrize("damage", list(REAL_PLACE))
def test_distill_refuses_chunks_out_of_place_in_every_mentor(synthetic_teacher, real_caches, tmp_path, damage,
                                                             position):
    manifest, _ = synthetic_teacher
    store = _copy(real_caches["float16"], tmp_path / "c.zarr")
    REAL_PLACE[damage](store)
    assert any(p.startswith("checksum: ") for p in verify_store(store, sample_rows=0).problems)
    mentors = [real_caches["float32"]]
    mentors.insert(position, store)
    out = tmp_path / "s.pt"
    one_error_line(_aver(manifest, mentors, out), str(store), "field checksum: ", "view 0 block 0",
                   "or its place changed")
    assert not out.exists()


def _flip_label(store: Path) -> None:
    """A high bit flipped in one label: a value far outside [0, C)."""
    path = store / "label" / "c.1"
    raw = bytearray(path.read_bytes())
    raw[8] ^= 0x80
    path.write_bytes(bytes(raw))


def test_a_flipped_label_byte_is_one_problem_line_for_verify(intact, tmp_path):
    store = _copy(intact["float16"], tmp_path / "s.zarr")
    _flip_label(store)
    result = CliRunner().invoke(cli, ["verify", str(store)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "NOT OK" in result.output and "checksums.label: expected crc32" in result.output
    assert "label: expected values in [0, 10)" in result.output
    assert not [line for line in result.output.splitlines() if "checksum:" in line]   # the blocks are intact


@pytest.mark.parametrize("position", [0, 1])
def test_distill_refuses_a_flipped_label_byte_in_every_mentor(synthetic_teacher, real_caches, tmp_path, position):
    manifest, _ = synthetic_teacher
    store = _copy(real_caches["float16"], tmp_path / "c.zarr")
    _flip_label(store)
    mentors = [real_caches["float32"]]
    mentors.insert(position, store)
    one_error_line(_aver(manifest, mentors, tmp_path / "s.pt"), str(store), "field checksums.label: expected crc32")
    assert not (tmp_path / "s.pt").exists()


def test_a_later_mentor_with_other_labels_is_refused(intact, tmp_path):
    store = _copy(intact["float16"], tmp_path / "s.zarr")
    group = zarr.open_group(str(store), mode="r+")
    labels = group["label"][:]
    group["label"][:] = (labels + 1) % C                  # other labels, its own attrs checksum to match
    group.attrs["checksums"] = schema.ids_checksums(group["sample_id"][:], group["label"][:])
    assert verify_store(store, sample_rows=0).ok
    with pytest.raises(UserError) as err:
        StoreGroup([intact["float32"], store])
    _one_line(err, str(store), "field label: expected the labels of", str(intact["float32"]))


def test_inspect_refuses_a_changed_chunk_in_every_way_it_reads(intact, tmp_path):
    from pipeline.inspect import inspect_stores, write_samples
    from pipeline.inspect_rank import rank_samples, store_probabilities
    store = _copy(intact["float16"], tmp_path / "s.zarr")
    assert inspect_stores([store])["stores"][0]["num_samples"] == N          # intact: inspected
    flip_byte(store, "logits", view=1, block=2)
    calls = {"summary": lambda: inspect_stores([intact["float32"], store]),
             "samples": lambda: write_samples([store], tmp_path / "samples.parquet"),
             "rank": lambda: rank_samples([store], teachers=["t"]),
             "probabilities": lambda: store_probabilities(str(store), view=0)}
    for name, call in calls.items():
        with pytest.raises(UserError) as err:
            call()
        _one_line(err, str(store), "field checksum: logits view 1 block 2: expected crc32")
    assert not (tmp_path / "samples.parquet").exists()
