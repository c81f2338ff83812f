"""How uncertain are the cached teachers? Summaries of one or more complete stores, with dask.

    kdcache inspect caches/train/ce.zarr caches/train/mse.zarr --out reports/inspect

    from pipeline.inspect import inspect_stores
    report = inspect_stores(["caches/train/ce.zarr"], bins=20)

Per store and view: accuracy, NLL, mean entropy, mean normalized entropy ``H / log C``, the
uncertainty-aware paper's mean confidence weight ``1 - H / log C``, mean ``p_gt``, the mean max
probability and the expected calibration error (ECE, equal-width confidence bins), plus the
per-class accuracy and entropy and a histogram of normalized entropy. For a classroom (several
stores of the same manifest split): how often each pair of teachers agrees, how often at least
one is right (oracle accuracy), and how often each is the most confident in the truth (max
``p_gt``), the quantity the multi-teacher methods rank by.

Every figure is computed from the stores' chunks by dask, block by block, so stores larger than
memory are fine. A store whose teacher checkpoint changed after caching is a warning
(``pipeline.store.provenance``). ``--out`` writes ``summary.json``, ``per_class.csv``,
``entropy_hist.csv`` and, when matplotlib is installed (extra ``[plots]``), ``entropy_hist.png``
and ``reliability.png``.
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
import zarr

from pipeline.errors import UserError
from pipeline.store.provenance import changed_teachers
from pipeline.store.verify import check_complete


def _max_prob(group: zarr.Group, kind: str) -> da.Array:
    """[V, N] max softmax probability, from dense logits or from the top-1 value and logsumexp."""
    if kind == "dense":
        logits = da.from_zarr(group["logits"]).astype(np.float32)
        return 1.0 / da.exp(logits - logits.max(axis=-1, keepdims=True)).sum(axis=-1)
    top1 = da.from_zarr(group["topk_values"])[..., 0].astype(np.float32)
    return da.exp(top1 - da.from_zarr(group["logsumexp"]))


def _store_lazy(path: str, *, bins: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Lazy dask figures for one store, and the facts read from its attrs."""
    attrs, layout = check_complete(path)
    for line in changed_teachers(attrs, store=path):
        warnings.warn(line, stacklevel=3)
    group = zarr.open_group(path, mode="r")
    num_classes, num_views = layout.num_classes, layout.num_views
    label = da.from_zarr(group["label"]).astype(np.int64)
    entropy, p_gt = da.from_zarr(group["entropy"]), da.from_zarr(group["p_gt"])
    pred = da.from_zarr(group["pred"]).astype(np.int64)
    correct = pred == label[None, :]
    norm_entropy = entropy / math.log(num_classes) if num_classes > 1 else da.zeros_like(entropy)
    conf = _max_prob(group, layout.kind)
    # Equal-width bins on [0, 1]: ECE from per-bin counts, confidence and accuracy sums.
    conf_bin = da.clip((conf * bins).astype(np.int64), 0, bins - 1)
    ent_bin = da.clip((norm_entropy * bins).astype(np.int64), 0, bins - 1)
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
             "storage": layout.kind, "label": label}
    return lazy, facts


def _finish_view(row: dict[str, Any]) -> tuple[dict[str, float], dict[str, list]]:
    """The view's scalar figures with its ECE, and its reliability diagram (per confidence bin)."""
    count, conf_sum, correct_sum = row.pop("_bin_count"), row.pop("_bin_conf"), row.pop("_bin_correct")
    n = max(int(count.sum()), 1)
    row["ece"] = float(np.abs(conf_sum - correct_sum).sum() / n)  # sum_b |acc_b - conf_b| * n_b / n
    safe = np.maximum(count, 1)
    reliability = {"count": count.astype(int).tolist(), "confidence": (conf_sum / safe).round(6).tolist(),
                   "accuracy": (correct_sum / safe).round(6).tolist()}
    return {key: round(float(value), 6) for key, value in row.items()}, reliability


