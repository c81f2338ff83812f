"""Which samples to look at: rankings of the cached teachers' doubts, streamed block by block.

    from pipeline.inspect_rank import rank_samples
    ranked = rank_samples(["caches/train/ce.zarr", "caches/train/mlp.zarr"], view=0, top=16, per_class=4)
    ranked.rows["contradicted"]          # store rows, best first: every teacher contradicts the label
    ranked.by_class["uncertain"][3]      # the most uncertain samples labelled 3
    ranked.details(rows)                 # sample_id, label, each teacher's pred, p_gt and entropy

Rankings of one cached view (``view``; 0 is the plain evaluation view), over the teachers' stored
``pred``, ``p_gt`` and ``entropy`` (exact values, every storage kind). With a store of mixed views
only view 0, which is never mixed, is ranked (``check_view``): a mixed view is the image of two
samples, so its label is half the story and its thumbnail (one sample's view) not what the
teacher saw.

- ``contradicted``: samples whose label every teacher predicts against, the lowest largest
  ``p_gt`` first (the best any teacher thinks of the label); candidates for label errors.
- ``disagree`` (two teachers or more): the largest fraction of teachers that differ from the most
  common prediction, then the largest spread of ``p_gt`` between teachers; samples on which every
  teacher predicts the same class are not ranked.
- ``uncertain``: the highest mean entropy over the teachers.

Only the best ``top`` rows of each ranking, and ``per_class`` rows per label, are kept while the
blocks stream by (a top-N merge per block), so memory does not grow with the store. Ties go to
the lower row.

``label_issue_ranks`` ranks label issues with cleanlab (extra ``[labels]``) on the teachers'
probabilities of that view, averaged over the teachers (``how="mean"``) or per teacher
(``how="each"``). cleanlab needs every sample's probabilities at once: [N, C] float32 in memory
(one array per teacher with ``each``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import zarr

from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.reader import check_checksums
from pipeline.store.verify import check_complete

RANKINGS = ("contradicted", "disagree", "uncertain")   # the order of the report's galleries
LABEL_ISSUE_MODES = ("mean", "each")
INSTALL_CLEANLAB = "pip install 'kdcache[labels]' (or: pip install cleanlab)"


def check_ranking_options(*, view: int, top: int, per_class: int, num_views: int | None = None,
                          mixed: bool = False) -> None:
    """UserError, naming the option, for a view the stores cannot rank (``check_view``) or a negative count."""
    if top < 1:
        raise UserError(f"--top: expected an integer >= 1, found {top}")
    if per_class < 0:
        raise UserError(f"--per-class: expected an integer >= 0, found {per_class}")
    check_view(view, num_views, mixed=mixed)


def check_view(view: int, num_views: int | None = None, *, mixed: bool = False) -> None:
    """UserError, naming ``--view``, for a view outside the stores, or past view 0 when a store's views
    are mixed: a mixed view's image and p_gt are of two samples, its thumbnail would show one and its
    label could be contradicted by a teacher that sees the partner's class."""
    if view < 0 or (num_views is not None and view >= num_views):
        bound = f"0 <= view < {num_views}" if num_views is not None else "an integer >= 0"
        raise UserError(f"--view: expected {bound} (the stores' cached views), found {view}")
    if mixed and view != 0:
        raise UserError(f"--view: expected 0 with stores of mixed views (views >= 1 mix two samples: no one label "
                        f"to rank against), found {view}")


