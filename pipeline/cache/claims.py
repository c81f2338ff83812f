"""Block claims: which job computes a (view, block) right now, so that jobs given the same blocks
split the work instead of both doing it, and no block is ever written by two jobs at once.

    claims = Claims("caches/train/ce.zarr", job="a1b2c3d4")   # one per job (per dask worker process)
    if claims.acquire(view, block):        # False: another live job holds it (come back later)
        ...                                # re-check the marker, compute, claims.holds(...), write
        claims.release(view, block)        # only once the block's marker is written
    claims.close()                         # stops the heartbeat

Claims never decide correctness (the ``done`` markers do); they decide who does the work. The
files live in ``<store>/.claims/`` (the store's arrays are looked up by name, so the folder is
invisible to readers, ``missing_chunks`` and verify); a complete store has none (``clear``).

The rules, and why:

- Creating a claim is atomic and exclusive: its JSON (host, pid, the pid's start time, job,
  time) is written to a private temporary file, which is then hard-linked to the claim's name.
  ``os.link`` fails when the name exists, so of two jobs exactly one creates a claim, and a
  reader never sees a half-written one (``os.open(O_CREAT | O_EXCL)`` then ``write`` would
  show an empty file for a moment). In a bucket the claim is one conditional PUT
  (``If-None-Match: *``), which likewise succeeds for exactly one job
  (``pipeline.store.location.create_exclusive``); a heartbeat writes the object again, and
  ``abandon`` writes it with ``"abandoned": true`` (an object's time cannot be set back).
- A claim is *stale* when its job is gone: on the same host, its pid no longer runs (or is a
  zombie, or is another process that reused the pid); on any host, its file was not refreshed
  for ``stale_after`` seconds. A job refreshes the claims it holds (touches them) every
  ``stale_after / 4`` seconds from a daemon thread, so a slow block of a live job is never
  judged stale. Other hosts' clocks only enter through file times on the shared filesystem.
- Taking over: the claims of one block form a chain ``<view>.<block>``, ``<view>.<block>~1``,
  ``<view>.<block>~2`` ...; the current claim is the last one. A job taking over a stale
  claim of generation g creates generation g + 1, exclusively, like a first claim: two jobs
  racing to take over one stale claim cannot both win, and a takeover never removes or
  replaces anything, so it can never destroy a newer live claim (renaming the stale file away
  first could: between reading the stale claim and renaming it, another taker may already
  have put its live claim under that name).
- Claim files are removed only once the block's marker is written (``release``, ``clear``).
  A job that gives a block up without writing it (an error) ages its claim instead of removing
  it (``abandon``): the block's chain must never shrink while the block is unmarked, or a
  fresh first claim and a takeover based on an older read could both succeed.
- ``holds`` tells a job, just before it writes, whether its claim is still the current one. A
  live job is overtaken only when its heartbeat stopped for ``stale_after`` (a frozen
  process or filesystem); then it does not write. What is left is the moment between that
  check and the write: a block's bytes do not depend on who computes it and every chunk file
  is replaced atomically, so even then the chunks stay whole and identical.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.store.location import (ObjectPath, create_exclusive, is_local, list_names, modified, remove_folder,
                                     store_path, touch)

CLAIMS_DIR = ".claims"
DEFAULT_STALE_AFTER = 600.0        # seconds without a heartbeat before another job may take a claim over


@dataclass(frozen=True)
class Claim:
    """One claim file as read: its path, generation in the block's chain and content (None if unreadable)."""

    path: Path | ObjectPath
    generation: int
    info: dict[str, Any] | None


def claims_dir(store: str | Path | ObjectPath) -> Path | ObjectPath:
    return store_path(store) / CLAIMS_DIR


def _name(view: int, block: int, *, generation: int) -> str:
    return f"{view}.{block}" if generation == 0 else f"{view}.{block}~{generation}"


def _generation(path: Path | ObjectPath) -> int:
    return int(path.name.rpartition("~")[2]) if "~" in path.name else 0


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` (Linux ``/proc``, in clock ticks since boot), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` of this host runs (not a zombie) and, given ``start``, is the same process."""
    if pid <= 0:
        return False                       # no pid recorded (0 and -1 would address process groups)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                               # another user's process: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True                        # no /proc: the signal test is all there is
    fields = stat.rpartition(")")[2].split()
    if fields[0] in ("Z", "X"):
        return False                       # killed, not yet reaped by its parent
    return start is None or fields[19] == start


def _abandoned(path: Path | ObjectPath) -> bytes | None:
    """A claim object's content marked abandoned (its time cannot be set back); None for a file."""
    if is_local(path):
        return None
    try:
        info = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return json.dumps({**info, "abandoned": True}, sort_keys=True).encode()


