"""Benchmark: what distilling from cached teachers costs the training loop, against live teachers.

    .venv/bin/python bench/offline_vs_online.py --quick                          # < 5 min on 2 cores
    .venv/bin/python bench/offline_vs_online.py --train-rows 8192 --reps 5        # ~10 min
    .venv/bin/python bench/offline_vs_online.py --dataset synthetic --quick       # mlp student, 30-d vectors
    .venv/bin/python bench/offline_vs_online.py --quick --profile offline_k6     # cProfile of one run

Data it builds itself in a temporary folder: Fashion-MNIST from /usr/share/datasets/fashion-mnist
(a random ``--train-rows`` of the train split; student ``cnn`` of ``--width``), the default where
those files are installed, or the synthetic dataset (``--dataset synthetic``, d = 30, K = 3;
student ``mlp``).
Six teachers of the student's arch (random init, seeds 0-5: a forward costs the same whatever the
weights) are saved as checkpoints and cached in one pass (1 view, float16). Then five variants of
``distill`` (the library call, in this process), alternated, ``--reps`` times each after a warm-up:

- ``student_only``: ``nokd``, no mentors;
- ``offline_k1``: ``kd`` from teacher 0's store;  ``offline_k6``: ``classroom`` from the six stores;
- ``online_k1``: ``kd`` from teacher 0 live;      ``online_k6``: ``classroom`` from the six live.

Every variant trains the same student (same seed, batch order, schedule, no validation) for
``--epochs``. Per run: the loop's CPU per step (the median over the run of ``time.process_time``
between consecutive steps, seen by ``distill``'s ``on_step``; a step's data, forward, targets,
loss, backward and SGD update), the same in wall time, and the whole call's CPU (store load and
checkpoints included). Ratios are to ``student_only`` on the median over the repetitions.
Goal: offline_k6 <= 1.02 x student_only in loop CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from _common import (DATASETS, alternate, build_data, low, machine_line, markdown_table, median, pick_dataset,
                     summary_line)
from pipeline.cache import cache_teachers, one_pass_configs
from pipeline.checkpoint import save_checkpoint
from pipeline.data import open_split
from pipeline.manifest import load_manifest
from pipeline.models import create_model
from pipeline.train import DistillConfig, distill
from pipeline.train.loop import TrainingWarning

TEACHERS = 6
STUDENTS = {"synthetic": "mlp", "fashion-mnist": "cnn"}
VARIANTS = ("student_only", "offline_k1", "offline_k6", "online_k1", "online_k6")


def build_teachers(root: Path, manifest: Path, arch: str, options: dict) -> list[Path]:
    """Six random-init teachers of ``arch`` saved as kdcache checkpoints."""
    man = load_manifest(manifest)
    shape = tuple(open_split(man, "train").input_shape)
    paths = []
    for seed in range(TEACHERS):
        torch.manual_seed(seed)
        net = create_model(arch, num_classes=man.num_classes, input_shape=shape, **options)
        path = root / f"teacher{seed}.pt"
        save_checkpoint(path, model=net, meta={"arch": arch, "num_classes": man.num_classes, "input_shape": shape,
                                               "arch_options": options, "loss": "ce", "manifest_sha256": man.sha256})
        paths.append(path)
    return paths


def variant_configs(args: argparse.Namespace, root: Path, manifest: Path, teachers: list[Path],
                    stores: list[str]) -> dict[str, DistillConfig]:
    common = dict(manifest=str(manifest), student=args.student, student_options=args.student_options,
                  epochs=args.epochs, batch_size=args.batch_size, seed=0, val_split=None, device="cpu",
                  progress=False, cache_mode="memory")
    t = [str(p) for p in teachers]
    return {
        "student_only": DistillConfig(method="nokd", out=str(root / "nokd.pt"), **common),
        "offline_k1": DistillConfig(method="kd", mentors=stores[:1], out=str(root / "kd.pt"), **common),
        "offline_k6": DistillConfig(method="classroom", mentors=stores, out=str(root / "cr.pt"), **common),
        "online_k1": DistillConfig(method="kd", online=True, teachers=t[:1], out=str(root / "kd_on.pt"), **common),
        "online_k6": DistillConfig(method="classroom", online=True, teachers=t, out=str(root / "cr_on.pt"),
                                   **common),
    }


def run_variant(cfg: DistillConfig) -> Callable[[], dict[str, float]]:
    """A run of ``distill(cfg)`` returning its median CPU and wall seconds per step."""
    def run() -> dict[str, float]:
        marks: list[tuple[int, float, float]] = []
        distill(cfg, on_step=lambda batch, out: marks.append((batch.epoch, time.process_time(),
                                                              time.perf_counter())))
        cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:]) if a[0] == b[0]]
        wall = [b[2] - a[2] for a, b in zip(marks, marks[1:]) if a[0] == b[0]]
        return {"step_cpu": statistics.median(cpu), "step_wall": statistics.median(wall), "steps": len(marks)}
    return run


def profile(run: Callable[[], dict], top: int) -> str:
    """A cProfile of one run (after an unprofiled warm-up run): the ``top`` entries by cumulative time,
    then by own time."""
    run()
    prof = cProfile.Profile()
    prof.runcall(run)
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="auto",
                        help="auto: fashion-mnist where installed, else synthetic")
    parser.add_argument("--quick", action="store_true", help="few rows, 2 epochs, 3 repetitions (< 5 min)")
    parser.add_argument("--train-rows", type=int, default=None, help="train rows (default 4096; quick 2048)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 3; quick 2)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per variant (default 5; quick 3)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--student", default=None, help="student and teacher arch (default: mlp / cnn)")
    parser.add_argument("--width", type=int, default=16, help="cnn width of student and teachers")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--profile", choices=VARIANTS, default=None, help="print a cProfile of one run of it")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    args.train_rows = args.train_rows or (2048 if args.quick else 4096)
    args.epochs = args.epochs or (2 if args.quick else 3)
    args.reps = args.reps or (3 if args.quick else 5)
    args.dataset = pick_dataset(args.dataset)
    args.student = args.student or STUDENTS[args.dataset]
    args.student_options = {"width": args.width} if args.student == "cnn" else {}
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", TrainingWarning)      # random teachers: the students need not learn
    root = args.dir or Path(tempfile.mkdtemp(prefix="kd-offline-online-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        began = time.perf_counter()
        manifest = build_data(root, args.dataset, args.train_rows)
        teachers = build_teachers(root, manifest, args.student, args.student_options)
        configs = one_pass_configs([str(t) for t in teachers], out_dir=str(root / "caches"), manifest=str(manifest),
                                    views=1, device="cpu", threads=args.threads, progress=False, overwrite=True)
        cache_teachers(configs)
        stores = [c.out for c in configs]
        cfgs = variant_configs(args, root, manifest, teachers, stores)
        print(f"{args.dataset}: {args.train_rows} train rows, batch {args.batch_size}, {args.epochs} epochs per run, "
              f"student and {TEACHERS} teachers {args.student} {args.student_options or ''}, torch threads "
              f"{args.threads}; {args.reps} runs per variant, alternated (set-up {time.perf_counter() - began:.0f} s)")
        print(machine_line())
        if args.profile:
            print(profile(run_variant(cfgs[args.profile]), 25))
        runs = alternate({name: run_variant(cfg) for name, cfg in cfgs.items()}, reps=args.reps)
        base = {key: median(runs["student_only"], key) for key in ("step_cpu", "step_wall", "cpu")}
        rows = []
        for name, samples in runs.items():
            rows.append([name, cfgs[name].method, f"{1e3 * low(samples, 'step_cpu'):.2f}",
                         f"{1e3 * median(samples, 'step_cpu'):.2f}", f"{1e3 * median(samples, 'step_wall'):.2f}",
                         f"{median(samples, 'cpu'):.2f}",
                         f"{median(samples, 'step_cpu') / base['step_cpu']:.3f}",
                         f"{median(samples, 'step_wall') / base['step_wall']:.3f}",
                         f"{median(samples, 'cpu') / base['cpu']:.3f}"])
        print(markdown_table(["variant", "method", "step CPU ms (min)", "step CPU ms (median)",
                              "step wall ms (median)", "run CPU s (median)", "x student (step CPU)",
                              "x student (step wall)", "x student (run CPU)"], rows))
        r1 = median(runs["offline_k6"], "step_cpu") / base["step_cpu"]
        r2 = median(runs["online_k6"], "step_cpu") / base["step_cpu"]
        print(f"goal offline_k6 <= 1.02 x student_only (loop CPU): {'met' if r1 <= 1.02 else 'NOT met'} "
              f"({time.perf_counter() - began:.0f} s)")
        print(summary_line(offline_k6_over_student_only=r1, online_k6_over_student_only=r2))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
