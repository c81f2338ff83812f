"""Benchmark: `kdcache inspect --out` on a large store, with and without the report page, in bounded memory.

    .venv/bin/python bench/inspect_report.py --quick                 # 65 536 rows x 100 classes, ~10 s
    .venv/bin/python bench/inspect_report.py                         # 1 M rows x 100 classes (200 MB of logits)
    .venv/bin/python bench/inspect_report.py --rows 1000000 --teachers 2 --reps 1

Writes ``--teachers`` stand-in stores of ``--rows`` rows, ``--classes`` classes, one view, float16
(``write_cache`` with precomputed logits, blocks of 4096 rows; no manifest behind them, so the page
gets its rankings as tables, as vector data does), then alternates, ``--reps`` times after a warm-up:

- ``inspect``: the figures (``inspect_stores``) and the files of ``write_report`` (summary, CSVs, plots),
  what ``kdcache inspect --out`` did before the report page;
- ``report``: ``kdcache inspect STORES --out DIR``: the same, then the rankings (``rank_samples``: a top-N merge over every block, ``--top``
  rows per ranking and ``--per-class`` per class) and ``report.html`` (``write_page``).

Each run is a fresh process (``report`` runs the ``kdcache inspect --out`` command itself); reports
its seconds and peak RSS after the imports (the high-water mark, ``VmHWM``, reset once torch, dask
and zarr are imported, above the RSS they left; the imports alone hold several hundred MiB, the same
for every variant). Goal: the report adds little time and
no memory that grows with the rows (the rankings keep O(top + classes x per-class) rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from _common import (ROOT, PrecomputedTeacher, alternate, bench_provenance, machine_line, markdown_table, median,
                     reset_peak_rss, rss_bytes, summary_line)
from pipeline.cache import write_cache
from pipeline.store import schema


def build_stores(root: Path, *, rows: int, classes: int, teachers: int) -> list[Path]:
    layout = schema.Layout(num_samples=rows, num_classes=classes, num_views=1, rows_per_block=4096)
    labels = np.random.default_rng(0).integers(0, classes, rows).astype(np.int32)
    stores = []
    for t in range(teachers):
        store = root / f"t{t}.zarr"
        write_cache(store, factory=PrecomputedTeacher(classes, layout.rows_per_block, seed=t), layout=layout,
                    provenance=bench_provenance(rows, classes, teacher=f"t{t}", seed=t),
                    sample_id=np.arange(rows), label=labels, overwrite=True, progress=False)
        stores.append(store)
    return stores


def child(variant: str, stores: list[str], *, out: str, top: int, per_class: int) -> None:
    """One run in this (fresh) process, after the imports: prints its seconds and peak RSS above the
    RSS the imports left (``VmHWM`` reset once they are done) as JSON."""
    import warnings

    from pipeline.cli import cli
    from pipeline.inspect import inspect_stores, write_report

    warnings.filterwarnings("ignore", message=".*no thumbnails")        # stand-in stores have no manifest
    reset_peak_rss()
    base, t0 = rss_bytes(), time.perf_counter()
    if variant == "inspect":
        write_report(inspect_stores(stores), out)
    else:
        cli.main(["inspect", *stores, "--out", out, "--top", str(top), "--per-class", str(per_class)],
                 standalone_mode=False)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak": rss_bytes("VmHWM") - base,
                      "imports": base}))


def variants(stores: list[Path], out: Path, *, top: int, per_class: int) -> dict[str, Callable[[], dict]]:
    """Each variant in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def run(variant: str) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        done = subprocess.run([sys.executable, __file__, "--child", variant, "--dir", str(out), "--top", str(top),
                               "--per-class", str(per_class), *map(str, stores)],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"error: the {variant} run exited {done.returncode}: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    return {"inspect": lambda: run("inspect"), "report": lambda: run("report")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="65 536 rows, 1 repetition")
    parser.add_argument("--rows", type=int, default=None, help="rows of each store (default 1 000 000; quick 65 536)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--teachers", type=int, default=1, help="stores (a classroom when more than one)")
    parser.add_argument("--top", type=int, default=16, help="rows per ranking")
    parser.add_argument("--per-class", type=int, default=4, help="rows per class and ranking")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per variant (default 3; quick 1)")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--child", choices=("inspect", "report"), help=argparse.SUPPRESS)
    parser.add_argument("stores", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.stores, out=str(args.dir), top=args.top, per_class=args.per_class)
    rows = args.rows or (65536 if args.quick else 1_000_000)
    reps = args.reps or (1 if args.quick else 3)
    root = args.dir or Path(tempfile.mkdtemp(prefix="kd-inspect-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(machine_line())
        t0 = time.perf_counter()
        stores = build_stores(root, rows=rows, classes=args.classes, teachers=args.teachers)
        print(f"wrote {args.teachers} store(s) of {rows} rows x {args.classes} classes in {time.perf_counter() - t0:.1f} s")
        runs = alternate(variants(stores, root / "out", top=args.top, per_class=args.per_class), reps=reps)
        table = [[name, f"{median(s, 'seconds'):.2f}", f"{median(s, 'peak') / 2**20:.0f}"] for name, s in runs.items()]
        print(markdown_table(["variant", "seconds (median)", "peak RSS above the imports, MiB (median)"], table))
        print(f"RSS after the imports: {median(runs['report'], 'imports') / 2**20:.0f} MiB")
        print(f"report.html: {(root / 'out' / 'report.html').stat().st_size / 1024:.0f} KiB")
        print(summary_line(report_over_inspect_seconds=median(runs["report"], "seconds") / median(runs["inspect"], "seconds"),
                           report_over_inspect_peak=median(runs["report"], "peak") / max(median(runs["inspect"], "peak"), 1)))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
