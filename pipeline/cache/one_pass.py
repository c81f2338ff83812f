"""Several frozen teachers over one pass of a split's views: a block's images are decoded once,
made into each input transform once, and fed to every teacher that needs that block.

    factory = OnePassFactory(teachers=(TeacherFactory(teacher="models/a.pt", ...),
                                         TeacherFactory(teacher="models/b.pt", ...)))
    computer = factory.build()                                          # loads every teacher once
    za, zb = computer(view=1, start=0, stop=4096, members=(0, 1))      # float32 [4096, C] each

Teachers are grouped by their views (``TeacherFactory.views``: the geometry, the resolution and
the normalization they were given): a group's inputs are made once per micro-batch and shared by
its teachers. Lazily decoded images (ImageFolder) are decoded once per view for every group: one
DataLoader item is the tuple of each group's input of that sample. The micro-batches, threads
and each teacher's forward are those of its own ``TeacherComputer``, so a teacher's logits are
bit-identical to those of a run caching it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.cache.teacher import TeacherComputer, TeacherFactory, micro_batches
from pipeline.data.views import apply_view
from pipeline.runtime import torch_threads

SHARED_FIELDS = ("manifest", "split", "micro_batch", "threads", "workers")


@dataclass(frozen=True)
class OnePassFactory:
    """The teachers of one pass (small, frozen, picklable: dask workers rebuild it)."""

    teachers: tuple[TeacherFactory, ...]

    def __post_init__(self) -> None:
        for name in SHARED_FIELDS:
            if len({getattr(f, name) for f in self.teachers}) > 1:
                raise ValueError(f"OnePassFactory: every teacher needs the same {name}")

    def build(self) -> "OnePassComputer":
        return OnePassComputer(self)


class SharedDecode(Dataset):
    """Item ``i``: the input of sample ``i`` for each of ``datasets`` (same split, one view each), decoded once."""

    def __init__(self, datasets: Sequence[Any]) -> None:
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return len(self.datasets[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        first = self.datasets[0]
        raw = first.samples.get(int(i))
        sample_id = int(first.sample_ids[int(i)])
        return tuple(apply_view(ds.views, raw, sample_id=sample_id, view=ds.view) for ds in self.datasets)


class OnePassComputer:
    """Every teacher loaded once; ``(view, start, stop, members)`` -> the members' float32 logits."""

    def __init__(self, factory: OnePassFactory) -> None:
        self.factory = factory
        shared: dict[str, dict[int, Any]] = {}
        self.teachers = [TeacherComputer(f, datasets=shared.setdefault(f.views, {})) for f in factory.teachers]
        self.num_classes = self.teachers[0].num_classes
        first = factory.teachers[0]
        self.micro_batch, self.threads, self.workers = first.micro_batch, first.threads, first.workers

    def _inputs(self, view: int, start: int, stop: int, groups: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        """Per micro-batch, each group's input batch."""
        first = {g: next(t for t in self.teachers if t.factory.views == g) for g in groups}
        datasets = [first[g].dataset(view) for g in groups]
        layout = micro_batches(start, stop, self.micro_batch)
        if all(hasattr(ds, "get_batch") for ds in datasets):
            for rows in layout:
                yield {g: torch.as_tensor(ds.get_batch(rows)[0]) for g, ds in zip(groups, datasets)}
            return
        loader = DataLoader(SharedDecode(datasets), batch_sampler=[rows.tolist() for rows in layout],
                            num_workers=self.workers)
        for xs in loader:
            yield dict(zip(groups, xs))

    def __call__(self, view: int, start: int, stop: int, members: Sequence[int]) -> list[np.ndarray]:
        teachers = [self.teachers[t] for t in members]
        groups = list(dict.fromkeys(t.factory.views for t in teachers))
        last_user = {t.factory.views: i for i, t in enumerate(teachers)}
        out: list[list[np.ndarray]] = [[] for _ in teachers]
        with torch_threads(self.threads), torch.inference_mode():
            for xs in self._inputs(view, start, stop, groups):
                moved: dict[tuple[str, torch.device], torch.Tensor] = {}
                for i, teacher in enumerate(teachers):
                    group, runtime = teacher.factory.views, teacher.runtime
                    key = (group, runtime.device)
                    if key not in moved:
                        moved[key] = runtime.to_device(xs[group])
                    # a teacher may change its input in place: the next ones get their own copy
                    x = moved[key] if last_user[group] == i else moved[key].clone()
                    with runtime.autocast():
                        out[i].append(teacher.model(x).float().cpu().numpy())
        return [np.concatenate(z, axis=0) for z in out]
