"""Experiment: how small can a teacher cache get before the student notices? float16, int8, top-k, sampled.

    .venv/bin/python bench/storage.py                         # C = 100 and C = 1000: 18 min of CPU (30 min wall, 2 shared cores)
    .venv/bin/python bench/storage.py --classes 1000 --seeds 0 --budget 60     # k and top-k for 60 bytes
    .venv/bin/python bench/storage.py --T 2                    # every KD run (and the sampled draws) at T = 2

For each class count C: a synthetic manifest (``--num-samples``, 5 % train, 90 % test), a CE teacher
(mlp), its train cache as dense float16 (the baseline), dense int8, top-k and sampled (draws at
the KD temperature), both with the largest k whose payload fits ``--budget`` bytes, then for each seed an mlp student distilled with ``kd``
(``w_ce = 0``: the teacher's targets only, so a codec's error is not hidden by the labels) from each
cache: the same initialisation, batch order and schedule for every cache. The sampled store is
written from the teacher's float32 logits (a float32 cache read back) with the library writer, so
that it can be drawn at any temperature. Prints a Markdown table: the logit payload in bytes per
sample-view (the codec's arrays, from the files on disk: ``rows_per_block`` divides the train split, so
no padding), the student's test top-1 (mean ± std over the seeds) and its KL(teacher ‖ student) at
T = 1 on the test split, next to the teacher.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cache import CacheConfig, cache_teacher, write_cache  # noqa: E402
from pipeline.data import build_manifest, default_views, open_split  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.runtime import Runtime  # noqa: E402
from pipeline.store import schema  # noqa: E402
from pipeline.store.codecs.base import index_dtype  # noqa: E402
from pipeline.store.writer import Provenance  # noqa: E402
from pipeline.train import DistillConfig, TeacherConfig, distill, train_teacher  # noqa: E402
from pipeline.train.evaluate import predict_logits  # noqa: E402


@dataclass(frozen=True)
class StoreLogits:
    """A block computer that reads a float32 dense store back: the teacher's exact logits."""

    store: str
    num_classes: int

    def build(self) -> "StoreLogits":
        return self

    def __call__(self, view: int, start: int, stop: int) -> np.ndarray:
        return zarr.open_group(self.store, mode="r")["logits"][view, start:stop]


def resample(dense32: Path, out: Path, *, k: int, temperature: float) -> Path:
    """A sampled store of the teacher logits in ``dense32`` (same provenance, rows and blocks)."""
    attrs = schema.read_attrs(dense32)
    lay = schema.Layout.from_attrs(attrs)
    group = zarr.open_group(str(dense32), mode="r")
    sampled = schema.Layout(num_samples=lay.num_samples, num_classes=lay.num_classes, num_views=lay.num_views,
                            kind="sampled", k=k, temperature=temperature, rows_per_block=lay.rows_per_block,
                            micro_batch=lay.micro_batch)
    write_cache(out, factory=StoreLogits(str(dense32), lay.num_classes), layout=sampled, overwrite=True,
                provenance=Provenance(attrs["manifest"], attrs["teacher"], attrs["views"]),
                sample_id=group["sample_id"][:], label=group["label"][:], progress=False)
    return out


def payload_bytes(store: Path) -> float:
    """Bytes of the payload arrays' chunk files per sample-view."""
    lay = schema.Layout.from_attrs(schema.read_attrs(store))
    size = sum(p.stat().st_size for name in lay.payload_arrays() for p in (store / name).glob("c.*"))
    return size / (lay.num_samples * lay.num_views)


def test_logits(ckpt: Path, test_split) -> tuple[torch.Tensor, torch.Tensor]:
    model, _ = load_model(ckpt)
    runtime = Runtime.create("cpu", images=False)
    return predict_logits(runtime.prepare(model), test_split, runtime=runtime, batch_size=4096)


def score(student: Path, test_split, teacher_logits: torch.Tensor) -> tuple[float, float]:
    """(test top-1 %, mean KL(p_teacher ‖ p_student) at T = 1 on the test split)."""
    z, y = test_logits(student, test_split)
    log_s, log_t = torch.log_softmax(z, 1), torch.log_softmax(teacher_logits, 1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1).mean().item()
    return 100.0 * (z.argmax(1) == y).float().mean().item(), kl


