"""How uncertain are the cached teachers? Summaries of one or more complete stores, with dask.

    kdcache inspect caches/train/ce.zarr caches/train/mse.zarr --out reports/inspect

    from pipeline.inspect import inspect_stores
    report = inspect_stores(["caches/train/ce.zarr"], bins=20)

Per store and view: accuracy, NLL, mean entropy, mean normalized entropy ``H / log C``, the
uncertainty-aware paper's mean confidence weight ``1 - H / log C``, mean ``p_gt``, the mean max
probability and the expected calibration error (ECE, equal-width confidence bins), plus the
per-class accuracy and entropy and a histogram of normalized entropy. A store of mixed views
(``"mixed": true``, a key only such a store's summary has) has its figures against each row's
mixed label, as its p_gt is: accuracy is the mean weight the mixed label gives the prediction
(``pipeline.store.stats.label_agreement``; the plain accuracy in view 0, which is never mixed).
For several teachers (several stores of the same manifest split): how often each pair of teachers
agrees, how often at least one is right (oracle accuracy), and how often each is the most
confident in the truth (max ``p_gt``), the quantity the multi-teacher methods rank by.

Every figure is computed from the stores' chunks by dask, block by block, so stores larger than
memory are fine. Each store's chunks, sample ids and labels are first checked against their
checksums (``pipeline.store.reader.check_checksums``, one pass over its chunk files): a changed or
misplaced chunk is refused in the one line training gives, never summarised. A store whose
teacher checkpoint changed after caching is a warning (``pipeline.store.provenance``). ``--out`` writes ``summary.json``, ``per_class.csv``,
``entropy_hist.csv`` and, when matplotlib is installed (extra ``[plots]``), ``entropy_hist.png``
and ``reliability.png`` (with the number of samples per confidence bin under the curve). An
empty bin, or a class without samples, has ``null`` figures in the JSON (never 0.0 or NaN).
The entropy histogram's edges run from 0 to ``log C`` in nats (``entropy_edges``); the last bin
holds the maximum.

``--samples FILE.parquet`` (``write_samples``) writes one row per sample and view: ``sample_id``,
``view``, ``source`` (from the manifest the stores recorded, null when that file is gone),
``label``, per teacher ``<name>_pred``, ``<name>_p_gt``, ``<name>_entropy`` (and for a store of mixed
views ``<name>_mix_partner``, the partner's sample id, and ``<name>_mix_lambda``: its p_gt is that
of the mixed label, ``lam * p[label] + (1 - lam) * p[partner's label]``), and across teachers
``n_distinct_preds``, ``frac_disagree_with_majority`` and ``mean_p_gt``; one Parquet row group per
store block, read and written block by block. With ``--label-issues``, ``label_issue_rank`` (or
``<name>_label_issue_rank`` per teacher): cleanlab's rank of the sample among the label issues of
the ``--view`` view, null elsewhere (``pipeline.inspect_rank``).

``--out`` also writes ``report.html`` and ``galleries/*.png`` (``pipeline.inspect_report``): the
samples to look at, as thumbnails with each teacher's prediction.

    from pipeline.inspect import write_samples
    write_samples(["caches/train/ce.zarr", "caches/train/mse.zarr"], "reports/samples.parquet")
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import dask
import dask.array as da
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from pipeline.errors import UserError
from pipeline.files import atomic_path
from pipeline.manifest import load_manifest
from pipeline.store.provenance import changed_teachers, recorded_path
from pipeline.store.schema import MIX_ARRAYS, Layout
from pipeline.store.stats import label_agreement, labels_of
from pipeline.store.reader import check_checksums


def _max_prob(group: zarr.Group, layout: Layout) -> da.Array:
    """[V, N] max softmax probability, from the store's payload arrays by its codec (sampled
    stores: estimated as the largest draw count / k, at the store's temperature)."""
    return layout.codec.max_prob({name: da.from_zarr(group[name]) for name in layout.payload_arrays()})


