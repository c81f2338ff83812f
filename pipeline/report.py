"""The experiment's report: every teacher and student side by side, and the papers' claims checked.

    from pipeline.report import Claim, summarize, write_report
    summary = summarize(teachers, students, claims)   # teachers: {name: {loss, arch, accuracy, ...}}
    write_report(summary, "reports", mentor_stats={"classroom": "models/students/classroom/seed0_mentors.csv"},
                 curves={"kd": "metrics/students/kd.csv"})

``teachers`` maps a name to its settings and test scores (``accuracy``, ``nll``, ``mse_to_bayes``
where the data has a known posterior); ``students`` maps a name to its settings and per-seed
scores (``runs``: one dict per seed). ``summarize`` adds the means and standard deviations over
seeds and a verdict per claim. A claim compares its first model against each of the others on
one metric (``accuracy``: higher is better; ``nll``, ``mse_to_bayes``: lower is better):

- ``holds``: better than every other by more than twice the standard error of the difference
  (over seeds; a teacher is one run);
- ``holds within noise``: better than every other, but not always by that margin;
- ``does not hold``: some other model is as good or better.

``write_report`` writes ``summary.json``, ``summary.md`` (the tables and verdicts a person reads)
and, with matplotlib (extra ``[plots]``), PNG figures in ``figures/``: the methods' accuracy
(mean ± std over seeds), the students' accuracy against the bytes stored per sample for their targets
(where any reads a store), the students' per-epoch validation accuracy, and per ClassroomKD
student the rank, activity and temperature of each mentor per epoch. PNGs need no network.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from pipeline.config import FromDict
from pipeline.errors import UserError
from pipeline.files import atomic_path, write_json

SCORES = ("accuracy", "nll", "mse_to_bayes")
LOWER_IS_BETTER = {"nll", "mse_to_bayes"}
HOLDS, WITHIN_NOISE, FAILS = "holds", "holds within noise", "does not hold"


@dataclass(frozen=True)
class Claim(FromDict):
    """One claim of a paper, checked on the experiment's figures (params.yaml ``report.claims``)."""

    section: ClassVar[str] = "report"

    text: str
    metric: str
    compare: tuple[str, ...]       # the model that should be better first, then what it is compared with

    def __post_init__(self) -> None:
        self.check_strings(("text",))
        if self.metric not in SCORES:
            raise self.bad("metric", f"one of {', '.join(SCORES)}")
        if len(self.compare) < 2 or not all(isinstance(n, str) and n for n in self.compare):
            raise self.bad("compare", "a list of at least two model names")


def _figure(entry: Mapping[str, Any], metric: str) -> tuple[float, float, int] | None:
    """(mean, std, runs) of ``metric`` for a teacher (one run) or a student (its seeds)."""
    if "runs" in entry:
        values = [r[metric] for r in entry["runs"] if r.get(metric) is not None]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)
    return (float(entry[metric]), 0.0, 1) if entry.get(metric) is not None else None


