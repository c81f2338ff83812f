"""The batch order of every training run and its split over DDP ranks: one rule for teachers,
students reading a cache from memory or streaming it, and students of live teachers.

    order = permutation(num_rows, key=(seed, epoch))             # a teacher's epoch
    order = permutation(num_rows, key=(seed, epoch, view))       # a student's epoch (cache or live)
    order, windows = windowed_permutation(num_blocks, block_rows, width=4, key=(seed, epoch, view))
    for rows in RankBatches(order, batch_size=128, rank=r, world_size=w): ...
    views = ViewSchedule("random", num_views=64, seed=0, sample_ids=ids).views(epoch)   # the view of each row

The order is a pure function of its key. Streaming shuffles the blocks, cuts them into windows
of ``width`` blocks and shuffles the rows inside each window, so a window is all a reader needs
in memory. ``RankBatches`` cuts the order into global batches of ``batch_size * world_size``
rows and gives rank r the r-th ``batch_size`` rows of each. The last, short global batch is cut
into ``world_size`` equal parts (the fewer than ``world_size`` rows left over are skipped), so
every rank takes the same number of steps and a DDP step averages equally sized batches, as one
process would; with one process it is the whole rest. ``drop_last`` skips the short batch.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline.data.views import uniforms_batch


def permutation(num_rows: int, *, key: Sequence[int]) -> np.ndarray:
    """A permutation of ``range(num_rows)`` (int64) that depends on ``key`` only."""
    return np.random.default_rng(list(key)).permutation(num_rows).astype(np.int64)


def windowed_permutation(num_blocks: int, block_rows: Callable[[int], tuple[int, int]], *, width: int,
                         key: Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Block-shuffled order: ``(order, windows)`` with ``windows[j]`` the block ids of window j."""
    rng = np.random.default_rng(list(key))
    blocks = rng.permutation(num_blocks)
    windows = [blocks[i:i + width] for i in range(0, num_blocks, width)]
    rows = [np.concatenate([np.arange(*block_rows(int(b))) for b in w]) for w in windows]
    return np.concatenate([rng.permutation(r) for r in rows]).astype(np.int64), windows


def rank_slices(num_rows: int, *, batch_size: int, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> list[tuple[int, int]]:
    """``(start, stop)`` positions in the order of this rank's batches (the module's rule)."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"batch_size/rank/world_size: expected >= 1 and 0 <= rank < world_size, "
                         f"found {batch_size}/{rank}/{world_size}")
    global_batch = batch_size * world_size
    full, rest = divmod(num_rows, global_batch)
    out = [(i * global_batch + rank * batch_size, i * global_batch + (rank + 1) * batch_size) for i in range(full)]
    share = rest // world_size
    if share and not drop_last:
        start = full * global_batch + rank * share
        out.append((start, start + share))
    return out


class RankBatches:
    """This rank's batches of row indices for one epoch; ``len`` works, and iterating again
    yields the same batches (a DataLoader's ``batch_sampler``).

    ``start`` (streaming) is called when an iteration begins and returns a function that is
    given each batch's last position in the order before the batch is yielded, so the reader
    can make that row's window readable first."""

    def __init__(self, order: np.ndarray, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, start: Callable[[], Callable[[int], None]] | None = None) -> None:
        self.order = order
        self.slices = rank_slices(len(order), batch_size=batch_size, rank=rank, world_size=world_size,
                                  drop_last=drop_last)
        self.start = start

    def __len__(self) -> int:
        return len(self.slices)

    def __iter__(self) -> Iterator[np.ndarray]:
        before = self.start() if self.start is not None else None
        for lo, hi in self.slices:
            if before is not None:
                before(hi - 1)
            yield self.order[lo:hi]


def shuffled_batches(num_rows: int, *, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                     drop_last: bool = False) -> RankBatches:
    """A teacher's batches for ``epoch``: ``permutation(key=(seed, epoch))`` split by ``RankBatches``."""
    return RankBatches(permutation(num_rows, key=(seed, epoch)), batch_size=batch_size, rank=rank,
                       world_size=world_size, drop_last=drop_last)


VIEW_SCHEDULES = ("cycle", "random")
_SCHEDULE_KEY = 1 << 40   # the schedule's stream is that of "view" 2**40 + epoch: no view of a store uses it


class ViewSchedule:
    """Which cached view each row of the split takes in each epoch.

    - ``cycle``: every row takes view ``epoch mod V`` (the students of a store before schedules);
    - ``random``: row ``i`` takes ``floor(u * V)``, ``u`` a uniform of the keyed stream of
      (``seed``, sample_id ``i``, 2**40 + ``epoch``) (``pipeline.data.views.uniforms_batch``): every view
      0..V-1 (view 0, the evaluation view, included) equally likely, drawn afresh per epoch and sample,
      a pure function of the run's seed. Over E epochs a row meets about ``V * (1 - (1 - 1/V)**E)``
      distinct views (E = 30, V = 64: 24.1; with ``cycle``: min(E, V)).

    ``views(epoch)`` is an int64 array [N]: the view of every row, the same in every process.
    """

    def __init__(self, kind: str, *, num_views: int, seed: int, sample_ids: Sequence[int] | np.ndarray) -> None:
        if kind not in VIEW_SCHEDULES:
            raise ValueError(f"view_schedule: expected {' or '.join(VIEW_SCHEDULES)}, found {kind!r}")
        self.kind, self.num_views, self.seed = kind, int(num_views), int(seed)
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self._last: tuple[int, np.ndarray] | None = None

    @property
    def one_view_per_epoch(self) -> bool:
        """Whether an epoch's rows all take one view (a streamed cache serves one view at a time)."""
        return self.kind == "cycle" or self.num_views == 1

    def views(self, epoch: int) -> np.ndarray:
        if self._last is None or self._last[0] != epoch:
            if self.kind == "cycle":
                out = np.full(len(self.sample_ids), epoch % self.num_views, dtype=np.int64)
            else:
                u = uniforms_batch(self.seed, self.sample_ids, view=_SCHEDULE_KEY + int(epoch), n=1)[:, 0]
                out = np.minimum((u * self.num_views).astype(np.int64), self.num_views - 1)
            self._last = (int(epoch), out)
        return self._last[1]
