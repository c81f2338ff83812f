"""kdcache inspect: figures recomputed independently from the stored arrays, agreement across teachers, the
per-sample table, the JSON and plots, CLI."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner

from pipeline.cache import write_cache
from pipeline.cli import cli
from pipeline.data import build_manifest
from pipeline.errors import UserError
from pipeline.inspect import (
    format_report,
    inspect_stores,
    report_json,
    write_report,
    write_samples,
)
from pipeline.store import schema
from tests.support.stores import FakeFactory, fake_provenance, make_fake_store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    dense = root / "dense.zarr"
    other = root / "other.zarr"
    topk = root / "topk.zarr"
    make_fake_store(dense, num_samples=700, num_classes=6, views=2, rows_per_block=128)
    make_fake_store(other, num_samples=700, num_classes=6, views=2, rows_per_block=128, seed=3, teacher_sha="u" * 64)
    make_fake_store(topk, num_samples=700, num_classes=6, views=2, rows_per_block=128, kind="topk", k=2)
    return dense, other, topk


def _ece(conf: np.ndarray, correct: np.ndarray, bins: int) -> float:
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = (conf >= lo) & (conf < hi) if b < bins - 1 else (conf >= lo)
        if sel.any():
            total += abs(conf[sel].mean() - correct[sel].mean()) * sel.sum()
    return total / len(conf)


def test_figures_match_a_recomputation_from_the_arrays(stores):
    dense = stores[0]
    report = inspect_stores([dense], bins=10)
    g = zarr.open_group(str(dense), mode="r")
    label, pred, entropy, p_gt = g["label"][:], g["pred"][:], g["entropy"][:], g["p_gt"][:]
    z = g["logits"][:].astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    (s,) = report["stores"]
    assert s["num_views"] == 2 and "across_teachers" not in report
    for v, row in enumerate(s["per_view"]):
        correct = pred[v] == label
        assert row["accuracy"] == pytest.approx(correct.mean(), abs=1e-6)
        assert row["mean_entropy"] == pytest.approx(entropy[v].mean(), abs=1e-5)
        assert row["mean_confidence_weight"] == pytest.approx(1 - entropy[v].mean() / math.log(6), abs=1e-5)
        assert row["nll"] == pytest.approx(-np.log(p_gt[v]).mean(), abs=1e-5)
        assert row["ece"] == pytest.approx(_ece(p.max(-1)[v], correct, 10), abs=1e-4)
        assert sum(s["entropy_hist"][v]) == 700
    assert s["per_class"]["count"] == np.bincount(label, minlength=6).tolist()
    assert s["per_class"]["accuracy"][2] == pytest.approx((pred[0][label == 2] == 2).mean(), abs=1e-5)


def test_topk_store_gives_the_dense_figures(stores):
    dense, _, topk = stores
    a, b = inspect_stores([dense])["stores"][0], inspect_stores([topk])["stores"][0]
    for ra, rb in zip(a["per_view"], b["per_view"]):
        for key in ("accuracy", "mean_entropy", "mean_p_gt"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6)
        assert ra["mean_max_prob"] == pytest.approx(rb["mean_max_prob"], abs=2e-3)  # fp16 top-1 vs fp16 row


def test_agreement_and_oracle_across_teachers(stores):
    dense, other, _ = stores
    report = inspect_stores([dense, other])
    room = report["across_teachers"]
    assert room["agreement"][0][0] == 1.0 and room["agreement"][0][1] == room["agreement"][1][0] < 1.0
    accs = [s["per_view"][0]["accuracy"] for s in report["stores"]]
    assert max(accs) <= room["oracle_accuracy"] <= min(1.0, sum(accs))
    assert sum(room["most_confident_in_truth"]) == pytest.approx(1.0)
    assert "oracle accuracy" in format_report(report)


def test_stores_of_different_manifests_are_refused(tmp_path, stores):
    layout = schema.Layout(num_samples=700, num_classes=6, num_views=2, rows_per_block=128, micro_batch=64)
    stranger = tmp_path / "stranger.zarr"
    write_cache(stranger, factory=FakeFactory(6), provenance=fake_provenance(700, 6, 2, manifest_sha="x" * 64),
                layout=layout, sample_id=np.arange(700, dtype=np.int64), label=np.zeros(700, np.int32), progress=False)
    with pytest.raises(UserError, match="manifest.sha256"):
        inspect_stores([stores[0], stranger])


def test_incomplete_store_is_refused(tmp_path):
    store = tmp_path / "half.zarr"
    make_fake_store(store, num_samples=700, num_classes=6, views=1, rows_per_block=128, shard=(0, 2))
    with pytest.raises(UserError, match="complete"):
        inspect_stores([store])


def test_cli_writes_reports_and_fails_in_one_line(tmp_path, stores):
    runner = CliRunner()
    out = tmp_path / "report"
    result = runner.invoke(cli, ["inspect", str(stores[0]), str(stores[1]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "agreement" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["stores"]) == 2
    assert (out / "per_class.csv").read_text().count("\n") == 1 + 2 * 6
    result = runner.invoke(cli, ["inspect", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 2
    assert "missing.zarr" in result.output and "Traceback" not in result.output


# --- per-sample table -------------------------------------------------------

class _Group:
    """Three teachers (seeds 0, 1, 2) of one real synthetic manifest's train split, 4 blocks of 64 rows."""

    def __init__(self, root):
        self.manifest_path = root / "m.parquet"
        self.manifest = build_manifest("synthetic", root / "data", self.manifest_path, num_samples=4000, seed=0)
        rows = self.manifest.split("train")
        self.rows = rows
        self.stores = []
        for seed, name in enumerate(("a", "b", "c")):
            prov = fake_provenance(len(rows), 3, 2, name=name)
            prov = dataclasses.replace(prov, manifest={**prov.manifest, "path": str(self.manifest_path),
                                                       "sha256": self.manifest.sha256, "num_classes": 3})
            layout = schema.Layout(num_samples=len(rows), num_classes=3, num_views=2, rows_per_block=64,
                                   micro_batch=32)
            store = root / f"{name}.zarr"
            write_cache(store, factory=FakeFactory(3, seed=seed), provenance=prov, layout=layout,
                        sample_id=rows.sample_id, label=rows.label, progress=False)
            self.stores.append(store)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    return _Group(tmp_path_factory.mktemp("group"))


