"""A student's training on a busy machine: wall time with and without a competing CPU-bound process,
at torch's default thread count and at one thread.

    .venv/bin/python bench/busy.py            # the default experiment's student (mlp, 5 000 rows, 20 epochs)
    .venv/bin/python bench/busy.py --quick    # 5 epochs, 1 repetition

Small models (the default experiment's mlp students) do a few hundred microseconds of work per
step. With torch's default of one intra-op thread per core, each of those steps wakes every
OpenMP thread, and a thread that finds its core taken by another process makes the whole step
wait for it: on a shared 2-core machine the same epoch took anywhere from 0.1 s to 3.8 s. One
thread per process sidesteps it. Each variant runs `kdcache distill` in a fresh process (torch's
thread pool is set once per process), idle and beside one process spinning on a core; the line at
the end gives, per thread setting, the ratio of the loaded wall time to the idle one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, build_data, summary_line

SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def kdcache(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def prepare(root: Path, train_rows: int) -> tuple[Path, Path]:
    """The default experiment's data (synthetic, 5 000 train rows) and a cached 2-epoch mlp teacher."""
    manifest = build_data(root, "synthetic", train_rows)
    teacher, store = root / "ce.pt", root / "ce.zarr"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(kdcache("train-teacher", "--manifest", str(manifest), "--arch", "mlp", "--epochs", "2",
                           "--threads", "1", "--no-progress", "--out", str(teacher)), check=True, env=env,
                   stdout=subprocess.DEVNULL)
    subprocess.run(kdcache("cache", "--teacher", str(teacher), "--manifest", str(manifest), "--threads", "1",
                           "--no-progress", "--out", str(store)), check=True, env=env, stdout=subprocess.DEVNULL)
    return manifest, store


def timed_distill(root: Path, manifest: Path, store: Path, *, epochs: int, threads: int | None, busy: bool) -> float:
    """Wall seconds of one `kdcache distill` process (kd, mlp student), optionally beside a spinner."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = kdcache("distill", "--method", "kd", "--mentors", str(store), "--manifest", str(manifest),
                   "--student", "mlp", "--epochs", str(epochs), "--no-progress", "--out", str(root / "kd.pt"))
    if threads is not None:
        args += ["--threads", str(threads)]
    spinner = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=3600)]) if busy else None
    try:
        start = time.perf_counter()
        subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-rows", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="5 epochs, 1 repetition")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    epochs, reps = (5, 1) if args.quick else (args.epochs, args.reps)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        manifest, store = prepare(root, args.train_rows)
        times: dict[tuple[str, bool], list[float]] = {}
        for rep in range(reps):
            for threads in (None, 1):
                for busy in ((False, True) if rep % 2 == 0 else (True, False)):
                    wall = timed_distill(root, manifest, store, epochs=epochs, threads=threads, busy=busy)
                    times.setdefault(("default" if threads is None else "1", busy), []).append(wall)
    print(f"\nkd, mlp student, {args.train_rows} rows, {epochs} epochs; wall seconds (median of {reps}):\n")
    print("| torch threads | idle | beside a CPU-bound process | loaded / idle |")
    print("|---|---|---|---|")
    ratios = {}
    for threads in ("default", "1"):
        idle, loaded = statistics.median(times[(threads, False)]), statistics.median(times[(threads, True)])
        ratios[f"threads_{threads}_loaded_over_idle"] = loaded / idle
        print(f"| {threads} | {idle:.2f} | {loaded:.2f} | {loaded / idle:.2f} |")
    ratios["threads_1_over_default_loaded"] = (statistics.median(times[("1", True)])
                                               / statistics.median(times[("default", True)]))
    print()
    print(summary_line(**ratios))


if __name__ == "__main__":
    main()
