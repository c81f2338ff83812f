"""``kdcache verify STORE``: is a cache complete and consistent? Non-zero exit when it is not.

    kdcache verify caches/train/ce.zarr
    kdcache verify --sample-rows 0 --no-checksums caches/train/ce.zarr     # markers, files, NaN only
    python -c "from pipeline.store.verify import verify_store; print(verify_store('caches/train/ce.zarr'))"

Checks: format and attrs; every array's shape, dtype and chunks against the layout; every done
marker; a chunk file for every (array, view, block); the CRC-32 of every data chunk against the
one written with it (each mismatch listed with its array, view and block) and of sample_id and
label; NaN/Inf anywhere in the stored values (every block is read once, from its chunk files);
index ranges; and a recomputation of entropy, p_gt and pred from a sample of stored logits.
Stored values were computed from the teacher's float32 logits, and the stored logits are rounded
to the store dtype, so recomputations are compared within the bound that rounding allows (half
an ulp per logit, half a quantization step for int8, propagated); a top-k store checks the bounds
its top-k values and logsumexp imply; a sampled store (whose classes cannot give the exact
targets back) checks its class ids and counts (ascending distinct classes, counts summing to k)
and the ranges of entropy, p_gt and pred.

``check_complete``, the check every reader makes when it opens a store, stays cheap: markers and
file sizes only (the readers check each chunk's CRC as they read it).
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from pipeline.errors import UserError
from pipeline.store import codecs, schema
from pipeline.store.chunks import array_signature, raw_meta, read_small
from pipeline.store.provenance import changed_teachers

_UNIT_ROUNDOFF = {"float16": 2.0**-11, "float32": 2.0**-24}
_SUBNORMAL = {"float16": 2.0**-25, "float32": 2.0**-150}


def check_complete(store: str | Path) -> tuple[dict, schema.Layout]:
    """For readers: the attrs and layout of a complete store; ``UserError`` naming what is missing."""
    attrs = schema.read_attrs(store)
    layout = schema.Layout.from_attrs(attrs)
    if not attrs["status"].get("complete"):
        raise UserError(f"{store}: field status.complete: expected true, found false (incomplete cache: "
                        "rerun `kdcache cache` for it, then `kdcache verify`)")
    path, group = Path(store), None
    for name, want in layout.arrays().items():  # array metadata edited by hand: a reader would misread the chunks
        found = array_signature(path, name)
        if found is None:                        # not kdcache's raw encoding: ask zarr
            group = group or zarr.open_group(str(store), mode="r")
            found = (tuple(group[name].shape), tuple(group[name].chunks), str(group[name].dtype)) \
                if name in group else None
        if found != want:
            raise UserError(f"{store}: field {name}: expected shape/chunks/dtype {want}, found {found}")
    done = read_small(path, "done", layout) if raw_meta(path, "done") else zarr.open_group(str(store), mode="r")["done"][:]
    if not done.all():
        v, b = np.argwhere(~done)[0]
        raise UserError(f"{store}: field done: expected every block marked, found {int((~done).sum())} unmarked "
                        f"(first: view {v} block {b})")
    holes = schema.missing_chunks(store, layout)
    if holes:
        name, v, b = holes[0]
        raise UserError(f"{store}: field {name}: expected a whole chunk for every block, found {len(holes)} missing "
                        f"or damaged (first: view {v} block {b}); `kdcache verify` lists them")
    return attrs, layout


@dataclass
class VerifyReport:
    store: Path
    problems: list[str] = field(default_factory=list)
    rows_recomputed: int = 0
    blocks_scanned: int = 0
    chunks_checked: int = 0          # data chunks whose CRC-32 was compared
    summary: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.store}: {'ok' if self.ok else 'NOT OK'} - {self.summary}"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


def verify_store(store: str | Path, *, sample_rows: int = 4096, checksums: bool = True, seed: int = 0,
                 max_problems: int = 50) -> VerifyReport:
    """Check everything listed in the module docstring; never raises for a damaged store (reports it).

    ``sample_rows=0`` skips the recomputation of targets; ``checksums=False`` skips the CRC-32 pass.
    """
    if isinstance(sample_rows, bool) or not isinstance(sample_rows, int) or sample_rows < 0:
        raise UserError(f"--sample-rows: expected an integer >= 0 (0: no recomputation), found {sample_rows!r}")
    store = Path(store)
    attrs = schema.read_attrs(store)
    report = VerifyReport(store)
    for line in changed_teachers(attrs, store=store):  # not damage to the store: said, not listed as a problem
        warnings.warn(line, stacklevel=2)
    add = report.problems.append
    try:
        lay = schema.Layout.from_attrs(attrs)
    except (KeyError, TypeError, ValueError, UserError) as err:
        add(f"attrs: expected a complete storage/manifest/views section, found {err}")
        return report
    report.summary = (f"{lay.num_samples} samples, {lay.num_classes} classes, {lay.num_views} view(s), "
                      f"{lay.kind}{f' k={lay.k}' if lay.k else ''}"
                      f"{f' T={lay.temperature:g}' if lay.kind == 'sampled' else f' {lay.dtype}'}, "
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
        elif arr.compressors or arr.filters or (arr.dtype.itemsize > 1 and getattr(
                getattr(arr.serializer, "endian", None), "value", None) != "little"):
            add(f"{name}: expected uncompressed little-endian chunks (the kdcache format), found another encoding")
        else:
            arrays[name] = arr
    if report.problems:
        return report
    names = lay.block_arrays()
    if list(arrays[schema.CHECKSUM].attrs.get("arrays", [])) != names:
        add(f"checksum.arrays: expected {names}, found {arrays[schema.CHECKSUM].attrs.get('arrays')!r}")
        return report
    if not attrs["status"].get("complete"):
        add("status.complete: expected true, found false (rerun `kdcache cache` with the same arguments: "
            "it computes only the missing blocks)")
    done = arrays["done"][:]
    for v, b in np.argwhere(~done)[:10]:
        add(f"done: expected a marker for view {v} block {b}, found none")
    if (~done).sum() > 10:
        add(f"done: {int((~done).sum())} markers missing in all")
    holes = schema.missing_chunks(store, lay)
    for name, v, b in holes[:10]:
        add(f"{name}: expected a whole chunk for view {v} block {b}, found no file or a damaged one")
    if len(holes) > 10:
        add(f"chunks: {len(holes)} missing or damaged in all")
    hole_units = {(v, b) for _, v, b in holes}
    sample_id, label = arrays["sample_id"][:], arrays["label"][:]
    if checksums and not any(name in ("sample_id", "label") for name, _, _ in holes):
        found_ids = schema.ids_checksums(sample_id, label)
        for name in ("sample_id", "label"):
            expected = attrs["checksums"].get(name)
            if expected != found_ids[name]:
                shown = f"{expected:08x}" if isinstance(expected, int) else repr(expected)
                add(f"checksums.{name}: expected crc32 {shown}, found {found_ids[name]:08x} (changed after the store "
                    "was created)")
    if len(np.unique(sample_id)) != lay.num_samples:
        add("sample_id: expected unique ids, found duplicates")
    if label.min(initial=0) < 0 or label.max(initial=0) >= lay.num_classes:
        add(f"label: expected values in [0, {lay.num_classes}), found [{label.min()}, {label.max()}]")
    expected_crc = arrays[schema.CHECKSUM][:]
    rng = np.random.default_rng(seed)
    per_unit = max(1, -(-sample_rows // max(1, len(lay.units()))))
    value_problems, listed_all = 0, True
    for v, b in lay.units():
        if not done[v, b] or (v, b) in hole_units or (None, b) in hole_units:
            continue
        start, stop = lay.block_rows(b)
        where = f"view {v} rows {start}:{stop}"
        block = {}
        for i, name in enumerate(names):
            data = (store / schema.chunk_key(name, arrays[name].ndim, v, b)).read_bytes()
            if checksums:
                found_crc, want_crc = zlib.crc32(data), int(expected_crc[v, b, i])
                report.chunks_checked += 1
                if found_crc != want_crc:    # every one is listed: they say which blocks to recompute
                    add(f"checksum: {name} view {v} block {b}: expected crc32 {want_crc:08x}, found {found_crc:08x} "
                        "(the chunk changed after it was written)")
            arr = arrays[name]
            chunk = np.frombuffer(data, dtype=arr.dtype.newbyteorder("<"))
            block[name] = chunk.reshape((lay.rows_per_block,) + arr.chunks[2:])[: stop - start]
        if value_problems >= max_problems:       # keep checking CRCs, stop listing value problems
            if listed_all:
                add("... more problems not listed")
                listed_all = False
            continue
        before = len(report.problems)
        finite = True
        for name, values in block.items():
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                add(f"{name}: expected finite values, found {int((~np.isfinite(values)).sum())} NaN/Inf at {where}")
                finite = False
        report.blocks_scanned += 1
        if finite and sample_rows > 0:
            pick = np.sort(rng.choice(stop - start, size=min(per_unit, stop - start), replace=False))
            check = {"dense": _check_dense, "topk": _check_topk, "sampled": _check_sampled}[lay.kind]
            for problem in check(lay, {k: a[pick] for k, a in block.items()}, label[start:stop][pick]):
                add(f"{problem} at {where}")
            report.rows_recomputed += len(pick)
        value_problems += len(report.problems) - before
    checked = f"{report.chunks_checked} chunk checksums checked" if checksums else "checksums not checked"
    report.summary += f"; {checked}, {report.rows_recomputed} rows recomputed"
    return report


def _bound(z: np.ndarray, dtype: str) -> np.ndarray:
    """Largest rounding error of each stored logit (half an ulp of the store dtype)."""
    return np.abs(z) * _UNIT_ROUNDOFF[dtype] + _SUBNORMAL[dtype]


def _check_dense(lay: schema.Layout, block: dict, labels: np.ndarray) -> list[str]:
    # First-order bounds of how far rounding each logit z_j by delta_j moves the targets:
    # |d log p_y| <= delta_y + sum_j p_j delta_j;  |dH| <= sum_j p_j |log p_j + H| delta_j.
    if lay.dtype == "int8":
        z = codecs.dequantize_int8(block["logits_q"], block["logits_scale"], block["logits_offset"])
        delta = 0.5 * block["logits_scale"][:, None] + 2 * _bound(z, "float32")
    else:
        z = block["logits"].astype(np.float32)
        delta = _bound(z, lay.dtype)
    got = schema.target_stats(z, labels)
    rows = np.arange(len(z))
    logp = z - got["logsumexp"][:, None]
    p = np.exp(logp)
    noise = 2e-6 * (1.0 + np.abs(z).max(axis=1))                    # float32 arithmetic on both sides
    out = []
    tol_p = block["p_gt"] * np.expm1(1.5 * (delta[rows, labels] + (p * delta).sum(axis=1))) + noise
    bad = np.abs(got["p_gt"] - block["p_gt"]) > tol_p
    if bad.any():
        out.append(f"p_gt: expected the value recomputed from the stored logits, found {int(bad.sum())} rows off "
                   f"(e.g. stored {block['p_gt'][bad][0]:.6g}, recomputed {got['p_gt'][bad][0]:.6g})")
    tol_h = 1.5 * (p * np.abs(logp + got["entropy"][:, None]) * delta).sum(axis=1) + noise * np.log(lay.num_classes + 1)
    bad = np.abs(got["entropy"] - block["entropy"]) > tol_h
    if bad.any():
        out.append(f"entropy: expected the value recomputed from the stored logits, found {int(bad.sum())} rows off "
                   f"(e.g. stored {block['entropy'][bad][0]:.6g}, recomputed {got['entropy'][bad][0]:.6g})")
    pred = block["pred"].astype(np.int64)
    if pred.min() < 0 or pred.max() >= lay.num_classes:
        return out + [f"pred: expected classes in [0, {lay.num_classes}), found [{pred.min()}, {pred.max()}]"]
    bad = (z[rows, pred][:, None] + delta[rows, pred][:, None] + delta < z).any(axis=1)
    if bad.any():
        out.append(f"pred: expected an arg-max of the stored logits, found {int(bad.sum())} rows where it is not")
    return out


def _check_topk(lay: schema.Layout, block: dict, labels: np.ndarray) -> list[str]:
    # With the exact float32 logsumexp, each top-k probability p_j = exp(v_j - lse) is known up to
    # the rounding of v_j (a factor exp(+-delta_j)); the tail mass 1 - sum p_j and the entropy
    # bounds below are evaluated over those intervals.
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
    delta = 1.5 * _bound(values, lay.dtype)
    logp = values - lse[:, None]
    p = np.exp(logp)
    p_lo, p_hi = p * np.exp(-delta), p * np.exp(delta)
    if (p_lo.sum(axis=1) > 1 + 1e-5).any():
        out.append("logsumexp: expected it to cover the top-k mass (<= 1), found more")
    hit = index == labels[:, None]
    in_topk = hit.any(axis=1)
    p_gt = block["p_gt"]
    bad = in_topk & ((p_gt < (p_lo * hit).sum(axis=1) - 1e-6) | (p_gt > (p_hi * hit).sum(axis=1) + 1e-6))
    bad |= ~in_topk & (p_gt > p_hi[:, -1] + 1e-6)
    if bad.any():
        out.append(f"p_gt: expected the value implied by top-k and logsumexp, found {int(bad.sum())} rows off")
    t_lo = np.clip(1.0 - p_hi.sum(axis=1), 0.0, 1.0)
    t_hi = np.clip(1.0 - p_lo.sum(axis=1), 0.0, 1.0)
    h_top = -(p * logp).sum(axis=1)
    h_err = (p * np.abs(logp + 1) * delta).sum(axis=1) + 1e-5
    h_lo = h_top - h_err + t_lo * -np.log(p_hi[:, -1])            # every tail class is below the k-th
    rest = lay.num_classes - lay.k
    if rest:
        def g(t):                                                   # tail spread uniformly: the most entropy
            return -t * np.log(np.maximum(t, 1e-30) / rest)
        peak = np.clip(rest / np.e, t_lo, t_hi)
        h_hi = h_top + h_err + np.maximum(np.maximum(g(t_lo), g(t_hi)), g(peak))
    else:
        h_hi = h_top + h_err
    bad = (block["entropy"] < h_lo) | (block["entropy"] > h_hi)
    if bad.any():
        out.append(f"entropy: expected it within the bounds top-k and logsumexp imply, found {int(bad.sum())} rows outside")
    return out


def _check_sampled(lay: schema.Layout, block: dict, labels: np.ndarray) -> list[str]:
    index = block["sample_index"].astype(np.int64)
    count = block["sample_count"].astype(np.int64)
    out = []
    if index.min() < 0 or index.max() >= lay.num_classes:
        return [f"sample_index: expected classes in [0, {lay.num_classes}), found [{index.min()}, {index.max()}]"]
    if (count.sum(axis=1) != lay.k).any():
        out.append(f"sample_count: expected counts summing to k = {lay.k} per row, found "
                   f"{int((count.sum(axis=1) != lay.k).sum())} rows that do not")
    drawn = count > 0
    if (drawn[:, 1:] & ~drawn[:, :-1]).any() or not drawn[:, 0].all():
        out.append("sample_count: expected the drawn classes first and count-0 padding after them, found another order")
    step = np.diff(index, axis=1)
    if (step < 0).any() or ((step == 0) & drawn[:, 1:]).any():
        out.append("sample_index: expected distinct classes in ascending order, found repeats or disorder")
    if not ((block["p_gt"] >= 0) & (block["p_gt"] <= 1 + 1e-6)).all():
        out.append("p_gt: expected probabilities in [0, 1], found values outside")
    if not ((block["entropy"] >= -1e-6) & (block["entropy"] <= np.log(lay.num_classes) + 1e-5)).all():
        out.append(f"entropy: expected values in [0, log {lay.num_classes}], found values outside")
    pred = block["pred"].astype(np.int64)
    if pred.min() < 0 or pred.max() >= lay.num_classes:
        out.append(f"pred: expected classes in [0, {lay.num_classes}), found [{pred.min()}, {pred.max()}]")
    return out
