"""Who computes which blocks: this process (with a progress bar), a shard of an array job, or a
dask.distributed cluster; then the store is finalized by whoever finds every marker set.

    kdcache cache ... --shard 3/8                 # SLURM array job: every 8th block, from the 4th
    kdcache cache ... --local-workers 4           # a LocalCluster of 4 processes on this machine
    kdcache cache ... --scheduler tcp://host:8786 # an existing cluster (start workers with --nthreads 1)

With --scheduler the workers must see the store, the checkpoint and the manifest under the same
absolute paths (a shared filesystem). One dask task per (view, block). A worker builds the teacher once (the first task it runs) and
keeps it, with the store handles, for the next tasks; it writes its own blocks, so no logits
travel back to the client. Metadata is created by the client before any task is submitted.
"""

from __future__ import annotations

import logging
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import faults
from pipeline.cache.teacher import BlockComputer, ComputerFactory
from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.writer import BlockWriter, CacheResult, Provenance, finalize, open_or_create

_WORKER_STATE: dict[Any, tuple[Any, Any]] = {}
_WORKER_LOCK = threading.Lock()


def _progress(writer_layout: schema.Layout, units: list[tuple[int, int]], progress: bool, desc: str) -> tqdm:
    rows = sum(b - a for a, b in (writer_layout.block_rows(block) for _, block in units))
    # Batch-job logs (no terminal) get a line every 30 s instead of a bar redrawn ten times a second.
    return tqdm(total=rows, unit="rows", unit_scale=True, desc=desc, disable=not progress, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


def compute_block(writer: BlockWriter, computer: BlockComputer, view: int, block: int) -> int:
    """Compute one block with ``computer`` and write it; returns the number of rows."""
    start, stop = writer.layout.block_rows(block)
    writer.write(view, block, np.asarray(computer(view, start, stop), dtype=np.float32))
    faults.point("block")
    return stop - start


def run_local(writer: BlockWriter, factory: ComputerFactory, units: list[tuple[int, int]], *, progress: bool = True) -> int:
    """Compute ``units`` in this process; returns how many were written."""
    if not units:
        return 0
    computer = factory.build()
    with _progress(writer.layout, units, progress, f"cache {writer.store.name}") as bar:
        for view, block in units:
            bar.update(compute_block(writer, computer, view, block))
    return len(units)


def _dask_unit(store: str, created: str, factory: ComputerFactory, view: int, block: int) -> int:
    """Runs on a worker: compute and write one block with this worker's teacher."""
    key = (store, created, factory)
    with _WORKER_LOCK:  # one block at a time per worker process: one teacher, one set of threads
        if key not in _WORKER_STATE:
            _WORKER_STATE.clear()
            _WORKER_STATE[key] = (BlockWriter(store), factory.build())
        writer, computer = _WORKER_STATE[key]
        return compute_block(writer, computer, view, block)


def run_dask(store: Path, factory: ComputerFactory, units: list[tuple[int, int]], *, scheduler: str | None = None,
             local_workers: int | None = None, progress: bool = True) -> int:
    """One task per unit on a dask.distributed cluster; returns how many were written."""
    if not units:
        return 0
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise UserError("--scheduler/--local-workers: expected the 'distributed' package, found it missing "
                        "(pip install distributed)") from None
    writer = BlockWriter(store)
    created = str(writer.attrs.get("created"))
    cluster = None
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as err:
            raise UserError(f"--scheduler: expected a reachable dask scheduler, found none at {scheduler} ({err})") from None
    else:
        if int(local_workers) < 1:
            raise UserError(f"--local-workers: expected a positive integer, found {local_workers}")
        cluster = LocalCluster(n_workers=int(local_workers), threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.CRITICAL)
        client = Client(cluster)
    token = uuid.uuid4().hex[:8]
    futures: list = []
    try:
        futures = [client.submit(_dask_unit, str(store), created, factory, view, block, pure=False,
                                 key=f"kdcache-block-{token}-{view}-{block}", retries=0)
                   for view, block in units]
        with _progress(writer.layout, units, progress, f"cache {store.name} (dask)") as bar:
            for fut in as_completed(futures):
                bar.update(fut.result())
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return len(units)


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n (SLURM: ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)."""
    if text is None:
        return 0, 1
    if isinstance(text, tuple):
        i, n = text
    else:
        try:
            i, n = (int(part) for part in str(text).split("/"))
        except ValueError:
            raise UserError(f"--shard: expected i/n with integers (e.g. 0/4), found {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard: expected 0 <= i < n, found {i}/{n}")
    return i, n


def write_cache(out: str | Path, *, factory: ComputerFactory, provenance: Provenance, layout: schema.Layout,
                sample_id: np.ndarray, label: np.ndarray, shard: str | tuple[int, int] | None = None,
                scheduler: str | None = None, local_workers: int | None = None, overwrite: bool = False,
                progress: bool = True) -> CacheResult:
    """Create/reopen ``out``, compute this run's missing blocks, finalize when every marker is set.

    ``shard=(i, n)`` takes every n-th (view, block) unit; ``scheduler``/``local_workers`` run one
    dask task per block (each worker builds the computer once with ``factory``).
    """
    i, n = parse_shard(shard)
    if overwrite and n > 1:
        raise UserError("--overwrite: expected a single job (it would delete blocks other shards are writing), "
                        f"found --shard {i}/{n}; remove the store once before starting the array job")
    if scheduler and local_workers:
        raise UserError("--scheduler/--local-workers: expected one of them, found both")
    out = Path(out)
    attrs = open_or_create(out, provenance=provenance, layout=layout, sample_id=sample_id, label=label,
                           overwrite=overwrite)
    writer = BlockWriter(out)
    missing = set(writer.missing())
    todo = [unit for j, unit in enumerate(layout.units()) if j % n == i and unit in missing]
    if not todo and attrs["status"].get("complete"):
        return CacheResult(out, 0, 0, True, attrs["status"].get("stats"))
    if scheduler or local_workers:
        computed = run_dask(out, factory, todo, scheduler=scheduler, local_workers=local_workers, progress=progress)
    else:
        computed = run_local(writer, factory, todo, progress=progress)
    result = finalize(out)
    result.computed = computed
    return result
