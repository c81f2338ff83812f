"""Benchmark: streaming a cache larger than the memory budget, against the disk's raw read speed.

    .venv/bin/python bench/stream.py --quick                       # 65 536 rows x 2 views, budget 128 MiB, ~1 min
    .venv/bin/python bench/stream.py                               # 1.28 M rows x 2 views (5.1 GB), budget 1 GiB
    .venv/bin/python bench/stream.py --rows 327680 --budget-mb 256 --reps 3

Writes one store with the stand-in writer (``write_cache`` with precomputed logits, C =
``--classes``, float16, blocks of 4096 rows), larger than ``--budget-mb``, then alternates, ``--reps``
times after a warm-up, each from a cold page cache (every file of the store evicted with
``posix_fadvise(DONTNEED)`` before each run: no root needed; what stays resident is checked with
``fincore`` where it is installed):

- ``stream``: one epoch of view 0 as distillation reads it: ``CachedTargets(..., mode="stream",
  memory_budget_bytes=budget)``, its block-windowed batch order (``--batch-size``), the rows
  drawn through a torch DataLoader with ``--workers`` processes (``pipeline.train.loop.iter_batches``,
  the loop's own; the inputs are a stand-in of 1 float per row) and each batch's targets
  (logits [1, B, C] float32, entropy, p_gt) gathered in this process (``--threads`` torch
  threads), every chunk CRC-checked;
- ``raw``: the same files (every block array of view 0: logits, entropy, p_gt, pred) read
  sequentially with ``readinto`` into one 16 MiB buffer.

Reports rows/s and MB/s of both (MiB of the files read), and the stream's peak RSS: this
process's high-water mark (``VmHWM``, reset before each run) above its RSS when the run began,
against the budget. Goals: stream >= 0.5 x raw read speed; peak RSS within the budget.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from _common import (PrecomputedTeacher, StandInInputs, alternate, bench_provenance, drop_page_cache, low, machine_line,
                     markdown_table, median, read_files, reset_peak_rss, rss_bytes, summary_line)
from pipeline.cache import write_cache
from pipeline.runtime import Runtime
from pipeline.store import schema
from pipeline.train.loop import iter_batches
from pipeline.train.targets import CachedTargets


def build_store(root: Path, *, rows: int, views: int, classes: int) -> Path:
    store = root / "stream.zarr"
    layout = schema.Layout(num_samples=rows, num_classes=classes, num_views=views)
    labels = np.random.default_rng(0).integers(0, classes, rows).astype(np.int32)
    write_cache(store, factory=PrecomputedTeacher(classes, layout.rows_per_block), layout=layout,
                provenance=bench_provenance(rows, classes, num_views=views, teacher="stand-in", seed=0),
                sample_id=np.arange(rows), label=labels, overwrite=True, progress=False)
    return store


def view_files(store: Path, view: int) -> list[Path]:
    """The chunk files one epoch of ``view`` reads: every block array's chunk of every block."""
    lay = schema.Layout.from_attrs(schema.read_attrs(store))
    return [store / schema.chunk_key(name, 3 if name == "logits" else 2, view, block)
            for name in lay.block_arrays() for block in range(lay.num_blocks)]


