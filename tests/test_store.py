"""The cache store with a fake deterministic teacher: layout, provenance, resume, verify, top-k, plan.

    .venv/bin/pytest tests/test_store.py -q

The real teacher, shards, dask and SIGKILL runs are in tests/test_store_teacher.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipeline.cache import write_cache
from pipeline.cli import cli
from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.verify import verify_store
from pipeline.store.writer import BlockWriter, finalize
from tests.support.stores import FakeFactory, fake_labels, fake_provenance, make_fake_store, store_bytes, store_files


def test_format_version_lives_in_schema_and_readme_example_matches():
    readme = (Path(schema.__file__).parent / "README.md").read_text()
    example = json.loads(readme.split("```json")[1].split("```")[0])
    assert example["schema"] == schema.SCHEMA and example["version"] == schema.FORMAT_VERSION == 3
    schema.check_format(example, "README.md")
    assert set(example["checksums"]) == {"algorithm", "sample_id", "label"}
    layout = schema.Layout.from_attrs(example)
    assert set(example["storage"]) == set(layout.storage_attrs())
    table = readme.split("## Arrays")[1].split("##")[0]
    for kind, k, dtype in (("dense", None, "float16"), ("dense", None, "int8"), ("topk", 3, "float16"),
                           ("sampled", 3, "float16")):         # the table lists every array of every layout
        for name in schema.Layout(num_samples=10, num_classes=5, num_views=1, kind=kind, k=k, dtype=dtype).arrays():
            assert f"`{name}`" in table, name


def test_every_chunk_is_one_view_block(tmp_path):
    make_fake_store(tmp_path / "s.zarr", num_samples=1000, rows_per_block=256)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group["logits"].chunks == (1, 256, 10) and group["entropy"].chunks == (1, 256)
    assert group["done"].chunks == (1, 1) and group["done"].shape == (2, 4)
    assert group["checksum"].chunks == (1, 1, 4) and group["checksum"].shape == (2, 4, 4)
    assert group["checksum"].attrs["arrays"] == ["logits", "entropy", "p_gt", "pred"]
    assert sorted(group) == sorted(["sample_id", "label", "logits", "entropy", "p_gt", "pred", "done", "checksum"])
    assert group["logits"].compressors == ()          # no compressor for logits (pipeline/store/README.md)
    assert group.attrs["status"]["complete"] is True


def test_stored_targets_are_exact_from_float32_logits(tmp_path):
    make_fake_store(tmp_path / "s.zarr", dtype="float32")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    labels = group["label"][:]
    for view in range(2):
        z = FakeFactory(10).build()(view, 0, 1000)
        want = schema.target_stats(z, labels)
        np.testing.assert_array_equal(group["logits"][view], z)
        for name in ("entropy", "p_gt", "pred"):
            np.testing.assert_array_equal(group[name][view], want[name])
    # and a hand-checked case: uniform logits
    s = schema.target_stats(np.zeros((1, 4), np.float32), np.array([2]))
    assert s["entropy"][0] == pytest.approx(np.log(4)) and s["p_gt"][0] == pytest.approx(0.25) and s["pred"][0] == 0


@pytest.mark.parametrize("field, change", [
    ("teacher.checkpoint_sha256", {"teacher_sha": "x" * 64}),
    ("storage.dtype", {"dtype": "float32"}),
    ("storage.kind", {"kind": "topk", "k": 3}),
    ("storage.rows_per_block", {"rows_per_block": 128}),
])
def test_reopening_with_other_provenance_names_the_field(tmp_path, field, change):
    make_fake_store(tmp_path / "s.zarr")
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        make_fake_store(tmp_path / "s.zarr", **change)
    make_fake_store(tmp_path / "s.zarr", overwrite=True, **change)   # --overwrite replaces
    assert zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs["status"]["complete"]


def test_reopening_with_other_manifest_names_the_field(tmp_path):
    make_fake_store(tmp_path / "s.zarr")
    layout = schema.Layout(num_samples=1000, num_classes=10, num_views=2, rows_per_block=256, micro_batch=64)
    with pytest.raises(UserError, match=r"manifest\.sha256"):
        write_cache(tmp_path / "s.zarr", factory=FakeFactory(10), layout=layout,
                    provenance=fake_provenance(1000, 10, 2, manifest_sha="0" * 64),
                    sample_id=np.arange(1000), label=fake_labels(1000, 10), progress=False)


class _Counting(FakeFactory):
    calls: list = []

    def build(self):
        computer = super().build()
        _Counting.calls = computer.calls
        return computer


def test_rerun_computes_only_missing_blocks_and_is_identical(tmp_path):
    ref, store = tmp_path / "ref.zarr", tmp_path / "s.zarr"
    make_fake_store(ref)
    make_fake_store(store)
    group = zarr.open_group(str(store), mode="r+")
    group["done"][1, 2] = False                      # as if killed before that marker
    group["logits"][1, 512:768] = np.zeros((256, 10), np.float16)   # ... with that block half written
    group.attrs["status"] = {"complete": False}
    layout = schema.Layout(num_samples=1000, num_classes=10, num_views=2, rows_per_block=256, micro_batch=64)
    result = write_cache(store, factory=_Counting(10), layout=layout, provenance=fake_provenance(1000, 10, 2),
                         sample_id=np.arange(1000) * 3 + 7, label=fake_labels(1000, 10), progress=False)
    assert _Counting.calls == [(1, 512, 768)] and result.computed == 1 and result.complete
    assert store_files(store) == store_files(ref)


def test_shards_share_one_store_and_the_last_one_finalizes(tmp_path):
    results = [make_fake_store(tmp_path / "s.zarr", shard=f"{i}/3") for i in range(3)]
    assert [r.complete for r in results] == [False, False, True]
    assert sum(r.computed for r in results) == 8
    make_fake_store(tmp_path / "ref.zarr")
    assert store_files(tmp_path / "s.zarr") == store_files(tmp_path / "ref.zarr")
    with pytest.raises(UserError, match="--overwrite"):
        make_fake_store(tmp_path / "s.zarr", shard="0/3", overwrite=True)
    with pytest.raises(UserError, match="--shard"):
        make_fake_store(tmp_path / "t.zarr", shard="3/3")


class _Bad(FakeFactory):
    def build(self):
        inner = super().build()

        def compute(view, start, stop):
            z = inner(view, start, stop)
            if start >= 512:
                z[0, 0] = np.nan if self.seed == 0 else 1e6
            return z
        compute.num_classes = self.num_classes
        return compute


@pytest.mark.parametrize("seed, message", [(0, "NaN"), (1, "float32")])
def test_bad_logits_stop_the_run_and_leave_no_marker(tmp_path, seed, message):
    layout = schema.Layout(num_samples=1000, num_classes=10, num_views=1, rows_per_block=256, micro_batch=64)
    with pytest.raises(UserError, match=message):
        write_cache(tmp_path / "s.zarr", factory=_Bad(10, seed=seed), layout=layout, provenance=fake_provenance(1000, 10, 1),
                    sample_id=np.arange(1000), label=fake_labels(1000, 10), progress=False)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group["done"][:].tolist() == [[True, True, False, False]]
    assert group.attrs["status"]["complete"] is False
    assert not verify_store(tmp_path / "s.zarr").ok


def test_verify_reports_each_kind_of_damage(fake_store, tmp_path):
    ref = fake_store
    assert verify_store(ref).ok and verify_store(ref).rows_recomputed > 0

    def damaged(name):
        path = tmp_path / name
        shutil.copytree(ref, path)
        return path, zarr.open_group(str(path), mode="r+")

    path, _ = damaged("chunk.zarr")
    (path / "logits" / "c.1.2.0").unlink()          # a deleted block
    assert any("logits: expected a whole chunk for view 1 block 2" in p for p in verify_store(path).problems)
    path, group = damaged("marker.zarr")
    group["done"][0, 3] = False
    assert any("done: expected a marker for view 0 block 3" in p for p in verify_store(path).problems)
    path, group = damaged("nan.zarr")
    group["logits"][0, 5, 3] = np.nan
    assert any("NaN" in p for p in verify_store(path).problems)
    path, group = damaged("entropy.zarr")
    group["entropy"][1] = group["entropy"][1] + 0.02
    assert any(p.startswith("entropy:") for p in verify_store(path).problems)
    path, group = damaged("shifted.zarr")
    group["entropy"][0] = np.roll(group["entropy"][0], 1)          # rows out of alignment
    assert any(p.startswith("entropy:") for p in verify_store(path).problems)
    path, group = damaged("p_gt.zarr")
    group["p_gt"][0] = group["p_gt"][0] * 1.02
    assert any(p.startswith("p_gt:") for p in verify_store(path).problems)
    path, group = damaged("pred.zarr")
    group["pred"][0] = (group["pred"][0] + 1) % 10
    assert any(p.startswith("pred:") for p in verify_store(path).problems)
    with pytest.raises(UserError, match="zarr.json"):
        verify_store(tmp_path / "nothing.zarr")


def test_finalize_refuses_marked_blocks_without_data(fake_store):
    (fake_store / "p_gt" / "c.0.1").unlink()
    with pytest.raises(UserError, match="p_gt"):
        finalize(fake_store)


def test_topk_store_keeps_exact_targets_and_the_topk_logits(tmp_path):
    make_fake_store(tmp_path / "dense.zarr", dtype="float32")
    make_fake_store(tmp_path / "topk.zarr", kind="topk", k=3)
    dense = zarr.open_group(str(tmp_path / "dense.zarr"), mode="r")
    top = zarr.open_group(str(tmp_path / "topk.zarr"), mode="r")
    assert verify_store(tmp_path / "topk.zarr").ok
    for name in ("entropy", "p_gt", "pred"):
        np.testing.assert_array_equal(top[name][:], dense[name][:])
    z = dense["logits"][:]                                           # float32, exact
    order = np.argsort(-z, axis=2, kind="stable")[..., :3]
    np.testing.assert_array_equal(top["topk_index"][:], order)
    np.testing.assert_array_equal(top["topk_values"][:], np.take_along_axis(z, order, axis=2).astype(np.float16))
    zmax = z.max(axis=2)
    np.testing.assert_allclose(top["logsumexp"][:], zmax + np.log(np.exp(z - zmax[..., None]).sum(axis=2)), rtol=1e-6)
    assert top["topk_index"].dtype == np.uint8 and top.attrs["storage"]["index_dtype"] == "uint8"   # C = 10
    shutil.copytree(tmp_path / "topk.zarr", tmp_path / "bad.zarr")
    zarr.open_group(str(tmp_path / "bad.zarr"), mode="r+")["logsumexp"][0, :10] -= 1.0
    problems = verify_store(tmp_path / "bad.zarr").problems
    assert any(p.startswith("logsumexp:") for p in problems) and any(p.startswith("p_gt:") for p in problems)


@pytest.mark.parametrize("kind, k, dtype, num_classes", [
    ("dense", None, "float16", 100), ("dense", None, "int8", 100), ("topk", 20, "float16", 100),
    ("sampled", 20, "float16", 100), ("dense", None, "int8", 1000), ("topk", 9, "float16", 1000),
    ("sampled", 13, "float16", 1000),
])
def test_plan_agrees_with_bytes_on_disk(tmp_path, kind, k, dtype, num_classes):
    make_fake_store(tmp_path / "s.zarr", num_samples=20_000, num_classes=num_classes, views=2, kind=kind, k=k,
                    dtype=dtype, rows_per_block=None, micro_batch=256)
    layout = schema.Layout(num_samples=20_000, num_classes=num_classes, num_views=2, kind=kind, k=k, dtype=dtype)
    planned = schema.plan_bytes(layout)["total"]
    on_disk = store_bytes(tmp_path / "s.zarr")
    assert abs(planned - on_disk) / on_disk < 0.01, (planned, on_disk)


def test_plan_counts_teachers_and_padding():
    one = schema.plan_bytes(schema.Layout(num_samples=5000, num_classes=10, num_views=1, rows_per_block=4096))
    three = schema.plan_bytes(schema.Layout(num_samples=5000, num_classes=10, num_views=1, rows_per_block=4096), teachers=3)
    assert three["total"] == 3 * one["total"]
    assert one["logits"] == 8192 * 10 * 2 + schema.METADATA_BYTES_PER_ARRAY + schema.DIRECTORY_BYTES   # 2 whole chunks


def test_block_writer_reads_layout_from_attrs(tmp_path):
    make_fake_store(tmp_path / "s.zarr", views=3, rows_per_block=300, num_samples=1000)
    writer = BlockWriter(tmp_path / "s.zarr")
    assert writer.layout.num_blocks == 4 and writer.layout.block_rows(3) == (900, 1000)
    assert writer.missing() == []


def test_cli_plan_and_verify(fake_store, tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli, ["plan", "--num-samples", "20000", "--num-classes", "100", "--views", "2",
                              "--storage", "topk", "--k", "20", "--num-teachers", "3"])
    assert out.exit_code == 0 and "topk_index" in out.output and "total" in out.output
    assert runner.invoke(cli, ["verify", str(fake_store)]).exit_code == 0
    (fake_store / "entropy" / "c.0.1").unlink()
    damaged = runner.invoke(cli, ["verify", str(fake_store)])
    assert damaged.exit_code == 1 and "entropy: expected a whole chunk for view 0 block 1" in damaged.output
    missing = runner.invoke(cli, ["verify", str(tmp_path / "none.zarr")])
    assert missing.exit_code == 2 and missing.output.startswith("error: ")
