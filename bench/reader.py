"""Benchmark: the cost of reading cached targets, as a fraction of a small student's training step.

    .venv/bin/python bench/reader.py                  # ~1 min on a 2-core CPU
    .venv/bin/python bench/reader.py --dir /tmp/kdbench --keep

Builds K = 6 stores of 60 000 samples x 10 classes (float16 logits, 1 view, blocks of 4096 rows;
random teachers: the reader does not care what the numbers are), then times, for batches of 256:

- the student step: the project's ``cnn`` (3 conv blocks of 32/64/128 channels, BN, ReLU, max-pool,
  global pool, linear; 28x28x1 inputs, Fashion-MNIST sized) — forward, ``aver_loss`` over the 6
  mentors (CE + KD to each), backward, SGD step, on random inputs, after warm-up;
- target reads in memory mode: ``next(CachedTargets.batches(...))`` + ``StoreGroup.targets`` per
  batch (``CachedTargets(..., mode="memory")``, its ``.group`` doing the gather);
- target reads in streaming mode, inside that training loop: the time spent in the batch order
  (waiting for a window, if the prefetch thread is late) and in ``targets``, while the next window
  loads on a thread during the student's steps (window = 1 block, so windows turn over every
  16 steps);
- streaming throughput: one epoch of batches + targets with no student at all (rows/s);
- for comparison, what the reader avoids: a random gather of the batch's rows from each Zarr store.

Every read checks each chunk's CRC-32 (memory mode once, at load; streaming as each window loads,
on the prefetch thread). Each measurement is made with the checks and without them (the reader's
``_Blocks.check_checksums`` switch, there for this baseline only), and the CRC of one batch's
bytes is timed on its own.

Goal: target reads <= 1% of the step in both modes, with the checks.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import zlib
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cache import write_cache  # noqa: E402
from pipeline.losses import aver_loss  # noqa: E402
from pipeline.models import create_model  # noqa: E402
from pipeline.store import reader, schema  # noqa: E402
from pipeline.store.writer import Provenance  # noqa: E402
from pipeline.train.targets import CachedTargets  # noqa: E402

K, N, C, BATCH = 6, 60_000, 10, 256


@dataclass(frozen=True)
class RandomTeacher:
    """A stand-in teacher: logits drawn from a generator seeded by (teacher, view, block start)."""

    num_classes: int
    seed: int

    def build(self):
        def compute(view: int, start: int, stop: int) -> np.ndarray:
            rng = np.random.default_rng([self.seed, view, start])
            return (rng.standard_normal((stop - start, self.num_classes)) * 3).astype(np.float32)
        compute.num_classes = self.num_classes
        return compute


def build_stores(root: Path) -> list[Path]:
    labels = np.random.default_rng(0).integers(0, C, N).astype(np.int32)
    layout = schema.Layout(num_samples=N, num_classes=C, num_views=1)
    paths = []
    for k in range(K):
        prov = Provenance(
            manifest={"path": "bench", "sha256": "b" * 64, "split": "train", "num_samples": N, "num_classes": C,
                      "dataset": "bench"},
            teacher={"name": f"t{k}", "arch": "random", "checkpoint_sha256": f"{k:064d}", "train_loss": "ce"},
            views={"count": 1, "seed": 0, "spec": {"kind": "identity", "seed": 0, "params": {}}})
        out = root / f"t{k}.zarr"
        write_cache(out, factory=RandomTeacher(C, k), provenance=prov, layout=layout, sample_id=np.arange(N),
                    label=labels, overwrite=True, progress=False)
        paths.append(out)
    return paths


def make_step() -> tuple[Callable[[torch.Tensor], None], int]:
    torch.manual_seed(0)
    net = create_model("cnn", num_classes=C, input_shape=(1, 28, 28))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(BATCH, 1, 28, 28)
    y = torch.randint(0, C, (BATCH,))

    def step(z_m: torch.Tensor) -> None:
        loss = aver_loss(net(x), z_m, y, T=4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, sum(p.numel() for p in net.parameters())


def time_step(step, warmup: int = 5, steps: int = 30) -> float:
    z = torch.randn(K, BATCH, C)
    for _ in range(warmup):
        step(z)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(z)
    return (time.perf_counter() - t0) / steps


def time_memory_reads(targets: CachedTargets, epochs: int = 3) -> tuple[float, float]:
    """Mean and median seconds of one batch's row indices plus its gathered targets."""
    times = []
    for epoch in range(epochs):
        view = epoch % targets.num_views
        it = iter(targets.batches(epoch, batch_size=BATCH, seed=0, drop_last=True))
        while True:
            t0 = time.perf_counter()
            rows = next(it, None)
            if rows is None:
                break
            targets.group.targets(view, rows)
            times.append(time.perf_counter() - t0)
    return float(np.mean(times)), float(np.median(times))


