"""Manifests: round trip, a content hash that is stable yet sensitive, one-line errors.

    .venv/bin/pytest tests/test_manifest.py -q
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.data import build_manifest
from pipeline.errors import UserError
from pipeline.manifest import Manifest, load_manifest, make_table, write_manifest
from tests.support.data import write_imagefolder


@pytest.fixture
def tiny(tmp_path: Path) -> Manifest:
    return build_manifest("synthetic", tmp_path / "data", tmp_path / "m.parquet", seed=1, num_samples=40, dim=4)


def _rewrite(m: Manifest, out: Path, table: pa.Table, **overrides) -> Path:
    """Write ``table`` with m's metadata and a freshly computed (hence valid) hash."""
    kw = dict(dataset=m.dataset, class_names=m.class_names, root=m.root, meta=m.meta, splits=m.splits)
    write_manifest(out, table, **{**kw, **overrides})
    return out


def _with_column(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, values)


def test_round_trip(tiny: Manifest, tmp_path: Path) -> None:
    m = load_manifest(tiny.path)
    assert (m.dataset, m.num_classes, m.class_names) == ("synthetic", 3, ("class_0", "class_1", "class_2"))
    assert m.sha256 == tiny.sha256 and m.meta == tiny.meta and m.root == str((tmp_path / "data").resolve())
    assert m.table.schema.field("sample_id").type == pa.int64()
    assert m.table.schema.field("label").type == pa.int32()
    rows = m.split("train")
    assert rows.sample_id.dtype == np.int64 and rows.label.dtype == np.int32 and len(rows) == 2
    assert m.split_sizes() == {"train": 2, "val": 2, "test": 36}


def test_hash_stable_across_rewrites_and_rebuilds(tiny: Manifest, tmp_path: Path) -> None:
    # Different Parquet encoding and chunking: same content, same hash.
    table = pq.read_table(tiny.path)
    chunked = pa.concat_tables([table.slice(0, 7), table.slice(7)])
    pq.write_table(chunked, tmp_path / "re.parquet", row_group_size=5, compression="gzip")
    assert load_manifest(tmp_path / "re.parquet").sha256 == tiny.sha256
    # Rebuilt from scratch with the same seed, into another place: same hash (root is not content).
    again = build_manifest("synthetic", tmp_path / "other", tmp_path / "sub" / "m.parquet", seed=1,
                           num_samples=40, dim=4)
    assert again.sha256 == tiny.sha256
    other_seed = build_manifest("synthetic", tmp_path / "s2", tmp_path / "m2.parquet", seed=2, num_samples=40, dim=4)
    assert other_seed.sha256 != tiny.sha256


def test_hash_changes_on_label_row_or_class_change(tiny: Manifest, tmp_path: Path) -> None:
    labels = tiny.table.column("label").to_numpy().copy()
    labels[5] = (labels[5] + 1) % 3
    relabelled = _rewrite(tiny, tmp_path / "a.parquet", _with_column(tiny.table, "label", pa.array(labels)))
    assert load_manifest(relabelled).sha256 != tiny.sha256
    dropped = _rewrite(tiny, tmp_path / "b.parquet", tiny.table.slice(0, 39))
    assert load_manifest(dropped).sha256 != tiny.sha256
    renamed = _rewrite(tiny, tmp_path / "c.parquet", tiny.table, class_names=("a", "b", "c"))
    assert load_manifest(renamed).sha256 != tiny.sha256


def test_relative_root_resolves_from_any_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    m = build_manifest("synthetic", "data/syn", "manifests/m.parquet", num_samples=20, dim=2)
    monkeypatch.chdir("/")
    assert load_manifest(tmp_path / "manifests/m.parquet").root == str(tmp_path / "data/syn")
    assert m.root == str(tmp_path / "data/syn")


def test_missing_split_names_file_and_split(tiny: Manifest) -> None:
    with pytest.raises(UserError, match=r"m\.parquet: split 'holdout' has no rows"):
        tiny.split("holdout")


