"""Helpers shared by the benchmarks: variants timed side by side, stand-in teachers and stores, tables.

    from _common import alternate, summary_line
    runs = alternate({"a": run_a, "b": run_b}, reps=5)      # {"a": [Sample(wall, cpu, extra), ...], ...}
    print(summary_line(a_over_b=median(runs["a"], "cpu") / median(runs["b"], "cpu")))

Every variant runs in this process, in turns (the order rotated each repetition, so none is
always first), and each run is timed twice: wall clock and this process's CPU time
(``time.process_time``: every thread of the process, not the other users of a noisy machine).
Figures are reported as the min and the median over the repetitions.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.cache.teacher import TeacherFactory  # noqa: E402
from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.data import build_manifest, default_views, open_split  # noqa: E402
from pipeline.data.fashion import FILES as FASHION_FILES, find_file, read_idx  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.models import create_model  # noqa: E402
from pipeline.store.writer import Provenance  # noqa: E402
from pipeline.teachers import teacher_source  # noqa: E402


FASHION = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("auto", "synthetic", "fashion-mnist")


def pick_dataset(name: str) -> str:
    """``auto``: Fashion-MNIST where its IDX files are installed, else the synthetic dataset."""
    if name != "auto":
        return name
    return "fashion-mnist" if FASHION.is_dir() else "synthetic"


def fashion_root() -> Path:
    """Where Fashion-MNIST's IDX files are installed; exits with a one-line error where they are not."""
    if not FASHION.is_dir():
        raise SystemExit(f"error: --dataset fashion-mnist: expected the IDX files in {FASHION}, found none")
    return FASHION


def build_data(root: Path, dataset: str, train_rows: int) -> Path:
    """A manifest with ``train_rows`` train rows: synthetic (5 % of its samples are train; d = 30,
    K = 3) or a random subset of Fashion-MNIST's train split."""
    manifest = root / f"{dataset}.parquet"
    if dataset == "synthetic":
        build_manifest("synthetic", root / "data", manifest, seed=0, num_samples=train_rows * 20)
    else:
        build_manifest("fashion-mnist", fashion_root(), manifest, seed=0, subset={"train": train_rows})
    return manifest


def source_images(dataset: str, images: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, 28, 28], labels [n]): the first ``images`` of Fashion-MNIST's train split, or as
    many synthetic images of 10 classes (a grating whose angle is the class, plus noise)."""
    if dataset == "synthetic":
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 10, images)
        yy, xx = np.mgrid[0:28, 0:28] / 28
        angle = labels[:, None, None] * np.pi / 10
        grating = 128 + 90 * np.sin(4 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)))
        return np.clip(grating + rng.normal(0, 20, grating.shape), 0, 255).astype(np.uint8), labels
    root = fashion_root()
    pixels, labels = (read_idx(root / find_file(root, FASHION_FILES[key]))[:images]
                      for key in ("train_images", "train_labels"))
    return pixels, labels


def build_imagefolder(root: Path, dataset: str, images: int, *, size: int = 28) -> Path:
    """A JPEG ImageFolder (quality 90, grayscale) of ``source_images`` resized to ``size`` px,
    ``root/jpeg-<dataset>-<size>px/train/c<label>/<k>.jpg``, and its manifest in that folder (all
    train, no val split; default views: random-resized-crop + flip + colour jitter at ``size``).
    An existing folder of as many images is reused."""
    folder = root / f"jpeg-{dataset}-{size}px"
    manifest = folder / "manifest.parquet"
    if manifest.exists() and len(load_manifest(manifest).split("train").sample_id) == images:
        return manifest
    shutil.rmtree(folder / "train", ignore_errors=True)
    pixels, labels = source_images(dataset, images)
    for k, (img, label) in enumerate(zip(pixels, labels)):
        (folder / "train" / f"c{label}").mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(img)
        if size != img.shape[0]:
            image = image.resize((size, size), Image.BICUBIC)
        image.save(folder / "train" / f"c{label}" / f"{k:05d}.jpg", quality=90)
    build_manifest("imagefolder", folder, manifest, image_size=size, val_fraction=0.0)
    return manifest


def save_teacher(path: Path, manifest: Path, arch: str, options: Mapping[str, Any], *, seed: int = 0) -> Path:
    """A randomly initialised ``arch`` teacher of the manifest's train inputs (its default views),
    saved as a kdcache checkpoint: caching and inference cost the same whatever the weights."""
    man = load_manifest(manifest)
    shape = tuple(open_split(man, "train").input_shape)
    torch.manual_seed(seed)
    net = create_model(arch, num_classes=man.num_classes, input_shape=shape, **options)
    save_checkpoint(path, model=net, meta={"arch": arch, "num_classes": man.num_classes, "input_shape": shape,
                                           "arch_options": dict(options), "loss": "ce", "manifest_sha256": man.sha256})
    return path


def teacher_factory(manifest: Path, teacher: Path, *, micro_batch: int, threads: int | None) -> TeacherFactory:
    """The caching job's block computer factory for ``teacher`` over the manifest's train split in
    its default views (seed 0), on the CPU."""
    views = json.dumps(default_views(load_manifest(manifest), seed=0).to_dict(), sort_keys=True)
    return TeacherFactory(teacher=teacher_source(teacher), manifest=str(manifest.resolve()), split="train",
                          views=views, micro_batch=micro_batch, device="cpu", threads=threads)


def clock() -> np.ndarray:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the steady one."""
    return np.array([time.perf_counter(), time.process_time()])


