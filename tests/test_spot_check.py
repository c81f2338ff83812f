"""``kdcache verify STORE --teacher SPEC --rows N``: the teacher run again on sampled (view, row) pairs.

    .venv/bin/pytest tests/test_spot_check.py -q
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cache.spot_check import pick_pairs
from pipeline.cli import cli
from pipeline.data import build_manifest
from tests.support.cli import one_error_line
from tests.support.data import write_imagefolder
from tests.support.distill import cache, untrained_teacher
from tests.support.stores import make_synthetic_teacher

LINE = re.compile(r"^(?P<store>\S+): teacher spot-check (?P<verdict>ok|MISMATCH) - (?P<pairs>\d+) \(view, row\) pairs, "
                  r"max \|Δlogit\| (?P<delta>\S+).*, top-1 agreement (?P<agree>[\d.]+)")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stores of one synthetic MLP teacher in several storage kinds, and one of another teacher."""
    tmp = tmp_path_factory.mktemp("spot")
    manifest, teacher = make_synthetic_teacher(tmp)
    _, other = make_synthetic_teacher(tmp, torch_seed=1, name="other.pt")
    kinds = {"dense": {}, "topk": {"storage": "topk", "k": 2}, "int8": {"dtype": "int8"},
             "sampled": {"storage": "sampled", "k": 8}}
    out = {kind: cache(teacher, manifest, tmp / f"{kind}.zarr", views=3, rows_per_block=32, **kw)
           for kind, kw in kinds.items()}
    out.update(teacher=teacher, other=other)
    for kind, kw in (("dense", {}), ("sampled", {"storage": "sampled", "k": 8})):
        out[f"other-{kind}"] = cache(other, manifest, tmp / f"other-{kind}.zarr", views=3, rows_per_block=32, **kw)
    return out


def _verify(*args: object) -> tuple[int, re.Match | None, str]:
    result = CliRunner().invoke(cli, ["verify", *map(str, args)])
    found = [LINE.match(line) for line in result.output.splitlines() if "spot-check" in line]
    return result.exit_code, (found[0] if found else None), result.output


@pytest.mark.parametrize("kind", ["dense", "topk", "int8", "sampled"])
def test_a_good_store_passes_with_its_logits_within_the_storage_rounding(synthetic, kind) -> None:
    code, line, output = _verify(synthetic[kind], "--teacher", synthetic["teacher"], "--rows", 40)
    assert code == 0 and line and line["verdict"] == "ok", output
    assert int(line["pairs"]) == 40 and float(line["agree"]) == 1.0
    if kind == "sampled":                      # no logits kept: the exact targets are what is compared
        assert line["delta"] == "n/a"
    else:                                      # fp16: half an ulp of |z| <= 16; int8: half a quantization step
        assert 0 < float(line["delta"]) < (0.1 if kind == "int8" else 0.01), line[0]


@pytest.mark.parametrize("kind", ["dense", "sampled"])
def test_a_store_cached_by_another_teacher_is_a_mismatch_naming_the_first_bad_pair(synthetic, kind) -> None:
    code, line, output = _verify(synthetic[f"other-{kind}"], "--teacher", synthetic["teacher"], "--rows", 40)
    assert code == 1 and line and line["verdict"] == "MISMATCH", output
    assert re.search(r"first bad: view \d+ row \d+ \(sample \d+\): ", output), output
    assert "is not the recorded teacher.checkpoint_sha256" in output   # the likely cause, said
    # the right teacher for that store passes, and says nothing about its sha256
    code, line, output = _verify(synthetic[f"other-{kind}"], "--teacher", synthetic["other"], "--rows", 40)
    assert code == 0 and "checkpoint_sha256" not in output, output