def _store_lazy(path: str, *, bins: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Lazy dask figures for one store, and the facts read from its attrs."""
    attrs, layout = check_checksums(path)
    for line in changed_teachers(attrs, store=path):
        warnings.warn(line, stacklevel=3)
    group = zarr.open_group(path, mode="r")
    num_classes, num_views = layout.num_classes, layout.num_views
    label = da.from_zarr(group["label"]).astype(np.int64)
    entropy, p_gt = da.from_zarr(group["entropy"]), da.from_zarr(group["p_gt"])
    pred = da.from_zarr(group["pred"]).astype(np.int64)
    correct = label_agreement(pred, label[None, :], _mixed_labels(group) if layout.mixed else None)
    norm_entropy = entropy / math.log(num_classes) if num_classes > 1 else da.zeros_like(entropy)
    conf = _max_prob(group, layout)
    # Equal-width bins on [0, 1]: ECE from per-bin counts, confidence and accuracy sums.
    conf_bin = da.clip((conf * bins).astype(np.int64), 0, bins - 1)
    # Entropy bins by comparison with the edges (as np.histogram): [e_b, e_b+1), the last one closed;
    # rounding just outside [0, log C] still counts in the first or last bin.
    edges = entropy_edges(num_classes, bins)
    ent_bin = da.clip(da.digitize(entropy.astype(np.float64), edges) - 1, 0, bins - 1)
    per_view, hist = [], []
    for v in range(num_views):
        cb = conf_bin[v]
        per_view.append({
            "accuracy": correct[v].mean(), "nll": (-da.log(da.maximum(p_gt[v], 1e-12))).mean(),
            "mean_entropy": entropy[v].mean(), "mean_normalized_entropy": norm_entropy[v].mean(),
            "mean_confidence_weight": (1.0 - norm_entropy[v]).mean(), "mean_p_gt": p_gt[v].mean(),
            "mean_max_prob": conf[v].mean(),
            "_bin_count": da.bincount(cb, minlength=bins),
            "_bin_conf": da.bincount(cb, weights=conf[v], minlength=bins),
            "_bin_correct": da.bincount(cb, weights=correct[v].astype(np.float64), minlength=bins),
        })
        hist.append(da.bincount(ent_bin[v], minlength=bins))
    per_class = {
        "count": da.bincount(label, minlength=num_classes),
        "correct": da.bincount(label, weights=correct[0].astype(np.float64), minlength=num_classes),
        "entropy": da.bincount(label, weights=entropy[0].astype(np.float64), minlength=num_classes),
    }
    lazy = {"per_view": per_view, "entropy_hist": hist, "per_class": per_class, "pred0": pred[0], "p_gt0": p_gt[0]}
    facts = {"store": path, "teacher": attrs["teacher"].get("name"), "train_loss": attrs["teacher"].get("train_loss"),
             "manifest_sha256": attrs["manifest"]["sha256"], "split": attrs["manifest"]["split"],
             "num_samples": layout.num_samples, "num_classes": num_classes, "num_views": num_views,
             "storage": layout.kind, "entropy_edges": [round(float(e), 6) for e in edges], "label": label,
             **({"mixed": True} if layout.mixed else {})}      # an unmixed store's report as before
    return lazy, facts


def _mixed_labels(group: zarr.Group) -> tuple[da.Array, da.Array]:
    """A mixed store's (partner labels, lambdas) [V, N], lazily: what its p_gt and accuracy weigh."""
    sample_id, label = group["sample_id"][:], group["label"][:].astype(np.int64)
    order = np.argsort(sample_id, kind="stable")
    partner = da.from_zarr(group["mix_partner"]).map_blocks(labels_of, sample_id, order, label, dtype=np.int64)
    return partner, da.from_zarr(group["mix_lambda"])


def entropy_edges(num_classes: int, bins: int) -> np.ndarray:
    """The entropy histogram's ``bins + 1`` edges, 0 to ``log C`` nats (0 to 1 for a single class)."""
    return np.linspace(0.0, math.log(num_classes) if num_classes > 1 else 1.0, bins + 1)


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    """num / den rounded, None where den is 0 (an empty bin has no mean: null in the JSON)."""
    return [round(float(a) / float(b), 6) if b > 0 else None for a, b in zip(num, den)]


def _finish_view(row: dict[str, Any]) -> tuple[dict[str, float], dict[str, list]]:
    """The view's scalar figures with its ECE, and its reliability diagram (per confidence bin)."""
    count, conf_sum, correct_sum = row.pop("_bin_count"), row.pop("_bin_conf"), row.pop("_bin_correct")
    n = max(int(count.sum()), 1)
    row["ece"] = float(np.abs(conf_sum - correct_sum).sum() / n)  # sum_b |acc_b - conf_b| * n_b / n
    reliability = {"count": count.astype(int).tolist(), "confidence": _ratio(conf_sum, count),
                   "accuracy": _ratio(correct_sum, count)}
    return {key: round(float(value), 6) for key, value in row.items()}, reliability


def _across_teachers(preds: list[np.ndarray], p_gts: list[np.ndarray], label: np.ndarray) -> dict[str, Any]:
    stacked = np.stack(preds)
    agree = [[float((a == b).mean()) for b in stacked] for a in stacked]
    best = np.bincount(np.stack(p_gts).argmax(axis=0), minlength=len(preds)) / len(label)
    return {"agreement": agree, "oracle_accuracy": float((stacked == label[None]).any(axis=0).mean()),
            "most_confident_in_truth": [float(b) for b in best]}


def inspect_stores(stores: Sequence[str | Path], *, bins: int = 20) -> dict[str, Any]:
    """Summaries of complete stores (UserError for an incomplete one); see the module docstring."""
    if not stores:
        raise UserError("inspect: expected at least one store")
    if bins < 2:
        raise UserError(f"--bins: expected an integer >= 2, found {bins}")
    lazies, facts = zip(*(_store_lazy(str(s), bins=bins) for s in stores))
    (computed,) = dask.compute(list(lazies))
    labels = [np.asarray(f.pop("label")) for f in facts]
    for fact, name in zip(facts, _teacher_names(facts)):
        fact["teacher"] = name
    report: dict[str, Any] = {"bins": bins, "stores": []}
    for fact, result in zip(facts, computed):
        pc = result["per_class"]
        count = pc["count"]
        per_view, reliability = zip(*(_finish_view(dict(row)) for row in result["per_view"]))
        report["stores"].append({
            **fact,
            "per_view": list(per_view),
            "reliability": list(reliability),
            "entropy_hist": [[int(c) for c in h] for h in result["entropy_hist"]],
            "per_class": {"count": count.tolist(), "accuracy": _ratio(pc["correct"], count),
                          "mean_entropy": _ratio(pc["entropy"], count)},
        })
    if len(stores) > 1:
        _check_same_split(facts)
        first = facts[0]
        for fact, label in zip(facts[1:], labels[1:]):
            if not np.array_equal(label, labels[0]):
                raise UserError(f"{fact['store']}: field label: expected the labels of {first['store']}, found others")
        report["across_teachers"] = _across_teachers([r["pred0"] for r in computed], [r["p_gt0"] for r in computed], labels[0])
    return report


def _teacher_names(facts: Sequence[dict[str, Any]]) -> list[str]:
    """The teachers' names; the stores' file stems when a name repeats (the same teacher cached
    twice), then ``<stem>_<i>`` if stems repeat too."""
    names = [str(f["teacher"]) for f in facts]
    if len(set(names)) < len(names):
        names = [Path(f["store"]).stem for f in facts]
    if len(set(names)) < len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    return names


def _check_same_split(facts: Sequence[dict[str, Any]]) -> None:
    """UserError unless every store caches the same manifest split as the first."""
    first = facts[0]
    for fact in facts[1:]:
        for key, field in (("manifest_sha256", "manifest.sha256"), ("split", "manifest.split")):
            if fact[key] != first[key]:
                raise UserError(f"{fact['store']}: field {field}: expected {first[key]} "
                                f"(as {first['store']}), found {fact[key]}; teachers compared need stores of the "
                                "same manifest split (inspect them one at a time otherwise)")


def report_json(report: dict[str, Any]) -> str:
    """The report as strict JSON: a NaN or infinite figure becomes ``null`` (json.dumps would write ``NaN``)."""
    return json.dumps(_finite(report), indent=2, allow_nan=False) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: one line per store and view, then the figures across teachers."""
    cols = ("accuracy", "nll", "mean_entropy", "mean_normalized_entropy", "mean_confidence_weight", "mean_p_gt", "ece")
    heads = ("acc", "nll", "H", "H/logC", "1-H/logC", "p_gt", "ece")
    lines = [f"{'teacher':<12}{'loss':<6}{'view':>5}" + "".join(f"{h:>10}" for h in heads)]
    for s in report["stores"]:
        for v, row in enumerate(s["per_view"]):
            lines.append(f"{str(s['teacher'])[:11]:<12}{str(s['train_loss'])[:5]:<6}{v:>5}"
                         + "".join(f"{row[c]:>10.4f}" for c in cols))
    mixed = [str(s["teacher"]) for s in report["stores"] if s.get("mixed")]
    if mixed:
        lines.append(f"mixed views ({', '.join(mixed)}; views >= 1): acc, nll and p_gt against each row's mixed label")
    room = report.get("across_teachers")
    if room:
        names = [str(s["teacher"]) for s in report["stores"]]
        lines.append(f"across teachers: oracle accuracy {room['oracle_accuracy']:.4f}; most confident in the truth: "
                     + ", ".join(f"{n} {b:.3f}" for n, b in zip(names, room["most_confident_in_truth"])))
        lines.append("agreement (view 0): " + "; ".join(
            f"{names[i]}/{names[j]} {room['agreement'][i][j]:.3f}"
            for i in range(len(names)) for j in range(i + 1, len(names))))
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: str | Path) -> list[Path]:
    """``summary.json``, ``per_class.csv``, ``entropy_hist.csv`` (+ PNG plots with matplotlib) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.json", out / "per_class.csv", out / "entropy_hist.csv"]
    written[0].write_text(report_json(report))
    with written[1].open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["teacher", "class", "count", "accuracy", "mean_entropy"])
        for s in report["stores"]:
            pc = s["per_class"]
            for c, row in enumerate(zip(pc["count"], pc["accuracy"], pc["mean_entropy"])):
                w.writerow([s["teacher"], c, *("" if x is None else x for x in row)])
    bins = report["bins"]
    with written[2].open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["teacher", "view", "bin_low", "bin_high", "count"])
        for s in report["stores"]:
            for v, hist in enumerate(s["entropy_hist"]):
                for b, count in enumerate(hist):
                    w.writerow([s["teacher"], v, round(b / bins, 6), round((b + 1) / bins, 6), count])
    return written + _plots(report, out)


