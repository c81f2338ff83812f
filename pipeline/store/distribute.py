"""Who computes which blocks: this process (with a progress bar) or a dask.distributed cluster.

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

from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.store.compute import ComputerFactory

_WORKER_STATE: dict[Any, tuple[Any, Any]] = {}
_WORKER_LOCK = threading.Lock()


def _progress(writer_layout, units: list[tuple[int, int]], progress: bool, desc: str) -> tqdm:
    rows = sum(b - a for a, b in (writer_layout.block_rows(block) for _, block in units))
    # Batch-job logs (no terminal) get a line every 30 s instead of a bar redrawn ten times a second.
    return tqdm(total=rows, unit="rows", unit_scale=True, desc=desc, disable=not progress, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


def run_local(writer, factory: ComputerFactory, units: list[tuple[int, int]], *, progress: bool = True) -> int:
    """Compute ``units`` in this process; returns how many were written."""
    if not units:
        return 0
    computer = factory.build()
    with _progress(writer.layout, units, progress, f"cache {writer.store.name}") as bar:
        for view, block in units:
            bar.update(writer.compute(computer, view, block))
    return len(units)


def _dask_unit(store: str, created: str, factory: ComputerFactory, view: int, block: int) -> int:
    """Runs on a worker: compute and write one block with this worker's teacher."""
    from pipeline.store.writer import BlockWriter

    key = (store, created, factory)
    with _WORKER_LOCK:  # one block at a time per worker process: one teacher, one set of threads
        if key not in _WORKER_STATE:
            _WORKER_STATE.clear()
            _WORKER_STATE[key] = (BlockWriter(store), factory.build())
        writer, computer = _WORKER_STATE[key]
        return writer.compute(computer, view, block)


def run_dask(store: Path, factory: ComputerFactory, units: list[tuple[int, int]], *, scheduler: str | None = None,
             local_workers: int | None = None, progress: bool = True) -> int:
    """One task per unit on a dask.distributed cluster; returns how many were written."""
    from pipeline.store.writer import BlockWriter

    if not units:
        return 0
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise UserError("--scheduler/--local-workers: expected the 'distributed' package, found it missing "
                        "(pip install 'kdcache[distributed]')") from None
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
    try:
        futures = [client.submit(_dask_unit, str(store), created, factory, view, block, pure=False,
                                 key=f"kdcache-block-{token}-{view}-{block}", retries=0)
                   for view, block in units]
        with _progress(writer.layout, units, progress, f"cache {store.name} (dask)") as bar:
            for fut in as_completed(futures):
                bar.update(fut.result())
    except BaseException:
        for fut in locals().get("futures", []):
            fut.cancel()
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return len(units)
