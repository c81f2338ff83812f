"""The synthetic Gaussian mixture: exact posterior, 5/5/90 split, seeded, sensible Bayes accuracy.

    .venv/bin/pytest tests/test_data_synthetic.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import build_manifest, default_views, open_split
from pipeline.data.synthetic import (
    bayes_posterior,
    generate,
    load_arrays,
    posterior_of,
    write_npz,
)
from pipeline.errors import UserError
from pipeline.manifest import Manifest


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """The default synthetic dataset of docs/methods.md (100 000 samples; about a second to build)."""
    tmp = tmp_path_factory.mktemp("syn")
    return build_manifest("synthetic", tmp / "data", tmp / "m.parquet", seed=0)


def test_defaults_and_split_sizes(full: Manifest) -> None:
    assert full.split_sizes() == {"train": 5000, "val": 5000, "test": 90000}
    assert (full.num_classes, full.meta["dim"], full.meta["sigma2"]) == (3, 30, 6.0)
    data = load_arrays(full)
    assert data["x"].shape == (100_000, 30) and data["x"].dtype == np.float32
    assert set(np.unique(data["means"])) <= {-1.0, 0.0, 1.0}
    assert np.array_equal(full.table.column("label").to_numpy(), data["y"])


def test_stored_posterior_equals_recomputation(full: Manifest) -> None:
    data = load_arrays(full)
    x, mu = torch.from_numpy(data["x"]).double(), torch.from_numpy(data["means"]).double()
    expected = torch.softmax(-torch.cdist(x, mu).pow(2) / (2 * 6.0), dim=1).numpy()
    np.testing.assert_allclose(data["posterior"], expected, atol=2e-6)
    test_rows = full.split("test")
    np.testing.assert_array_equal(bayes_posterior(full, "test"), data["posterior"][test_rows.sample_id])


def test_bayes_accuracy_is_sensible(full: Manifest) -> None:
    p = bayes_posterior(full, "test")
    y = full.split("test").label
    bayes_acc = (p.argmax(1) == y).mean()
    assert 0.6 < bayes_acc < 0.95  # well above chance (1/3), below perfect: the classes overlap
    # No rule can beat the Bayes rule by more than sampling noise, e.g. a dot-product classifier.
    x = load_arrays(full)["x"][full.split("test").sample_id]
    dot_acc = ((x @ load_arrays(full)["means"].T).argmax(1) == y).mean()
    assert bayes_acc >= dot_acc - 0.005
    # The true posterior is calibrated: its mean confidence is its accuracy, and the mass it
    # puts on the drawn label is on average sum_k p_k^2.
    assert abs(p.max(1).mean() - bayes_acc) < 0.01
    assert abs(p[np.arange(len(y)), y].mean() - (p.astype(np.float64) ** 2).sum(1).mean()) < 0.01


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    kw = dict(num_samples=100, dim=5, num_classes=4, sigma2=2.0)
    a = build_manifest("synthetic", tmp_path / "a", tmp_path / "a.parquet", seed=7, **kw)
    b = build_manifest("synthetic", tmp_path / "b", tmp_path / "b.parquet", seed=7, **kw)
    c = build_manifest("synthetic", tmp_path / "c", tmp_path / "c.parquet", seed=8, **kw)
    da, db, dc = load_arrays(a), load_arrays(b), load_arrays(c)
    assert all(np.array_equal(da[k], db[k]) for k in da) and a.sha256 == b.sha256
    assert not np.array_equal(da["x"], dc["x"]) and a.sha256 != c.sha256
    assert a.split_sizes() == {"train": 5, "val": 5, "test": 90} and a.num_classes == 4


def test_identity_views_return_the_stored_vectors(tmp_path: Path) -> None:
    m = build_manifest("synthetic", tmp_path / "d", tmp_path / "m.parquet", num_samples=40, dim=3)
    assert default_views(m).kind == "identity"
    ds = open_split(m, "test", view=5)
    x = load_arrays(m)["x"]
    assert ds.input_shape == (3,) and len(ds) == 36 and ds.num_classes == 3
    item, label, row = ds[4]
    assert item.dtype == torch.float32 and row == 4 and label == ds.labels[4]
    np.testing.assert_array_equal(item.numpy(), x[ds.sample_ids[4]])
    xb, yb = ds.get_batch(np.array([4, 0]))
    assert torch.equal(xb[0], item) and yb.dtype == torch.int64


def test_changed_data_file_is_caught(tmp_path: Path) -> None:
    m = build_manifest("synthetic", tmp_path / "d", tmp_path / "m.parquet", num_samples=40, dim=3)
    data = load_arrays(m)
    data["posterior"][0] = [1.0, 0.0, 0.0]
    np.savez(tmp_path / "d" / "synthetic.npz", **data)
    with pytest.raises(UserError, match="changed since the manifest was built"):
        bayes_posterior(m, "train")


def test_chunked_file_has_the_bytes_of_one_draw(tmp_path: Path) -> None:
    """Written 7 rows at a time, the file is byte for byte np.savez of the draws made in one call each."""
    n, d, k, sigma2, seed = 50, 6, 4, 2.0, 5
    rng = np.random.default_rng(seed)
    means = rng.integers(-1, 2, size=(k, d)).astype(np.float32)
    y = rng.integers(0, k, size=n).astype(np.int32)
    x = (means[y] + rng.normal(0.0, np.sqrt(sigma2), size=(n, d))).astype(np.float32)
    np.savez(tmp_path / "whole.npz", x=x, y=y, means=means, posterior=posterior_of(x, means, sigma2=sigma2))
    got_y = write_npz(tmp_path / "chunked.npz", num_samples=n, dim=d, num_classes=k, sigma2=sigma2, seed=seed,
                      chunk_rows=7)
    assert (tmp_path / "chunked.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()
    np.testing.assert_array_equal(got_y, y)
    data = generate(num_samples=n, dim=d, num_classes=k, sigma2=sigma2, seed=seed)
    np.testing.assert_array_equal(data["x"], x)