def test_samples_table_matches_a_direct_computation(tmp_path, group):
    out = tmp_path / "samples.parquet"
    n_rows = write_samples(group.stores, out)
    meta = pq.ParquetFile(out).metadata
    assert meta.num_row_groups == 4  # 200 rows in blocks of 64: one row group per block
    table = pq.read_table(out)
    assert n_rows == len(table) == 200 * 2
    arrays = [zarr.open_group(str(s), mode="r") for s in group.stores]
    preds = np.stack([g["pred"][:] for g in arrays])  # [T, V, N]
    p_gts = np.stack([g["p_gt"][:] for g in arrays])
    entropies = np.stack([g["entropy"][:] for g in arrays])
    col = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    i = 0
    for row in range(200):
        for view in range(2):
            assert col["sample_id"][i] == group.rows.sample_id[row] and col["view"][i] == view
            assert col["source"][i] == group.rows.source[row] and col["label"][i] == group.rows.label[row]
            for t, name in enumerate(("a", "b", "c")):
                assert col[f"{name}_pred"][i] == preds[t, view, row]
                assert col[f"{name}_p_gt"][i] == p_gts[t, view, row]
                assert col[f"{name}_entropy"][i] == entropies[t, view, row]
            votes = collections.Counter(preds[:, view, row].tolist())
            assert col["n_distinct_preds"][i] == len(votes)
            assert col["frac_disagree_with_majority"][i] == pytest.approx(1 - max(votes.values()) / 3)
            assert col["mean_p_gt"][i] == pytest.approx(p_gts[:, view, row].mean(), abs=1e-6)
            i += 1
    assert col["n_distinct_preds"].max() > 1  # the fake teachers do disagree somewhere