def _bad_manifests(m: Manifest, tmp: Path) -> dict[str, tuple[Path, str]]:
    """{case: (file, the field its error must name)}."""
    t = m.table
    ids = t.column("sample_id").to_numpy().copy()
    ids[3] = ids[4]
    labels = t.column("label").to_numpy().copy()
    labels[2] = 3  # num_classes is 3
    no_val = np.where(t.column("split").to_numpy(zero_copy_only=False) == "val", "train", t.column("split"))
    metadata = pq.read_table(m.path).schema.metadata
    pq.write_table(t.drop(["label"]).replace_schema_metadata(metadata), tmp / "missing_column.parquet")
    pq.write_table(_with_column(t, "label", t.column("label").cast(pa.int64())).replace_schema_metadata(metadata),
                   tmp / "wrong_dtype.parquet")
    pq.write_table(_with_column(t, "label", pa.array((labels + 1) % 3, pa.int32())).replace_schema_metadata(metadata),
                   tmp / "edited.parquet")
    return {
        "duplicate_id": (_rewrite(m, tmp / "duplicate_id.parquet", _with_column(t, "sample_id", pa.array(ids))), "sample_id"),
        "label_range": (_rewrite(m, tmp / "label_range.parquet", _with_column(t, "label", pa.array(labels))), "label"),
        "empty_split": (_rewrite(m, tmp / "empty_split.parquet", _with_column(t, "split", pa.array(no_val))), "split"),
        "missing_column": (tmp / "missing_column.parquet", "label"),
        "wrong_dtype": (tmp / "wrong_dtype.parquet", "label"),
        "edited": (tmp / "edited.parquet", "sha256"),
        "not_parquet": (tmp / "m.parquet.txt", "Parquet"),
    }


CASES = ["duplicate_id", "label_range", "empty_split", "missing_column", "wrong_dtype", "edited", "not_parquet"]


@pytest.mark.parametrize("case", CASES)
def test_bad_manifest_fails_in_one_line(tiny: Manifest, tmp_path: Path, case: str) -> None:
    (tmp_path / "m.parquet.txt").write_text("not parquet")
    path, field = _bad_manifests(tiny, tmp_path)[case]
    result = CliRunner().invoke(cli, ["manifest", "check", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert path.name in lines[0] and field in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_missing_image_file_fails_check(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "imgs", dirs={"train": 2, "val": 1})
    build_manifest("imagefolder", root, tmp_path / "if.parquet", val_fraction=0.0)
    (root / "train" / "dog" / "img_1.png").unlink()
    result = CliRunner().invoke(cli, ["manifest", "check", str(tmp_path / "if.parquet")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "if.parquet" in result.output and "source" in result.output and "img_1.png" in result.output
    assert CliRunner().invoke(cli, ["manifest", "check", "--no-files", str(tmp_path / "if.parquet")]).exit_code == 0


def test_cli_in_a_real_process(tiny: Manifest, tmp_path: Path) -> None:
    path, _ = _bad_manifests(tiny, tmp_path)["duplicate_id"]
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "manifest", "check", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "sample_id" in run.stderr and "Traceback" not in run.stderr
    ok = subprocess.run([sys.executable, "-m", "pipeline.cli", "manifest", "check", str(tiny.path)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and tiny.sha256 in ok.stdout and "train 2, val 2, test 36" in ok.stdout


def test_cli_build_writes_atomically_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "m.parquet"
    result = CliRunner().invoke(cli, ["manifest", "build", "--dataset", "synthetic", "--root", str(tmp_path / "d"),
                                      "--out", str(out), "--num-samples", "40", "--dim", "3"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and not list(out.parent.glob(".*tmp*"))
    assert load_manifest(out).sha256 in result.output
    bad = CliRunner().invoke(cli, ["manifest", "build", "--dataset", "synthetic", "--root", str(tmp_path / "d"),
                                   "--out", str(out), "--val-fraction", "0.2"])
    assert bad.exit_code == 2 and "val_fraction" in bad.output


def test_make_table_types() -> None:
    t = make_table(sample_id=[1, 2], label=[0, 1], split=["train", "test"], source=["a", "b"])
    assert [f.type for f in t.schema] == [pa.int64(), pa.int32(), pa.string(), pa.string()]
