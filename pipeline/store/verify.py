"""``kdcache verify STORE``: is a cache complete and consistent? Non-zero exit when it is not.

    kdcache verify caches/train/ce.zarr
    kdcache verify --sample-rows 0 --no-checksums caches/train/ce.zarr     # markers, files, NaN only
    python -c "from pipeline.store.verify import verify_store; print(verify_store('caches/train/ce.zarr'))"

Checks: format and attrs; every array's shape, dtype and chunks against the layout; every done
marker; a chunk file for every (array, view, block); the CRC-32 of every data chunk against the
one written with it (each mismatch listed with its array, view and block) and of sample_id and
label; NaN/Inf anywhere in the stored values (every block is read once, from its chunk files);
index ranges; and a recomputation of entropy, p_gt and pred from a sample of stored logits.
A store of mixed views also has its partners and lambdas (``mix_partner``, ``mix_lambda``) checked:
sample ids of the split, lambdas in [0, 1], view 0 unmixed (whether they are the ones its views spec
gives is ``kdcache verify --teacher``'s to say: the views are data code); and its codec checks the
p_gt of the mixed rows as the mixed label's probability ``lam * p[y] + (1 - lam) * p[y_partner]``
as exactly as it checks an unmixed one (dense: recomputed; top-k: exact where both labels are
kept, bounded where not; sampled at T_s = 1: within 1/k of the draws' shares, else its range).
Stored values were computed from the teacher's float32 logits, and the stored logits are rounded
to the store dtype, so recomputations are compared within the bound that rounding allows; what
a block's rows are checked against is its codec's ``check`` (``pipeline.store.codecs``: dense
logits within half an ulp or half a quantization step, propagated; top-k within the bounds its
values and logsumexp imply; sampled class ids and counts, p_gt within 1/k of the draws' share at
T_s = 1, and the ranges of entropy, p_gt and pred).

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
from pipeline.store import schema
from pipeline.store.location import store_path, zarr_store
from pipeline.store.chunks import array_signature, raw_meta, read_small
from pipeline.store.codecs import Codec
from pipeline.store.provenance import changed_teachers

def check_complete(store: str | Path) -> tuple[dict, schema.Layout]:
    """For readers: the attrs and layout of a complete store; ``UserError`` naming what is missing."""
    attrs = schema.read_attrs(store)
    layout = schema.Layout.from_attrs(attrs)
    if not attrs["status"].get("complete"):
        raise UserError(f"{store}: field status.complete: expected true, found false (incomplete cache: "
                        "rerun `kdcache cache` for it, then `kdcache verify`)")
    path, group = store_path(store), None
    for name, want in layout.arrays().items():  # array metadata edited by hand: a reader would misread the chunks
        found = array_signature(path, name)
        if found is None:                        # not kdcache's raw encoding: ask zarr
            group = group or zarr.open_group(zarr_store(path, read_only=True), mode="r")
            found = (tuple(group[name].shape), tuple(group[name].chunks), str(group[name].dtype)) \
                if name in group else None
        if found != want:
            raise UserError(f"{store}: field {name}: expected shape/chunks/dtype {want}, found {found}")
    done = read_small(path, "done", layout) if raw_meta(path, "done") else \
        zarr.open_group(zarr_store(path, read_only=True), mode="r")["done"][:]
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
    The steps, in order (a step that finds the store unreadable ends the checks): the structure
    (attrs, every array's layout and encoding), completeness (status, markers, chunk files), the
    sample ids and labels, then every block once: its chunks' checksums, finite values and its
    codec's content checks; last, the summary's counts.
    """
    if isinstance(sample_rows, bool) or not isinstance(sample_rows, int) or sample_rows < 0:
        raise UserError(f"--sample-rows: expected an integer >= 0 (0: no recomputation), found {sample_rows!r}")
    store = store_path(store)
    attrs = schema.read_attrs(store)
    report = VerifyReport(store)
    for line in changed_teachers(attrs, store=store):  # not damage to the store: said, not listed as a problem
        warnings.warn(line, stacklevel=2)
    opened = _check_structure(store, attrs, report)
    if opened is None:
        return report
    lay, arrays = opened
    done, holes = _check_completeness(store, attrs, lay, arrays, report)
    label = _check_ids(attrs, lay, arrays, holes, report, checksums=checksums)
    scan = _BlockScan(store, lay, arrays, report, label, checksums=checksums, sample_rows=sample_rows,
                      rng=np.random.default_rng(seed), max_problems=max_problems)
    hole_units = {(v, b) for _, v, b in holes}
    for v, b in lay.units():
        if done[v, b] and (v, b) not in hole_units and (None, b) not in hole_units:
            scan.block(v, b)
    checked = f"{report.chunks_checked} chunk checksums checked" if checksums else "checksums not checked"
    report.summary += f"; {checked}, {report.rows_recomputed} rows recomputed"
    return report