def _plots(report: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: pip install 'kdcache[plots]'
        return []
    bins = report["bins"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in report["stores"]:
        hist = np.asarray(s["entropy_hist"][0], dtype=float)
        # stairs over the edges: the first and last bins drawn whole, 0 to log C
        ax.stairs(hist / max(hist.sum(), 1), s["entropy_edges"], label=f"{s['teacher']} ({s['train_loss']})")
    edges = report["stores"][0]["entropy_edges"]
    ax.set(xlabel="entropy H in nats (view 0), 0 to log C", ylabel="fraction of samples", title="Teacher uncertainty",
           xlim=(edges[0], edges[-1]))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "entropy_hist.png", dpi=120)
    plt.close(fig)
    fig, (ax, strip) = plt.subplots(2, 1, figsize=(5, 6.5), sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    lows = np.arange(bins) / bins
    width = 1.0 / bins / len(report["stores"])
    for i, s in enumerate(report["stores"]):
        rel = s["reliability"][0]
        conf = np.asarray(rel["confidence"], dtype=float)  # None (empty bin) -> NaN: not drawn
        line, = ax.plot(conf, np.asarray(rel["accuracy"], dtype=float), "o-",
                        label=f"{s['teacher']} (ECE {s['per_view'][0]['ece']:.3f})")
        # How many samples each point stands on: a point over a handful of samples is noise.
        strip.bar(lows + i * width, rel["count"], width=width, align="edge", color=line.get_color())
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability (view 0)")
    ax.legend()
    strip.set(xlabel="confidence (max probability)", ylabel="samples per bin")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=120)
    plt.close(fig)
    return [out / "entropy_hist.png", out / "reliability.png"]


def write_samples(stores: Sequence[str | Path], out: str | Path, *, extra: dict[str, np.ndarray] | None = None,
                  extra_view: int = 0) -> int:
    """The per-sample table of the module docstring at ``out`` (atomically); returns its row count.

    ``extra``: more int32 columns, one value per store row (negative: null), filled on the rows of
    view ``extra_view`` and null on the others (the label-issue ranks of ``pipeline.inspect_rank``).

    UserError for an incomplete store or stores of different manifest splits. The source column is
    null, with one warning, when the manifest the stores recorded is missing or has changed.
    """
    if not stores:
        raise UserError("inspect: expected at least one store")
    paths = [str(s) for s in stores]
    opened = [check_checksums(p) for p in paths]
    for path, (attrs, _) in zip(paths, opened):
        for line in changed_teachers(attrs, store=path):
            warnings.warn(line, stacklevel=2)
    facts = [{"store": p, "teacher": a["teacher"].get("name"), "manifest_sha256": a["manifest"]["sha256"],
              "split": a["manifest"]["split"]} for p, (a, _) in zip(paths, opened)]
    _check_same_split(facts)
    names = _teacher_names(facts)
    if "mean" in names:  # "mean_p_gt" is the across-teacher column
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    layout = opened[0][1]
    for path, (_, other) in zip(paths[1:], opened[1:]):
        if (other.num_samples, other.num_views) != (layout.num_samples, layout.num_views):
            raise UserError(f"{path}: field manifest.num_samples/views.count: expected {layout.num_samples}/"
                            f"{layout.num_views} (as {paths[0]}), found {other.num_samples}/{other.num_views}")
    groups = [zarr.open_group(p, mode="r") for p in paths]
    source = _sources(opened[0][0]["manifest"], store=paths[0], num_samples=layout.num_samples)
    mixed = [lay.mixed for _, lay in opened]
    schema_ = pa.schema([("sample_id", pa.int64()), ("view", pa.int32()), ("source", pa.string()),
                         ("label", pa.int32())]
                        + [f for n, m in zip(names, mixed)
                           for f in ((f"{n}_pred", pa.int32()), (f"{n}_p_gt", pa.float32()),
                                     (f"{n}_entropy", pa.float32()))
                           + (((f"{n}_mix_partner", pa.int64()), (f"{n}_mix_lambda", pa.float32())) if m else ())]
                        + [("n_distinct_preds", pa.int32()), ("frac_disagree_with_majority", pa.float32()),
                           ("mean_p_gt", pa.float32())]
                        + [(name, pa.int32()) for name in extra or {}])
    views, rows = layout.num_views, 0
    with atomic_path(out, suffix=".parquet") as tmp, pq.ParquetWriter(tmp, schema_) as writer:
        for block in range(layout.num_blocks):
            start, stop = layout.block_rows(block)
            label = groups[0]["label"][start:stop]
            for path, g in zip(paths[1:], groups[1:]):
                if not np.array_equal(g["label"][start:stop], label):
                    raise UserError(f"{path}: field label: expected the labels of {paths[0]}, found others "
                                    f"(rows {start}..{stop - 1})")
            # [V, n] arrays -> rows ordered by sample, then view
            pred = np.stack([g["pred"][:, start:stop].T.ravel() for g in groups])  # [T, n * V]
            p_gt = np.stack([g["p_gt"][:, start:stop].T.ravel() for g in groups])
            entropy = [g["entropy"][:, start:stop].T.ravel() for g in groups]
            n = stop - start
            columns: dict[str, Any] = {
                "sample_id": np.repeat(groups[0]["sample_id"][start:stop], views),
                "view": np.tile(np.arange(views, dtype=np.int32), n),
                "source": pa.nulls(n * views, pa.string()) if source is None
                else np.repeat(source[start:stop], views),
                "label": np.repeat(label, views),
            }
            for i, name in enumerate(names):
                columns.update({f"{name}_pred": pred[i], f"{name}_p_gt": p_gt[i], f"{name}_entropy": entropy[i]})
                if mixed[i]:
                    columns.update({f"{name}_{a}": groups[i][a][:, start:stop].T.ravel() for a in MIX_ARRAYS})
            columns.update(_disagreement(pred, p_gt))
            for name, values in (extra or {}).items():
                here = np.repeat(values[start:stop], views)
                columns[name] = pa.array(here, mask=(here < 0) | (columns["view"] != extra_view), type=pa.int32())
            table = pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in schema_],
                                         schema=schema_)
            writer.write_table(table, row_group_size=max(len(table), 1))  # one row group per block
            rows += len(table)
    return rows