@dataclass
class Sample:
    """One timed run: wall and CPU seconds, and whatever figures the run returned (``extra``)."""

    wall: float
    cpu: float
    extra: dict[str, float] = field(default_factory=dict)

    def get(self, key: str) -> float:
        return self.wall if key == "wall" else self.cpu if key == "cpu" else self.extra[key]


def timed(fn: Callable[[], Mapping[str, float] | None]) -> Sample:
    """Run ``fn`` once; its wall and process CPU seconds, and the figures it returns."""
    wall, cpu = time.perf_counter(), time.process_time()
    extra = fn()
    return Sample(time.perf_counter() - wall, time.process_time() - cpu, dict(extra or {}))


def alternate(variants: Mapping[str, Callable[[], Mapping[str, float] | None]], *, reps: int,
              warmup: bool = True) -> dict[str, list[Sample]]:
    """Run every variant ``reps`` times in turns (after one untimed warm-up round); samples per variant."""
    names = list(variants)
    if warmup:
        for name in names:
            variants[name]()
    out: dict[str, list[Sample]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            out[name].append(timed(variants[name]))
    return out


def low(samples: Sequence[Sample], key: str) -> float:
    return min(s.get(key) for s in samples)


def median(samples: Sequence[Sample], key: str) -> float:
    return statistics.median(s.get(key) for s in samples)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_line(**ratios: float) -> str:
    """``name=value`` pairs, three decimals: the one line a benchmark ends with."""
    return " ".join(f"{name}={value:.3f}" for name, value in ratios.items())


def bench_provenance(num_samples: int, num_classes: int, *, num_views: int = 1, teacher: str, seed: int) -> Provenance:
    """The provenance of a stand-in store (no manifest, no checkpoint behind it)."""
    return Provenance(
        manifest={"path": "bench", "sha256": "b" * 64, "split": "train", "num_samples": num_samples,
                  "num_classes": num_classes, "dataset": "bench"},
        teacher={"name": teacher, "arch": "stand-in", "checkpoint_sha256": f"{seed:064d}", "train_loss": "ce"},
        views={"count": num_views, "seed": 0, "spec": {"kind": "identity", "seed": 0, "params": {}}})


@functools.lru_cache(maxsize=8)
def _precomputed(seed: int, view: int, rows: int, num_classes: int) -> np.ndarray:
    rng = np.random.default_rng([seed, view])
    return (rng.standard_normal((rows, num_classes)) * 3).astype(np.float32)


@dataclass(frozen=True)
class PrecomputedTeacher:
    """A stand-in teacher that costs nothing: every block's logits are slices of one precomputed
    [rows_per_block, C] float32 array per view, made once per process (so that the writer's own
    work is all that is timed)."""

    num_classes: int
    rows_per_block: int
    seed: int = 0

    def build(self) -> Callable[[int, int, int], np.ndarray]:
        def compute(view: int, start: int, stop: int) -> np.ndarray:
            return _precomputed(self.seed, view, self.rows_per_block, self.num_classes)[: stop - start]
        compute.num_classes = self.num_classes
        return compute


class StandInInputs(torch.utils.data.Dataset):
    """The inputs side of a batch, as cheap as possible: one float per row and the stored label."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((len(rows), 1), np.float32), self.labels[rows].astype(np.int64)


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Evict the files from the page cache (``posix_fadvise(DONTNEED)`` after ``fsync``: no root
    needed for one's own files), so that the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(paths: Iterable[Path], *, buffer_bytes: int = 16 * 2**20) -> int:
    """Read the files sequentially into one reused buffer (the raw read speed); bytes read."""
    buf = bytearray(buffer_bytes)
    view = memoryview(buf)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while True:
                got = fh.readinto(view)
                if not got:
                    break
                total += got
    return total


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_bytes(kind: str = "VmRSS") -> int:
    """This process's current (``VmRSS``) or peak (``VmHWM``) resident set size, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status: no {kind}")


def machine_line() -> str:
    """Cores, memory and the load, for the header of a benchmark's output."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"machine: {os.cpu_count()} cores, {mem:.0f} GiB RAM, load average {load}"
