"""Several frozen teachers over one pass of a split's views: a block's images are decoded once,
made into each input transform once, and fed to every teacher that needs that block.

    factory = OnePassFactory(teachers=(TeacherFactory(teacher="models/a.pt", ...),
                                         TeacherFactory(teacher="models/b.pt", ...)))
    computer = factory.build()                                          # loads every teacher once
    za, zb = computer(view=1, start=0, stop=4096, members=(0, 1))      # float32 [4096, C] each
    per_view = computer.compute_views([1, 2, 3], 0, 4096, members=(0, 1))   # [[za1, zb1], [za2, zb2], ...]

Teachers are grouped by their views (``TeacherFactory.views``: the geometry, the resolution and
the normalization they were given): a group's inputs are made once per micro-batch and shared by
its teachers. Lazily decoded images (ImageFolder) are decoded once for every group and every view
of a ``compute_views`` call: one DataLoader item is a micro-batch, the input batch of each (group,
view) (``pipeline.cache.teacher.SharedDecode``). The micro-batches, threads and each teacher's
forward are those of its own ``TeacherComputer``, so a teacher's logits are bit-identical to those
of a run caching it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipeline.cache.teacher import TeacherComputer, TeacherFactory, decoded_batches, micro_batches
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


class OnePassComputer:
    """Every teacher loaded once; ``(view, start, stop, members)`` -> the members' float32 logits."""

    def __init__(self, factory: OnePassFactory) -> None:
        self.factory = factory
        shared: dict[str, dict[int, Any]] = {}
        self.teachers = [TeacherComputer(f, datasets=shared.setdefault(f.views, {})) for f in factory.teachers]
        self.num_classes = self.teachers[0].num_classes
        first = factory.teachers[0]
        self.micro_batch, self.threads, self.workers = first.micro_batch, first.threads, first.workers

    def _inputs(self, keys: list[tuple[str, int]], start: int,
                stop: int) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
        """Per micro-batch, the input batch of each (group, view) of ``keys``."""
        first = {g: next(t for t in self.teachers if t.factory.views == g) for g, _ in keys}
        datasets = [first[g].dataset(view) for g, view in keys]
        layout = micro_batches(start, stop, self.micro_batch)
        if all(hasattr(ds, "get_batch") for ds in datasets):
            for rows in layout:
                yield {key: torch.as_tensor(ds.get_batch(rows)[0]) for key, ds in zip(keys, datasets)}
            return
        for xs in decoded_batches(datasets, layout, workers=self.workers):
            yield dict(zip(keys, xs))

    def compute_views(self, views: Sequence[int], start: int, stop: int,
                      members: Sequence[int]) -> list[list[np.ndarray]]:
        """Per view of ``views``, the members' float32 logits of rows [start, stop): every image decoded
        once for all the views and groups; view v's arrays equal ``self(v, start, stop, members)``."""
        teachers = [self.teachers[t] for t in members]
        groups = list(dict.fromkeys(t.factory.views for t in teachers))
        last_user = {t.factory.views: i for i, t in enumerate(teachers)}
        keys = [(g, view) for view in views for g in groups]
        out: list[list[list[np.ndarray]]] = [[[] for _ in teachers] for _ in views]
        with torch_threads(self.threads), torch.inference_mode():
            for xs in self._inputs(keys, start, stop):
                for v, view in enumerate(views):
                    moved: dict[tuple[str, torch.device], torch.Tensor] = {}
                    for i, teacher in enumerate(teachers):
                        group, runtime = teacher.factory.views, teacher.runtime
                        key = (group, runtime.device)
                        if key not in moved:
                            moved[key] = runtime.to_device(xs[group, view])
                        # a teacher may change its input in place: the next ones get their own copy
                        x = moved[key] if last_user[group] == i else moved[key].clone()
                        with runtime.autocast():
                            out[v][i].append(teacher.model(x).float().cpu().numpy())
        return [[np.concatenate(z, axis=0) for z in per_view] for per_view in out]

    def __call__(self, view: int, start: int, stop: int, members: Sequence[int]) -> list[np.ndarray]:
        return self.compute_views([view], start, stop, members)[0]