def _check_structure(store: Path, attrs: dict, report: VerifyReport) -> tuple[schema.Layout, dict] | None:
    """The layout the attrs describe and every array against it (shape, chunks, dtype, the raw
    encoding, the checksum array's names); None, with the problems listed, when they do not fit."""
    add = report.problems.append
    try:
        lay = schema.Layout.from_attrs(attrs)
    except (KeyError, TypeError, ValueError, UserError) as err:
        add(f"attrs: expected a complete storage/manifest/views section, found {err}")
        return None
    report.summary = (f"{lay.num_samples} samples, {lay.num_classes} classes, {lay.num_views} view(s), "
                      f"{lay.codec.describe()}{_temperature(lay.codec)}, {lay.num_blocks} block(s) of "
                      f"{lay.rows_per_block} rows")
    group = zarr.open_group(zarr_store(store, read_only=True), mode="r")
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
        return None
    names = lay.block_arrays()
    if list(arrays[schema.CHECKSUM].attrs.get("arrays", [])) != names:
        add(f"checksum.arrays: expected {names}, found {arrays[schema.CHECKSUM].attrs.get('arrays')!r}")
        return None
    return lay, arrays


def _temperature(codec: Codec) -> str:
    """`` T=<T_s>`` for a codec whose targets hold at one temperature only."""
    return "" if codec.sample_temperature is None else f" T={codec.sample_temperature:g}"


def _check_completeness(store: Path, attrs: dict, lay: schema.Layout, arrays: dict,
                        report: VerifyReport) -> tuple[np.ndarray, list[tuple[str, int | None, int]]]:
    """``status.complete``, every done marker and every chunk file; the markers and the missing chunks."""
    add = report.problems.append
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
    return done, holes


def _check_ids(attrs: dict, lay: schema.Layout, arrays: dict, holes: list[tuple[str, int | None, int]],
               report: VerifyReport, *, checksums: bool) -> np.ndarray | None:
    """sample_id and label: their CRC-32 against the attrs, unique ids, labels in range; the labels,
    or None when they cannot be trusted (changed, or out of range: no row is checked against them)."""
    add = report.problems.append
    sample_id, label = arrays["sample_id"][:], arrays["label"][:]
    trusted = True
    if checksums and not any(name in ("sample_id", "label") for name, _, _ in holes):
        found_ids = schema.ids_checksums(sample_id, label)
        for name in ("sample_id", "label"):
            expected = attrs["checksums"].get(name)
            if expected != found_ids[name]:
                shown = f"{expected:08x}" if isinstance(expected, int) else repr(expected)
                add(f"checksums.{name}: expected crc32 {shown}, found {found_ids[name]:08x} (changed after the store "
                    "was created)")
                trusted = trusted and name != "label"
    if len(np.unique(sample_id)) != lay.num_samples:
        add("sample_id: expected unique ids, found duplicates")
    if label.min(initial=0) < 0 or label.max(initial=0) >= lay.num_classes:
        add(f"label: expected values in [0, {lay.num_classes}), found [{label.min()}, {label.max()}]")
        trusted = False
    return label if trusted else None


