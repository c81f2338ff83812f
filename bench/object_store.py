"""Benchmark: a store in a bucket against the same store on the local disk, caching and streaming.

    .venv/bin/python bench/object_store.py --quick          # 32 768 rows, C = 100, ~1 min
    .venv/bin/python bench/object_store.py                  # 262 144 rows, C = 1000 (512 MiB), budget 256 MiB
    .venv/bin/python bench/object_store.py --rows 65536 --reps 5

The bucket is served by moto's S3 server (``pip install 'kdcache[dev]'``), started here on a
loopback port: real HTTP, every object a PUT or a GET, the objects held in the server's memory.
Its figures are the protocol's overhead against a local folder (SigV4 signing, HTTP, one request
per chunk), not a cloud's bandwidth. Four variants, alternated ``--reps`` times after a warm-up:

- ``cache, disk`` / ``cache, bucket``: ``write_cache`` of the whole store (a stand-in teacher
  whose logits cost nothing: the writer's work and the I/O are what is timed), ``--overwrite``;
- ``stream, disk`` / ``stream, bucket``: one epoch of view 0 as distillation reads it
  (``CachedTargets(..., mode="stream")``, block windows loaded ahead on the prefetch thread, each
  window's chunks on the reader threads, every chunk CRC-checked), the disk store's files evicted
  from the page cache first.

Ends with ``cache_bucket_over_disk=`` and ``stream_bucket_over_disk=``: the bucket's rows/s over
the disk's (1.0: as fast).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Callable

import numpy as np

from _common import (PrecomputedTeacher, StandInInputs, alternate, bench_provenance, drop_page_cache, low, machine_line,
                     markdown_table, median, summary_line)
from pipeline.cache import write_cache
from pipeline.runtime import Runtime
from pipeline.store import schema
from pipeline.train.loop import iter_batches
from pipeline.train.targets import CachedTargets

BUCKET = "kdcache-bench"


def cache(store: str, *, rows: int, classes: int) -> Callable[[], dict]:
    layout = schema.Layout(num_samples=rows, num_classes=classes, num_views=1)
    labels = np.random.default_rng(0).integers(0, classes, rows).astype(np.int32)

    def run() -> dict:
        t0 = time.perf_counter()
        result = write_cache(store, factory=PrecomputedTeacher(classes, layout.rows_per_block), layout=layout,
                             provenance=bench_provenance(rows, classes, teacher="stand-in", seed=0),
                             sample_id=np.arange(rows), label=labels, overwrite=True, progress=False)
        assert result.complete
        return {"seconds": time.perf_counter() - t0}
    return run


def stream(store: str, *, budget: int, batch_size: int, evict: list[Path]) -> Callable[[], dict]:
    runtime = Runtime.create("cpu", images=False)

    def run() -> dict:
        drop_page_cache(evict)
        t0 = time.perf_counter()
        with closing(CachedTargets([store], memory_budget_bytes=budget, mode="stream")) as targets:
            rows = 0
            for _, _, batch in iter_batches(StandInInputs(targets.group.labels),
                                            targets.batches(0, batch_size=batch_size, seed=0), runtime=runtime,
                                            workers=0):
                rows += targets.group.targets(0, batch)["logits"].shape[1]
        return {"seconds": time.perf_counter() - t0, "rows": rows}
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 768 rows, C = 100, budget 2 MiB, 2 repetitions")
    parser.add_argument("--rows", type=int, default=None, help="rows of the store (default 262 144; quick 32 768)")
    parser.add_argument("--classes", type=int, default=None, help="C (default 1000; quick 100)")
    parser.add_argument("--budget-mb", type=int, default=None, help="the reader's memory budget, MiB (default 256; "
                                                                    "quick 2): below the store, so it streams")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--reps", type=int, default=None, help="timed runs per variant (default 3; quick 2)")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    rows = args.rows or (32768 if args.quick else 262_144)
    classes = args.classes or (100 if args.quick else 1000)
    budget = (args.budget_mb or (2 if args.quick else 256)) * 2**20
    reps = args.reps or (2 if args.quick else 3)
    try:
        from tests.support.s3 import bucket_session
    except ImportError as err:
        raise SystemExit(f"error: expected moto's server and s3fs (pip install 'kdcache[dev]'), found {err}") from None
    root = args.dir or Path(tempfile.mkdtemp(prefix="kd-object-store-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        with bucket_session(BUCKET) as env:
            print(machine_line())
            disk, bucket = str(root / "disk.zarr"), f"s3://{BUCKET}/bench/bucket.zarr"
            cache(disk, rows=rows, classes=classes)()
            cache(bucket, rows=rows, classes=classes)()
            files = sorted(p for p in Path(disk).rglob("*") if p.is_file())
            size = sum(p.stat().st_size for p in files)
            print(f"store: {rows} rows x 1 view x C = {classes} float16, {size / 2**20:.0f} MiB in {len(files)} "
                  f"objects; endpoint {env['AWS_ENDPOINT_URL']} (moto, loopback); memory budget {budget / 2**20:.0f} MiB; batch "
                  f"{args.batch_size}; {reps} runs each, alternated")
            variants = {"cache, disk": cache(disk, rows=rows, classes=classes),
                        "cache, bucket": cache(bucket, rows=rows, classes=classes),
                        "stream, disk": stream(disk, budget=budget, batch_size=args.batch_size,
                                               evict=files),
                        "stream, bucket": stream(bucket, budget=budget, batch_size=args.batch_size, evict=[])}
            runs = alternate(variants, reps=reps)
        table = [[name, f"{low(s, 'seconds'):.2f}", f"{median(s, 'seconds'):.2f}", f"{rows / median(s, 'seconds'):,.0f}",
                  f"{size / 2**20 / median(s, 'seconds'):.0f}"] for name, s in runs.items()]
        print(markdown_table(["variant", "wall s (min)", "wall s (median)", "rows/s (median)", "MiB/s (median)"], table))
        ratio = {kind: median(runs[f"{kind}, disk"], "seconds") / median(runs[f"{kind}, bucket"], "seconds")
                 for kind in ("cache", "stream")}
        print(summary_line(cache_bucket_over_disk=ratio["cache"], stream_bucket_over_disk=ratio["stream"]))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
