"""Block computers: given a view and a row range, the teacher's full float32 logits.

    factory = TeacherFactory(teacher=teacher_source("models/ce.pt"), manifest="data_manifests/synthetic.parquet",
                             split="train", views=json.dumps(spec.to_dict()))
    # any source of pipeline.teachers: teacher_source("resnet18", "r18.pt"), teacher_source("my_models:build")
    computer = factory.build()               # loads the teacher once
    logits = computer(view=0, start=0, stop=4096)   # np.float32 [4096, C]
    z0, z1, z2 = computer.compute_views([0, 1, 2], start=0, stop=4096)   # each image decoded once for all three
    z = computer.compute_rows(1, [5, 900, 4000])   # any rows of a view (kdcache verify --teacher)

A factory is small, frozen and picklable: a dask worker or a shard job rebuilds the computer from
it (the teacher's source travels, not the model). The batches of a block are fixed (``micro_batch``
rows from the block start, the last one shorter), so a block's logits never depend on which process computed it, nor when. The teacher
runs under the precision policy of ``pipeline.runtime`` (bf16 autocast for image models on CUDA,
float32 otherwise); its logits are cast to float32 before anything is derived from them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from pipeline.data import open_split
from pipeline.data.views import ViewSpec
from pipeline.manifest import load_manifest
from pipeline.runtime import Runtime, torch_threads
from pipeline.teachers import TeacherSource, check_rebuilt, check_teacher


class BlockComputer(Protocol):
    num_classes: int

    def __call__(self, view: int, start: int, stop: int) -> np.ndarray:
        """float32 logits [stop - start, num_classes] of rows [start, stop) in view ``view``."""


class ComputerFactory(Protocol):
    def build(self) -> BlockComputer:
        """Build the computer (load the teacher); called once per process or dask worker."""


def micro_batches(start: int, stop: int, micro_batch: int) -> list[np.ndarray]:
    """The fixed batch layout of a block: consecutive ``micro_batch`` rows from its start."""
    return [np.arange(a, min(a + micro_batch, stop)) for a in range(start, stop, micro_batch)]


def _worker_device(device: str) -> str:
    """``auto`` inside a dask worker: spread the local workers over the GPUs of the machine."""
    if device != "auto" or not torch.cuda.is_available():
        return device
    index = 0
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) % torch.cuda.device_count() if str(name).isdigit() else 0
    except (ImportError, ValueError):
        pass
    return f"cuda:{index}"


@dataclass(frozen=True)
class TeacherFactory:
    """Everything needed to rebuild the teacher and the split's views in another process."""

    teacher: TeacherSource          # pipeline.teachers.teacher_source(...)
    manifest: str
    split: str
    views: str                      # json.dumps(ViewSpec.to_dict()): hashable, and exact
    micro_batch: int = 256
    device: str = "auto"            # "auto": cuda when there is a GPU, else cpu
    threads: int | None = None      # torch CPU threads while computing; fix it for bit-identical stores
    workers: int = 0                # DataLoader workers decoding images (datasets without get_batch)
    state_sha256: str | None = None  # a teacher without a weights file: its state_dict's sha256, checked on rebuild
    data_root: str | None = None    # where this process finds the manifest's data (default: the manifest's root)

    def build(self) -> "TeacherComputer":
        return TeacherComputer(self)