def _disagreement(pred: np.ndarray, p_gt: np.ndarray) -> dict[str, np.ndarray]:
    """Across the teachers (axis 0) of [T, M] predictions: distinct predictions, the fraction that
    differ from the most common one, and the mean p_gt."""
    ordered = np.sort(pred, axis=0)
    distinct = 1 + (np.diff(ordered, axis=0) != 0).sum(axis=0)
    majority = np.max([(pred == p).sum(axis=0) for p in pred], axis=0)  # votes of the most common prediction
    teachers = len(pred)
    return {"n_distinct_preds": distinct.astype(np.int32),
            "frac_disagree_with_majority": ((teachers - majority) / teachers).astype(np.float32),
            "mean_p_gt": p_gt.astype(np.float64).mean(axis=0).astype(np.float32)}


def _sources(recorded: dict[str, Any], *, store: str, num_samples: int) -> np.ndarray | None:
    """The manifest's source of each store row, or None (with one warning) when the manifest the
    store recorded is missing or is not the one it was cached from."""
    path = recorded_path(recorded.get("path"), store)
    if path is None or not path.is_file():
        warnings.warn(f"{store}: manifest {path} (field manifest.path) not found: column source left null",
                      stacklevel=3)
        return None
    manifest = load_manifest(path)
    if manifest.sha256 != recorded.get("sha256"):
        warnings.warn(f"{store}: manifest {path} changed since caching (sha256 {manifest.sha256[:12]}..., recorded "
                      f"{str(recorded.get('sha256'))[:12]}...): column source left null", stacklevel=3)
        return None
    rows = manifest.split(recorded["split"])
    if len(rows) != num_samples:
        warnings.warn(f"{store}: manifest {path} split {recorded['split']} has {len(rows)} rows, the store "
                      f"{num_samples}: column source left null", stacklevel=3)
        return None
    return rows.source
