"""One short check at ImageNet size on a GPU: cache a ResNet-50 teacher, distill a ResNet-18 from it.

    python bench/gpu_resnet50.py                          # on a CUDA machine: ~4 min, 4096 images, C = 1000
    python bench/gpu_resnet50.py --quick                  # ~1 min: 1024 images, C = 100
    python bench/gpu_resnet50.py --device cpu --images 48 --classes 4 --image-size 32 \\
        --teacher-arch resnet18 --batch-size 16 --workers 0      # the smallest run (a test does this)

Everything is made in a temporary folder, nothing is downloaded: an ImageFolder of random JPEGs
(``--images`` training images of 256 px in ``--classes`` class folders), a random-init torchvision
ResNet-50 teacher saved as a kdcache checkpoint (a forward costs the same whatever the weights).
Then, with kdcache's own calls and precision policy (bf16 autocast and channels_last for image models
on CUDA):

1. ``cache_teachers``: the teacher over 2 views at ``--image-size`` (view 0: resize + center crop;
   view 1: random-resized crop, flip, colour jitter), float16 store: the writer's rows/s (a row is a
   sample-view), JPEG decoding in ``--workers`` DataLoader workers included;
2. ``distill`` of a ResNet-18 three ways over the same batches: the student alone (``nokd``), ``kd``
   from the cache, ``kd`` from the live teacher (``--online``): the median step time (wall, CUDA
   synchronized at every step) and each ratio to the student alone;
3. the same student and teacher steps on one batch already on the device (no data loading), so the
   GPU's own floor is seen next to the loop's step time;
4. the cached logits (bf16 autocast, stored float16) against an fp32 forward (TF32 off) of the
   same views: max and mean absolute difference, and top-1 agreement.

It ends with one line: ``writer_rows_per_s=... kd_cached_over_student=... kd_live_over_student=...
top1_agreement=...`` (the cached logits' top-1 against the fp32 forward's).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zarr
from PIL import Image

from _common import machine_line, markdown_table, summary_line
from pipeline.cache import CacheConfig, cache_teachers
from pipeline.checkpoint import save_checkpoint
from pipeline.data import build_manifest, open_split
from pipeline.data.views import ViewSpec
from pipeline.manifest import load_manifest
from pipeline.losses import kd_loss
from pipeline.models import create_model, load_model
from pipeline.runtime import Runtime
from pipeline.train import DistillConfig, distill
from pipeline.train.loop import TrainingWarning


def write_images(root: Path, *, images: int, classes: int, side: int = 256, seed: int = 0) -> None:
    """``images`` JPEGs under ``root/train/<class>/``: smooth random colour fields (upsampled noise),
    so they compress and decode like photographs rather than like white noise."""
    rng = np.random.default_rng(seed)
    for i in range(images):
        folder = root / "train" / f"c{i % classes:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)


def save_teacher(path: Path, arch: str, num_classes: int, input_shape: tuple[int, ...], sha256: str) -> None:
    torch.manual_seed(0)
    net = create_model(arch, num_classes=num_classes, input_shape=input_shape)
    save_checkpoint(path, model=net, meta={"arch": arch, "num_classes": num_classes, "input_shape": input_shape,
                                           "arch_options": {}, "loss": "ce", "manifest_sha256": sha256})


def step_times(cfg: DistillConfig, device: torch.device) -> list[float]:
    """Wall seconds between consecutive steps of ``distill(cfg)`` (the first two dropped: cuDNN autotuning)."""
    marks: list[float] = []

    def on_step(batch, out) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())

    distill(cfg, on_step=on_step)
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    return gaps[2:] or gaps


def device_floor(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 runtime: Runtime, *, reps: int) -> dict[str, float]:
    """Median seconds of the student's SGD step (CE), of the same with a KD loss from fixed targets, and
    of the teacher's forward, on one batch already on the device (no data loading)."""
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    with torch.inference_mode(), runtime.autocast():
        z_t = teacher(x).float()

    def student_step(with_kd: bool) -> None:
        opt.zero_grad(set_to_none=True)
        with runtime.autocast():
            z = student(x).float()
        loss = kd_loss(z, z_t, y) if with_kd else torch.nn.functional.cross_entropy(z, y)
        loss.backward()
        opt.step()

    def teacher_forward() -> None:
        with torch.inference_mode(), runtime.autocast():
            teacher(x)

    def timed(fn: Callable[[], None]) -> float:
        times = []
        for _ in range(reps + 2):
            began = time.perf_counter()
            fn()
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - began)
        return statistics.median(times[2:])

    return {"student step (CE)": timed(lambda: student_step(False)),
            "student step (kd loss, fixed targets)": timed(lambda: student_step(True)),
            "teacher forward": timed(teacher_forward)}