def test_samples_without_the_manifest_leave_source_null_with_one_warning(tmp_path, stores, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the fake stores record manifest path fake.parquet, not here
    runner = CliRunner()
    out = tmp_path / "s.parquet"
    result = runner.invoke(cli, ["inspect", str(stores[0]), str(stores[1]), "--samples", str(out)])
    assert result.exit_code == 0, result.output
    assert sum("manifest.path" in line for line in result.output.splitlines()) == 1
    table = pq.read_table(out)
    assert len(table) == 700 * 2 and table.column("source").null_count == len(table)
    assert table.column_names[-3:] == ["n_distinct_preds", "frac_disagree_with_majority", "mean_p_gt"]
    assert {"dense_pred", "other_pred"} <= set(table.column_names)  # both named "fake": told apart by file


def test_samples_of_mismatched_stores_write_nothing(tmp_path, stores):
    layout = schema.Layout(num_samples=700, num_classes=6, num_views=2, rows_per_block=128, micro_batch=64)
    relabelled = tmp_path / "relabelled.zarr"
    write_cache(relabelled, factory=FakeFactory(6), provenance=fake_provenance(700, 6, 2), layout=layout,
                sample_id=np.arange(700, dtype=np.int64), label=np.zeros(700, np.int32), progress=False)
    out = tmp_path / "s.parquet"
    with pytest.raises(UserError, match="field label"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_samples([stores[0], relabelled], out)
    assert not out.exists() and list(tmp_path.glob(".s.parquet*")) == []


# --- figures -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _EdgeFactory:
    """Even rows: equal logits (entropy log C); odd rows: one class far ahead (entropy 0)."""

    num_classes: int

    def build(self):
        return self

    def __call__(self, view: int, start: int, stop: int) -> np.ndarray:
        z = np.zeros((stop - start, self.num_classes), np.float32)
        z[(np.arange(start, stop) % 2 == 1), 0] = 60.0
        return z


def test_reliability_json_has_counts_and_null_empty_bins(tmp_path, stores):
    dense = stores[0]
    report = inspect_stores([dense], bins=20)
    out = tmp_path / "report"
    write_report(report, out)
    text = (out / "summary.json").read_text()
    assert "NaN" not in text
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    g = zarr.open_group(str(dense), mode="r")
    z = g["logits"][:].astype(np.float64)
    conf = (1.0 / np.exp(z - z.max(-1, keepdims=True)).sum(-1))
    for v, rel in enumerate(summary["stores"][0]["reliability"]):
        counts = np.bincount(np.clip((conf[v] * 20).astype(int), 0, 19), minlength=20)
        assert rel["count"] == counts.tolist()
        assert counts[:3].sum() == 0  # max probability of 6 classes is >= 1/6: the low bins are empty
        for c, mean_conf, acc in zip(rel["count"], rel["confidence"], rel["accuracy"]):
            assert (mean_conf is None) == (acc is None) == (c == 0)
    assert json.loads(report_json({"x": float("nan"), "y": [np.float32("inf"), 1.5]})) == {"x": None, "y": [None, 1.5]}


def test_entropy_histogram_edges_cover_zero_to_log_c(tmp_path, stores):
    report = inspect_stores([stores[0]], bins=10)
    s = report["stores"][0]
    edges = np.linspace(0, math.log(6), 11)
    assert s["entropy_edges"] == pytest.approx(edges.tolist(), abs=1e-6)
    entropy = zarr.open_group(str(stores[0]), mode="r")["entropy"][:]
    for v in range(2):
        assert s["entropy_hist"][v] == np.histogram(np.clip(entropy[v], 0, math.log(6)), bins=edges)[0].tolist()
    layout = schema.Layout(num_samples=300, num_classes=5, num_views=1, rows_per_block=64, micro_batch=32)
    edge = tmp_path / "edge.zarr"
    write_cache(edge, factory=_EdgeFactory(5), provenance=fake_provenance(300, 5, 1), layout=layout,
                sample_id=np.arange(300, dtype=np.int64), label=np.zeros(300, np.int32), progress=False)
    (hist,) = inspect_stores([edge], bins=10)["stores"][0]["entropy_hist"]
    assert hist[0] == 150 and hist[-1] == 150 and sum(hist) == 300  # 0 in the first bin, log C in the last


def test_plots_are_written_with_matplotlib(tmp_path, stores):
    pytest.importorskip("matplotlib")
    written = write_report(inspect_stores([stores[0], stores[1]], bins=10), tmp_path / "r")
    for name in ("entropy_hist.png", "reliability.png"):
        path = tmp_path / "r" / name
        assert path in written and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
