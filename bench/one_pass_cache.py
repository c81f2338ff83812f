"""Benchmark: 6 teachers cached in one pass vs 6 separate runs.

    .venv/bin/python bench/one_pass_cache.py                   # ~4 min on a 2-core CPU
    .venv/bin/python bench/one_pass_cache.py --images 5000 --dir /tmp/kdpass --keep

Builds an ImageFolder of JPEGs from Fashion-MNIST (/usr/share/datasets/fashion-mnist, the first
``--images`` training images, resized to 96 px, 10 classes; views: the ImageFolder default,
random-resized-crop + flip + colour jitter at 96 px) and 6 small teachers with random init
(seeds 0-5), saved as kdcache checkpoints (caching costs the same whatever the weights): the
project's ``cnn`` at width 4 twice, and its ``mlp`` with 64, 128, 256 and 512 hidden units. Then, with ``--views`` views and ``--threads`` torch
threads, it times:

- data: one pass over the views without a teacher (decode + augment, the micro-batches and
  DataLoader a caching job uses);
- forward: each teacher over inputs made once (the data time of that pass excluded);
- ideal = data + the six forwards: what a pass that decodes once costs, store writes aside;
- separate: ``cache_teacher`` six times (each run decodes and augments every view again);
- one pass: ``cache_teachers`` for the six (``kdcache cache --teacher ... --out-dir``).

Each in wall and in CPU seconds of this process (decoding runs in it: ``workers=0``); the ratios
use CPU time, which other users of a shared machine do not inflate.

Every store of the pass is checked to be byte-identical to its separate run's.
Goal: one pass <= 1.10 x ideal (CPU time).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import build_imagefolder, clock, save_teacher
from pipeline.cache import CacheConfig, cache_teacher, cache_teachers
from pipeline.cache.teacher import micro_batches
from pipeline.data import default_views, open_split
from pipeline.manifest import load_manifest
from pipeline.models import load_model
from pipeline.runtime import torch_threads
from pipeline.store import schema

SIZE = 96
TEACHERS = (("cnn", {"width": 4}), ("cnn", {"width": 4}), ("mlp", {"hidden": 64}), ("mlp", {"hidden": 128}),
            ("mlp", {"hidden": 256}), ("mlp", {"hidden": 512}))


def build_teachers(root: Path, manifest: Path) -> list[Path]:
    return [save_teacher(root / f"{arch}{next(iter(options.values()))}_{seed}.pt", manifest, arch, options, seed=seed)
            for seed, (arch, options) in enumerate(TEACHERS)]


def data_and_forward(manifest: Path, teachers: list[Path], *, views: int,
                     threads: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(wall, CPU) seconds decoding + augmenting every view once, and of each teacher's forward on those inputs."""
    man = load_manifest(manifest)
    spec = default_views(man, seed=0)
    models = [load_model(t)[0] for t in teachers]
    data, forward = np.zeros(2), [np.zeros(2) for _ in models]
    with torch_threads(threads), torch.inference_mode():
        for view in range(views):
            ds = open_split(man, "train", views=spec, view=view)
            layout = micro_batches(0, len(ds), schema.DEFAULT_MICRO_BATCH)
            loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=[rows.tolist() for rows in layout]))
            for _ in layout:
                start = clock()
                x = next(loader)[0]
                data += clock() - start
                for i, model in enumerate(models):
                    start = clock()
                    model(x).float().numpy()
                    forward[i] += clock() - start
    return data, forward


def same_files(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="Fashion-MNIST training images used")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="kdpass-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        manifest = build_imagefolder(root, "fashion-mnist", args.images, size=SIZE)
        teachers = build_teachers(root, manifest)
        settings = dict(manifest=str(manifest), split="train", views=args.views, threads=args.threads,
                        device="cpu", progress=False, overwrite=True)
        data, forward = data_and_forward(manifest, teachers, views=args.views, threads=args.threads)
        start = clock()
        for t in teachers:
            cache_teacher(CacheConfig(teacher=str(t), out=str(root / "alone" / f"{t.stem}.zarr"), **settings))
        separate = clock() - start
        start = clock()
        results = cache_teachers([CacheConfig(teacher=str(t), out=str(root / "pass" / f"{t.stem}.zarr"), **settings)
                                  for t in teachers])
        one_pass = clock() - start
        identical = all(r.complete and same_files(r.store, root / "alone" / r.store.name) for r in results)
        ideal = data + sum(forward)
        rows = args.images * args.views
        print(f"{args.images} images x {args.views} views = {rows} rows, {len(teachers)} teachers "
              f"({', '.join(t.stem for t in teachers)}; random init), {args.threads} thread(s)")
        print(f"{'':<32} {'wall s':>8} {'CPU s':>8} {'CPU / ideal':>12}")
        rows_out = [("data (decode + augment, once)", data)]
        rows_out += [(f"forward {t.stem}", seconds) for t, seconds in zip(teachers, forward)]
        rows_out += [("ideal = data + forwards", ideal), ("six separate runs", separate), ("one pass", one_pass)]
        for label, (wall, cpu) in rows_out:
            print(f"{label:<32} {wall:8.2f} {cpu:8.2f} {cpu / ideal[1]:12.3f}")
        print(f"stores byte-identical to the separate runs: {'yes' if identical else 'NO'}")
        ratio = one_pass / ideal
        goal = "met" if ratio[1] <= 1.10 else "missed"
        print(f"summary: one pass {ratio[1]:.3f} x (data + forwards) in CPU time, {ratio[0]:.3f} x in wall time "
              f"(goal <= 1.10: {goal}); {separate[1] / one_pass[1]:.2f} x less CPU than six separate runs; "
              f"identical {identical}")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