class TeacherComputer:
    """The frozen teacher (eval mode, no grad) over the views of one split."""

    def __init__(self, factory: TeacherFactory, *, datasets: dict[int, Any] | None = None) -> None:
        """``datasets``: a view -> dataset cache to share with computers of the same split and views."""
        self.factory = factory
        self.manifest = load_manifest(factory.manifest)
        if factory.data_root is not None:
            self.manifest = dataclasses.replace(self.manifest, root=factory.data_root)
        self.spec = ViewSpec.from_dict(json.loads(factory.views))
        self._datasets: dict[int, Any] = {} if datasets is None else datasets
        shape = tuple(self.dataset(0).input_shape)
        teacher = check_teacher(factory.teacher, manifest=self.manifest, input_shape=shape, split=factory.split,
                                views=self.spec, build=True)
        check_rebuilt(teacher, factory.state_sha256)
        self.teacher, self.meta, self.num_classes = teacher, teacher.meta, int(teacher.meta["num_classes"])
        model = teacher.model
        self.runtime = Runtime.for_model(_worker_device(factory.device), shape)
        self.model = self.runtime.prepare(model).eval()

    def dataset(self, view: int) -> Any:
        """The split in view ``view``: opened (its samples loaded) once, every other view shares them."""
        if view not in self._datasets:
            if self._datasets:
                ds = copy.copy(next(iter(self._datasets.values())))
                ds.set_view(view)
            else:
                ds = open_split(self.manifest, self.factory.split, views=self.spec, view=view)
            self._datasets[view] = ds
        return self._datasets[view]

    def _batches(self, views: Sequence[int], layout: list[np.ndarray]) -> Iterator[list[torch.Tensor]]:
        """Per batch of rows in ``layout``, its input in each of ``views``: a lazily decoded image is
        decoded once for all."""
        datasets = [self.dataset(view) for view in views]
        if all(hasattr(ds, "get_batch") for ds in datasets):
            for rows in layout:
                yield [torch.as_tensor(ds.get_batch(rows)[0]) for ds in datasets]
            return
        yield from decoded_batches(datasets, layout, workers=self.factory.workers)

    def compute_views(self, views: Sequence[int], start: int, stop: int) -> list[np.ndarray]:
        """float32 logits [stop - start, num_classes] of rows [start, stop) in each of ``views``, each
        source image decoded once; view v's array equals ``self(v, start, stop)``."""
        return self._forward(views, micro_batches(start, stop, self.factory.micro_batch))

    def compute_rows(self, view: int, rows: Sequence[int]) -> np.ndarray:
        """float32 logits [len(rows), num_classes] of any ``rows`` of view ``view``, in batches of
        ``micro_batch`` rows: a block's logits of those rows, up to the arithmetic of other batches."""
        rows = np.asarray(rows, dtype=np.int64)
        step = self.factory.micro_batch
        return self._forward([view], [rows[a:a + step] for a in range(0, len(rows), step)])[0]

    def _forward(self, views: Sequence[int], layout: list[np.ndarray]) -> list[np.ndarray]:
        """The teacher's float32 logits of the batches ``layout`` in each of ``views``."""
        out: list[list[np.ndarray]] = [[] for _ in views]
        with torch_threads(self.factory.threads), torch.inference_mode(), self.runtime.autocast():
            for xs in self._batches(views, layout):
                for i, x in enumerate(xs):
                    out[i].append(self.model(self.runtime.to_device(x)).float().cpu().numpy())
        return [np.concatenate(z, axis=0) for z in out]

    def __call__(self, view: int, start: int, stop: int) -> np.ndarray:
        return self.compute_views([view], start, stop)[0]


class SharedDecode(torch.utils.data.Dataset):
    """Item ``rows`` (a micro-batch): the input batch of those rows in each of ``datasets`` (same split;
    each its own views spec and view), every sample read and decoded once for all of them, each view
    made a batch at a time (``ViewDataset.batch_of``: one draw of the batch's uniforms, the flips,
    jitters and normalization on one array; a mixed view decodes its partners too)."""

    def __init__(self, datasets: Sequence[Any]) -> None:
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return len(self.datasets[0])

    def __getitem__(self, rows: np.ndarray) -> list[torch.Tensor]:
        samples = self.datasets[0].samples
        raw = [samples.get(int(i)) for i in rows]
        return [ds.batch_of(rows, raw) for ds in self.datasets]


def decoded_batches(datasets: Sequence[Any], layout: list[np.ndarray], *,
                    workers: int) -> torch.utils.data.DataLoader:
    """Per batch of rows in ``layout``, its input in each of ``datasets`` (``SharedDecode``), decoded in
    ``workers`` DataLoader worker processes (0: in this one)."""
    return torch.utils.data.DataLoader(SharedDecode(datasets), sampler=layout, batch_size=None, num_workers=workers)


def compute_views(computer: BlockComputer, views: Sequence[int], start: int, stop: int) -> list[np.ndarray]:
    """Each of ``views`` of rows [start, stop): in one pass (each image decoded once) when the computer
    can (``compute_views``), else view by view."""
    many = getattr(computer, "compute_views", None)
    return many(views, start, stop) if many is not None else [computer(view, start, stop) for view in views]


def default_threads(local_workers: int | None) -> int | None:
    """CPU threads per dask worker: the cores shared out, at least one."""
    if not local_workers:
        return None
    return max(1, (os.cpu_count() or 1) // int(local_workers))
