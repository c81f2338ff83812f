"""The store reader and cached targets: agreement checks, memory and streaming targets, block-aware DDP batches, top-k.

    .venv/bin/pytest tests/test_reader.py -q
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache import write_cache
from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.codecs.topk import dense_from_topk
from pipeline.store.reader import StoreGroup
from pipeline.train.sampling import windowed_permutation
from pipeline.train.targets import CachedTargets
from tests.support.stores import FakeFactory, fake_labels, fake_provenance, make_fake_store

N, C, RPB = 1000, 10, 128                      # 8 blocks, the last one short


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("room")
    paths = []
    for k in range(3):
        make_fake_store(root / f"t{k}.zarr", num_samples=N, num_classes=C, views=2, rows_per_block=RPB,
                        micro_batch=64, seed=k, teacher_sha=str(k) * 64)
        paths.append(root / f"t{k}.zarr")
    return paths


def _expected(paths, view, rows):
    groups = [zarr.open_group(str(p), mode="r") for p in paths]
    return {"logits": np.stack([g["logits"][view][rows].astype(np.float32) for g in groups]),
            "entropy": np.stack([g["entropy"][view][rows] for g in groups]),
            "p_gt": np.stack([g["p_gt"][view][rows] for g in groups])}


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_targets_equal_the_stored_values(stores, mode):
    cached = CachedTargets(stores, mode=mode, window_blocks=2, max_lag_batches=1)
    room = cached.group
    assert (room.num_mentors, room.num_samples, room.num_classes, room.num_views) == (3, N, C, 2)
    assert room.mode == mode and len(room.sample_ids) == N and room.labels.dtype == np.int32
    seen = []
    for rows in cached.batches(1, batch_size=64, seed=0):
        got = room.targets(1, rows)
        want = _expected(stores, 1, rows)
        assert got["logits"].shape == (3, len(rows), C) and got["logits"].dtype == torch.float32
        for name in want:
            np.testing.assert_array_equal(got[name].numpy(), want[name])
        seen.append(rows)
    assert sorted(np.concatenate(seen).tolist()) == list(range(N))
    only = room.targets(1, seen[-1], fields=("p_gt",))
    assert set(only) == {"p_gt"}
    cached.close()


def test_memory_mode_is_chosen_when_it_fits_the_budget(stores):
    assert StoreGroup(stores).mode == "memory"
    room = StoreGroup(stores, memory_budget_bytes=1000)
    assert room.mode == "stream" and room.memory_bytes > 1000


def test_streaming_is_block_shuffled_and_serves_only_its_windows(stores):
    cached = CachedTargets(stores, mode="stream", window_blocks=2, max_lag_batches=1)
    room = cached.group
    sampler = cached.batches(0, batch_size=32, seed=3)
    _, blocks = windowed_permutation(room.layouts[0].num_blocks, room.layouts[0].block_rows, width=2, key=(3, 0, 0))
    windows = [set(np.concatenate([np.arange(b * RPB, min((b + 1) * RPB, N)) for b in w]).tolist()) for w in blocks]
    assert len(windows) == 4
    it = iter(sampler)
    first = next(it)
    assert set(first.tolist()) <= windows[0]
    with pytest.raises(RuntimeError, match="window"):
        room.targets(0, np.array(sorted(windows[3])[:4]))      # not loaded: an error, never a Zarr read
    with pytest.raises(RuntimeError, match="stream"):
        room.targets(1, first)                                  # the epoch streams view 0
    batches = [first] + list(it)
    assert sorted(np.concatenate(batches).tolist()) == list(range(N))
    for rows in batches:                                        # a batch spans at most two windows
        assert sum(bool(set(rows.tolist()) & w) for w in windows) <= 2
    again = list(cached.batches(0, batch_size=32, seed=3))
    assert all((a == b).all() for a, b in zip(again, batches))
    other = list(cached.batches(2, batch_size=32, seed=3))
    assert not all((a == b).all() for a, b in zip(other, batches))
    cached.close()


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ddp_ranks_get_disjoint_equal_batches(stores, mode, drop_last):
    world, batch = 3, 50
    cached = CachedTargets(stores, mode=mode, window_blocks=2, max_lag_batches=1)
    per_rank = [list(cached.batches(4, batch_size=batch, seed=1, rank=r, world_size=world, drop_last=drop_last))
                for r in range(world)]
    union = np.concatenate([np.concatenate(b) for b in per_rank])
    assert len(union) == len(np.unique(union))                  # disjoint, no row twice
    assert len({len(b) for b in per_rank}) == 1                 # every rank takes the same number of steps
    for step in zip(*per_rank):                                 # ... of equal batches (a DDP mean = one process)
        assert len({len(rows) for rows in step}) == 1
    full, rest = divmod(N, batch * world)
    covered = full * batch * world + (0 if drop_last else rest // world * world)
    assert len(union) == covered                                # fewer than `world` rows are left out
    one = np.concatenate(list(cached.batches(4, batch_size=batch * world, seed=1, drop_last=drop_last)))
    assert sorted(union.tolist()) == sorted(one[:covered].tolist())   # the rows one process sees
    cached.close()


def test_stream_with_a_dataloader_running_ahead(stores):
    cached = CachedTargets(stores, mode="stream", window_blocks=2, max_lag_batches=4)
    sampler = cached.batches(0, batch_size=16, seed=0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(N)), batch_sampler=sampler,
                                         num_workers=2, prefetch_factor=2)
    count = 0
    for (idx,) in loader:
        got = cached.group.targets(0, idx)
        np.testing.assert_array_equal(got["entropy"].numpy(), _expected(stores, 0, idx.numpy())["entropy"])
        count += len(idx)
    assert count == N
    cached.close()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return zarr.open_group(str(dst), mode="r+")


def test_disagreeing_or_incomplete_stores_are_refused(stores, tmp_path):
    other = tmp_path / "m.zarr"
    layout = schema.Layout(num_samples=N, num_classes=C, num_views=2, rows_per_block=RPB, micro_batch=64)
    write_cache(other, factory=FakeFactory(C), layout=layout, progress=False,
                provenance=fake_provenance(N, C, 2, manifest_sha="0" * 64),
                sample_id=np.arange(N) * 3 + 7, label=fake_labels(N, C))
    with pytest.raises(UserError, match=r"m\.zarr: field manifest\.sha256"):
        StoreGroup([stores[0], other])
    make_fake_store(tmp_path / "v.zarr", num_samples=N, num_classes=C, views=3, rows_per_block=RPB, micro_batch=64)
    with pytest.raises(UserError, match=r"views\.count"):
        StoreGroup([stores[0], tmp_path / "v.zarr"])
    order = _copy(stores[1], tmp_path / "order.zarr")
    order["sample_id"][:] = order["sample_id"][:][::-1]
    with pytest.raises(UserError, match="sample_id"):
        StoreGroup([stores[0], tmp_path / "order.zarr"])
    _copy(stores[1], tmp_path / "hole.zarr")
    (tmp_path / "hole.zarr" / "logits" / "c.1.3.0").unlink()     # a deleted block
    with pytest.raises(UserError, match=r"hole\.zarr: field logits"):
        StoreGroup([stores[0], tmp_path / "hole.zarr"])
    _copy(stores[1], tmp_path / "marker.zarr")["done"][0, 2] = False
    with pytest.raises(UserError, match="field done"):
        StoreGroup([tmp_path / "marker.zarr"])
    with pytest.raises(UserError, match="zarr.json"):
        StoreGroup([tmp_path / "missing.zarr"])


def test_topk_reconstruction_keeps_topk_probabilities_and_tail_mass(tmp_path):
    make_fake_store(tmp_path / "top.zarr", num_samples=N, num_classes=C, views=1, kind="topk", k=3,
                    rows_per_block=RPB, micro_batch=64)
    make_fake_store(tmp_path / "dense.zarr", num_samples=N, num_classes=C, views=1, rows_per_block=RPB, micro_batch=64)
    for mode in ("memory", "stream"):
        cached = CachedTargets([tmp_path / "dense.zarr", tmp_path / "top.zarr"], mode=mode, window_blocks=8)
        rows = next(iter(cached.batches(0, batch_size=200, seed=0)))
        got = cached.group.targets(0, rows)
        g = zarr.open_group(str(tmp_path / "top.zarr"), mode="r")
        values, index, lse = g["topk_values"][0][rows], g["topk_index"][0][rows], g["logsumexp"][0][rows]
        p = torch.softmax(got["logits"][1], dim=1).numpy()
        np.testing.assert_allclose(np.take_along_axis(p, index.astype(np.int64), 1),
                                   np.exp(values.astype(np.float32) - lse[:, None]), rtol=2e-3, atol=1e-6)
        tail = np.ones((len(rows), C), bool)
        np.put_along_axis(tail, index.astype(np.int64), False, 1)
        rest = p[tail].reshape(len(rows), C - 3)
        np.testing.assert_allclose(rest, rest[:, :1].repeat(C - 3, 1), rtol=1e-5)   # uniform tail
        np.testing.assert_array_equal(got["entropy"][1].numpy(), g["entropy"][0][rows])
        cached.close()
    z = dense_from_topk(np.array([[2.0, 1.0]]), np.array([[1, 0]]), np.array([np.log(np.e**2 + np.e + 1.0)]), 2)
    np.testing.assert_allclose(z, [[1.0, 2.0]])                                   # k == C: the logits themselves