def check_claim(claim: Claim, models: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The verdict on ``claim`` and the figures it rests on."""
    for name in claim.compare:
        if name not in models:
            raise UserError(f"report: claim {claim.text!r}: no teacher or student named {name!r}")
    figures = {name: _figure(models[name], claim.metric) for name in claim.compare}
    if any(f is None for f in figures.values()):
        missing = [name for name, f in figures.items() if f is None]
        return {"text": claim.text, "metric": claim.metric, "compare": list(claim.compare),
                "verdict": f"not measured ({', '.join(missing)} has no {claim.metric})", "figures": {}}
    sign = -1.0 if claim.metric in LOWER_IS_BETTER else 1.0
    first, *others = claim.compare
    mean_a, std_a, n_a = figures[first]  # type: ignore[misc]
    verdicts = []
    for other in others:
        mean_b, std_b, n_b = figures[other]  # type: ignore[misc]
        gain = sign * (mean_a - mean_b)
        margin = 2.0 * math.sqrt(std_a ** 2 / n_a + std_b ** 2 / n_b)
        verdicts.append(FAILS if gain <= 0 else HOLDS if gain > margin else WITHIN_NOISE)
    verdict = FAILS if FAILS in verdicts else WITHIN_NOISE if WITHIN_NOISE in verdicts else HOLDS
    return {"text": claim.text, "metric": claim.metric, "compare": list(claim.compare), "verdict": verdict,
            "figures": {name: {"mean": round(f[0], 6), "std": round(f[1], 6), "runs": f[2]}  # type: ignore[index]
                        for name, f in figures.items()}}


def summarize(teachers: Mapping[str, Mapping[str, Any]], students: Mapping[str, Mapping[str, Any]],
              claims: Sequence[Claim]) -> dict[str, Any]:
    """``summary.json``'s content: ``teachers``, ``students`` (means / std over seeds), ``claims``."""
    clash = sorted(set(teachers) & set(students))
    if clash:
        raise UserError(f"report: names used by a teacher and a student: {', '.join(clash)}")
    out_students = {}
    for name, entry in students.items():
        row: dict[str, Any] = {k: entry[k] for k in ("method", "mentors", "stored_bytes_per_sample") if k in entry}
        row["seeds"] = [r["seed"] for r in entry["runs"]]
        for metric in SCORES + tuple(f"{s}_b" for s in SCORES):
            figure = _figure(entry, metric)
            if figure is not None:
                row[f"{metric}_mean"] = round(figure[0], 6)
                if metric.startswith("accuracy"):
                    row[f"{metric}_std"] = round(figure[1], 6)
        out_students[name] = row
    models = {**teachers, **students}
    return {"teachers": {name: dict(entry) for name, entry in teachers.items()}, "students": out_students,
            "claims": [check_claim(c, models) for c in claims]}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def markdown(summary: Mapping[str, Any], *, split: str = "test") -> str:
    """The tables and verdicts as Markdown (accuracy in percent)."""
    lines = [f"# Results ({split} split)", "", "## Teachers", "",
             "| teacher | loss | arch | accuracy % | NLL | MSE to Bayes |", "|---|---|---|---|---|---|"]
    for name, t in summary["teachers"].items():
        lines.append(f"| {name} | {t.get('loss', 'ce')} | {t.get('arch', '')} | {_pct(t.get('accuracy'))} | "
                     f"{_num(t.get('nll'))} | {_num(t.get('mse_to_bayes'))} |")
    lines += ["", "## Students (mean ± std over seeds)", "",
              "| student | method | mentors | stored bytes / sample | seeds | accuracy % | NLL | MSE to Bayes "
              "| student B accuracy % |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary["students"].items():
        acc = f"{_pct(s.get('accuracy_mean'))} ± {_pct(s.get('accuracy_std'))}"
        acc_b = (f"{_pct(s['accuracy_b_mean'])} ± {_pct(s['accuracy_b_std'])}" if "accuracy_b_mean" in s else "—")
        stored = s.get("stored_bytes_per_sample")
        lines.append(f"| {name} | {s.get('method', '')} | {', '.join(s.get('mentors', [])) or '—'} | "
                     f"{'—' if stored is None else stored} | {len(s['seeds'])} | {acc} | {_num(s.get('nll_mean'))} | "
                     f"{_num(s.get('mse_to_bayes_mean'))} "
                     f"| {acc_b} |")
    lines += ["", "## The papers' claims, here", ""]
    for c in summary["claims"]:
        shown = ", ".join(f"{name} {_shown(c['metric'], f)}" for name, f in c["figures"].items())
        lines.append(f"- **{c['verdict']}**: {c['text']} ({c['metric']}: {shown})")
    lines += ["", f"Verdicts: `{HOLDS}` = better than each by more than 2 standard errors of the difference; "
              f"`{WITHIN_NOISE}` = better, but not by that margin; `{FAILS}` = not better.", ""]
    return "\n".join(lines)


def _shown(metric: str, figure: Mapping[str, Any]) -> str:
    if metric == "accuracy":
        text = f"{100 * figure['mean']:.2f}"
        return text + (f" ± {100 * figure['std']:.2f}" if figure["runs"] > 1 else "")
    return f"{figure['mean']:.4f}" + (f" ± {figure['std']:.4f}" if figure["runs"] > 1 else "")


def read_csv(path: str | Path) -> list[dict[str, float | str]]:
    """Rows of a CSV history, numbers as floats."""
    def value(text: str) -> float | str:
        try:
            return float(text)
        except ValueError:
            return text
    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def write_report(summary: Mapping[str, Any], out: str | Path, *, split: str = "test",
                 curves: Mapping[str, str | Path] | None = None,
                 mentor_stats: Mapping[str, str | Path] | None = None) -> list[Path]:
    """``summary.json``, ``summary.md`` and (with matplotlib) the figures; returns the files written."""
    out = Path(out)
    write_json(out / "summary.json", dict(summary))
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(markdown(summary, split=split))
    written = [out / "summary.json", out / "summary.md"]
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib
    except ImportError:
        return written
    matplotlib.use("Agg")
    written.append(plot_methods(summary, figures / "methods.png"))
    if any(s.get("stored_bytes_per_sample") for s in summary["students"].values()):
        written.append(plot_bytes(summary, figures / "bytes.png"))
    if curves:
        written.append(plot_curves({name: read_csv(path) for name, path in curves.items()}, figures / "curves.png"))
    for name, path in (mentor_stats or {}).items():
        written.append(plot_mentors(read_csv(path), figures / f"mentors_{name}.png", title=name))
    return written


def plot_methods(summary: Mapping[str, Any], path: Path) -> Path:
    """Test accuracy of every student (mean ± std over seeds); teachers as horizontal lines."""
    import matplotlib.pyplot as plt

    students = summary["students"]
    names = list(students)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) + 2), 4))
    means = [100 * students[n].get("accuracy_mean", float("nan")) for n in names]
    stds = [100 * students[n].get("accuracy_std", 0.0) for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=3, color="#4c72b0")
    for k, (name, t) in enumerate(summary["teachers"].items()):
        if t.get("accuracy") is not None:
            ax.axhline(100 * t["accuracy"], ls="--", lw=1, color=f"C{k + 1}", label=f"teacher {name}")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    finite = [m for m in means if m == m]
    if finite:
        low = min(finite + [100 * t["accuracy"] for t in summary["teachers"].values() if t.get("accuracy")])
        ax.set_ylim(max(0.0, low - 3 * max(stds + [0.5])), None)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Students by method (mean ± std over seeds)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bytes(summary: Mapping[str, Any], path: Path) -> Path:
    """Test accuracy (mean ± std over seeds) against the bytes the mentors' stores take per training
    sample; students that read no store (no teacher, or a live one) as horizontal lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    stored = {n: s for n, s in summary["students"].items() if s.get("stored_bytes_per_sample")}
    unstored = [(n, s) for n, s in summary["students"].items()
                if n not in stored and s.get("accuracy_mean") is not None]
    colours = plt.get_cmap("tab10" if len(unstored) <= 10 else "tab20").colors     # a colour of its own each
    for k, (name, s) in enumerate(unstored):
        mean, std = 100 * s["accuracy_mean"], 100 * s.get("accuracy_std", 0.0)
        ax.axhline(mean, ls="--", lw=1, color=colours[k % len(colours)],
                   label=f"{name} (no store) {mean:.2f} ± {std:.2f}")
    for name, s in stored.items():
        if s.get("accuracy_mean") is None:
            continue
        x = s["stored_bytes_per_sample"]
        ax.errorbar([x], [100 * s["accuracy_mean"]], yerr=[100 * s.get("accuracy_std", 0.0)], fmt="o", capsize=3,
                    color="#4c72b0")
        ax.annotate(name, (x, 100 * s["accuracy_mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.margins(x=0.15)                 # room for the names of the last points
    ax.set_xlabel("bytes stored per training sample (all views, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Students against the bytes of their cached targets (mean ± std over seeds)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(histories: Mapping[str, list[dict]], path: Path) -> Path:
    """Validation accuracy per epoch (mean over seeds) of every student that has it."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = plt.get_cmap("tab10" if len(histories) <= 10 else "tab20").colors    # a colour of its own each
    for k, (name, rows) in enumerate(histories.items()):
        key = "val_top1" if rows and "val_top1" in rows[0] else "val_top1_0"
        points = [(r["epoch"], 100 * r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), label=name, lw=1, color=colours[k % len(colours)], ls="-" if k % 2 == 0 else "--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Students per epoch (mean over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_mentors(rows: list[dict], path: Path, *, title: str) -> Path:
    """ClassroomKD's mentors per epoch: rank, share of steps active, temperature (one line each)."""
    import matplotlib.pyplot as plt

    stats = [s for s in ("rank", "active", "temperature") if any(s in r for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(stats)), figsize=(4 * max(1, len(stats)), 3.2), squeeze=False)
    mentors = sorted({(int(r["mentor"]), str(r["name"])) for r in rows})
    for ax, stat in zip(axes[0], stats):
        for k, name in mentors:
            points = [(r["epoch"], r[stat]) for r in rows if int(r["mentor"]) == k and stat in r]
            ax.plot(*zip(*points), label=name, lw=1.2)
        ax.set_xlabel("epoch")
        ax.set_title(stat)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}: mentors per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