def run(classes: int, args: argparse.Namespace, root: Path) -> list[str]:
    n_train = args.train_rows[classes]
    num_samples = n_train * 20
    manifest_path = root / f"synthetic_c{classes}.parquet"
    if not manifest_path.exists():
        build_manifest("synthetic", root / f"data_c{classes}", manifest_path, seed=0, num_samples=num_samples,
                       num_classes=classes, sigma2=args.sigma2)
    manifest = load_manifest(manifest_path)
    teacher = root / f"teacher_c{classes}.pt"
    if not teacher.exists():
        train_teacher(TeacherConfig(manifest=str(manifest_path), arch="mlp", loss="ce", out=str(teacher),
                                    device="cpu", epochs=args.teacher_epochs, arch_options={"hidden": 256},
                                    val_split=None, progress=False))
    ids = np.dtype(index_dtype(classes)).itemsize
    k, topk = args.budget // (ids + 1), (args.budget - 4) // (2 + ids)     # sampled: id + uint8 count
    rpb = args.rows_per_block
    common = dict(teacher=str(teacher), manifest=str(manifest_path), split="train", views=1, device="cpu",
                  rows_per_block=rpb, progress=False, overwrite=True, threads=1)
    stores = {"dense float16": root / f"c{classes}_f16.zarr", "dense int8": root / f"c{classes}_i8.zarr",
              f"top-k k={topk}": root / f"c{classes}_topk.zarr", f"sampled k={k}": root / f"c{classes}_smp.zarr"}
    cache_teacher(CacheConfig(out=str(stores["dense float16"]), **common))
    cache_teacher(CacheConfig(out=str(stores["dense int8"]), dtype="int8", **common))
    cache_teacher(CacheConfig(out=str(stores[f"top-k k={topk}"]), storage="topk", k=topk, **common))
    f32 = cache_teacher(CacheConfig(out=str(root / f"c{classes}_f32.zarr"), dtype="float32", **common)).store
    resample(f32, stores[f"sampled k={k}"], k=k, temperature=args.T)

    test_split = open_split(manifest, "test", views=default_views(manifest), view=0)
    teacher_z, teacher_y = test_logits(teacher, test_split)
    lines = []
    for name, store in stores.items():
        results = []
        for seed in args.seeds:
            out = root / f"c{classes}_{store.stem}_s{seed}.pt"
            distill(DistillConfig(manifest=str(manifest_path), method="kd", student="mlp", out=str(out),
                                  mentors=(str(store),), options={"T": args.T, "w_ce": 0.0, "w_kd": 1.0},
                                  seed=seed, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                  device="cpu", progress=False, student_options={"hidden": 256}, val_split=None))
            results.append(score(out, test_split, teacher_z))
        top1, kl = [r[0] for r in results], [r[1] for r in results]
        spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
        lines.append(f"| {classes} | {name} | {payload_bytes(store):.1f} | {statistics.mean(top1):.2f} ± {spread:.2f} "
                     f"| {statistics.mean(kl):.4f} |")
    teacher_top1 = 100.0 * (teacher_z.argmax(1) == teacher_y).float().mean().item()
    lines.append(f"| {classes} | (teacher) | | {teacher_top1:.2f} | 0 |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="Working folder (default: a temporary one).")
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Student seeds.")
    parser.add_argument("--budget", type=int, default=40, help="Logit payload in bytes per sample-view of the "
                        "top-k and sampled stores (k as large as fits).")
    parser.add_argument("--T", type=float, default=1.0, help="KD temperature (and the sampled store's).")
    parser.add_argument("--sigma2", type=float, default=2.0, help="Noise variance of the synthetic data.")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10, help="Student epochs.")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rows-per-block", type=int, default=2048, help="Divides every train split here.")
    args = parser.parse_args()
    args.train_rows = {c: 4096 if c <= 100 else 8192 for c in args.classes}
    root = args.dir or Path(tempfile.mkdtemp(prefix="storage-"))
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    began = time.perf_counter()
    lines = []
    for classes in args.classes:
        lines += run(classes, args, root)
    print(f"synthetic d=30 sigma2={args.sigma2}, train rows {args.train_rows}, 1 view; mlp teacher "
          f"({args.teacher_epochs} ep) and students ({args.epochs} ep), kd T={args.T} w_ce=0 w_kd=1, seeds {args.seeds}")
    print("| C | cache | logit payload (bytes / sample-view) | student test top-1 % | KL(teacher ‖ student), test |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))
    print(f"({time.perf_counter() - began:.0f} s, files in {root})")


if __name__ == "__main__":
    main()
