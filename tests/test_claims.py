"""Block claims: jobs on the same blocks split them, dead jobs' claims are taken over, live ones
are not, one stale claim has one taker, and a dask worker killed mid-block is recovered from.

    .venv/bin/pytest tests/test_claims.py -q            # -m "not distributed" skips the dask cluster

Jobs run as threads of this process with fake block computers that count their calls; which
job holds which block at the contested moment is fixed by events, not by timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cache import write_cache
from pipeline.cache.claims import Claims, claims_dir
from pipeline.cache.run import CLAIMED, COMPUTED, DONE, claim_and_compute
from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.verify import verify_store
from pipeline.store.writer import BlockWriter, finalize
from tests.support.stores import Recording as StoreRecording
from tests.support.stores import (FakeFactory, fake_labels, fake_provenance, make_fake_store, store_files,
                                  two_jobs_on_one_store)

N, C, V, RPB = 1000, 10, 2, 256          # 4 blocks x 2 views
LAYOUT = schema.Layout(num_samples=N, num_classes=C, num_views=V, rows_per_block=RPB, micro_batch=64)
UNITS = LAYOUT.units()


Recording = partial(StoreRecording, num_classes=C, rows_per_block=RPB)   # Recording(calls, first=None)


def _cache(store: Path, factory, **kw):
    return write_cache(store, factory=factory, provenance=fake_provenance(N, C, V), layout=LAYOUT,
                       sample_id=np.arange(N, dtype=np.int64) * 3 + 7, label=fake_labels(N, C), progress=False, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """The files of a clean single-job run."""
    store = tmp_path_factory.mktemp("ref") / "ref.zarr"
    make_fake_store(store, num_samples=N, num_classes=C, views=V, rows_per_block=RPB, micro_batch=64)
    return store_files(store)


def _unmark(store: Path, *units: tuple[int, int]) -> None:
    """As if the job computing ``units`` had died before their markers (their data half there)."""
    group = zarr.open_group(str(store), mode="r+")
    for view, block in units:
        group["done"][view, block] = False
        group["logits"][view, block * RPB:(block + 1) * RPB] = np.zeros((min(RPB, N - block * RPB), C), np.float16)
    group.attrs["status"] = {"complete": False}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_two_jobs_on_the_same_blocks_compute_each_block_once(tmp_path, reference):
    store = tmp_path / "s.zarr"
    a_calls, b_calls, results = two_jobs_on_one_store(lambda factory: _cache(store, factory), Recording, wait=60)
    assert a_calls[0] == (0, 0) and b_calls[0] == (0, 1)          # B skipped the block A held
    assert sorted(a_calls + b_calls) == UNITS                    # every block exactly once in total
    assert results["a"].computed == len(a_calls) and results["b"].computed == len(b_calls)
    assert results["a"].complete or results["b"].complete
    assert store_files(store) == reference and not claims_dir(store).exists()
    assert verify_store(store).ok


def test_a_dead_jobs_claim_is_taken_over(tmp_path, reference):
    store = tmp_path / "s.zarr"
    make_fake_store(store, num_samples=N, num_classes=C, views=V, rows_per_block=RPB, micro_batch=64)
    _unmark(store, (0, 1))
    assert Claims(store, job="dead", pid=_dead_pid()).acquire(0, 1)
    assert verify_store(store).problems and not any("claims" in p for p in verify_store(store).problems)
    calls: list = []
    result = _cache(store, Recording(calls))
    assert calls == [(0, 1)] and result.computed == 1 and result.complete
    assert store_files(store) == reference and not claims_dir(store).exists()


def test_a_live_claim_is_not_taken_over_until_it_is_old(tmp_path, reference):
    store = tmp_path / "s.zarr"
    make_fake_store(store, num_samples=N, num_classes=C, views=V, rows_per_block=RPB, micro_batch=64)
    _unmark(store, (0, 1), (1, 2))
    other = Claims(store, job="other")                       # a live job of this host (this very process)
    elsewhere = Claims(store, job="far", host="elsewhere.invalid", pid=1)
    assert other.acquire(0, 1) and elsewhere.acquire(1, 2)
    calls: list = []
    result = _cache(store, Recording(calls))
    assert calls == [] and result.computed == 0 and not result.complete and result.missing == 2
    assert other.holds(0, 1) and elsewhere.holds(1, 2)
    # The other host's job stopped refreshing its claim long ago: it is stale after stale_after.
    old = time.time() - 120
    os.utime(claims_dir(store) / "1.2", (old, old))
    result = _cache(store, Recording(calls), stale_after=60)
    assert calls == [(1, 2)] and result.computed == 1 and result.missing == 1
    assert not elsewhere.holds(1, 2)                          # it may not write now
    other.refresh()                                           # a heartbeat keeps a claim young
    assert time.time() - (claims_dir(store) / "0.1").stat().st_mtime < 60
    other.abandon(0, 1)                                       # given up without a marker: free at once
    result = _cache(store, Recording(calls))
    assert calls == [(1, 2), (0, 1)] and result.complete
    assert store_files(store) == reference and not claims_dir(store).exists()
    other.close()
    elsewhere.close()


def test_one_stale_claim_has_exactly_one_taker(tmp_path):
    store = tmp_path / "s.zarr"
    make_fake_store(store, num_samples=N, num_classes=C, views=V, rows_per_block=RPB, micro_batch=64)
    assert Claims(store, job="dead", pid=_dead_pid()).acquire(0, 1)
    a, b = Claims(store, job="a"), Claims(store, job="b")
    seen = a.current(0, 1)
    assert seen == b.current(0, 1) and seen.generation == 0 and a.is_stale(seen)
    assert a.take_over(seen) and not b.take_over(seen)         # B read the same stale claim: too late
    assert not b.acquire(0, 1) and a.holds(0, 1) and not b.holds(0, 1)
    assert json.loads((claims_dir(store) / "0.1~1").read_text())["job"] == "a"
    # Several takers at once: one winner, whatever the interleaving.
    assert Claims(store, job="dead", pid=_dead_pid()).acquire(1, 3)
    takers = [Claims(store, job=f"t{i}") for i in range(6)]
    stale = takers[0].current(1, 3)
    start, won = threading.Barrier(len(takers)), []

    def take(claims):
        start.wait()
        if claims.take_over(stale):
            won.append(claims.job)

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1 and [t.holds(1, 3) for t in takers].count(True) == 1
    for claims in (a, b, *takers):
        claims.close()


def test_an_overtaken_job_does_not_write_and_a_marked_block_is_not_recomputed(tmp_path):
    store = tmp_path / "s.zarr"
    make_fake_store(store, num_samples=N, num_classes=C, views=V, rows_per_block=RPB, micro_batch=64)
    _unmark(store, (0, 2))
    writer = BlockWriter(store)
    slow = Claims(store, job="slow", pid=_dead_pid())             # judged dead while it computes
    fast = Claims(store, job="fast")
    calls: list = []

    def overtaken():
        assert fast.acquire(0, 2)

    outcome = claim_and_compute(writer, slow, view=0, block=2, computer=Recording(calls, first=overtaken).build)
    assert outcome == (CLAIMED, 0) and calls == [(0, 2)] and not writer.arrays["done"][0, 2]
    assert claim_and_compute(writer, fast, view=0, block=2, computer=Recording(calls).build) == (COMPUTED, RPB)
    # A job whose list of missing blocks is out of date claims a block, finds its marker and writes nothing.
    late = Claims(store, job="late")
    assert claim_and_compute(writer, late, view=0, block=2, computer=Recording(calls).build) == (DONE, 0)
    assert late.current(0, 2) is None and calls == [(0, 2), (0, 2)]
    for claims in (slow, fast, late):
        claims.close()


def test_finalize_removes_only_dead_writers_partial_files(tmp_path, reference):
    """With every marker set, a live claim (its job between marker and release) means no write
    in flight: the .partial files finalize finds are dead writers', and removing them is safe."""
    store = tmp_path / "s.zarr"
    make_fake_store(store, num_samples=N, num_classes=C, views=V, rows_per_block=RPB, micro_batch=64)
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["status"] = {"complete": False}
    leftover = store / "logits" / "c.1.3.0123abcd.partial"      # a write killed before its rename
    leftover.write_bytes(b"\0" * 100)
    holder = Claims(store, job="holder")
    assert holder.acquire(1, 3)
    calls: list = []
    late = Claims(store, job="late")
    assert claim_and_compute(BlockWriter(store), late, view=1, block=3, computer=Recording(calls).build) == (DONE, 0)
    before = {k: v for k, v in store_files(store).items() if ".partial" not in k and not k.startswith(".claims")}
    assert finalize(store).complete
    assert not leftover.exists() and calls == []
    assert {k: v for k, v in store_files(store).items() if not k.startswith(".claims")} == before == reference
    holder.release(1, 3)
    holder.close()


