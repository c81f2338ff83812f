"""Distillation under DDP: 2 CPU processes (gloo) against one process with the global batch.

    .venv/bin/pytest tests/test_distill_distributed.py -m distributed -q

Every row is seen exactly once per epoch over the ranks, each step's rows together are the
single process's batch, and the weights agree (equal halves, so the mean gradients agree).
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.checkpoint import load_checkpoint
from pipeline.train import DistillConfig, distill
from tests.support.distill import cache, ddp_worker
from tests.support.stores import make_synthetic_teacher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("cache_mode", ["memory", "stream"])
def test_two_ranks_cover_every_row_once_and_match_one_process(tmp_path, cache_mode):
    manifest, teacher = make_synthetic_teacher(tmp_path, num_samples=3000)   # 150 train rows
    store = cache(teacher, manifest, tmp_path / "t.zarr", views=2, rows_per_block=32)
    base = dict(manifest=str(manifest), method="kd", student="mlp", mentors=(str(store),), epochs=2, lr=0.05,
                device="cpu", progress=False, cache_mode=cache_mode, memory_budget_mb=1)
    # 150 = 4 global batches of 2 x 16 + 22 rows, split 11 / 11: the ranks' mean gradients average exactly
    mp.spawn(ddp_worker, args=(2, _free_port(), {**base, "batch_size": 16, "out": str(tmp_path / "ddp.pt")},
                               str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(2)]
    single: list = []
    distill(DistillConfig(**{**base, "batch_size": 32, "out": str(tmp_path / "one.pt")}),
            on_step=lambda b, out: single.append({"epoch": b.epoch, "rows": b.rows.tolist()}))
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 2 * 5
    for epoch in range(2):
        seen = Counter(r for rank in ranks for s in rank if s["epoch"] == epoch for r in s["rows"])
        assert sorted(seen) == list(range(150)) and set(seen.values()) == {1}   # each row once per epoch
    for a, b, one in zip(ranks[0], ranks[1], single):                             # step by step, same rows
        assert not set(a["rows"]) & set(b["rows"]) and sorted(a["rows"] + b["rows"]) == sorted(one["rows"])
    ddp, one = load_checkpoint(tmp_path / "ddp.pt"), load_checkpoint(tmp_path / "one.pt")
    for key, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5)
    assert ddp["meta"]["metrics"]["train_loss"] == pytest.approx(one["meta"]["metrics"]["train_loss"], rel=1e-4)


@pytest.mark.distributed
def test_ranks_take_equal_steps_when_fewer_rows_than_ranks_remain(tmp_path):
    """129 rows = 4 global batches of 2 x 16 + 1: the lone row would give rank 0 one step more than rank 1."""
    manifest, teacher = make_synthetic_teacher(tmp_path, num_samples=2580)   # 129 train rows
    store = cache(teacher, manifest, tmp_path / "t.zarr", views=1, rows_per_block=32)
    config = dict(manifest=str(manifest), method="kd", student="mlp", mentors=(str(store),), epochs=1, lr=0.05,
                  device="cpu", progress=False, batch_size=16, out=str(tmp_path / "ddp.pt"))
    mp.spawn(ddp_worker, args=(2, _free_port(), config, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    rows = np.concatenate([s["rows"] for rank in ranks for s in rank])
    assert len(rows) == len(set(rows.tolist())) == 128   # the one row left over is skipped this epoch
