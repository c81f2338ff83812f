"""Who computes which blocks: this process (with a progress bar), a shard of an array job, or a
dask.distributed cluster; then each store is finalized by whoever finds its every marker set.

    kdcache cache ... --shard 3/8                 # SLURM array job: every 8th block, from the 4th
    kdcache cache ... --local-workers 4           # a LocalCluster of 4 processes on this machine
    kdcache cache ... --scheduler tcp://host:8786 # an existing cluster (start workers with --nthreads 1)

    write_cache(out, factory=..., provenance=..., layout=..., sample_id=ids, label=labels)   # one store
    write_caches([StoreTarget(out_a, ...), StoreTarget(out_b, ...)], factory=one_pass)      # one pass, several

Several stores of one layout (the teachers of one pass) are written in one pass: a (view, block)
unit is the same rows in every store, so it is computed once for all the stores that miss it
and written into each of them. The units of one block are computed together (``by_block``): each
image of the block is decoded once for all its views and teachers (``compute_views``), never once
per view; the stores are the same bytes either way, each view's micro-batches and forward unchanged.

Two jobs given the same blocks (the same --shard twice, two reruns at once) split them: a job
claims each block of each store before computing it and skips blocks another live job holds,
coming back to them once at the end (``pipeline.cache.claims``). A dead job's claims are taken over.

With --scheduler the teachers' checkpoints and manifests travel with the tasks (``pipeline.cache.ship``):
the workers need to reach the stores (a bucket, or a shared folder) and the data (at the caller's
absolute data root, or --worker-data-root), nothing else of the caller's disk; --no-ship-inputs has
them read every file under the caller's paths (a shared filesystem). One dask task per block (the
views of it this run computes).
A worker builds the teachers once (the first task it runs) and keeps them, with the store handles,
for the next tasks; it writes its own blocks, so no logits travel back to the client. Metadata is
created by the client before any task is submitted.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from pipeline import faults
from pipeline.cache.claims import DEFAULT_STALE_AFTER, Claims, clear_claims
from pipeline.cache.ship import read_files, ship_factory, unship
from pipeline.cache.teacher import BlockComputer, ComputerFactory, compute_views
from pipeline.data.views import ViewSpec, view_mixing
from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.location import CONDITIONAL_WRITES, exclusive_writes, store_path
from pipeline.store.writer import BlockWriter, CacheResult, Provenance, check_target, finalize, open_or_create

COMPUTED, DONE, CLAIMED = "computed", "done", "claimed"

log = logging.getLogger(__name__)
_WORKER_STATE: dict[Any, tuple[Any, Any, Any]] = {}
_WORKER_LOCK = threading.Lock()


class PassComputer(Protocol):
    def __call__(self, view: int, start: int, stop: int, members: Sequence[int]) -> list[np.ndarray]:
        """float32 logits [stop - start, num_classes] of rows [start, stop) in view ``view``, one
        array per store in ``members`` (indices into the pass's stores)."""

    def compute_views(self, views: Sequence[int], start: int, stop: int,
                      members: Sequence[int]) -> list[list[np.ndarray]]:
        """Per view of ``views``, what ``self(view, start, stop, members)`` gives, each image decoded once."""


class PassFactory(Protocol):
    def build(self) -> PassComputer:
        """Build the computer (load the teachers); called once per process or dask worker."""


@dataclass(frozen=True)
class StoreTarget:
    """One store of a pass: where it goes and what it is created with (``open_or_create``)."""

    out: Path
    provenance: Provenance
    layout: schema.Layout
    sample_id: np.ndarray
    label: np.ndarray


@dataclass(frozen=True)
class OneStore:
    """A single store's block-computer factory as the factory of a one-store pass."""

    factory: ComputerFactory

    def build(self) -> "_OneStoreComputer":
        return _OneStoreComputer(self.factory.build())


class _OneStoreComputer:
    def __init__(self, computer: BlockComputer) -> None:
        self.computer = computer

    def __call__(self, view: int, start: int, stop: int, members: Sequence[int]) -> list[np.ndarray]:
        return [self.computer(view, start, stop)]

    def compute_views(self, views: Sequence[int], start: int, stop: int,
                      members: Sequence[int]) -> list[list[np.ndarray]]:
        return [[z] for z in compute_views(self.computer, views, start, stop)]


def _progress(rows: int, progress: bool, desc: str) -> tqdm:
    # Batch-job logs (no terminal) get a line every 30 s instead of a bar redrawn ten times a second.
    return tqdm(total=rows, unit="rows", unit_scale=True, desc=desc, disable=not progress, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


def _todo_rows(writers: Sequence[BlockWriter], units: list[tuple[int, int]]) -> int:
    """Rows of ``units`` still without a marker, summed over the stores."""
    rows = 0
    for writer in writers:
        done = writer.arrays["done"][:]
        rows += sum(b - a for a, b in (writer.layout.block_rows(block) for view, block in units
                                       if not done[view, block]))
    return rows


def _desc(stores: Sequence[Path]) -> str:
    return f"cache {stores[0].name}" if len(stores) == 1 else f"cache {len(stores)} stores"


def claim_and_compute_all(writers: Sequence[BlockWriter], claims: Sequence[Claims], *, views: Sequence[int],
                          block: int, computer: Callable[[], PassComputer]) -> dict[int, list[tuple[str, int]]]:
    """Claim (view, block) of ``views`` in every store, compute the held ones in one pass (each image
    decoded once for all the views), write each into its store and release those claims; returns,
    per view, (outcome, rows written) per store.

    Outcomes: ``COMPUTED``; ``DONE`` (its marker is set: nothing to do); ``CLAIMED`` (another live
    job holds it, or took it over from us before we wrote: come back later). ``computer()``
    gives the pass computer (built on first use). A store's marker is read again after its claim
    is taken: the job that held the claim before may have finished the block meanwhile.
    """
    outcomes = {view: [(DONE, 0)] * len(writers) for view in views}
    held: list[tuple[int, int]] = []                  # (view, store)
    try:
        for view in views:
            for s, (writer, claim) in enumerate(zip(writers, claims)):
                if writer.marked(view, block):
                    continue
                if not claim.acquire(view, block):
                    outcomes[view][s] = (CLAIMED, 0)
                elif writer.marked(view, block):
                    claim.release(view, block)
                else:
                    held.append((view, s))
        if not held:
            return outcomes
        start, stop = writers[held[0][1]].layout.block_rows(block)
        todo = list(dict.fromkeys(view for view, _ in held))
        members = tuple(sorted({s for _, s in held}))
        logits = computer().compute_views(todo, start, stop, members)
        for (view, s) in list(held):
            values = logits[todo.index(view)][members.index(s)]
            if not claims[s].holds(view, block):      # judged stale and taken over while we computed
                held.remove((view, s))
                claims[s].abandon(view, block)
                outcomes[view][s] = (CLAIMED, 0)
                continue
            writers[s].write(view, block, np.asarray(values, dtype=np.float32),
                             block_mixing(writers[s].attrs, writers[s].sample_ids, view, start, stop))
            held.remove((view, s))
            faults.point("block")
            claims[s].release(view, block)            # only after the marker
            outcomes[view][s] = (COMPUTED, stop - start)
    except BaseException:
        for view, s in held:
            claims[s].abandon(view, block)            # unmarked: any job may take the block over now
        raise
    return outcomes


def block_mixing(attrs: dict[str, Any], sample_id: np.ndarray, view: int, start: int,
                 stop: int) -> dict[str, np.ndarray] | None:
    """What a store of mixed views records for rows [start, stop) of ``view`` (``schema.MIX_ARRAYS``:
    the partners' sample ids, the effective lambdas); None for a store of unmixed views. A pure
    function of the store's views spec, its sample ids (the split, in order) and the teacher's input
    size (the pixels CutMix boxes are cut in): the images its teacher answered were mixed so."""
    spec = ViewSpec.from_dict(attrs["views"]["spec"])
    if not spec.mixed:
        return None
    size = tuple(attrs["teacher"]["preprocessing"]["input_shape"][-2:])
    m = view_mixing(spec, sample_id[start:stop], np.arange(start, stop), view=view, num_rows=len(sample_id),
                    size=size)
    return {"mix_partner": np.asarray(sample_id, np.int64)[m.partner], "mix_lambda": m.lam}


def claim_and_compute(writer: BlockWriter, claims: Claims, *, view: int, block: int,
                      computer: Callable[[], BlockComputer]) -> tuple[str, int]:
    """``claim_and_compute_all`` of one view for one store and its block computer."""
    return claim_and_compute_all([writer], [claims], views=[view], block=block,
                                 computer=lambda: _OneStoreComputer(computer()))[view][0]


LOGITS_PER_PASS = 2**29   # bytes of float32 logits one compute_views call may hold (512 MiB)


def by_block(units: Sequence[tuple[int, int]], *, most: int | None = None) -> list[tuple[int, list[int]]]:
    """(block, views) for ``units`` of (view, block), blocks in first-seen order: the unit of work that
    decodes a block's images once for all its views; at most ``most`` views each (a block of many
    views of many classes is cut so that its logits fit ``LOGITS_PER_PASS``)."""
    out: dict[int, list[int]] = {}
    for view, block in units:
        out.setdefault(block, []).append(view)
    step = (most or max(len(views) for views in out.values())) if out else 1
    return [(block, views[i:i + step]) for block, views in out.items() for i in range(0, len(views), step)]


def views_per_pass(layout: schema.Layout, num_stores: int) -> int:
    """How many views of a block ``compute_views`` takes at once: its logits within ``LOGITS_PER_PASS``."""
    per_view = layout.rows_per_block * layout.num_classes * 4 * max(1, num_stores)
    return max(1, LOGITS_PER_PASS // per_view)


def run_local(writers: Sequence[BlockWriter], factory: PassFactory, units: list[tuple[int, int]], *,
              claims: Sequence[Claims], progress: bool = True) -> list[int]:
    """Compute ``units`` of every store in this process, skipping blocks other live jobs hold and
    coming back to them once at the end (done by then, or taken over when their job died);
    returns how many blocks of each store were computed here. Blocks still held by a live job
    are left to it."""
    computed = [0] * len(writers)
    if not units:
        return computed
    built: list[PassComputer] = []

    def computer() -> PassComputer:
        if not built:
            built.append(factory.build())
        return built[0]

    def one(block: int, views: list[int]) -> list[tuple[int, int]]:
        """Compute the block's views; the (view, block) units other live jobs hold."""
        held_elsewhere = []
        for view, outcomes in claim_and_compute_all(writers, claims, views=views, block=block,
                                                    computer=computer).items():
            for s, (outcome, rows) in enumerate(outcomes):
                computed[s] += outcome == COMPUTED
                bar.update(rows)
            if any(outcome == CLAIMED for outcome, _ in outcomes):
                held_elsewhere.append((view, block))
        return held_elsewhere

    with _progress(_todo_rows(writers, units), progress, _desc([w.store for w in writers])) as bar:
        most = views_per_pass(writers[0].layout, len(writers))
        later = [unit for block, views in by_block(units, most=most) for unit in one(block, views)]
        left = len([unit for block, views in by_block(later, most=most) for unit in one(block, views)])
    if left:
        log.info("%s: %d blocks left to the live jobs that hold them", ", ".join(str(w.store) for w in writers), left)
    return computed


def _dask_unit(stores: tuple[str, ...], *, factory: PassFactory, job: str, stale_after: float, views: list[int],
               block: int, payloads: dict[str, bytes]) -> dict[int, list[tuple[str, int]]]:
    """Runs on a worker: claim, compute and write the ``views`` of one block of every store with this
    worker's teachers (each image decoded once); ``payloads``: the shipped files' bytes by sha256."""
    key = (stores, factory, job, stale_after)  # job: one token per run
    with _WORKER_LOCK:  # one block at a time per worker process: one set of teachers, one set of threads
        if key not in _WORKER_STATE:
            for _, _, old in _WORKER_STATE.values():
                for claims in old:
                    claims.close()
            _WORKER_STATE.clear()
            # The job id names this worker's claims: its pid tells a stale one from a live one.
            worker_job = f"{job}-{os.getpid()}"
            _WORKER_STATE[key] = ([BlockWriter(store) for store in stores], [],
                                  [Claims(store, job=worker_job, stale_after=stale_after) for store in stores])
        writers, built, claims = _WORKER_STATE[key]

        def computer() -> PassComputer:
            if not built:
                built.append(unship(factory, payloads).build() if payloads else factory.build())
            return built[0]

        return claim_and_compute_all(writers, claims, views=views, block=block, computer=computer)


def run_dask(stores: Sequence[Path], factory: PassFactory, units: list[tuple[int, int]], *,
             scheduler: str | None = None, local_workers: int | None = None, progress: bool = True,
             stale_after: float = DEFAULT_STALE_AFTER, ship: bool = False,
             data_root: str | None = None) -> list[int]:
    """One task per unit (all stores) on a dask.distributed cluster, then one more round for the
    blocks other live jobs held; returns how many blocks of each store this run computed.

    ``ship``: the teachers' manifests and weights travel with the tasks (``pipeline.cache.ship``), for
    workers that share no filesystem with this process; ``data_root``: where they find the data.

    A worker that dies mid-block leaves the block unmarked and its claims stale (its pid is
    gone), so the task retried elsewhere, or a rerun, takes the claims over and computes it.
    """
    computed = [0] * len(stores)
    if not units:
        return computed
    try:
        from distributed import Client, KilledWorker, LocalCluster, as_completed
    except ImportError:
        raise UserError("--scheduler/--local-workers: expected the 'distributed' package, found it missing "
                        "(pip install distributed)") from None
    writers = [BlockWriter(store) for store in stores]
    names = tuple(str(store) for store in stores)
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
    payloads: dict = {}
    try:
        if ship:
            factory, files = ship_factory(factory, data_root=data_root)
            payloads = client.scatter(read_files(files)) if files else {}
        with _progress(_todo_rows(writers, units), progress, _desc(stores) + " (dask)") as bar:
            todo = units
            for round_ in range(2):
                tasks = by_block(todo, most=views_per_pass(writers[0].layout, len(writers)))
                futures = [client.submit(_dask_unit, names, factory=factory, job=token,
                                         stale_after=stale_after, views=views, block=block, payloads=payloads,
                                         pure=False,
                                         key=f"kdcache-block-{token}-{round_}-{block}", retries=0)
                           for block, views in tasks]
                task_of = {fut.key: task for fut, task in zip(futures, tasks)}
                later = []
                for fut in as_completed(futures):
                    try:
                        per_view = fut.result()
                    except KilledWorker as err:
                        block, views = task_of[fut.key]
                        raise UserError(f"{', '.join(names)}: dask workers died computing block {block} (views "
                                        f"{', '.join(map(str, views))}) ({err}); blocks with markers are kept: rerun "
                                        "the same command to compute the missing ones") from None
                    for view, outcomes in per_view.items():
                        for s, (outcome, rows) in enumerate(outcomes):
                            computed[s] += outcome == COMPUTED
                            bar.update(rows)
                        if any(outcome == CLAIMED for outcome, _ in outcomes):
                            later.append((view, task_of[fut.key][0]))
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


def write_caches(targets: Sequence[StoreTarget], *, factory: PassFactory, shard: str | tuple[int, int] | None = None,
                 scheduler: str | None = None, local_workers: int | None = None, overwrite: bool = False,
                 progress: bool = True, stale_after: float = DEFAULT_STALE_AFTER, ship: bool | None = None,
                 data_root: str | None = None) -> list[CacheResult]:
    """Check every target store, then create/reopen them, compute this run's missing blocks of all
    of them in one pass (member ``s`` of ``factory``'s computer computes ``targets[s]``), finalize
    each store whose markers are all set; one result per target.

    The targets share one layout. ``shard=(i, n)`` takes every n-th (view, block) unit;
    ``scheduler``/``local_workers`` run one dask task per block (each worker builds the computer
    once with ``factory``). Every block of every store is claimed before it is computed
    (``pipeline.cache.claims``), so jobs given the same blocks (the same shard twice, two reruns
    at once) split them; a claim whose job died is taken over at once on the same host, and
    after ``stale_after`` seconds without a heartbeat from another host. Whoever finds a store
    complete removes its claims folder. ``ship`` (default: with ``scheduler``) sends the teachers'
    files with the tasks, the data found under ``data_root`` on the workers (``run_dask``).
    """
    i, n = parse_shard(shard)
    if overwrite and n > 1:
        raise UserError("--overwrite: expected a single job (it would delete blocks other shards are writing), "
                        f"found --shard {i}/{n}; remove the store once before starting the array job")
    if scheduler and local_workers:
        raise UserError("--scheduler/--local-workers: expected one of them, found both")
    ship = bool(scheduler) if ship is None else ship
    if ship and not (scheduler or local_workers):
        raise UserError("--ship-inputs: expected --scheduler or --local-workers (a job without dask workers reads "
                        "its files itself)")
    if data_root is not None and not ship:
        raise UserError("--worker-data-root: expected inputs shipped to dask workers (--scheduler, without "
                        "--no-ship-inputs)")
    if len({target.layout for target in targets}) != 1:
        raise ValueError("write_caches: expected one layout for every target store")
    outs = [store_path(target.out) for target in targets]
    for out, t in zip(outs, targets):          # every store checked before the first one is created
        check_target(out, provenance=t.provenance, layout=t.layout, sample_id=t.sample_id, label=t.label,
                     overwrite=overwrite)
    attrs = [open_or_create(out, provenance=t.provenance, layout=t.layout, sample_id=t.sample_id, label=t.label,
                            overwrite=overwrite) for out, t in zip(outs, targets)]
    writers = [BlockWriter(out) for out in outs]
    for out in outs:
        if not exclusive_writes(out):
            log.warning("%s: %s", out, CONDITIONAL_WRITES)
    missing = [set(writer.missing()) for writer in writers]
    todo = [unit for j, unit in enumerate(targets[0].layout.units()) if j % n == i and any(unit in m for m in missing)]
    if scheduler or local_workers:
        computed = run_dask(outs, factory, todo, scheduler=scheduler, local_workers=local_workers, progress=progress,
                            stale_after=stale_after, ship=ship, data_root=data_root)
    else:
        job = uuid.uuid4().hex[:12]
        claims = [Claims(out, job=job, stale_after=stale_after) for out in outs]
        try:
            computed = run_local(writers, factory, todo, claims=claims, progress=progress)
        finally:
            for held in claims:
                held.close()
    results = []
    for out, attr, store_missing, count, writer in zip(outs, attrs, missing, computed, writers):
        if attr["status"].get("complete") and not store_missing.intersection(todo):
            results.append(CacheResult(out, 0, 0, True, attr["status"].get("stats")))
            continue
        result = finalize(out, writer=writer)
        if result.complete:
            clear_claims(out)      # every marker is set: what is left are claims of finished or dead jobs
        result.computed = count
        results.append(result)
    return results


def write_cache(out: str | Path, *, factory: ComputerFactory, provenance: Provenance, layout: schema.Layout,
                sample_id: np.ndarray, label: np.ndarray, shard: str | tuple[int, int] | None = None,
                scheduler: str | None = None, local_workers: int | None = None, overwrite: bool = False,
                progress: bool = True, stale_after: float = DEFAULT_STALE_AFTER) -> CacheResult:
    """Create/reopen ``out``, compute this run's missing blocks, finalize when every marker is set
    (``write_caches`` with one store, whose blocks ``factory``'s computer computes)."""
    target = StoreTarget(store_path(out), provenance, layout, sample_id, label)
    return write_caches([target], factory=OneStore(factory), shard=shard, scheduler=scheduler,
                        local_workers=local_workers, overwrite=overwrite, progress=progress,
                        stale_after=stale_after)[0]