def logit_difference(store: Path, teacher_ckpt: Path, manifest_path: Path, device: torch.device,
                     rows: int) -> dict[str, float]:
    """The store's view-0 logits of the first ``rows`` samples against the teacher's fp32 forward."""
    group = zarr.open_group(str(store), mode="r")
    spec = ViewSpec.from_dict(dict(group.attrs)["views"]["spec"])
    ds = open_split(load_manifest(manifest_path), "train", views=spec, view=0)
    rows = min(rows, len(ds))
    x = torch.stack([ds[i][0] for i in range(rows)])
    cached = torch.from_numpy(np.asarray(group["logits"][0, :rows], dtype=np.float32))
    model, _ = load_model(teacher_ckpt, device=device)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            ref = torch.cat([model(x[i:i + 64].to(device)).float().cpu() for i in range(0, rows, 64)])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    diff = (cached - ref).abs()
    return {"rows": rows, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "ref_abs_mean": float(ref.abs().mean()),
            "top1_agree": float((cached.argmax(1) == ref.argmax(1)).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="1024 images of 100 classes (about a minute on a GPU)")
    parser.add_argument("--images", type=int, default=None, help="training images, JPEGs of 256 px (default 4096)")
    parser.add_argument("--classes", type=int, default=None, help="class folders (default 1000)")
    parser.add_argument("--image-size", type=int, default=224, help="side of the views the models see")
    parser.add_argument("--teacher-arch", default="resnet50")
    parser.add_argument("--student-arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=12, help="DataLoader workers decoding the JPEGs")
    parser.add_argument("--dir", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    args.images = args.images or (1024 if args.quick else 4096)
    args.classes = args.classes or (100 if args.quick else 1000)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device here (use --device cpu for the smallest run)")
    warnings.simplefilter("ignore", TrainingWarning)        # random teacher: the students need not learn
    root = args.dir or Path(tempfile.mkdtemp(prefix="kd-gpu-"))
    try:
        began = time.perf_counter()
        write_images(root / "images", images=args.images, classes=args.classes)
        manifest_path = root / "images.parquet"
        man = build_manifest("imagefolder", root / "images", manifest_path, seed=0, val_fraction=0.0,
                             image_size=args.image_size)
        shape = (3, args.image_size, args.image_size)
        teacher_ckpt = root / "teacher.pt"
        save_teacher(teacher_ckpt, args.teacher_arch, man.num_classes, shape, man.sha256)
        n = int((man.table.column("split").to_numpy(zero_copy_only=False) == "train").sum())
        print(f"{n} training JPEGs, {man.num_classes} classes, views of {args.image_size} px; teacher "
              f"{args.teacher_arch}, student {args.student_arch}, batch {args.batch_size}, device {device} "
              f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}); set-up "
              f"{time.perf_counter() - began:.0f} s")
        print(machine_line())

        store = root / "teacher.zarr"
        cfg = CacheConfig(teacher=str(teacher_ckpt), manifest=str(manifest_path), out=str(store), views=2,
                          device=str(device), workers=args.workers, progress=False)
        began = time.perf_counter()
        cache_teachers([cfg])
        cache_s = time.perf_counter() - began
        writer_rows = 2 * n / cache_s
        print(f"cache: {2 * n} rows (2 views) in {cache_s:.1f} s: {writer_rows:.0f} rows/s")

        common = dict(manifest=str(manifest_path), student=args.student_arch, epochs=1, batch_size=args.batch_size,
                      seed=0, val_split=None, device=str(device), progress=False, workers=args.workers,
                      cache_mode="memory")
        variants = {
            "student alone (nokd)": DistillConfig(method="nokd", views=2, out=str(root / "nokd.pt"), **common),
            "kd, cached teacher": DistillConfig(method="kd", mentors=[str(store)], out=str(root / "kd.pt"), **common),
            "kd, live teacher": DistillConfig(method="kd", online=True, teachers=[str(teacher_ckpt)], views=2,
                                              out=str(root / "kd_live.pt"), **common),
        }
        times = {name: statistics.median(step_times(v, device)) for name, v in variants.items()}
        base = times["student alone (nokd)"]
        print(markdown_table(["variant", "step ms (median)", "x student alone"],
                             [[k, f"{1e3 * t:.1f}", f"{t / base:.3f}"] for k, t in times.items()]))

        runtime = Runtime.for_model(device, shape)
        torch.manual_seed(0)
        student = runtime.prepare(create_model(args.student_arch, num_classes=man.num_classes, input_shape=shape))
        teacher = runtime.prepare(create_model(args.teacher_arch, num_classes=man.num_classes, input_shape=shape))
        x = runtime.to_device(torch.randn(args.batch_size, *shape))
        y = runtime.to_device(torch.randint(0, man.num_classes, (args.batch_size,)))
        floor = device_floor(student, teacher.eval(), x, y, runtime, reps=10)
        print(markdown_table(["on one batch on the device", "ms (median)"],
                             [[k, f"{1e3 * t:.1f}"] for k, t in floor.items()]))

        diff = logit_difference(store, teacher_ckpt, manifest_path, device, rows=512)
        policy = "bf16 autocast" if runtime.amp else "fp32"
        print(f"cached logits ({policy} -> float16) vs fp32 forward, {diff['rows']} rows of view 0: "
              f"max |diff| {diff['max_abs']:.4g}, mean |diff| {diff['mean_abs']:.4g} (mean |logit| "
              f"{diff['ref_abs_mean']:.4g}), top-1 agreement {diff['top1_agree']:.4f}")
        print(summary_line(writer_rows_per_s=writer_rows, kd_cached_over_student=times["kd, cached teacher"] / base,
                           kd_live_over_student=times["kd, live teacher"] / base, top1_agreement=diff["top1_agree"]))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
