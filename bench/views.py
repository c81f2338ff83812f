"""Benchmark: caching V views with each image decoded once against once per view, and where the time goes.

    .venv/bin/python bench/views.py                 # 1 000 images x 32 views, 2 repetitions: ~4 min on 2 cores
    .venv/bin/python bench/views.py --quick         # 256 images x 8 views, 1 repetition: ~15 s
    .venv/bin/python bench/views.py --images 2000 --views 16 --width 16 --reps 3 --dir /tmp/kdviews
    .venv/bin/python bench/views.py --quick --mix mixup,cutmix    # and the same views cached mixed

Data: a JPEG ImageFolder (``bench/_common.build_imagefolder``: 28 px grayscale JPEGs, 10 class
folders) of the first ``--images`` Fashion-MNIST training images where installed (``--dataset``),
else of synthetic images; its default views (random-resized-crop + flip + colour jitter at 28 px,
view 0 the evaluation crop). Teacher: the project's ``cnn`` of ``--width`` (random init: the cost
is the same whatever the weights), micro-batches of 256 rows, ``--threads`` torch threads, every
image decoded in this process (``workers=0``).

(a) Alternated ``--reps`` times (after an untimed micro-batch through the teacher), each over
every block of the split in all ``--views`` views:

- ``decode once``: the caching path, the block computer's ``compute_views`` with a block's views
  (``pipeline.cache.run.by_block``): each image read and decoded once for all of them;
- ``decode per view``: the per-view path, ``computer(view, start, stop)`` for each view: each
  image read and decoded again in every view;
- ``caching``: ``cache_teacher`` of the same teacher and views (decode once, float16 store,
  building the computer and finalizing included);
- ``caching, decoding workers`` (unless ``--workers 0``): the same caching run with ``--workers``
  DataLoader processes (default 1) reading, decoding and making the views while this process runs
  the teacher and writes, as ``kdcache cache --workers`` does;
- ``caching, mixed`` (with ``--mix KINDS``): the caching run with the views mixed (``--mix``:
  each view >= 1 also decodes and transforms its partner's image).

The first two share one block computer and throw the logits away.

(b) Where a caching run's time goes, each phase timed on its own over the same rows: decode (every
image once: read, JPEG decode, RGB), view transform (each view of the decoded images, made a
micro-batch at a time as the caching path makes it: ``ViewDataset.batch_of``), forward (the
teacher on those batches), write (``write_cache`` of those logits, returned by a stand-in teacher,
into a store of the caching run's layout), in a fourth variant alternated with (a)'s (the medians
of each phase over its runs); their sum against the caching run.

Ratios (CPU time): ``decode_once_over_per_view``, the images/s of decoding once over those of
decoding per view; ``cached_view_over_forward``, the caching run over the forward phase alone: what
one cached view costs relative to the teacher's forward on it (all the work in one process). Goal
<= 1.10. ``overlapped_view_over_forward``: the wall time of the run with decoding workers over the
forward phase's: what a cached view costs in time where a core is free for the view work. With ``--mix``,
``mixed_over_unmixed``: the images/s of the mixed caching run over those of the unmixed one (the
table's last column gives each variant's images/s over the unmixed caching run's, wall).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from _common import (DATASETS, alternate, bench_provenance, build_imagefolder, clock, low, machine_line,
                     markdown_table, median, pick_dataset, save_teacher, summary_line, teacher_factory)
from pipeline.cache import CacheConfig, cache_teacher, write_cache
from pipeline.cache.run import by_block, views_per_pass
from pipeline.cache.teacher import TeacherComputer, micro_batches
from pipeline.runtime import torch_threads
from pipeline.store import schema

GOAL = 1.10
PHASES = ("decode", "view transform", "forward", "write")
WORKERS = "caching, decoding workers"


@dataclass(frozen=True)
class ReplayTeacher:
    """A stand-in teacher whose logits were computed already (``logits[view]``: float32 [N, C]),
    so that writing them is all the store's writer does."""

    logits: tuple[np.ndarray, ...]

    def build(self) -> Callable[[int, int, int], np.ndarray]:
        def compute(view: int, start: int, stop: int) -> np.ndarray:
            return self.logits[view][start:stop]
        compute.num_classes = self.logits[0].shape[1]
        return compute