def test_pairs_are_seeded_distinct_and_spread_over_views_and_blocks() -> None:
    picked = pick_pairs(3, 1000, 100, count=31, seed=0)
    again = pick_pairs(3, 1000, 100, count=31, seed=0)
    assert all(v == w and np.array_equal(a, b) for (v, a), (w, b) in zip(picked, again))
    assert [view for view, _ in picked] == [0, 1, 2] and [len(rows) for _, rows in picked] == [11, 10, 10]
    for _, rows in picked:
        assert len(set(rows.tolist())) == len(rows) and len(set((rows // 100).tolist())) == 10   # every block once
    other = pick_pairs(3, 1000, 100, count=31, seed=1)
    assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(picked, other))
    assert pick_pairs(1, 5, 2, count=7)[0][1].tolist() == [0, 1, 2, 3, 4]        # more pairs than there are: all
    assert [view for view, _ in pick_pairs(4, 50, 10, count=1)] == [0]            # view 0 first


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small ImageFolder and an untrained CNN teacher for it."""
    tmp = tmp_path_factory.mktemp("spot_folder")
    root = write_imagefolder(tmp / "root", dirs={"train": 4, "val": 1})
    manifest = build_manifest("imagefolder", root, tmp / "f.parquet", image_size=16)
    # logits well above the image models' tolerance floor (2^-5), so that a changed image shows
    teacher = untrained_teacher(manifest.path, tmp / "t.pt", arch="cnn", scale=16.0)
    return {"root": root, "teacher": teacher}


def test_an_image_edited_in_place_after_caching_is_a_mismatch_at_its_row(folder, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(folder["root"], copy / "root")
    manifest = build_manifest("imagefolder", copy / "root", copy / "f.parquet", image_size=16)
    store = cache(folder["teacher"], manifest.path, copy / "f.zarr", views=2, rows_per_block=5,
                  augment="trivialaugment")
    pairs = 2 * len(manifest.split("train").sample_id)                # every pair: the edited one among them
    code, line, output = _verify(store, "--teacher", folder["teacher"], "--rows", pairs)
    assert code == 0 and line and int(line["pairs"]) == pairs, output
    row = 7
    path = copy / "root" / manifest.split("train").source[row]
    with Image.open(path) as img:
        Image.fromarray(255 - np.asarray(img)).save(path)          # same file, same size, other pixels
    code, line, output = _verify(store, "--teacher", folder["teacher"], "--rows", pairs)
    assert code == 1 and line and line["verdict"] == "MISMATCH", output
    assert f"first bad: view 0 row {row} " in output and "checkpoint_sha256" not in output


def test_a_changed_cifar_batch_file_is_refused_by_the_manifest_check(cifar10_root, tmp_path) -> None:
    root = shutil.copytree(cifar10_root, tmp_path / "cifar")
    manifest = build_manifest("cifar10", root, tmp_path / "c.parquet")
    teacher = untrained_teacher(manifest.path, tmp_path / "t.pt", arch="cnn")
    store = cache(teacher, manifest.path, tmp_path / "c.zarr", views=2, rows_per_block=8)
    assert _verify(store, "--teacher", teacher, "--rows", 8)[0] == 0
    batch = next(root.rglob("data_batch_1"))
    data = bytearray(batch.read_bytes())
    data[-10] ^= 0xFF
    batch.write_bytes(bytes(data))
    one_error_line(CliRunner().invoke(cli, ["verify", str(store), "--teacher", str(teacher), "--rows", "8"]),
                   "data_batch_1", "changed since the manifest was built")


def test_bad_values_are_one_error_line(synthetic, tmp_path) -> None:
    store, teacher = str(synthetic["dense"]), str(synthetic["teacher"])
    run = CliRunner().invoke
    one_error_line(run(cli, ["verify", store, "--teacher", teacher, "--rows", "0"]), "--rows", "found 0")
    one_error_line(run(cli, ["verify", store, "--teacher", str(tmp_path / "gone.pt"), "--rows", "4"]),
                   "--teacher", "gone.pt")
    one_error_line(run(cli, ["verify", store, "--rows", "4"]), "--rows", "--teacher")
    one_error_line(run(cli, ["verify", store, "--teacher", "mlp", "--weights", str(tmp_path / "w.pt")]),
                   "--weights", "w.pt")


def test_a_moved_manifest_is_one_error_line(synthetic, tmp_path) -> None:
    store = shutil.copytree(synthetic["dense"], tmp_path / "elsewhere" / "deeper" / "dense.zarr")
    one_error_line(CliRunner().invoke(cli, ["verify", str(store), "--teacher", str(synthetic["teacher"])]),
                   "field manifest.path")


def test_an_edited_augmentation_is_a_mismatch_in_an_augmented_view_only(folder, tmp_path) -> None:
    manifest = build_manifest("imagefolder", folder["root"], tmp_path / "f.parquet", image_size=16)
    store = cache(folder["teacher"], manifest.path, tmp_path / "f.zarr", views=2, rows_per_block=5,
                  augment="randaugment", augment_options={"n": 2, "m": 9})
    pairs = 2 * len(manifest.split("train").sample_id)
    assert _verify(store, "--teacher", folder["teacher"], "--rows", pairs)[0] == 0
    meta = store / "zarr.json"
    attrs = json.loads(meta.read_text())
    assert attrs["attributes"]["views"]["spec"]["params"]["augment"]["m"] == 9
    attrs["attributes"]["views"]["spec"]["params"]["augment"]["m"] = 28          # what the store says it replays
    meta.write_text(json.dumps(attrs))
    code, line, output = _verify(store, "--teacher", folder["teacher"], "--rows", pairs)
    assert code == 1 and line and line["verdict"] == "MISMATCH", output
    assert "first bad: view 1 row" in output                                    # view 0 is not augmented


def test_a_rebuilt_manifest_at_the_recorded_path_is_one_error_line(synthetic, tmp_path) -> None:
    store = shutil.copytree(synthetic["dense"], tmp_path / "dense.zarr")
    build_manifest("synthetic", tmp_path / "data", tmp_path / "synthetic.parquet", num_samples=3000, seed=1)
    one_error_line(CliRunner().invoke(cli, ["verify", str(store), "--teacher", str(synthetic["teacher"])]),
                   "field manifest.sha256", "the manifest changed after caching")