def block_scores(pred: np.ndarray, p_gt: np.ndarray, *, entropy: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
    """Each ranking's score of a block's rows (higher first; -inf: not ranked) from [T, n] arrays."""
    teachers = len(pred)
    wrong = pred != label[None, :]
    scores = {"uncertain": entropy.astype(np.float64).mean(axis=0)}
    if teachers > 1:
        majority = np.max([(pred == p).sum(axis=0) for p in pred], axis=0)
        frac = (teachers - majority) / teachers                     # steps of 1 / T
        spread = p_gt.max(axis=0).astype(np.float64) - p_gt.min(axis=0)
        # lexicographic: the fraction first, the spread (< 1 / T after scaling) breaks its ties
        scores["disagree"] = np.where(frac > 0, frac + spread / (teachers + 1), -np.inf)
    scores["contradicted"] = np.where(wrong.all(axis=0), 1.0 - p_gt.max(axis=0).astype(np.float64), -np.inf)
    return scores


@dataclass
class TopN:
    """The ``n`` best rows seen so far (score descending, then row ascending), and the ``m`` best per class."""

    n: int
    m: int
    scores: np.ndarray = field(default_factory=lambda: np.empty(0))
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    classes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    class_scores: np.ndarray = field(default_factory=lambda: np.empty(0))
    class_rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    class_of: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def add(self, scores: np.ndarray, rows: np.ndarray, *, classes: np.ndarray) -> None:
        keep = np.isfinite(scores)
        scores, rows, classes = scores[keep], rows[keep], classes[keep]
        s, r, c = (np.concatenate(x) for x in ((self.scores, scores), (self.rows, rows), (self.classes, classes)))
        if len(s) > self.n:  # only rows at or above the n-th best score can stay
            cut = s >= -np.partition(-s, self.n - 1)[self.n - 1]
            s, r, c = s[cut], r[cut], c[cut]
        order = np.lexsort((r, -s))[: self.n]
        self.scores, self.rows, self.classes = s[order], r[order], c[order]
        if self.m:
            s, r, c = (np.concatenate(x) for x in ((self.class_scores, scores), (self.class_rows, rows),
                                                  (self.class_of, classes)))
            order = np.lexsort((r, -s, c))
            c_sorted = c[order]
            rank = np.arange(len(order)) - np.searchsorted(c_sorted, c_sorted, side="left")
            order = order[rank < self.m]
            self.class_scores, self.class_rows, self.class_of = s[order], r[order], c[order]

    def per_class(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for cls, row in zip(self.class_of.tolist(), self.class_rows.tolist()):
            out.setdefault(cls, []).append(row)
        return out


@dataclass
class Ranked:
    """The rankings of ``rank_samples``: store rows best first, overall and per label."""

    stores: list[str]
    teachers: list[str]
    view: int
    top: int
    num_classes: int
    rows: dict[str, list[int]]
    by_class: dict[str, dict[int, list[int]]]
    scores: dict[str, dict[int, float]]

    def details(self, rows: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Per row: ``sample_id``, ``label`` and per teacher (in store order) ``pred``, ``p_gt``, ``entropy``."""
        wanted = np.unique(np.asarray(list(rows), dtype=np.int64))
        if not len(wanted):
            return {}
        groups = [zarr.open_group(p, mode="r") for p in self.stores]
        sel = (self.view, wanted)
        ids, labels = groups[0]["sample_id"].get_orthogonal_selection((wanted,)), \
            groups[0]["label"].get_orthogonal_selection((wanted,))
        per_teacher = [{name: g[name].get_orthogonal_selection(sel) for name in ("pred", "p_gt", "entropy")}
                       for g in groups]
        out = {}
        for i, row in enumerate(wanted.tolist()):
            out[row] = {"row": row, "sample_id": int(ids[i]), "label": int(labels[i]),
                        "teachers": [{"name": name, "pred": int(t["pred"][i]), "p_gt": float(t["p_gt"][i]),
                                      "entropy": float(t["entropy"][i])}
                                     for name, t in zip(self.teachers, per_teacher)]}
        return out


def rank_samples(stores: Sequence[str], *, teachers: Sequence[str], view: int = 0, top: int = 16,
                 per_class: int = 4) -> Ranked:
    """Stream every block of ``view`` of the (agreeing, complete) stores once; see the module docstring."""
    opened = [check_checksums(p) for p in stores]
    layout = opened[0][1]
    check_ranking_options(view=view, top=top, per_class=per_class, num_views=layout.num_views,
                          mixed=any(lay.mixed for _, lay in opened))
    groups = [zarr.open_group(str(p), mode="r") for p in stores]
    names = [n for n in RANKINGS if n != "disagree" or len(stores) > 1]
    tops = {n: TopN(top, per_class) for n in names}
    for block in range(layout.num_blocks):
        start, stop = layout.block_rows(block)
        label = groups[0]["label"][start:stop].astype(np.int64)
        pred = np.stack([g["pred"][view, start:stop] for g in groups]).astype(np.int64)
        p_gt = np.stack([g["p_gt"][view, start:stop] for g in groups])
        entropy = np.stack([g["entropy"][view, start:stop] for g in groups])
        rows = np.arange(start, stop, dtype=np.int64)
        for name, scores in block_scores(pred, p_gt, entropy=entropy, label=label).items():
            tops[name].add(scores, rows, classes=label)
    return Ranked(stores=[str(s) for s in stores], teachers=list(teachers), view=view, top=top,
                  num_classes=layout.num_classes, rows={n: t.rows.tolist() for n, t in tops.items()},
                  by_class={n: t.per_class() for n, t in tops.items()},
                  scores={n: {**dict(zip(t.class_rows.tolist(), t.class_scores.tolist())),
                              **dict(zip(t.rows.tolist(), t.scores.tolist()))} for n, t in tops.items()})


def store_probabilities(store: str, *, view: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, C] float32 softmax probabilities of ``view`` of one complete store (every storage kind,
    through its codec's dense logits; a sampled store at its temperature), and its labels."""
    attrs, layout = check_checksums(store)
    group = zarr.open_group(str(store), mode="r")
    temperature = layout.codec.sample_temperature or 1.0   # decoded logits' softmax at it: the stored one
    probs = np.empty((layout.num_samples, layout.num_classes), dtype=np.float32)
    for block in range(layout.num_blocks):
        start, stop = layout.block_rows(block)
        parts = {name: group[name][view, start:stop] for name in layout.payload_arrays()}
        z = layout.codec.decode(parts).astype(np.float64) / temperature
        p = np.exp(z - z.max(axis=1, keepdims=True))
        probs[start:stop] = p / p.sum(axis=1, keepdims=True)
    return probs, group["label"][:].astype(np.int64)


def label_issue_ranks(stores: Sequence[str], *, teachers: Sequence[str], view: int = 0,
                      how: str = "mean") -> dict[str, np.ndarray]:
    """Per ranking (``"mean"``, or each teacher's name with ``how="each"``): int32 [N], the
    1-based rank of each sample among cleanlab's label issues (most likely first), -1 for the rest."""
    if how not in LABEL_ISSUE_MODES:
        raise UserError(f"--label-issue-probs: expected one of {', '.join(LABEL_ISSUE_MODES)}, found {how!r}")
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        raise UserError(f"--label-issues needs cleanlab: {INSTALL_CLEANLAB}") from None
    layouts = [schema.Layout.from_attrs(check_complete(store)[0]) for store in stores]
    check_view(view, layouts[0].num_views, mixed=any(lay.mixed for lay in layouts))
    sources: dict[str, np.ndarray] = {}
    labels = None
    total = None
    for name, store in zip(teachers, stores):
        probs, labels = store_probabilities(str(store), view=view)
        if how == "each":
            sources[name] = probs
        else:
            total = probs if total is None else total + probs
            del probs
    if how == "mean":
        sources["mean"] = total / len(stores)
    out = {}
    for name, probs in sources.items():
        ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
        rank = np.full(len(labels), -1, dtype=np.int32)
        rank[ranked] = np.arange(1, len(ranked) + 1, dtype=np.int32)
        out[name] = rank
    return out
