"""Experiment: does KD from a cached CE teacher beat training on labels alone (nokd)?

    .venv/bin/python bench/kd_vs_nokd.py                       # ~2 min on a 2-core CPU
    .venv/bin/python bench/kd_vs_nokd.py --option T=1 --option w_ce=0 --option w_kd=1   # soft labels only
    .venv/bin/python bench/kd_vs_nokd.py --num-samples 20000    # 1000 train rows instead of 5000

The default synthetic dataset (docs/methods.md, "The synthetic dataset";
``build_manifest("synthetic", ..., seed=0)``: K = 3, d = 30, sigma^2 = 6, 100 000 samples,
5 % train = 5 000 rows, 90 % test), a CE teacher (mlp,
``--teacher-epochs``), its cache (1 view: the data are vectors, every view is the same), then for
each seed an ``mlp`` student with ``kd`` and one with ``nokd``: the same initialisation, batch order
and schedule (both take the cache's ``CachedTargets.batches``; nokd ignores the targets). Prints
the test accuracy (mean ± std over the seeds), agreement with the Bayes classifier and MSE to the
Bayes posterior, next to the teacher's and the Bayes ceiling.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.train import DistillConfig, distill, parse_options  # noqa: E402
from pipeline.data import build_manifest  # noqa: E402
from pipeline.cache import CacheConfig, cache_teacher  # noqa: E402
from pipeline.train import TeacherConfig, evaluate_checkpoint, train_teacher  # noqa: E402

METRICS = (("top1", "test top-1 %", 100.0), ("bayes_agree", "agrees with Bayes %", 100.0),
           ("bayes_mse", "MSE to p* (x1e3)", 1000.0))


def _row(name: str, scores: list[dict]) -> str:
    cells = []
    for key, _, scale in METRICS:
        values = [s[key] * scale for s in scores]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        cells.append(f"{statistics.mean(values):7.2f} ± {spread:4.2f}")
    return f"{name:<22}" + "".join(f"{c:>24}" for c in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="Working folder (default: a temporary one).")
    parser.add_argument("--num-samples", type=int, default=100_000, help="Synthetic samples (train = 5 %%).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Student seeds.")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--teacher-wd", type=float, default=5e-4)
    parser.add_argument("--epochs", type=int, default=20, help="Student epochs.")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="kd option (T, w_ce, w_kd).")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="kd_vs_nokd-"))
    root.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    manifest = root / f"synthetic_{args.num_samples}.parquet"
    if not manifest.exists():
        build_manifest("synthetic", root / f"data_{args.num_samples}", manifest, seed=0, num_samples=args.num_samples)
    teacher = root / f"ce_{args.num_samples}_{args.teacher_epochs}_{args.teacher_wd}.pt"
    if not teacher.exists():
        train_teacher(TeacherConfig(manifest=str(manifest), arch="mlp", loss="ce", out=str(teacher), device="cpu",
                                    epochs=args.teacher_epochs, weight_decay=args.teacher_wd, progress=False))
    store = teacher.with_suffix(".zarr")
    cache_teacher(CacheConfig(teacher=teacher, manifest=manifest, split="train", views=1, out=store, device="cpu",
                              progress=False))
    teacher_scores = evaluate_checkpoint(teacher, manifest, "test", device="cpu")

    options = parse_options(args.option)
    scores: dict[str, list[dict]] = {"kd": [], "nokd": []}
    for seed in args.seeds:
        for method in scores:
            out = root / f"{method}_seed{seed}.pt"
            distill(DistillConfig(manifest=str(manifest), method=method, student="mlp", out=str(out),
                                  mentors=(str(store),), options=options if method == "kd" else {}, seed=seed,
                                  epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                                  batch_size=args.batch_size, device="cpu", progress=False))
            scores[method].append(evaluate_checkpoint(out, manifest, "test", device="cpu"))

    n_train = int(round(args.num_samples * 0.05))
    print(f"synthetic K=3 d=30 sigma2=6: {n_train} train rows, {teacher_scores['n']} test rows; "
          f"students mlp, {args.epochs} epochs, lr {args.lr}, seeds {args.seeds}; kd options {options or 'defaults'}")
    print(f"{'':<22}" + "".join(f"{label:>24}" for _, label, _ in METRICS))
    print(_row(f"teacher (CE, {args.teacher_epochs} ep)", [teacher_scores]))
    print(_row("kd", scores["kd"]))
    print(_row("nokd", scores["nokd"]))
    print(f"{'Bayes classifier':<22}{100 * teacher_scores['bayes_top1']:>17.2f}")
    diffs = [100 * (a["top1"] - b["top1"]) for a, b in zip(scores["kd"], scores["nokd"])]
    print(f"kd - nokd per seed (top-1 points): {', '.join(f'{d:+.2f}' for d in diffs)}; "
          f"({time.perf_counter() - began:.0f} s, files in {root})")


if __name__ == "__main__":
    main()