def variants(computer: TeacherComputer, layout: schema.Layout, cfg: CacheConfig, store: Path,
             mixed: CacheConfig | None = None) -> dict[str, Callable[[], dict[str, float] | None]]:
    """Decode once, decode per view (the same computer, logits thrown away), a caching run, the
    same run with decoding workers, the phases of one timed apart (their seconds as the figures of
    the run) and, given ``mixed``, its caching run of mixed views."""
    units = list(layout.units())

    def decode_once() -> None:
        for block, views in by_block(units, most=views_per_pass(layout, 1)):
            computer.compute_views(views, *layout.block_rows(block))

    def decode_per_view() -> None:
        for view, block in units:
            computer(view, *layout.block_rows(block))

    runs = {"decode once": decode_once, "decode per view": decode_per_view,
            "caching": lambda: cache_teacher(cfg) and None, "phases": lambda: phases(computer, layout, store)}
    if cfg.workers:
        runs[WORKERS] = lambda: cache_teacher(cfg) and None
        runs["caching"] = lambda: cache_teacher(replace(cfg, workers=0)) and None
    if mixed is not None:
        runs["caching, mixed"] = lambda: cache_teacher(mixed) and None
    return runs


def phases(computer: TeacherComputer, layout: schema.Layout, store: Path) -> dict[str, float]:
    """``{"<phase> wall": s, "<phase> cpu": s}`` for each of ``PHASES``, over every row of the split
    in every view, and their sums (``"sum wall"``, ``"sum cpu"``)."""
    ds = computer.dataset(0)
    datasets = [computer.dataset(view) for view in range(layout.num_views)]
    spent = {name: np.zeros(2) for name in PHASES}
    logits: list[list[np.ndarray]] = [[] for _ in range(layout.num_views)]
    runtime = computer.runtime
    with torch_threads(computer.factory.threads), torch.inference_mode(), runtime.autocast():
        for block in range(layout.num_blocks):
            start, stop = layout.block_rows(block)
            t = clock()
            images = [ds.samples.get(i) for i in range(start, stop)]
            spent["decode"] += clock() - t
            for view in range(layout.num_views):
                for rows in micro_batches(start, stop, layout.micro_batch):
                    t = clock()
                    x = datasets[view].batch_of(rows, images[rows[0] - start:rows[-1] + 1 - start])
                    spent["view transform"] += clock() - t
                    t = clock()
                    logits[view].append(computer.model(runtime.to_device(x)).float().cpu().numpy())
                    spent["forward"] += clock() - t
    t = clock()
    write_cache(store, factory=ReplayTeacher(tuple(np.concatenate(z) for z in logits)), layout=layout,
                provenance=bench_provenance(len(ds), layout.num_classes, num_views=layout.num_views, teacher="cnn",
                                            seed=0),
                sample_id=ds.sample_ids, label=ds.labels, overwrite=True, progress=False)
    spent["write"] += clock() - t
    spent["sum"] = sum(spent.values())
    return {f"{name} {clock_name}": float(seconds[i]) for name, seconds in spent.items()
            for i, clock_name in enumerate(("wall", "cpu"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 images x 8 views, 1 repetition")
    parser.add_argument("--dataset", choices=DATASETS, default="auto",
                        help="source of the JPEGs: auto = fashion-mnist where installed, else synthetic")
    parser.add_argument("--images", type=int, default=None, help="images of the ImageFolder (default 1000; quick 256)")
    parser.add_argument("--views", type=int, default=None, help="views per image (default 32; quick 8)")
    parser.add_argument("--width", type=int, default=32, help="cnn teacher width")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per variant (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--workers", type=int, default=1,
                        help="decoding worker processes of the overlapped caching run (0: leave it out)")
    parser.add_argument("--mix", default=None,
                        help="also cache the same views mixed: mixup, cutmix or mixup,cutmix (kdcache cache --mix)")
    args = parser.parse_args()
    images = args.images or (256 if args.quick else 1000)
    views = args.views or (8 if args.quick else 32)
    reps = args.reps or (1 if args.quick else 2)
    dataset = pick_dataset(args.dataset)
    torch.set_num_threads(args.threads)
    root = args.dir or Path(tempfile.mkdtemp(prefix="kd-views-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(machine_line())
        manifest = build_imagefolder(root, dataset, images)
        teacher = save_teacher(root / "teacher.pt", manifest, "cnn", {"width": args.width})
        cfg = CacheConfig(teacher=str(teacher), manifest=str(manifest), out=str(root / "cache.zarr"), views=views,
                          device="cpu", threads=args.threads, workers=args.workers, overwrite=True,
                          progress=False)
        computer = teacher_factory(manifest, teacher, micro_batch=schema.DEFAULT_MICRO_BATCH,
                                   threads=args.threads).build()
        layout = schema.Layout(num_samples=len(computer.dataset(0)), num_classes=computer.num_classes, num_views=views)
        computer(0, 0, min(layout.micro_batch, layout.num_samples))
        mixed = replace(cfg, mix=args.mix, workers=0, out=str(root / "mixed.zarr")) if args.mix else None
        runs = alternate(variants(computer, layout, cfg, root / "phases.zarr", mixed), reps=reps, warmup=False)
        rows = images * views
        print(f"(a) {dataset} JPEGs, 28 px: {images} images x {views} views = {rows} rows, teacher cnn width "
              f"{args.width} (random init), micro-batch {layout.micro_batch}, blocks of {layout.rows_per_block} rows, "
              f"torch threads {args.threads}; {reps} run(s) each, alternated")
        heads = ["variant", "CPU s (min)", "CPU s (median)", "wall s (median)", "images/s (median wall)",
                 "rows/s (median wall)"]
        table = [[name, f"{low(s, 'cpu'):.2f}", f"{median(s, 'cpu'):.2f}", f"{median(s, 'wall'):.2f}",
                  f"{images / median(s, 'wall'):,.1f}", f"{rows / median(s, 'wall'):,.0f}"]
                 for name, s in runs.items() if name != "phases"]
        if args.mix:                                     # images/s over the unmixed caching run's
            heads.append("images/s over caching (wall)")
            for line in table:
                line.append(f"{median(runs['caching'], 'wall') / median(runs[line[0]], 'wall'):.3f}")
        print(markdown_table(heads, table))

        def seconds(name: str) -> np.ndarray:
            """(wall, CPU) median seconds of a phase, or of the caching run."""
            if name == "caching":
                return np.array([median(runs[name], "wall"), median(runs[name], "cpu")])
            return np.array([median(runs["phases"], f"{name} wall"), median(runs["phases"], f"{name} cpu")])

        caching, total = seconds("caching"), seconds("sum")
        print(f"(b) each phase timed on its own over the same {rows} rows, against the caching run of (a); medians")
        table = [[name, f"{t[1]:.2f}", f"{t[0]:.2f}", f"{100 * t[1] / total[1]:.1f} %",
                  f"{100 * t[1] / caching[1]:.1f} %", f"{1e6 * t[1] / rows:.0f}"]
                 for name, t in ((name, seconds(name)) for name in (*PHASES, "sum"))]
        table[-1][0] = "sum of the phases"
        rest = caching - total
        table.append(["caching run, not in a phase", f"{rest[1]:.2f}", f"{rest[0]:.2f}", "",
                      f"{100 * rest[1] / caching[1]:.1f} %", f"{1e6 * rest[1] / rows:.0f}"])
        print(markdown_table(["phase", "CPU s", "wall s", "share of the phases (CPU)", "share of the caching run (CPU)",
                              "CPU us per row"], table))

        forward = seconds("forward")
        ratios = {"decode_once_over_per_view": median(runs["decode per view"], "cpu") / median(runs["decode once"], "cpu"),
                  "cached_view_over_forward": caching[1] / forward[1]}
        print(f"decode once / decode per view, images/s: {ratios['decode_once_over_per_view']:.3f} (CPU), "
              f"{median(runs['decode per view'], 'wall') / median(runs['decode once'], 'wall'):.3f} (wall)")
        print(f"cached view / forward alone: {ratios['cached_view_over_forward']:.3f} (CPU), "
              f"{caching[0] / forward[0]:.3f} (wall); goal <= {GOAL:.2f}: "
              f"{'met' if ratios['cached_view_over_forward'] <= GOAL else 'NOT met'}")
        if args.workers:                # the view work in worker processes, beside the forward
            ratios["overlapped_view_over_forward"] = median(runs[WORKERS], "wall") / forward[0]
            print(f"cached view with {args.workers} decoding worker(s) / forward alone: "
                  f"{ratios['overlapped_view_over_forward']:.3f} (wall); goal <= {GOAL:.2f}: "
                  f"{'met' if ratios['overlapped_view_over_forward'] <= GOAL else 'NOT met'}")
        if args.mix:
            ratios["mixed_over_unmixed"] = caching[1] / median(runs["caching, mixed"], "cpu")
            print(f"caching mixed ({args.mix}) / unmixed, images/s: {ratios['mixed_over_unmixed']:.3f} (CPU), "
                  f"{caching[0] / median(runs['caching, mixed'], 'wall'):.3f} (wall)")
        print(summary_line(**ratios))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