class _BlockScan:
    """Every complete (view, block), read once from its chunk files: the CRC-32 of each chunk (all
    of them listed: they say which blocks to recompute), then, until ``max_problems`` value problems
    are listed, finite values and the codec's checks of ``sample_rows`` rows in all."""

    def __init__(self, store: Path, lay: schema.Layout, arrays: dict, report: VerifyReport, label: np.ndarray | None, *,
                 checksums: bool, sample_rows: int, rng: np.random.Generator, max_problems: int) -> None:
        self.store, self.lay, self.arrays, self.report, self.label = store, lay, arrays, report, label
        self.sample_id = arrays["sample_id"][:] if lay.mixed else None
        self.id_order = None if self.sample_id is None else np.argsort(self.sample_id, kind="stable")
        self.checksums, self.sample_rows, self.rng, self.max_problems = checksums, sample_rows, rng, max_problems
        self.expected_crc = arrays[schema.CHECKSUM][:]
        self.per_unit = max(1, -(-sample_rows // max(1, len(lay.units()))))
        self.value_problems, self.listed_all = 0, True

    def block(self, v: int, b: int) -> None:
        start, stop = self.lay.block_rows(b)
        block = self._read(v, b, stop - start)
        if self.value_problems >= self.max_problems:       # keep checking CRCs, stop listing value problems
            if self.listed_all:
                self.report.problems.append("... more problems not listed")
                self.listed_all = False
            return
        before = len(self.report.problems)
        self._check_values(block, f"view {v} rows {start}:{stop}", start, stop, v)
        self.value_problems += len(self.report.problems) - before

    def _read(self, v: int, b: int, rows: int) -> dict[str, np.ndarray]:
        """The block's arrays (its ``rows`` rows), each chunk's CRC-32 compared when checksums are on."""
        block = {}
        for i, name in enumerate(self.lay.block_arrays()):
            arr = self.arrays[name]
            data = (self.store / schema.chunk_key(name, arr.ndim, v, b)).read_bytes()
            if self.checksums:
                found_crc = zlib.crc32(data, self.lay.chunk_crc_start(name, v, b))
                want_crc = int(self.expected_crc[v, b, i])
                self.report.chunks_checked += 1
                if found_crc != want_crc:
                    self.report.problems.append(
                        f"checksum: {name} view {v} block {b}: expected crc32 {want_crc:08x}, found {found_crc:08x} "
                        "(the chunk's bytes or its place changed after it was written)")
            chunk = np.frombuffer(data, dtype=arr.dtype.newbyteorder("<"))
            block[name] = chunk.reshape((self.lay.rows_per_block,) + arr.chunks[2:])[:rows]
        return block

    def _check_mixing(self, block: dict[str, np.ndarray], where: str, start: int, stop: int,
                      view: int) -> np.ndarray | None:
        """A mixed store's partner rows of the block (None when they cannot be trusted), its problems listed."""
        partner, problems = _mixing_problems(block, self.sample_id, self.id_order, start, stop, view)
        self.report.problems.extend(f"{p} at {where}" for p in problems)
        return None if problems else partner

    def _check_values(self, block: dict[str, np.ndarray], where: str, start: int, stop: int, view: int) -> None:
        """Finite values, a mixed store's partners and lambdas, then the codec's checks of a sample of
        the block's rows."""
        add = self.report.problems.append
        finite = True
        for name, values in block.items():
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                add(f"{name}: expected finite values, found {int((~np.isfinite(values)).sum())} NaN/Inf at {where}")
                finite = False
        self.report.blocks_scanned += 1
        partner = None
        if self.lay.mixed:
            partner = self._check_mixing(block, where, start, stop, view)
            finite = finite and partner is not None
        if finite and self.sample_rows > 0 and self.label is not None:   # no labels to check rows against
            pick = np.sort(self.rng.choice(stop - start, size=min(self.per_unit, stop - start), replace=False))
            rows = {k: a[pick] for k, a in block.items()}
            labels = self.label[start:stop][pick]
            mixed = None if partner is None else (self.label[partner[pick]], rows["mix_lambda"])
            for problem in self.lay.codec.check(rows, labels, mixed):
                add(f"{problem} at {where}")
            self.report.rows_recomputed += len(pick)


def _mixing_problems(block: dict[str, np.ndarray], sample_id: np.ndarray, order: np.ndarray, start: int, stop: int,
                     view: int) -> tuple[np.ndarray, list[str]]:
    """The partner rows of a mixed store's block and the problems of its ``mix_partner``/``mix_lambda``:
    ids of the split, lambdas in [0, 1], view 0 unmixed (``order``: the argsort of ``sample_id``)."""
    problems = []
    at = np.minimum(np.searchsorted(sample_id, block["mix_partner"], sorter=order), len(order) - 1)
    partner = order[at]
    unknown = sample_id[partner] != block["mix_partner"]
    if unknown.any():
        problems.append(f"mix_partner: expected sample ids of the split, found {int(unknown.sum())} others")
    lam = block["mix_lambda"]
    if not ((lam >= 0) & (lam <= 1)).all():
        problems.append("mix_lambda: expected values in [0, 1], found values outside")
    if view == 0 and ((block["mix_partner"] != sample_id[start:stop]) | (lam != 1)).any():
        problems.append("mix_partner/mix_lambda: expected view 0 unmixed (each row its own partner, lambda 1), "
                        "found mixed rows")
    return partner, problems