def time_stream_in_training(targets: CachedTargets, step: Callable[[torch.Tensor], None],
                            steps: int) -> tuple[float, float]:
    """Mean and median seconds per batch spent on targets while the student trains (epoch 0)."""
    it = iter(targets.batches(0, batch_size=BATCH, seed=0, drop_last=True))
    spent = []
    for _ in range(steps):
        t0 = time.perf_counter()
        rows = next(it)
        z = targets.group.targets(0, rows)["logits"]
        spent.append(time.perf_counter() - t0)
        step(z)
    spent = spent[1:]                         # the first batch waits for the first window (start-up)
    return float(np.mean(spent)), float(np.median(spent))


def stream_rows_per_second(targets: CachedTargets) -> float:
    """Rows per second over one whole epoch (epoch 1) of batches and targets, no student."""
    view = 1 % targets.num_views
    t0 = time.perf_counter()
    rows = 0
    for batch in targets.batches(1, batch_size=BATCH, seed=0):
        rows += len(targets.group.targets(view, batch)["logits"][0])
    return rows / (time.perf_counter() - t0)


@contextmanager
def checksums(enabled: bool) -> Iterator[None]:
    """Readers made inside check (or, for the baseline, skip) every chunk's CRC-32."""
    before = reader._Blocks.check_checksums
    reader._Blocks.check_checksums = enabled
    try:
        yield
    finally:
        reader._Blocks.check_checksums = before


def time_batch_crc(paths: list[Path], reps: int = 200) -> float:
    """Seconds of zlib.crc32 over one batch's share of every chunk a read checks (K stores, pred included)."""
    lay = schema.Layout(num_samples=N, num_classes=C, num_views=1)
    data = [(p / schema.chunk_key(name, 3 if name == "logits" else 2, 0, 0)).read_bytes()
            for p in paths for name in lay.block_arrays()]
    t0 = time.perf_counter()
    for _ in range(reps):
        for chunk in data:
            zlib.crc32(chunk)
    per_block = (time.perf_counter() - t0) / reps
    return per_block * BATCH / lay.rows_per_block


def time_zarr_gather(paths: list[Path], reps: int = 20) -> float:
    arrays = [zarr.open_group(str(p), mode="r")["logits"] for p in paths]
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(reps):
        rows = np.sort(rng.choice(N, BATCH, replace=False))
        np.stack([a.get_orthogonal_selection((0, rows, slice(None))) for a in arrays])
    return (time.perf_counter() - t0) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the stores (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--stream-steps", type=int, default=80)
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        paths = build_stores(root)
        print(f"stores: {K} x {N} samples x {C} classes fp16, 1 view, blocks of "
              f"{schema.Layout(num_samples=N, num_classes=C, num_views=1).rows_per_block} rows "
              f"(written in {time.perf_counter() - t0:.1f} s); torch threads {torch.get_num_threads()}")
        step, params = make_step()
        t_step = time_step(step)
        print(f"student step: cnn ({params / 1e3:.0f} k params), batch {BATCH}, 1x28x28, aver_loss over {K} mentors, "
              f"SGD: {t_step * 1e3:.2f} ms")
        steps_per_epoch = N // BATCH
        worst = 0.0
        for checked in (True, False):
            label = "checked  " if checked else "unchecked"
            with checksums(checked):
                t0 = time.perf_counter()
                with closing(CachedTargets(paths, mode="memory")) as targets:
                    t_load = time.perf_counter() - t0
                    t_mem, med_mem = time_memory_reads(targets)
                print(f"memory mode, {label}: {t_mem * 1e6:8.1f} us per batch (median {med_mem * 1e6:.1f}) = "
                      f"{100 * t_mem / t_step:6.3f}% of a step; load {t_load * 1e3:.0f} ms once "
                      f"(= {100 * t_load / (steps_per_epoch * t_step):.3f}% of one epoch's {steps_per_epoch} steps)")
                with closing(CachedTargets(paths, memory_budget_bytes=1 << 20, window_blocks=1)) as targets:
                    assert targets.group.mode == "stream"
                    t_stream, med_stream = time_stream_in_training(targets, step, args.stream_steps)
                    print(f"stream mode, {label}: {t_stream * 1e6:8.1f} us per batch (median {med_stream * 1e6:.1f}) = "
                          f"{100 * t_stream / t_step:6.3f}% of a step (inside the training loop, {args.stream_steps} "
                          "steps, window = 1 block of 4096 rows, prefetch thread)")
                    rate = stream_rows_per_second(targets)
                print(f"stream rows/s, {label}: {rate:,.0f} (batches + targets of {K} stores, no student)")
            if checked:
                worst = max(t_mem, t_stream)
        t_crc = time_batch_crc(paths)
        print(f"CRC-32 of one batch's bytes ({K} stores, every array): {t_crc * 1e6:.1f} us = "
              f"{100 * t_crc / t_step:.3f}% of a step (streaming: on the prefetch thread)")
        t_zarr = time_zarr_gather(paths)
        print(f"for comparison, random gather of the batch from Zarr each step: {t_zarr * 1e3:.2f} ms "
              f"= {100 * t_zarr / t_step:.1f}% of a step")
        ok = worst / t_step <= 0.01
        print(f"goal <= 1% of a step, with the checks: {'met' if ok else 'NOT met'}")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
