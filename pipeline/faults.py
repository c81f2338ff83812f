"""Deterministic fault injection: make a run die at a named point, for testing crash recovery.

    KDCACHE_FAULT=block:3 kdcache cache ...                  # dies right after the third block it writes
    KDCACHE_FAULT=epoch:2:interrupt kdcache train-teacher ...  # Ctrl-C right after epoch 2's checkpoint

The environment variable ``KDCACHE_FAULT=<point>:<count>[:<action>]`` names a point and a
count: when this process reaches that point for the ``count``-th time, it acts there. The
count is per process and starts at the first call made while the variable is set (a resumed
run counts its own epochs from 1; every dask worker or ``--shard`` job counts its own blocks).

Points (each reached from exactly one place in the code):

- ``block``: after a block's data and its done marker are written (``pipeline.cache.run``).
- ``marker``: between a block's data and its done marker (``pipeline.store.writer``).
- ``finalize``: in ``finalize``, after every check, before ``status.complete`` is written.
- ``epoch``: after an epoch's checkpoint is written (``pipeline.train.loop.fit``, every rank).
- ``checkpoint``: while a checkpoint is written, after its temporary file is complete (and
  fsynced), before it replaces the target (``pipeline.checkpoint.save_checkpoint``).

Actions: ``kill`` (the default) sends the process SIGKILL, a hard crash with nothing flushed
or cleaned up; ``interrupt`` raises ``KeyboardInterrupt`` where the point is, as Ctrl-C does
(so ``finally`` blocks and the CLI's interrupt hint run). A malformed value is a ``UserError``
naming the variable, raised at the first point reached. With the variable unset, ``point`` is
one environment lookup.

In code: ``faults.point("block")``; tests call ``faults.reset()`` to start the counts afresh.
"""

from __future__ import annotations

import os
import signal

from pipeline.errors import UserError

VARIABLE = "KDCACHE_FAULT"
POINTS = ("block", "marker", "finalize", "epoch", "checkpoint")
ACTIONS = ("kill", "interrupt")

_counts: dict[str, int] = {}


def parse(value: str) -> tuple[str, int, str]:
    """``"block:3"`` -> ``("block", 3, "kill")``; a malformed value is a UserError naming the variable."""
    parts = value.strip().split(":")
    expected = f"{VARIABLE}: expected <point>:<count>[:kill|interrupt]"
    if len(parts) not in (2, 3):
        raise UserError(f"{expected}, found {value!r}")
    name, count, action = parts[0], parts[1], parts[2] if len(parts) == 3 else "kill"
    if name not in POINTS:
        raise UserError(f"{expected} with <point> one of {', '.join(POINTS)}, found {value!r}")
    if not count.isdigit() or int(count) < 1:
        raise UserError(f"{expected} with <count> a positive integer, found {value!r}")
    if action not in ACTIONS:
        raise UserError(f"{expected}, found action {action!r} in {value!r}")
    return name, int(count), action


def point(name: str) -> None:
    """Count one arrival at ``name``; die here when ``KDCACHE_FAULT`` names this arrival."""
    value = os.environ.get(VARIABLE)
    if not value:
        return
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {POINTS}")
    target, count, action = parse(value)
    _counts[name] = _counts.get(name, 0) + 1
    if name != target or _counts[name] != count:
        return
    if action == "interrupt":
        raise KeyboardInterrupt(f"{VARIABLE}={value}")
    os.kill(os.getpid(), signal.SIGKILL)


def count(name: str) -> int:
    """How many times this process reached ``name`` while the variable was set."""
    return _counts.get(name, 0)


def reset() -> None:
    """Forget every count (for tests that inject faults in their own process)."""
    _counts.clear()
