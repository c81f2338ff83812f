"""``kdcache verify STORE --teacher SPEC --rows N``: run the teacher again on sampled (view, row)
pairs of a store and compare its answers with the stored targets.

    from pipeline.cache.spot_check import spot_check
    from pipeline.teachers import teacher_source
    result = spot_check("caches/train/ce.zarr", teacher_source("models/teachers/ce.pt"), rows=64)
    print(result.line)        # caches/train/ce.zarr: teacher spot-check ok - 64 (view, row) pairs, ...
    result.ok

The pairs are a pure function of ``seed`` and the store's shape (``pick_pairs``): spread evenly over
the views (view 0 always among them) and, within a view, over its blocks. Each view's rows are
rebuilt from what the store records: the manifest (``manifest.path``, relative to the store; its
sha256 must be the recorded one and its data files must pass the manifest's own check), the split
and the view spec (``views.spec``, augmentations and mixing included: a mixed view is rebuilt from
its partner, and its p_gt is that of the mixed label), and run through the caching job's block
computer (``pipeline.cache.teacher``: the same model loading, device and precision policy).

Compared, for every storage kind: the exact float32 targets (``entropy``, ``p_gt``, ``pred``); for the
kinds that keep logits, each kept logit (``Codec.kept_logits``: every class of a dense or int8 store,
the k classes of a top-k one) within its storage rounding plus the recomputation's tolerance
``eps = max(1e-3, 2^-10 |z|)``. Image models get ``eps = max(2^-5, 2^-6 max_j |z_j|)`` per row: the
caching job may have run them under bf16 autocast on CUDA, and a store does not record where it
ran. A different prediction counts only when the fresh logits of the two classes differ by more than
``2 eps`` (a near-tie may fall either way). A teacher whose weights' sha256 is not the recorded one
is compared all the same, and the line says so: it is the likely cause of a mismatch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.cache.teacher import TeacherComputer, TeacherFactory
from pipeline.data import check_files
from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from pipeline.store import schema
from pipeline.store.location import store_path, zarr_store
from pipeline.store.provenance import recorded_path
from pipeline.store.stats import target_stats
from pipeline.store.verify import check_complete
from pipeline.teachers import TeacherSource

PAIR_SALT = 0x53504F54            # "SPOT": the pairs' stream, apart from any other use of the seed
DEFAULT_PAIRS = 64                # (view, row) pairs of ``kdcache verify --teacher`` without --rows
TARGETS = ("entropy", "p_gt", "pred")


@dataclass
class SpotCheck:
    """The outcome: the pairs compared, the largest logit difference, top-1 agreement, the first bad pair."""

    store: Path
    pairs: int
    max_delta: float | None          # None: the storage kind keeps no logits
    agreement: float
    problem: str | None = None       # the first bad (view, row), or None
    note: str | None = None          # the teacher is not the recorded one

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def line(self) -> str:
        delta = "n/a (no logits stored)" if self.max_delta is None else f"{self.max_delta:.4g}"
        text = (f"{self.store}: teacher spot-check {'ok' if self.ok else 'MISMATCH'} - {self.pairs} (view, row) "
                f"pairs, max |Δlogit| {delta}, top-1 agreement {self.agreement:.4g}")
        if self.problem:
            text += f"; first bad: {self.problem}"
        return text + (f"; {self.note}" if self.note else "")


def pick_pairs(num_views: int, num_samples: int, rows_per_block: int, *, count: int,
               seed: int = 0) -> list[tuple[int, np.ndarray]]:
    """``count`` distinct (view, row) pairs (all of them when there are fewer), as (view, sorted rows)
    per view: views take turns from view 0, and a view's rows go round its blocks in a random order,
    one random row of each block per round."""
    total = min(int(count), num_views * num_samples)
    rng = np.random.default_rng([int(seed), PAIR_SALT])
    per_view = [total // num_views + (v < total % num_views) for v in range(num_views)]
    out = []
    for view, n in enumerate(per_view):
        if n == 0:
            continue
        rows = rng.permutation(num_samples)
        block = rows // rows_per_block
        block_rank = rng.permutation(int(block.max()) + 1)[block]
        # a row's round: how many rows of its block come before it in the permutation
        order = np.lexsort((block_rank, _rank_within(block)))
        out.append((view, np.sort(rows[order[:n]])))
    return out


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same group."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, len(groups)]))
    rank = np.empty(len(groups), np.int64)
    rank[order] = np.arange(len(groups)) - first
    return rank


def _computer(store: Path, attrs: dict, source: TeacherSource, device: str) -> TeacherComputer:
    """The block computer of the store's manifest, split and views, with the teacher ``source``."""
    recorded = attrs["manifest"]
    path = recorded_path(recorded.get("path"), store)
    if path is None or not path.is_file():
        raise UserError(f"{store}: field manifest.path: expected the manifest the store was cached from, found no "
                        f"file at {path or recorded.get('path')!r}")
    manifest = load_manifest(path)
    if manifest.sha256 != recorded.get("sha256"):
        raise UserError(f"{store}: field manifest.sha256: expected {recorded.get('sha256')} (the manifest when "
                        f"cached), found {manifest.sha256} in {path}: the manifest changed after caching; recache "
                        "the store")
    check_files(manifest)   # a data file whose recorded hash changed is refused here, naming it
    spec = attrs["views"]["spec"]
    factory = TeacherFactory(teacher=source, manifest=str(path), split=recorded["split"],
                             views=json.dumps(spec, sort_keys=True),
                             micro_batch=int(attrs["storage"].get("micro_batch") or schema.DEFAULT_MICRO_BATCH),
                             device=device)
    return TeacherComputer(factory)