def resident_bytes(paths: list[Path]) -> int | None:
    """Bytes of ``paths`` in the page cache (``fincore``), None where fincore is missing."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line) for line in out.split())


def variants(store: Path, *, budget: int, batch_size: int, workers: int) -> dict[str, Callable[[], dict]]:
    every = sorted(p for p in store.rglob("*") if p.is_file())
    files = view_files(store, 0)
    runtime = Runtime.create("cpu", images=False)

    def stream() -> dict:
        drop_page_cache(every)
        reset_peak_rss()
        base = rss_bytes()
        t0, c0 = time.perf_counter(), time.process_time()
        with closing(CachedTargets([store], memory_budget_bytes=budget, mode="stream",
                                   max_lag_batches=max(32, 2 * workers + 2))) as targets:
            dataset = StandInInputs(targets.group.labels)
            rows = 0
            for _, y, batch in iter_batches(dataset, targets.batches(0, batch_size=batch_size, seed=0),
                                            runtime=runtime, workers=workers):
                got = targets.group.targets(0, batch)
                rows += got["logits"].shape[1]
            width = targets.group.window_width(batch_size)
        return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "rows": rows,
                "peak": rss_bytes("VmHWM") - base, "peak_abs": rss_bytes("VmHWM"), "window_blocks": width}

    def raw() -> dict:
        drop_page_cache(every)
        t0, c0 = time.perf_counter(), time.process_time()
        nbytes = read_files(files)
        return {"seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "bytes": nbytes}

    return {"stream": stream, "raw": raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="65 536 rows x 2 views, budget 128 MiB, 3 repetitions")
    parser.add_argument("--rows", type=int, default=None, help="rows of the store (default 1 280 000; quick 65 536)")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--budget-mb", type=int, default=None, help="the reader's memory budget, MiB "
                                                                    "(default 1024; quick 128)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of this process")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per variant (default 3; quick 3)")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    rows = args.rows or (65536 if args.quick else 1_280_000)
    budget = (args.budget_mb or (128 if args.quick else 1024)) * 2**20
    reps = args.reps or 3
    torch.set_num_threads(args.threads)
    root = args.dir or Path(tempfile.mkdtemp(prefix="kd-stream-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(machine_line())
        t0 = time.perf_counter()
        store = build_store(root, rows=rows, views=args.views, classes=args.classes)
        every = sorted(p for p in store.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in every)
        files = view_files(store, 0)
        epoch_bytes = sum(p.stat().st_size for p in files)
        print(f"store: {rows} rows x {args.views} views x C = {args.classes} float16, {size / 2**20:.0f} MiB "
              f"(written in {time.perf_counter() - t0:.0f} s, folder {root}); memory budget {budget / 2**20:.0f} MiB; "
              f"one epoch reads view 0: {epoch_bytes / 2**20:.0f} MiB in {len(files)} files; batch {args.batch_size}, "
              f"{args.workers} DataLoader workers, torch threads {args.threads}; {reps} runs each, alternated")
        if size <= budget:
            raise SystemExit(f"error: --rows {rows}: expected a store larger than the budget ({budget / 2**20:.0f} "
                             f"MiB), found {size / 2**20:.0f} MiB; give more rows or a smaller --budget-mb")
        drop_page_cache(every)
        left = resident_bytes(every)
        print("page cache after eviction: " + ("fincore not installed, not checked" if left is None else
                                                f"{left / 2**20:.1f} MiB of {size / 2**20:.0f} MiB resident (cold reads)"))
        runs = alternate(variants(store, budget=budget, batch_size=args.batch_size, workers=args.workers), reps=reps)
        mib = epoch_bytes / 2**20
        table = [[name, f"{low(s, 'seconds'):.2f}", f"{median(s, 'seconds'):.2f}", f"{median(s, 'cpu_s'):.2f}",
                  f"{rows / median(s, 'seconds'):,.0f}", f"{mib / low(s, 'seconds'):.0f}",
                  f"{mib / median(s, 'seconds'):.0f}"] for name, s in runs.items()]
        print(markdown_table(["variant", "wall s (min)", "wall s (median)", "CPU s (median)", "rows/s (median)",
                              "MiB/s (best)", "MiB/s (median)"], table))
        peak = max(s.get("peak") for s in runs["stream"])
        print(f"stream peak RSS above the run's start: {peak / 2**20:.0f} MiB of a {budget / 2**20:.0f} MiB budget "
              f"(process peak {max(s.get('peak_abs') for s in runs['stream']) / 2**20:.0f} MiB; windows of "
              f"{int(runs['stream'][0].get('window_blocks'))} blocks)")
        speed = median(runs["raw"], "seconds") / median(runs["stream"], "seconds")
        print(f"goals: stream >= 0.5 x raw read speed: {'met' if speed >= 0.5 else 'NOT met'} ({speed:.3f}); "
              f"peak RSS within budget: {'met' if peak <= budget else 'NOT met'} ({peak / budget:.3f})")
        print(summary_line(stream_over_raw_read=speed, peak_rss_over_budget=peak / budget))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
