"""``kdcache verify STORE``: is a cache complete and consistent? Non-zero exit when it is not.

    kdcache verify caches/train/ce.zarr
    python -c "from pipeline.store.verify import verify_store; print(verify_store('caches/train/ce.zarr'))"

Checks: format and attrs; every array's shape, dtype and chunks against the layout; every done
marker; a chunk file for every (array, view, block); NaN/Inf anywhere in the stored values
(every block is read once); index ranges; and a recomputation of entropy, p_gt and pred from a
sample of stored logits. Stored values were computed from the teacher's float32 logits, and the
stored logits are rounded to the store dtype, so recomputations are compared within the bound
that rounding allows (half an ulp per logit, propagated); a top-k store checks the bounds its
top-k values and logsumexp imply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from pipeline.errors import UserError
from pipeline.store import schema

_UNIT_ROUNDOFF = {"float16": 2.0**-11, "float32": 2.0**-24}
_SUBNORMAL = {"float16": 2.0**-25, "float32": 2.0**-150}


def _chunk_key(name: str, shape: tuple[int, ...], view: int | None, block: int) -> str:
    coords = (block,) if len(shape) == 1 else (view, block) + (0,) * (len(shape) - 2)
    return f"{name}/c/" + "/".join(str(c) for c in coords)


def _existing_files(store: Path) -> set[str]:
    found = set()
    for root, _, files in os.walk(store):
        rel = os.path.relpath(root, store)
        for name in files:
            found.add(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return found


def missing_chunks(store: str | Path, layout: schema.Layout) -> list[tuple[str, int | None, int]]:
    """(array, view, block) for every data chunk that has no file (view None for sample_id/label)."""
    files = _existing_files(Path(store))
    holes = []
    for name, (shape, _, _) in layout.arrays().items():
        if name == "done":
            continue
        views = [None] if len(shape) == 1 else range(layout.num_views)
        for view in views:
            for block in range(layout.num_blocks):
                if _chunk_key(name, shape, view, block) not in files:
                    holes.append((name, view, block))
    return holes


def remove_partial_files(store: str | Path) -> None:
    """Temporary files of writes killed mid-way (zarr writes a ``*.partial`` file, then renames)."""
    for root, _, files in os.walk(store):
        for name in files:
            if name.endswith(".partial"):
                Path(root, name).unlink(missing_ok=True)


def check_complete(store: str | Path) -> tuple[dict, schema.Layout]:
    """For readers: the attrs and layout of a complete store; ``UserError`` naming what is missing."""
    from pipeline.store.writer import read_attrs

    attrs = read_attrs(store)
    layout = schema.Layout.from_attrs(attrs)
    if not attrs["status"].get("complete"):
        raise UserError(f"{store}: field status.complete: expected true, found false (incomplete cache: "
                        "rerun `kdcache cache` for it, then `kdcache verify`)")
    done = zarr.open_group(str(store), mode="r")["done"][:]
    if not done.all():
        v, b = np.argwhere(~done)[0]
        raise UserError(f"{store}: field done: expected every block marked, found {int((~done).sum())} unmarked "
                        f"(first: view {v} block {b})")
    holes = missing_chunks(store, layout)
    if holes:
        name, v, b = holes[0]
        raise UserError(f"{store}: field {name}: expected a chunk for every block, found {len(holes)} missing "
                        f"(first: view {v} block {b})")
    return attrs, layout


@dataclass
class VerifyReport:
    store: Path
    problems: list[str] = field(default_factory=list)
    rows_recomputed: int = 0
    blocks_scanned: int = 0
    summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.store}: {'ok' if self.ok else f'{len(self.problems)} problem(s)'} - {self.summary}"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


def verify_store(store: str | Path, *, sample_rows: int = 4096, seed: int = 0, max_problems: int = 50) -> VerifyReport:
    """Check everything listed in the module docstring; never raises for a damaged store (reports it)."""
    from pipeline.store.writer import read_attrs

    store = Path(store)
    attrs = read_attrs(store)
    report = VerifyReport(store)
    add = report.problems.append
    try:
        lay = schema.Layout.from_attrs(attrs)
    except (KeyError, TypeError, ValueError, UserError) as err:
        add(f"attrs: expected a complete storage/manifest/views section, found {err}")
        return report
    report.summary = (f"{lay.num_samples} samples, {lay.num_classes} classes, {lay.num_views} view(s), "
                      f"{lay.kind}{f' k={lay.k}' if lay.kind == 'topk' else ''} {lay.dtype}, "
                      f"{lay.num_blocks} block(s) of {lay.rows_per_block} rows")
    group = zarr.open_group(str(store), mode="r")
    arrays = {}
    for name, (shape, chunks, dtype) in lay.arrays().items():
        if name not in group:
            add(f"{name}: expected an array, found none")
            continue
        arr = group[name]
        found = (tuple(arr.shape), tuple(arr.chunks), str(arr.dtype))
        if found != (shape, chunks, dtype):
            add(f"{name}: expected shape/chunks/dtype {(shape, chunks, dtype)}, found {found}")
        else:
            arrays[name] = arr
    if report.problems:
        return report
    if not attrs["status"].get("complete"):
        add("status.complete: expected true, found false")
    done = arrays["done"][:]
    for v, b in np.argwhere(~done)[:10]:
        add(f"done: expected a marker for view {v} block {b}, found none")
    if (~done).sum() > 10:
        add(f"done: {int((~done).sum())} markers missing in all")
    holes = missing_chunks(store, lay)
    for name, v, b in holes[:10]:
        add(f"{name}: expected a chunk for view {v} block {b}, found no file")
    hole_units = {(v, b) for _, v, b in holes}
    sample_id, label = arrays["sample_id"][:], arrays["label"][:]
    if len(np.unique(sample_id)) != lay.num_samples:
        add("sample_id: expected unique ids, found duplicates")
    if label.min(initial=0) < 0 or label.max(initial=0) >= lay.num_classes:
        add(f"label: expected values in [0, {lay.num_classes}), found [{label.min()}, {label.max()}]")
    rng = np.random.default_rng(seed)
    per_unit = max(1, -(-sample_rows // max(1, len(lay.units()))))
    for v, b in lay.units():
        if not done[v, b] or (v, b) in hole_units or (None, b) in hole_units:
            continue
        if len(report.problems) >= max_problems:
            add("... more problems not listed")
            break
        start, stop = lay.block_rows(b)
        block = {name: arrays[name][v, start:stop] for name in lay.block_arrays()}
        where = f"view {v} rows {start}:{stop}"
        for name, values in block.items():
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                add(f"{name}: expected finite values, found {int((~np.isfinite(values)).sum())} NaN/Inf at {where}")
        if any(p.endswith(where) for p in report.problems[-len(block):]):
            continue
        pick = np.sort(rng.choice(stop - start, size=min(per_unit, stop - start), replace=False))
        check = _check_dense if lay.kind == "dense" else _check_topk
        for problem in check(lay, {k: a[pick] for k, a in block.items()}, label[start:stop][pick]):
            add(f"{problem} at {where}")
        report.rows_recomputed += len(pick)
        report.blocks_scanned += 1
    return report


def _bound(z_abs_max: np.ndarray, dtype: str) -> np.ndarray:
    """Largest rounding error of any stored logit of a row."""
    return z_abs_max * _UNIT_ROUNDOFF[dtype] + _SUBNORMAL[dtype]


def _check_dense(lay: schema.Layout, block: dict, labels: np.ndarray) -> list[str]:
    z = block["logits"].astype(np.float32)
    got = schema.target_stats(z, labels)
    zmax = np.abs(z).max(axis=1)
    delta = _bound(zmax, lay.dtype)
    noise = 1e-6 * (1.0 + zmax)                   # float32 arithmetic on both sides
    out = []
    bad = np.abs(got["p_gt"] - block["p_gt"]) > block["p_gt"] * np.expm1(2 * delta) * 1.5 + noise
    if bad.any():
        out.append(f"p_gt: expected the value recomputed from the stored logits, found {int(bad.sum())} rows off "
                   f"(e.g. stored {block['p_gt'][bad][0]:.6g}, recomputed {got['p_gt'][bad][0]:.6g})")
    tol_h = 6 * delta * (block["entropy"] + 1e-3) + noise * np.log(lay.num_classes + 1)
    bad = np.abs(got["entropy"] - block["entropy"]) > tol_h
    if bad.any():
        out.append(f"entropy: expected the value recomputed from the stored logits, found {int(bad.sum())} rows off "
                   f"(e.g. stored {block['entropy'][bad][0]:.6g}, recomputed {got['entropy'][bad][0]:.6g})")
    pred = block["pred"].astype(np.int64)
    if pred.min() < 0 or pred.max() >= lay.num_classes:
        return out + [f"pred: expected classes in [0, {lay.num_classes}), found [{pred.min()}, {pred.max()}]"]
    at_pred = z[np.arange(len(z)), pred]
    bad = at_pred < z.max(axis=1) - 2 * delta
    if bad.any():
        out.append(f"pred: expected an arg-max of the stored logits, found {int(bad.sum())} rows where it is not")
    return out


def _check_topk(lay: schema.Layout, block: dict, labels: np.ndarray) -> list[str]:
    values = block["topk_values"].astype(np.float32)
    index = block["topk_index"].astype(np.int64)
    lse = block["logsumexp"]
    out = []
    if index.min() < 0 or index.max() >= lay.num_classes:
        return [f"topk_index: expected classes in [0, {lay.num_classes}), found [{index.min()}, {index.max()}]"]
    if (np.diff(values, axis=1) > 0).any():
        out.append("topk_values: expected values sorted largest first, found them out of order")
    if lay.k > 1 and (np.diff(np.sort(index, axis=1), axis=1) == 0).any():
        out.append("topk_index: expected distinct classes per row, found repeats")
    if (block["pred"] != index[:, 0]).any():
        out.append("pred: expected the first top-k class, found another")
    delta = _bound(np.abs(values).max(axis=1), lay.dtype)
    slack = np.expm1(delta)[:, None] * 1.5 + 1e-6
    p = np.exp(values - lse[:, None])                       # top-k probabilities
    p_lo, p_hi = p * (1 - slack), p * (1 + slack)
    mass = p.sum(axis=1)
    if (p_lo.sum(axis=1) > 1 + 1e-5).any():
        out.append("logsumexp: expected it to cover the top-k mass (<= 1), found more")
    hit = index == labels[:, None]
    in_topk = hit.any(axis=1)
    p_gt = block["p_gt"]
    p_label = (p * hit).sum(axis=1)
    bad = in_topk & (np.abs(p_gt - p_label) > p_label * slack[:, 0] + 1e-6)
    bad |= ~in_topk & (p_gt > p_hi[:, -1] + 1e-6)
    if bad.any():
        out.append(f"p_gt: expected the value implied by top-k and logsumexp, found {int(bad.sum())} rows off")
    tail = np.clip(1.0 - mass, 0.0, 1.0)
    h_top = -(p * (values - lse[:, None])).sum(axis=1)
    rest = lay.num_classes - lay.k
    h_lo = h_top + tail * (lse - values[:, -1])
    h_hi = h_top + (-tail * np.log(np.maximum(tail, 1e-30) / rest) if rest else 0.0)
    tol = 3 * delta * (h_hi + 1) + 1e-5
    bad = (block["entropy"] < h_lo - tol) | (block["entropy"] > h_hi + tol)
    if bad.any():
        out.append(f"entropy: expected it within the bounds top-k and logsumexp imply, found {int(bad.sum())} rows outside")
    return out
