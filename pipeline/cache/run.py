"""Who computes which blocks: this process (with a progress bar), a shard of an array job, or a
dask.distributed cluster; then the store is finalized by whoever finds every marker set.

    kdcache cache ... --shard 3/8                 # SLURM array job: every 8th block, from the 4th
    kdcache cache ... --local-workers 4           # a LocalCluster of 4 processes on this machine
    kdcache cache ... --scheduler tcp://host:8786 # an existing cluster (start workers with --nthreads 1)

Two jobs given the same blocks (the same --shard twice, two reruns at once) split them: a job
claims each block before computing it and skips blocks another live job holds, coming back to
them once at the end (``pipeline.cache.claims``). A dead job's claims are taken over.

With --scheduler the workers must see the store, the checkpoint and the manifest under the same
absolute paths (a shared filesystem). One dask task per (view, block). A worker builds the teacher once (the first task it runs) and
keeps it, with the store handles, for the next tasks; it writes its own blocks, so no logits
travel back to the client. Metadata is created by the client before any task is submitted.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import faults
from pipeline.cache.claims import DEFAULT_STALE_AFTER, Claims, clear_claims
from pipeline.cache.teacher import BlockComputer, ComputerFactory
from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.writer import BlockWriter, CacheResult, Provenance, finalize, open_or_create

COMPUTED, DONE, CLAIMED = "computed", "done", "claimed"

log = logging.getLogger(__name__)
_WORKER_STATE: dict[Any, tuple[Any, Any, Any]] = {}
_WORKER_LOCK = threading.Lock()


def _progress(writer_layout: schema.Layout, units: list[tuple[int, int]], progress: bool, desc: str) -> tqdm:
    rows = sum(b - a for a, b in (writer_layout.block_rows(block) for _, block in units))
    # Batch-job logs (no terminal) get a line every 30 s instead of a bar redrawn ten times a second.
    return tqdm(total=rows, unit="rows", unit_scale=True, desc=desc, disable=not progress, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


def _marked(writer: BlockWriter, view: int, block: int) -> bool:
    return bool(writer.arrays["done"][view, block])      # read afresh: another job may have set it


def claim_and_compute(writer: BlockWriter, claims: Claims, *, view: int, block: int,
                      computer: Callable[[], BlockComputer]) -> tuple[str, int]:
    """Claim (view, block), compute and write it, release the claim; returns (outcome, rows written).

    Outcomes: ``COMPUTED``; ``DONE`` (its marker is set: nothing to do); ``CLAIMED`` (another live
    job holds it, or took it over from us before we wrote: come back later). ``computer()``
    gives the block computer (built on first use). The marker is read again after the claim
    is taken: the job that held the claim before may have finished the block meanwhile.
    """
    if _marked(writer, view, block):
        return DONE, 0
    if not claims.acquire(view, block):
        return CLAIMED, 0
    try:
        if _marked(writer, view, block):
            claims.release(view, block)
            return DONE, 0
        start, stop = writer.layout.block_rows(block)
        logits = np.asarray(computer()(view, start, stop), dtype=np.float32)
        if not claims.holds(view, block):      # judged stale and taken over while we computed
            claims.abandon(view, block)
            return CLAIMED, 0
        writer.write(view, block, logits)
    except BaseException:
        claims.abandon(view, block)            # unmarked: any job may take the block over now
        raise
    faults.point("block")
    claims.release(view, block)                # only after the marker
    return COMPUTED, stop - start


def run_local(writer: BlockWriter, factory: ComputerFactory, units: list[tuple[int, int]], *,
              claims: Claims | None = None, progress: bool = True) -> int:
    """Compute ``units`` in this process, skipping blocks other live jobs hold and coming back to
    them once at the end (done by then, or taken over when their job died); returns how many
    were computed here. Blocks still held by a live job are left to it."""
    if not units:
        return 0
    own = claims is None
    claims = claims or Claims(writer.store)
    built: list[BlockComputer] = []

    def computer() -> BlockComputer:
        if not built:
            built.append(factory.build())
        return built[0]

    computed = 0
    try:
        with _progress(writer.layout, units, progress, f"cache {writer.store.name}") as bar:
            later = []
            for view, block in units:
                outcome, rows = claim_and_compute(writer, claims, view=view, block=block, computer=computer)
                computed += outcome == COMPUTED
                bar.update(rows)
                if outcome == CLAIMED:
                    later.append((view, block))
            left = 0
            for view, block in later:
                outcome, rows = claim_and_compute(writer, claims, view=view, block=block, computer=computer)
                computed += outcome == COMPUTED
                left += outcome == CLAIMED
                bar.update(rows)
    finally:
        if own:
            claims.close()
    if left:
        log.info("%s: %d blocks left to the live jobs that hold them", writer.store, left)
    return computed


def _dask_unit(store: str, created: str, *, factory: ComputerFactory, job: str, stale_after: float, view: int,
               block: int) -> tuple[str, int]:
    """Runs on a worker: claim, compute and write one block with this worker's teacher."""
    key = (store, created, factory, job, stale_after)
    with _WORKER_LOCK:  # one block at a time per worker process: one teacher, one set of threads
        if key not in _WORKER_STATE:
            for _, _, old in _WORKER_STATE.values():
                old.close()
            _WORKER_STATE.clear()
            # The job id names this worker's claims: its pid tells a stale one from a live one.
            _WORKER_STATE[key] = (BlockWriter(store), [], Claims(store, job=f"{job}-{os.getpid()}",
                                                               stale_after=stale_after))
        writer, built, claims = _WORKER_STATE[key]

        def computer() -> BlockComputer:
            if not built:
                built.append(factory.build())
            return built[0]

        return claim_and_compute(writer, claims, view=view, block=block, computer=computer)


