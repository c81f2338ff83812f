"""Benchmark: what writing a cache costs on top of teacher inference, and the writer's own ceiling.

    .venv/bin/python bench/cache_write.py --quick                      # ~3 min on 2 cores
    .venv/bin/python bench/cache_write.py --train-rows 16384 --views 2 --rows 262144 --reps 5
    .venv/bin/python bench/cache_write.py --dataset synthetic --quick  # mlp teacher, 30-d vectors

(a) Caching against pure inference, alternated ``--reps`` times after a warm-up, each run in this
process:

- ``inference``: the caching job's own block computer (``pipeline.cache.teacher.TeacherFactory``:
  the same model, views, micro-batches of 256 rows) built and run over every (view, block), the
  logits thrown away;
- ``caching``: ``cache_teacher`` of the same teacher over the same views (``overwrite``: the store
  is created anew each run; float16, blocks of 4096 rows), finalize included.

Data: a random ``--train-rows`` of Fashion-MNIST's train split (its default views: random crop and
flip; a ``cnn`` teacher of ``--width``, random init) where installed, else the synthetic dataset
(an ``mlp`` teacher). Goal: caching <= 1.02 x inference (CPU).

(b) The writer's ceiling: ``write_cache`` with a stand-in teacher that returns precomputed logits
(C = ``--classes``, 1000 by default; ``--rows`` rows x ``--views`` views), so that only the writer
works (per block: stats at T = 1, the float16 cast, CRC-32s, the chunk writes, the marker), then
every file of the store is fsynced. Against it, the raw sequential write speed of the same disk:
files of the same sizes, written with plain ``write`` calls and each fsynced, in the same folder.
Goal: writer MB/s >= 0.5 x raw MB/s (wall time: the disk is what is measured).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from _common import (DATASETS, PrecomputedTeacher, alternate, bench_provenance, build_data, low, machine_line,
                     markdown_table, median, pick_dataset, save_teacher, summary_line, teacher_factory)
from pipeline.cache import CacheConfig, cache_teacher, write_cache
from pipeline.manifest import load_manifest
from pipeline.store import schema

ARCHS = {"synthetic": "mlp", "fashion-mnist": "cnn"}


def caching_variants(root: Path, manifest: Path, teacher: Path, *, views: int,
                     threads: int) -> dict[str, Callable[[], None]]:
    man = load_manifest(manifest)
    cfg = CacheConfig(teacher=str(teacher), manifest=str(manifest), out=str(root / "cache.zarr"), views=views,
                      device="cpu", threads=threads, overwrite=True, progress=False)
    layout = schema.Layout(num_samples=len(man.split("train").sample_id), num_classes=man.num_classes, num_views=views)
    factory = teacher_factory(manifest, teacher, micro_batch=layout.micro_batch, threads=threads)

    def inference() -> None:
        computer = factory.build()
        for view, block in layout.units():
            computer(view, *layout.block_rows(block))

    return {"inference": inference, "caching": lambda: cache_teacher(cfg) and None}


def fsync_tree(root: Path) -> int:
    """fsync every file under ``root``; their total size in bytes."""
    total = 0
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            total += path.stat().st_size
    return total


def writer_variants(root: Path, *, rows: int, views: int, classes: int) -> tuple[dict[str, Callable[[], dict]], dict]:
    layout = schema.Layout(num_samples=rows, num_classes=classes, num_views=views)
    labels = np.random.default_rng(0).integers(0, classes, rows).astype(np.int32)
    store = root / "standin.zarr"
    sizes: list[int] = []

    def writer() -> dict:
        t0 = time.perf_counter()
        write_cache(store, factory=PrecomputedTeacher(classes, layout.rows_per_block), layout=layout,
                    provenance=bench_provenance(rows, classes, num_views=views, teacher="stand-in", seed=0),
                    sample_id=np.arange(rows), label=labels, overwrite=True, progress=False)
        unsynced = time.perf_counter() - t0
        nbytes = fsync_tree(store)
        if not sizes:
            sizes.extend(p.stat().st_size for p in sorted(store.rglob("*")) if p.is_file())
        return {"bytes": nbytes, "unsynced": unsynced}

    def raw() -> dict:
        folder = root / "raw"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        payload = np.random.default_rng(1).integers(0, 256, max(sizes), dtype=np.uint8).tobytes()
        for i, size in enumerate(sizes):
            fd = os.open(folder / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(payload)[:size]
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        return {"bytes": sum(sizes)}

    return {"writer": writer, "raw": raw}, {"layout": layout, "sizes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller data, 3 repetitions")
    parser.add_argument("--dataset", choices=DATASETS, default="auto",
                        help="(a): auto = fashion-mnist where installed, else synthetic")
    parser.add_argument("--train-rows", type=int, default=None, help="(a) train rows (default 16384; quick 4096)")
    parser.add_argument("--views", type=int, default=2, help="views per sample, (a) and (b)")
    parser.add_argument("--width", type=int, default=32, help="(a) cnn teacher width")
    parser.add_argument("--rows", type=int, default=None, help="(b) rows of the stand-in store (default 262144; "
                                                               "quick 32768)")
    parser.add_argument("--classes", type=int, default=1000, help="(b) classes of the stand-in store")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per variant (default 5; quick 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--skip", choices=("a", "b"), default=None, help="leave out part (a) or (b)")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    train_rows = args.train_rows or (4096 if args.quick else 16384)
    rows = args.rows or (32768 if args.quick else 262144)
    reps = args.reps or (3 if args.quick else 5)
    dataset = pick_dataset(args.dataset)
    torch.set_num_threads(args.threads)
    root = args.dir or Path(tempfile.mkdtemp(prefix="kd-cache-write-"))
    root.mkdir(parents=True, exist_ok=True)
    ratios = {}
    try:
        print(machine_line())
        if args.skip != "a":
            manifest = build_data(root, dataset, train_rows)
            arch = ARCHS[dataset]
            teacher = save_teacher(root / "teacher.pt", manifest, arch, {"width": args.width} if arch == "cnn" else {})
            runs = alternate(caching_variants(root, manifest, teacher, views=args.views, threads=args.threads),
                             reps=reps)
            print(f"(a) {dataset}: {train_rows} train rows x {args.views} views, teacher {arch}"
                  f"{f' width {args.width}' if arch == 'cnn' else ''}, micro-batch 256, torch threads {args.threads}; "
                  f"{reps} runs each, alternated")
            print(markdown_table(["variant", "CPU s (min)", "CPU s (median)", "wall s (median)", "rows/s (median wall)"],
                                 [[name, f"{low(s, 'cpu'):.2f}", f"{median(s, 'cpu'):.2f}", f"{median(s, 'wall'):.2f}",
                                   f"{train_rows * args.views / median(s, 'wall'):,.0f}"] for name, s in runs.items()]))
            ratios["caching_over_inference"] = median(runs["caching"], "cpu") / median(runs["inference"], "cpu")
            wall = median(runs["caching"], "wall") / median(runs["inference"], "wall")
            print(f"caching / inference: {ratios['caching_over_inference']:.3f} (CPU), {wall:.3f} (wall); goal <= 1.02: "
                  f"{'met' if ratios['caching_over_inference'] <= 1.02 else 'NOT met'}")
        if args.skip != "b":
            variants, info = writer_variants(root, rows=rows, views=args.views, classes=args.classes)
            runs = alternate(variants, reps=reps)
            nbytes = median(runs["writer"], "bytes")
            lay = info["layout"]
            print(f"(b) stand-in teacher, C = {args.classes}: {rows} rows x {args.views} views, blocks of "
                  f"{lay.rows_per_block} rows, {nbytes / 2**20:.0f} MiB in {len(info['sizes'])} files; {reps} runs "
                  f"each, alternated; folder {root}")
            table = []
            for name, s in runs.items():
                table.append([name, f"{median(s, 'wall'):.2f}", f"{median(s, 'cpu'):.2f}",
                              f"{rows * args.views / median(s, 'wall'):,.0f}" if name == "writer" else "",
                              f"{nbytes / 2**20 / low(s, 'wall'):.0f}", f"{nbytes / 2**20 / median(s, 'wall'):.0f}"])
            print(markdown_table(["variant", "wall s (median)", "CPU s (median)", "rows/s", "MB/s (best)",
                                  "MB/s (median)"], table))
            print(f"writer without the final fsync: {median(runs['writer'], 'unsynced'):.2f} s (median); "
                  "MB here are MiB")
            ratios["writer_over_raw_write"] = median(runs["raw"], "wall") / median(runs["writer"], "wall")
            print(f"writer / raw write speed: {ratios['writer_over_raw_write']:.3f}; goal >= 0.5: "
                  f"{'met' if ratios['writer_over_raw_write'] >= 0.5 else 'NOT met'}")
        print(summary_line(**ratios))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
