"""kdcache inspect: figures recomputed independently from the stored arrays, classroom checks, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipeline.cache import write_cache
from pipeline.cli import cli
from pipeline.errors import UserError
from pipeline.inspect import format_report, inspect_stores
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
    assert s["num_views"] == 2 and "classroom" not in report
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


def test_classroom_agreement_and_oracle(stores):
    dense, other, _ = stores
    report = inspect_stores([dense, other])
    room = report["classroom"]
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