def run_dask(store: Path, factory: ComputerFactory, units: list[tuple[int, int]], *, scheduler: str | None = None,
             local_workers: int | None = None, progress: bool = True,
             stale_after: float = DEFAULT_STALE_AFTER) -> int:
    """One task per unit on a dask.distributed cluster, then one more round for the blocks other
    live jobs held; returns how many were computed by this run.

    A worker that dies mid-block leaves the block unmarked and its claim stale (its pid is
    gone), so the task retried elsewhere, or a rerun, takes the claim over and computes it.
    """
    if not units:
        return 0
    try:
        from distributed import Client, KilledWorker, LocalCluster, as_completed
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
    computed = 0
    try:
        with _progress(writer.layout, units, progress, f"cache {store.name} (dask)") as bar:
            todo = units
            for round_ in range(2):
                futures = [client.submit(_dask_unit, str(store), created, factory=factory, job=token,
                                         stale_after=stale_after, view=view, block=block, pure=False,
                                         key=f"kdcache-block-{token}-{round_}-{view}-{block}", retries=0)
                           for view, block in todo]
                unit_of = {fut.key: unit for fut, unit in zip(futures, todo)}
                later = []
                for fut in as_completed(futures):
                    try:
                        outcome, rows = fut.result()
                    except KilledWorker as err:
                        view, block = unit_of[fut.key]
                        raise UserError(f"{store}: dask workers died computing view {view} block {block} ({err}); "
                                        "blocks with markers are kept: rerun the same command to compute the "
                                        "missing ones") from None
                    computed += outcome == COMPUTED
                    bar.update(rows)
                    if outcome == CLAIMED:
                        later.append(unit_of[fut.key])
                todo = later
                if not todo:
                    break
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return computed


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
                progress: bool = True, stale_after: float = DEFAULT_STALE_AFTER) -> CacheResult:
    """Create/reopen ``out``, compute this run's missing blocks, finalize when every marker is set.

    ``shard=(i, n)`` takes every n-th (view, block) unit; ``scheduler``/``local_workers`` run one
    dask task per block (each worker builds the computer once with ``factory``). Every block is
    claimed before it is computed (``pipeline.cache.claims``), so jobs given the same blocks
    (the same shard twice, two reruns at once) split them; a claim whose job died is taken over
    at once on the same host, and after ``stale_after`` seconds without a heartbeat from
    another host. Whoever finds the store complete removes the claims folder.
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
        computed = run_dask(out, factory, todo, scheduler=scheduler, local_workers=local_workers, progress=progress,
                            stale_after=stale_after)
    else:
        claims = Claims(out, stale_after=stale_after)
        try:
            computed = run_local(writer, factory, todo, claims=claims, progress=progress)
        finally:
            claims.close()
    result = finalize(out)
    if result.complete:
        clear_claims(out)          # every marker is set: what is left are claims of finished or dead jobs
    result.computed = computed
    return result