def _classroom(preds: list[np.ndarray], p_gts: list[np.ndarray], label: np.ndarray) -> dict[str, Any]:
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
    names = [f["teacher"] for f in facts]
    if len(set(names)) < len(names):  # the same teacher cached twice: tell the stores apart by file
        for fact in facts:
            fact["teacher"] = Path(fact["store"]).stem
    report: dict[str, Any] = {"bins": bins, "stores": []}
    for fact, result in zip(facts, computed):
        pc = result["per_class"]
        count = np.maximum(pc["count"], 1)
        per_view, reliability = zip(*(_finish_view(dict(row)) for row in result["per_view"]))
        report["stores"].append({
            **fact,
            "per_view": list(per_view),
            "reliability": list(reliability),
            "entropy_hist": [[int(c) for c in h] for h in result["entropy_hist"]],
            "per_class": {"count": pc["count"].tolist(), "accuracy": (pc["correct"] / count).round(6).tolist(),
                          "mean_entropy": (pc["entropy"] / count).round(6).tolist()},
        })
    if len(stores) > 1:
        first = facts[0]
        for fact, label in zip(facts[1:], labels[1:]):
            for key, field in (("manifest_sha256", "manifest.sha256"), ("split", "manifest.split")):
                if fact[key] != first[key]:
                    raise UserError(f"{fact['store']}: field {field}: expected {first[key]} "
                                    f"(as {first['store']}), found {fact[key]}; a classroom needs stores of the "
                                    "same manifest split (inspect them one at a time otherwise)")
            if not np.array_equal(label, labels[0]):
                raise UserError(f"{fact['store']}: field label: expected the labels of {first['store']}, found others")
        report["classroom"] = _classroom([r["pred0"] for r in computed], [r["p_gt0"] for r in computed], labels[0])
    return report


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: one line per store and view, then the classroom figures."""
    cols = ("accuracy", "nll", "mean_entropy", "mean_normalized_entropy", "mean_confidence_weight", "mean_p_gt", "ece")
    heads = ("acc", "nll", "H", "H/logC", "1-H/logC", "p_gt", "ece")
    lines = [f"{'teacher':<12}{'loss':<6}{'view':>5}" + "".join(f"{h:>10}" for h in heads)]
    for s in report["stores"]:
        for v, row in enumerate(s["per_view"]):
            lines.append(f"{str(s['teacher'])[:11]:<12}{str(s['train_loss'])[:5]:<6}{v:>5}"
                         + "".join(f"{row[c]:>10.4f}" for c in cols))
    room = report.get("classroom")
    if room:
        names = [str(s["teacher"]) for s in report["stores"]]
        lines.append(f"classroom: oracle accuracy {room['oracle_accuracy']:.4f}; most confident in the truth: "
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
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    with written[1].open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["teacher", "class", "count", "accuracy", "mean_entropy"])
        for s in report["stores"]:
            pc = s["per_class"]
            for c, row in enumerate(zip(pc["count"], pc["accuracy"], pc["mean_entropy"])):
                w.writerow([s["teacher"], c, *row])
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
    centers = (np.arange(bins) + 0.5) / bins
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in report["stores"]:
        hist = np.asarray(s["entropy_hist"][0], dtype=float)
        ax.step(centers, hist / max(hist.sum(), 1), where="mid", label=f"{s['teacher']} ({s['train_loss']})")
    ax.set(xlabel="normalized entropy H / log C (view 0)", ylabel="fraction of samples", title="Teacher uncertainty")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "entropy_hist.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    for s in report["stores"]:
        rel = s["reliability"][0]
        seen = np.asarray(rel["count"]) > 0
        ax.plot(np.asarray(rel["confidence"])[seen], np.asarray(rel["accuracy"])[seen], "o-",
                label=f"{s['teacher']} (ECE {s['per_view'][0]['ece']:.3f})")
    ax.set(xlabel="confidence (max probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title="Reliability (view 0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=120)
    plt.close(fig)
    return [out / "entropy_hist.png", out / "reliability.png"]
