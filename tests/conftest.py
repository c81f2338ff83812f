"""Fixtures shared by the test modules: tiny datasets, a tiny teacher and a fake store.

    def test_something(synthetic, synthetic_teacher, fake_store): ...

- ``synthetic``: a 4000-sample synthetic manifest (200 train / 200 val / 3600 test rows, K = 3,
  d = 30), as a path string; built once per session.
- ``synthetic_teacher``: ``(manifest, checkpoint)`` of ``make_synthetic_teacher`` with its
  defaults (3000 samples, 150 train rows, a confident untrained MLP named ``teacher``); once per session.
- ``cifar10_root``: the default CIFAR-10 folder of ``write_cifar10`` (30 train, 8 test images).
- ``fake_store``: a complete default ``make_fake_store`` store at ``tmp_path / "s.zarr"`` (per test).

Session fixtures are shared read-only: a test writes its outputs under its own ``tmp_path``.
Functions that take arguments (``make_fake_store``, ``cache``, ``write_cifar10`` ...) are in
tests/support/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data import build_manifest
from tests.support.data import write_cifar10
from tests.support.stores import make_fake_store, make_synthetic_teacher


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small synthetic manifest: 200 train / 200 val / 3600 test rows, K = 3, d = 30."""
    root = tmp_path_factory.mktemp("synthetic")
    build_manifest("synthetic", root / "data", root / "syn.parquet", seed=0, num_samples=4000)
    return str(root / "syn.parquet")


@pytest.fixture(scope="session")
def synthetic_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(manifest, teacher.pt)``: 3000 synthetic samples and a confident untrained MLP for them."""
    return make_synthetic_teacher(tmp_path_factory.mktemp("synthetic_teacher"))


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10 root (``cifar-10-batches-py``): 5 train batches of 6 images, 8 test images."""
    return write_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture
def fake_store(tmp_path: Path) -> Path:
    """A complete fake store with ``make_fake_store``'s defaults: 1000 samples, 10 classes, 2 views."""
    store = tmp_path / "s.zarr"
    make_fake_store(store)
    return store
