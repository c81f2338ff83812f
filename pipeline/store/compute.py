"""Block computers: given a view and a row range, the teacher's full float32 logits.

    factory = TeacherFactory(checkpoint="models/ce.pt", manifest="data_manifests/synthetic.parquet",
                             split="train", views=json.dumps(spec.to_dict()))
    computer = factory.build()               # loads the teacher once
    logits = computer(view=0, start=0, stop=4096)   # np.float32 [4096, C]

A factory is small, frozen and picklable: a dask worker or a shard job rebuilds the computer from
it. The batches of a block are fixed (``micro_batch`` rows from the block start, the last one
shorter), so a block's logits never depend on which process computed it, nor when.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np


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


def _resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if not torch.cuda.is_available():
        return "cpu"
    index = 0
    try:  # inside a dask worker: spread local workers over the GPUs of the machine
        from distributed import get_worker

        name = get_worker().name
        index = int(name) % torch.cuda.device_count() if str(name).isdigit() else 0
    except (ImportError, ValueError):
        pass
    return f"cuda:{index}"


@dataclass(frozen=True)
class TeacherFactory:
    """Everything needed to rebuild the teacher and the split's views in another process."""

    checkpoint: str
    manifest: str
    split: str
    views: str                      # json.dumps(ViewSpec.to_dict()): hashable, and exact
    micro_batch: int = 256
    device: str = "auto"            # "auto": cuda (bf16 autocast) when there is a GPU, else cpu
    threads: int | None = None      # torch CPU threads; fix it for bit-identical results across runs
    loader_workers: int = 0         # DataLoader workers decoding images (datasets without get_batch)

    def build(self) -> "TeacherComputer":
        return TeacherComputer(self)


class TeacherComputer:
    """The frozen teacher (eval mode, no grad) over the views of one split."""

    def __init__(self, factory: TeacherFactory) -> None:
        import torch

        from pipeline.checkpoint import load_model
        from pipeline.data import open_split
        from pipeline.data.views import ViewSpec
        from pipeline.errors import UserError
        from pipeline.manifest import load_manifest

        if factory.threads:
            torch.set_num_threads(int(factory.threads))
        self.factory = factory
        self.device = _resolve_device(factory.device)
        self.model, self.meta = load_model(factory.checkpoint, device=self.device)
        self.manifest = load_manifest(factory.manifest)
        self.spec = ViewSpec.from_dict(json.loads(factory.views))
        self._open_split = open_split
        self._datasets: dict[int, object] = {}
        self.num_classes = int(self.meta["num_classes"])
        if self.num_classes != self.manifest.num_classes:
            raise UserError(f"{factory.checkpoint}: field num_classes: expected {self.manifest.num_classes} "
                            f"(manifest {factory.manifest}), found {self.num_classes}")
        ds = self.dataset(0)
        if tuple(self.meta["input_shape"]) != tuple(ds.input_shape):
            raise UserError(f"{factory.checkpoint}: field input_shape: expected {tuple(ds.input_shape)} "
                            f"(split {factory.split} with views {self.spec.kind}), found {tuple(self.meta['input_shape'])}")

    def dataset(self, view: int):
        if view not in self._datasets:
            self._datasets[view] = self._open_split(self.manifest, self.factory.split, views=self.spec, view=view)
        return self._datasets[view]

    def _batches(self, view: int, start: int, stop: int):
        import torch

        ds = self.dataset(view)
        layout = micro_batches(start, stop, self.factory.micro_batch)
        if hasattr(ds, "get_batch"):
            for rows in layout:
                yield ds.get_batch(rows)[0]
            return
        loader = torch.utils.data.DataLoader(ds, batch_sampler=[rows.tolist() for rows in layout],
                                             num_workers=self.factory.loader_workers)
        for x, _, _ in loader:
            yield x

    def __call__(self, view: int, start: int, stop: int) -> np.ndarray:
        import torch

        cuda = self.device.startswith("cuda")
        out = []
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            for x in self._batches(view, start, stop):
                out.append(self.model(x.to(self.device, non_blocking=True)).float().cpu().numpy())
        return np.concatenate(out, axis=0)


def default_threads(local_workers: int | None) -> int | None:
    """CPU threads per dask worker: the cores shared out, at least one."""
    if not local_workers:
        return None
    return max(1, (os.cpu_count() or 1) // int(local_workers))