def _tolerance(z: np.ndarray, *, images: bool) -> np.ndarray:
    """Per logit, how far a recomputation of the teacher's float32 logits ``z`` [B, C] may land."""
    if images:
        row = np.maximum(2.0**-5, 2.0**-6 * np.abs(z).max(axis=1))
        return np.broadcast_to(row[:, None], z.shape)
    return np.maximum(1e-3, 2.0**-10 * np.abs(z))


def _first_problem(z: np.ndarray, stored: dict[str, np.ndarray], kept, eps: np.ndarray, labels: np.ndarray,
                   mixed: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, list[str]]:
    """Per row, whether the fresh top-1 is the stored ``pred``, and the first reason the row fails
    (empty when it passes); ``mixed``: the rows' (partner labels, lambda) of a mixed store."""
    rows = np.arange(len(z))
    fresh = target_stats(z, labels, mixed=mixed)
    why = [""] * len(z)

    def flag(bad: np.ndarray, text) -> None:
        for i in np.flatnonzero(bad):
            if not why[i]:
                why[i] = text(i)

    if kept is not None:
        classes, values, bound = kept
        z_kept = np.take_along_axis(z, classes, axis=1)
        delta = np.abs(z_kept - values)
        allowed = bound + np.take_along_axis(eps, classes, axis=1)
        worst = np.argmax(delta - allowed, axis=1)
        flag((delta > allowed).any(axis=1),
             lambda i: (f"logit of class {classes[i, worst[i]]} stored {values[i, worst[i]]:.5g}, recomputed "
                        f"{z_kept[i, worst[i]]:.5g} (tolerance {allowed[i, worst[i]]:.3g})"))
    row_eps = eps.max(axis=1)
    pred = stored["pred"].astype(np.int64)
    gap = z[rows, fresh["pred"]] - z[rows, np.clip(pred, 0, z.shape[1] - 1)]
    flag(gap > 2 * row_eps, lambda i: f"pred stored {pred[i]}, recomputed {fresh['pred'][i]}")
    # Logits within eps of each other move log p by at most 2 eps, and the entropy by at most 2 eps H.
    tol_p = stored["p_gt"] * np.expm1(3 * row_eps) + 1e-6
    flag(np.abs(fresh["p_gt"] - stored["p_gt"]) > tol_p,
         lambda i: f"p_gt stored {stored['p_gt'][i]:.5g}, recomputed {fresh['p_gt'][i]:.5g}")
    tol_h = 3 * row_eps * np.maximum(fresh["entropy"], stored["entropy"]) + 1e-5
    flag(np.abs(fresh["entropy"] - stored["entropy"]) > tol_h,
         lambda i: f"entropy stored {stored['entropy'][i]:.5g}, recomputed {fresh['entropy'][i]:.5g}")
    return fresh["pred"] == pred, why


def spot_check(store: str | Path, source: TeacherSource, *, rows: int = DEFAULT_PAIRS, seed: int = 0,
               device: str = "auto") -> SpotCheck:
    """Run ``source``'s teacher on ``rows`` (view, row) pairs of ``store`` and compare (module docstring).

    A ``UserError`` (one line) for what stops the check before any comparison: ``rows`` < 1, a store
    that is not complete, a manifest that is gone or changed, a teacher that does not fit it."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise UserError(f"--rows: expected an integer >= 1 ((view, row) pairs to recompute), found {rows!r}")
    store = store_path(store)
    attrs, layout = check_complete(store)
    computer = _computer(store, attrs, source, device)
    images = len(computer.dataset(0).input_shape) == 3
    group = zarr.open_group(zarr_store(store, read_only=True), mode="r")
    sample_id, label = group["sample_id"][:], group["label"][:]
    names = list(layout.codec.payload()) + list(TARGETS)
    pairs, deltas, agree, problem = 0, [], 0, None
    for view, picked in pick_pairs(layout.num_views, layout.num_samples, layout.rows_per_block, count=rows,
                                   seed=seed):
        stored = {name: group[name].get_orthogonal_selection((view, picked)) for name in names}
        z = computer.compute_rows(view, picked)
        kept = layout.codec.kept_logits(stored)
        if kept is not None:
            deltas.append(float(np.abs(np.take_along_axis(z, kept[0], axis=1) - kept[1]).max()))
        m = computer.dataset(view).mixing(picked, np.full(len(picked), view)) if layout.mixed else None
        mixed = None if m is None else (label[m.partner], m.lam)   # the mixing the views spec gives those rows
        same, why = _first_problem(z, stored, kept, _tolerance(z, images=images), label[picked], mixed)
        if m is not None:
            found = {name: group[name].get_orthogonal_selection((view, picked)) for name in schema.MIX_ARRAYS}
            for i in np.flatnonzero((found["mix_partner"] != sample_id[m.partner]) | (found["mix_lambda"] != m.lam)):
                why[i] = why[i] or (f"partner/lambda stored {found['mix_partner'][i]}/{found['mix_lambda'][i]:.6g}, "
                                    f"recomputed {sample_id[m.partner[i]]}/{m.lam[i]:.6g}")
        pairs, agree = pairs + len(picked), agree + int(same.sum())
        bad = [i for i, text in enumerate(why) if text]
        if bad and problem is None:
            i = bad[0]
            problem = f"view {view} row {picked[i]} (sample {sample_id[picked[i]]}): {why[i]}"
    recorded = (attrs.get("teacher") or {}).get("checkpoint_sha256")
    note = None
    if recorded and computer.teacher.sha256 != recorded:
        note = (f"the teacher's sha256 {computer.teacher.sha256[:12]} is not the recorded "
                f"teacher.checkpoint_sha256 {recorded[:12]} (another teacher?)")
    return SpotCheck(store, pairs, max(deltas) if deltas else None, agree / max(pairs, 1), problem, note)