class Claims:
    """Claims of one job on the blocks of one store (thread-safe; one heartbeat thread)."""

    def __init__(self, store: str | Path, *, job: str | None = None, stale_after: float = DEFAULT_STALE_AFTER,
                 host: str | None = None, pid: int | None = None) -> None:
        if not stale_after > 0:
            raise UserError(f"stale_after: expected a positive number of seconds, found {stale_after}")
        self.store = store_path(store)
        self.root = claims_dir(store)
        self.job = job or uuid.uuid4().hex[:12]
        self.stale_after = float(stale_after)
        self.host = host or socket.gethostname()       # whom the claims are recorded for (default: this process)
        self.pid = os.getpid() if pid is None else int(pid)
        self.start = _proc_start(self.pid)
        self._held: dict[tuple[int, int], Path | ObjectPath] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- reading ---------------------------------------------------------------------------------

    def current(self, view: int, block: int) -> Claim | None:
        """The last claim of the block's chain, or None when the block is not claimed."""
        last = None
        generation = 0
        while True:
            path = self.root / _name(view, block, generation=generation)
            try:
                text = path.read_text()
            except FileNotFoundError:
                return last
            try:
                info = json.loads(text)
            except ValueError:
                info = None                # damaged: judged by its age alone
            last = Claim(path, generation, info if isinstance(info, dict) else None)
            generation += 1

    def is_stale(self, claim: Claim) -> bool:
        """Whether the job of ``claim`` is gone (see the module docstring)."""
        try:
            age = time.time() - modified(claim.path)
        except FileNotFoundError:
            return True                    # released meanwhile: its block is marked
        if age > self.stale_after:
            return True
        info = claim.info
        if info is None:
            return False
        if info.get("abandoned"):
            return True                    # an object's time cannot be set back: ``abandon`` says so inside
        if info.get("host") == self.host:
            return not pid_alive(int(info.get("pid", -1)), info.get("start"))
        return False

    def holds(self, view: int, block: int) -> bool:
        """Whether this job's claim of the block is still the current one (no one took it over)."""
        with self._lock:
            path = self._held.get((view, block))
        if path is None or not path.exists():
            return False
        return not (self.root / _name(view, block, generation=_generation(path) + 1)).exists()

    # -- claiming --------------------------------------------------------------------------------

    def acquire(self, view: int, block: int) -> bool:
        """Claim the block: a first claim, or a takeover of a stale one; False when a live job holds it."""
        with self._lock:
            if (view, block) in self._held:
                return True
        last = self.current(view, block)
        if last is None:
            return self._create(view, block, generation=0)
        return self.take_over(last)

    def take_over(self, claim: Claim) -> bool:
        """Replace a stale ``claim`` by ours (its successor in the chain); False when it is live or
        another job took it over first. Of any number of jobs calling this with the same stale
        claim, exactly one gets True."""
        if not self.is_stale(claim):
            return False
        view, _, rest = claim.path.name.partition(".")
        block = rest.partition("~")[0]
        return self._create(int(view), int(block), generation=claim.generation + 1)

    def _create(self, view: int, block: int, *, generation: int) -> bool:
        target = self.root / _name(view, block, generation=generation)
        info = {"host": self.host, "pid": self.pid, "start": self.start, "job": self.job,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "generation": generation}
        for _ in range(3):                 # the folder may be removed by a finishing job's ``clear``
            try:                           # atomic and exclusive, with the content already whole
                if not create_exclusive(target, json.dumps(info, sort_keys=True).encode(),
                                        tmp=f".tmp-{self.job}-{uuid.uuid4().hex[:8]}"):
                    return False
            except FileNotFoundError:
                continue
            with self._lock:
                self._held[(view, block)] = target
            self._start_heartbeat()
            return True
        return False

    def release(self, view: int, block: int) -> None:
        """Remove the block's claims; call only once its marker is written (or seen set)."""
        with self._lock:
            path = self._held.pop((view, block), None)
        last = self.current(view, block)
        top = max(last.generation if last else 0, _generation(path) if path else 0)
        for generation in range(top, -1, -1):
            (self.root / _name(view, block, generation=generation)).unlink(missing_ok=True)

    def abandon(self, view: int, block: int) -> None:
        """Give the block up without writing it: age our claim so that any job may take it over now."""
        with self._lock:
            path = self._held.pop((view, block), None)
            if path is not None:
                touch(path, age_out=True, data=_abandoned(path))

    def refresh(self) -> None:
        """Touch every claim this job holds (the heartbeat; also callable directly)."""
        with self._lock:
            for path in self._held.values():
                touch(path)

    def _start_heartbeat(self) -> None:
        with self._lock:
            if self._beat is not None or self._stop.is_set():
                return
            self._beat = threading.Thread(target=self._heartbeat, name=f"kdcache-claims-{self.job}", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_after / 4):
            self.refresh()

    def close(self) -> None:
        """Stop the heartbeat (claims still held become stale after ``stale_after``)."""
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join()

    def clear(self) -> None:
        """Remove every claim of the store; only once every marker is set (the store is complete)."""
        with self._lock:
            self._held.clear()
        clear_claims(self.store)


def clear_claims(store: str | Path | ObjectPath) -> None:
    """Remove ``<store>/.claims`` file by file (a finishing job may still release its own meanwhile)."""
    root = claims_dir(store)
    try:
        names = list_names(root)
    except FileNotFoundError:
        return
    for name in names:
        (root / name).unlink(missing_ok=True)
    try:
        remove_folder(root)
    except OSError:
        pass                               # another job created a claim meanwhile: it releases it itself