@dataclass(frozen=True)
class Logged(FakeFactory):
    """FakeFactory whose computers append ``view block`` to a file (counts calls across processes)."""

    log: str = ""

    def build(self):
        inner, log = super().build(), self.log

        def compute(view: int, start: int, stop: int) -> np.ndarray:
            with open(log, "a") as f:
                f.write(f"{view} {start // RPB}\n")
            return inner(view, start, stop)

        compute.num_classes = self.num_classes
        return compute


@pytest.mark.distributed
def test_a_killed_dask_worker_leaves_a_claim_the_rerun_takes_over(tmp_path, reference):
    dask = pytest.importorskip("dask")
    distributed = pytest.importorskip("distributed")
    store, log = tmp_path / "s.zarr", tmp_path / "calls.log"
    factory = Logged(C, log=str(log))
    # One worker that dies (SIGKILL) at its third marker: two blocks marked, the third written without one.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                     env={"KDCACHE_FAULT": "marker:3"}) as cluster:
        with pytest.raises(UserError, match="dask workers died"):
            _cache(store, factory, scheduler=cluster.scheduler_address)
    done = zarr.open_group(str(store), mode="r")["done"][:]
    missing = [(v, b) for v, b in UNITS if not done[v, b]]
    logged = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert int(done.sum()) >= 2 and len(logged) > int(done.sum())       # a block computed, not marked
    left = sorted(set(logged) - {(v, b) for v, b in UNITS if done[v, b]})
    assert left and all(Claims(store).current(*unit) is not None for unit in left)
    calls: list = []
    result = _cache(store, Recording(calls))
    assert sorted(calls) == missing and result.complete                 # exactly the missing blocks
    assert store_files(store) == reference and not claims_dir(store).exists()


@pytest.mark.distributed
def test_a_task_retried_after_its_worker_was_killed_takes_the_claim_over(tmp_path, reference):
    distributed = pytest.importorskip("distributed")
    store, log, token = tmp_path / "s.zarr", tmp_path / "calls.log", tmp_path / "armed"

    class ArmOnce(distributed.WorkerPlugin):
        """Makes the first worker process to start (only that one, not its replacement) die at its first marker."""

        def setup(self, worker):
            try:
                os.close(os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os.environ["KDCACHE_FAULT"] = "marker:1"

    # One worker: its replacement (started by the nanny) gets the task again.
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.register_plugin(ArmOnce())
        result = _cache(store, Logged(C, log=str(log)), scheduler=cluster.scheduler_address)
    logged = sorted(tuple(map(int, line.split())) for line in log.read_text().splitlines())
    assert result.complete and result.computed == len(UNITS)
    killed = [unit for unit in UNITS if logged.count(unit) == 2]
    # A task computes every view of its block: the killed block's views again, all others once.
    assert killed and len({block for _, block in killed}) == 1 and len(logged) == len(UNITS) + len(killed)
    assert store_files(store) == reference and not claims_dir(store).exists()
