"""Tiny teachers, their caches, and a DDP worker for the distillation tests.

    from tests.support.distill import cache, ddp_worker, untrained_teacher
    teacher = untrained_teacher(manifest, tmp_path / "t.pt", arch="cnn")
    store = cache(teacher, manifest, tmp_path / "t.zarr", views=1)
    torch.multiprocessing.spawn(ddp_worker, args=(2, port, config, str(tmp_path)), nprocs=2)

Caches come from the library writer (``cache_teacher``), never from a copy of it. ``ddp_worker``
lives in this importable module so that spawned processes can unpickle it by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.cache import CacheConfig, cache_teacher
from pipeline.checkpoint import save_checkpoint
from pipeline.data import default_views, open_split
from pipeline.manifest import load_manifest
from pipeline.models import create_model
from pipeline.train import DistillConfig, distill


def untrained_teacher(manifest: str | Path, out: str | Path, *, arch: str = "mlp", seed: int = 0,
                      scale: float = 4.0) -> Path:
    """A random ``arch`` for ``manifest`` (last layer scaled so its targets are not uniform), saved as a checkpoint."""
    m = load_manifest(manifest)
    views = default_views(m)
    shape = tuple(open_split(m, "train", views=views).input_shape)
    torch.manual_seed(seed)
    net = create_model(arch, num_classes=m.num_classes, input_shape=shape)
    with torch.no_grad():
        last = [mod for mod in net.modules() if isinstance(mod, torch.nn.Linear)][-1]
        last.weight.mul_(scale)
    save_checkpoint(out, model=net, meta={"arch": arch, "num_classes": m.num_classes, "input_shape": shape,
                                          "loss": "ce", "manifest_sha256": m.sha256, "views": views.to_dict()})
    return Path(out)


def cache(teacher: str | Path, manifest: str | Path, out: str | Path, *, views: int = 2, rows_per_block: int = 64,
          **kw) -> Path:
    """``kdcache cache`` of the train split (float16, dense), through the library writer."""
    cache_teacher(CacheConfig(teacher=teacher, manifest=manifest, split="train", views=views, out=out,
                              rows_per_block=rows_per_block, micro_batch=32, progress=False, device="cpu", **kw))
    return Path(out)


def ddp_worker(rank: int, world_size: int, port: int, config: dict, log_dir: str) -> None:
    """One rank of a gloo DDP run (``torch.multiprocessing.spawn``): distil, log every step's rows as JSON."""
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen: list[dict] = []
    try:
        distill(DistillConfig(**config), on_step=lambda b, out: seen.append({"epoch": b.epoch, "step": b.step,
                                                                             "rows": b.rows.tolist()}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(log_dir, f"rank{rank}.json").write_text(json.dumps(seen))
