"""``DistillLoader``: cached targets for a user's own training loop.

    .venv/bin/pytest tests/test_loader.py -q

The loader must hand out exactly what ``kdcache distill`` trains on: the rows of
``CachedTargets.batches``, the inputs of ``open_split(..., view=e mod V)`` for those rows, and
the stores' targets for the same rows and view, whatever the workers, ranks or cache mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import build_manifest, open_split
from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from pipeline.store.reader import StoreGroup
from pipeline.train import DistillLoader
from pipeline.train.targets import CachedTargets
from tests.support.distill import cache
from tests.support.stores import synthetic_checkpoint

BATCH = 32


@pytest.fixture(scope="module")
def caches(synthetic_teacher, tmp_path_factory) -> tuple[Path, list[Path]]:
    """``(manifest, [store of the teacher, store of a second teacher])``, 2 views each."""
    manifest, teacher = synthetic_teacher
    root = tmp_path_factory.mktemp("loader")
    second = synthetic_checkpoint(manifest, root / "second.pt", torch_seed=1)
    return manifest, [cache(teacher, manifest, root / "a.zarr"), cache(second, manifest, root / "b.zarr")]


def _items(loader: DistillLoader, epoch: int) -> list[tuple[np.ndarray, tuple]]:
    e = loader.epoch(epoch)
    return list(zip([np.asarray(r) for r in e.batches], e))


def test_an_epoch_gives_the_cached_rows_their_inputs_and_their_targets(caches) -> None:
    manifest, stores = caches
    m = load_manifest(manifest)
    reference = CachedTargets.open(stores, m)
    group = StoreGroup(stores)
    with DistillLoader(stores, manifest, batch_size=BATCH, seed=3) as loader:
        assert (loader.num_mentors, loader.num_views, loader.names) == (2, 2, reference.names)
        assert loader.input_shape == (30,) and loader.num_classes == m.num_classes
        for epoch in (0, 1, 2):
            view = epoch % 2
            expected_rows = [np.asarray(r) for r in reference.batches(epoch, batch_size=BATCH, seed=3)]
            items = _items(loader, epoch)
            assert len(loader.epoch(epoch)) == len(items) == len(expected_rows) == 5   # 150 rows / 32
            data = open_split(m, reference.split, views=reference.view_spec, view=view)
            for want, (rows, (x, y, t)) in zip(expected_rows, items):
                np.testing.assert_array_equal(rows, want)
                x_ref, y_ref = data.get_batch(rows)
                torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
                assert y.dtype == torch.int64
                torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
                ref = group.targets(view, rows)
                assert set(t) == {"logits", "entropy", "p_gt"}
                assert t["logits"].shape == (2, len(rows), m.num_classes) and t["p_gt"].shape == (2, len(rows))
                for name in t:
                    assert t[name].dtype == torch.float32
                    torch.testing.assert_close(t[name], ref[name], rtol=0, atol=0)
            all_rows = np.concatenate(expected_rows)
            assert sorted(all_rows.tolist()) == list(range(150))     # one process: every row once
    reference.close()


def test_epoch_e_reads_view_e_mod_v_of_the_inputs_and_the_targets(caches, monkeypatch) -> None:
    # Synthetic vectors have identity views (equal values in every view), so the view read is
    # recorded rather than told apart by value.
    manifest, stores = caches
    with DistillLoader(stores, manifest, batch_size=BATCH) as loader:
        asked: list[list[int]] = []   # the distinct views of each gather's rows
        gather = loader.cached.group.targets
        monkeypatch.setattr(loader.cached.group, "targets", lambda view, rows, **kw:
                            asked.append(sorted(set(np.atleast_1d(view).tolist()))) or gather(view, rows, **kw))
        for epoch in (0, 1, 2, 3):
            e = loader.epoch(epoch)
            assert e.dataset.view == epoch % 2 and loader.dataset.view == 0
            assert len(list(e)) == 5 and asked == [[epoch % 2]] * 5
            asked.clear()


def test_workers_give_the_same_batches_as_the_main_process(caches) -> None:
    manifest, stores = caches
    with DistillLoader(stores, manifest, batch_size=BATCH, seed=1) as plain, \
            DistillLoader(stores, manifest, batch_size=BATCH, seed=1, workers=2) as workers:
        for epoch in (0, 1):
            a, b = _items(plain, epoch), _items(workers, epoch)
            assert len(a) == len(b) == 5
            for (rows_a, (xa, ya, ta)), (rows_b, (xb, yb, tb)) in zip(a, b):
                np.testing.assert_array_equal(rows_a, rows_b)
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
                assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("cache_mode", ["memory", "stream"])
def test_two_ranks_get_disjoint_rows_and_the_same_batch_count(caches, cache_mode: str) -> None:
    manifest, stores = caches
    group = StoreGroup(stores)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            with DistillLoader(stores, manifest, batch_size=16, seed=0, rank=rank, world_size=2,
                               cache_mode=cache_mode) as loader:
                assert loader.cached.group.mode == cache_mode
                items = _items(loader, epoch)
                assert len(items) == len(loader.epoch(epoch))
                for rows, (x, y, t) in items:
                    assert len(rows) == len(y) == x.shape[0]
                    assert torch.equal(t["logits"], group.targets(epoch % 2, rows)["logits"])
                seen.append([rows for rows, _ in items])
        counts = [len(s) for s in seen]
        assert counts[0] == counts[1] == 5                     # 150 rows: 4 batches of 2 x 16, then 2 x 11
        rank0, rank1 = (set(np.concatenate(s).tolist()) for s in seen)
        assert not rank0 & rank1
        assert len(rank0) == len(rank1) == 75 and rank0 | rank1 == set(range(150))


def test_a_store_of_another_manifest_is_one_user_error(caches, tmp_path: Path) -> None:
    _, stores = caches
    other = build_manifest("synthetic", tmp_path / "data", tmp_path / "other.parquet", num_samples=3000, seed=1)
    with pytest.raises(UserError) as err:
        DistillLoader(stores, other.path, batch_size=BATCH)
    text = str(err.value)
    assert "\n" not in text and str(stores[0]) in text and "manifest.sha256" in text


def test_bad_arguments_are_user_errors(caches) -> None:
    manifest, stores = caches
    with pytest.raises(UserError, match="rank/world_size: expected both or neither"):
        DistillLoader(stores, manifest, batch_size=BATCH, rank=0)
    with pytest.raises(UserError, match="rank/world_size: expected 0 <= rank < world_size"):
        DistillLoader(stores, manifest, batch_size=BATCH, rank=2, world_size=2)
    with pytest.raises(UserError, match="batch_size: expected an integer >= 1"):
        DistillLoader(stores, manifest, batch_size=0)
    with pytest.raises(UserError, match="stores: expected a non-empty list"):
        DistillLoader(str(stores[0]), manifest, batch_size=BATCH)
    with pytest.raises(UserError, match="memory_budget_mb: expected an integer >= 1, found 0"):
        DistillLoader(stores, manifest, batch_size=BATCH, memory_budget_mb=0)


@pytest.mark.parametrize("cache_mode", ["memory", "stream"])
def test_a_second_epoch_asked_for_mid_epoch(caches, cache_mode: str) -> None:
    """In memory two epochs interleave freely; a streamed cache serves the latest epoch only, and an
    older epoch's next batch says so in one line instead of reading another epoch's window."""
    manifest, stores = caches
    with DistillLoader(stores, manifest, batch_size=BATCH, cache_mode=cache_mode) as loader:
        first = iter(loader.epoch(0))
        next(first)
        second = list(loader.epoch(1))
        assert len(second) == 5
        if cache_mode == "memory":
            assert len(list(first)) == 4
        else:
            with pytest.raises(UserError, match="epoch 0: the streamed cache now serves a later loader.epoch"):
                next(first)


def test_a_sampled_store_needs_the_loss_temperature(synthetic_teacher, tmp_path) -> None:
    """Draws at T_s give an unbiased KD loss at T = T_s only: the loader asks for the loop's T."""
    manifest, teacher = synthetic_teacher
    store = cache(teacher, manifest, tmp_path / "s.zarr", storage="sampled", k=8, temperature=2.0)
    with pytest.raises(UserError, match="draws at T = 2, right for a loss at that temperature only; pass temperature=2"):
        DistillLoader([store], manifest, batch_size=BATCH)
    with pytest.raises(UserError, match=r"storage.temperature: expected 4 \(temperature of this loader\), found 2"):
        DistillLoader([store], manifest, batch_size=BATCH, temperature=4)
    with DistillLoader([store], manifest, batch_size=BATCH, temperature=2.0) as loader:
        x, y, t = next(iter(loader.epoch(0)))
        assert t["logits"].shape == (1, len(y), loader.num_classes)
