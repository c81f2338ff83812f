"""The inspect report for people: one self-contained HTML page and contact sheets of the samples to look at.

    kdcache inspect caches/train/ce.zarr caches/train/mlp.zarr --out reports/inspect [--view 0] [--top 16]
        [--per-class 4] [--label-issues]

    from pipeline.inspect import inspect_stores, write_report
    from pipeline.inspect_rank import rank_samples
    from pipeline.inspect_report import write_page
    stores = ["caches/train/ce.zarr", "caches/train/mlp.zarr"]
    report = inspect_stores(stores)
    write_report(report, "reports/inspect")                      # the figures the page shows
    write_page(report, stores, out="reports/inspect", ranked=rank_samples(stores, teachers=["ce", "mlp"]))

``report.html`` holds the summary tables of ``pipeline.inspect``, its figures and galleries of
the rankings of ``pipeline.inspect_rank`` (most uncertain, most disagreed on, label contradicted
by every teacher; cleanlab's label issues with ``--label-issues``), overall and per class. Each
card shows the sample's thumbnail, id, source path and label, and under it each teacher's
prediction, ``p_gt`` and entropy. Every image is inline (``data:`` URIs), the style is inline and
there is no script: the page renders offline. Thumbnails are the cached view (``view``) replayed
from the manifest the stores recorded (without normalisation); vector data, or a manifest that is
gone or changed, gets the same rankings as tables. ``galleries/*.png`` are the same galleries as
matplotlib contact sheets (with the ``[plots]`` extra): one per ranking and one per class.
The page comes from the jinja2 template ``pipeline/templates/report.html.j2``.
"""

from __future__ import annotations

import base64
import io
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jinja2
import numpy as np
import torch
from PIL import Image

from pipeline.data import READERS
from pipeline.data.views import ViewSpec, apply_view
from pipeline.errors import DataError
from pipeline.files import atomic_path
from pipeline.inspect_rank import Ranked
from pipeline.manifest import Manifest, SplitRows, load_manifest
from pipeline.store.provenance import recorded_path
from pipeline.store.verify import check_complete

THUMB = 96                       # the longest side of a thumbnail, pixels
TITLES = {
    "uncertain": ("Most uncertain", "the highest mean entropy over the teachers"),
    "disagree": ("Teachers disagree", "the most teachers off the majority prediction, then the widest spread of p_gt"),
    "contradicted": ("Label contradicted by every teacher",
                     "every teacher predicts another class; lowest best p_gt first: candidates for label errors"),
}
FIGURES = ("entropy_hist.png", "reliability.png")


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "templates"),
                              autoescape=jinja2.select_autoescape(["html", "j2"]),
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _manifest(attrs: dict[str, Any], store: str) -> Manifest | None:
    """The manifest the store was cached from, or None (with one warning) when it is gone or changed."""
    path = recorded_path(attrs["manifest"].get("path"), store)
    if path is None or not path.is_file():
        warnings.warn(f"{store}: manifest {path} (field manifest.path) not found: the report has no thumbnails",
                      stacklevel=3)
        return None
    manifest = load_manifest(path)
    if manifest.sha256 != attrs["manifest"].get("sha256"):
        warnings.warn(f"{store}: manifest {path} changed since caching (field manifest.sha256): the report has "
                      "no thumbnails", stacklevel=3)
        return None
    return manifest


def _display_spec(attrs: dict[str, Any], manifest: Manifest) -> ViewSpec:
    """The cached views' geometry without normalisation (pixels in [0, 1])."""
    try:
        spec = ViewSpec.from_dict(attrs["views"]["spec"])
    except (DataError, KeyError, TypeError):
        spec = READERS.create(manifest.dataset).default_views(manifest, seed=int(attrs["views"].get("seed", 0)))
    return ViewSpec(spec.kind, seed=spec.seed, params={**spec.params, "mean": None, "std": None})


def thumbnails(store: str, rows: Sequence[int], *, view: int) -> tuple[dict[int, Image.Image], dict[int, str], tuple]:
    """Thumbnails (PIL, longest side <= THUMB) of store rows as the teachers saw view ``view``, their
    manifest sources, and the class names. No thumbnails for vector data or a missing manifest."""
    attrs, _ = check_complete(store)
    manifest = _manifest(attrs, store)
    if manifest is None:
        return {}, {}, ()
    split = manifest.split(attrs["manifest"]["split"])
    wanted = np.unique(np.asarray(list(rows), dtype=np.int64))
    subset = SplitRows(split.name, split.sample_id[wanted], split.label[wanted], split.source[wanted])
    sources = {int(r): str(s) for r, s in zip(wanted, subset.source)}
    samples = READERS.create(manifest.dataset).load(manifest, subset)
    if samples.kind != "image" or not len(wanted):
        return {}, sources, manifest.class_names
    spec = _display_spec(attrs, manifest)
    images = {}
    for i, row in enumerate(wanted.tolist()):
        x = apply_view(spec, samples.get(i), sample_id=int(subset.sample_id[i]), view=view)
        arr = (x.clamp(0, 1).mul(255).round().to(dtype=torch.uint8).permute(1, 2, 0).numpy())
        img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        if max(img.size) > THUMB:
            img.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
        images[row] = img
    return images, sources, manifest.class_names


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _cards(rows: Sequence[int], details: dict[int, dict], *, images: dict[int, Image.Image], sources: dict[int, str],
           class_name: Callable[[int], str]) -> list[dict[str, Any]]:
    cards = []
    for row in rows:
        d = details[row]
        cards.append({**d, "label_name": class_name(d["label"]), "source": sources.get(row),
                      "image": images.get(row),
                      "teachers": [{**t, "pred_name": class_name(t["pred"]), "right": t["pred"] == d["label"]}
                                   for t in d["teachers"]]})
    return cards


def write_page(report: dict[str, Any], stores: Sequence[str], *, out: str | Path, ranked: Ranked,
               label_issues: dict[str, np.ndarray] | None = None) -> list[Path]:
    """``report.html`` and ``galleries/*.png`` in ``out`` (module docstring); the paths written."""
    out = Path(out)
    stores = [str(s) for s in stores]
    view, top = ranked.view, ranked.top
    galleries: list[tuple[str, str, str, list[int]]] = [
        (name, *TITLES[name], rows) for name, rows in ranked.rows.items()]
    for name, rank in (label_issues or {}).items():
        order = np.argsort(np.where(rank > 0, rank, np.iinfo(np.int32).max), kind="stable")[: int((rank > 0).sum())]
        what = "averaged over the teachers" if name == "mean" else f"of teacher {name}"
        galleries.append((f"label_issues_{name}", f"Label issues (cleanlab, {name})",
                          f"cleanlab.filter.find_label_issues on the probabilities {what}, ranked by self-confidence; "
                          f"{int((rank > 0).sum())} flagged in all. A hint: teachers trained on these samples "
                          "are overconfident on them", order[:top].tolist()))
    wanted = {r for *_, rows in galleries for r in rows}
    wanted |= {r for per in ranked.by_class.values() for rows in per.values() for r in rows}
    details = ranked.details(sorted(wanted))
    images, sources, class_names = thumbnails(stores[0], sorted(wanted), view=view)

    def class_name(c: int) -> str:
        return f"{class_names[c]} ({c})" if 0 <= c < len(class_names) else str(c)

    def uri_cards(cards: list[dict]) -> list[dict]:
        return [{**c, "image": _data_uri(c["image"]) if c["image"] is not None else None} for c in cards]

    found = {"images": images, "sources": sources, "class_name": class_name}
    sections = [{"key": key, "title": title, "about": about, "cards": _cards(rows, details, **found)}
                for key, title, about, rows in galleries]
    per_class = []
    for c in range(ranked.num_classes):
        parts = [{"key": name, "title": TITLES[name][0],
                  "cards": _cards(per.get(c, []), details, **found)}
                 for name, per in ranked.by_class.items()]
        if any(p["cards"] for p in parts):
            per_class.append({"cls": c, "name": class_name(c), "parts": parts})
    figures = [{"name": f, "uri": "data:image/png;base64," + base64.b64encode((out / f).read_bytes()).decode("ascii")}
               for f in FIGURES if (out / f).is_file()]
    html = _environment().get_template("report.html.j2").render(
        report=report, stores=stores, view=view, figures=figures, has_images=bool(images),
        sections=[{**s, "cards": uri_cards(s["cards"])} for s in sections],
        per_class=[{**p, "parts": [{**q, "cards": uri_cards(q["cards"])} for q in p["parts"]]} for p in per_class],
        class_name=class_name, columns=SUMMARY_COLUMNS, across=report.get("across_teachers"),
        label_issues=bool(label_issues))
    out.mkdir(parents=True, exist_ok=True)
    page = out / "report.html"
    with atomic_path(page, suffix=".html") as tmp:
        Path(tmp).write_text(html, encoding="utf-8")
    written = [page]
    if images:
        written += _contact_sheets(sections, per_class, folder=out / "galleries")
    return written


SUMMARY_COLUMNS = (("accuracy", "accuracy"), ("nll", "NLL"), ("mean_entropy", "entropy H"),
                   ("mean_normalized_entropy", "H / log C"), ("mean_confidence_weight", "1 - H / log C"),
                   ("mean_p_gt", "p_gt"), ("mean_max_prob", "max prob"), ("ece", "ECE"))


def _contact_sheets(sections: list[dict], per_class: list[dict], *, folder: Path) -> list[Path]:
    """One PNG per ranking and one per class (a row of cards per ranking); none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # contact sheets are optional, as the plots: pip install 'kdcache[plots]'
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for s in sections:
        if s["cards"]:
            written.append(_sheet(plt, [(s["title"], s["cards"])], path=folder / f"{s['key']}.png"))
    for p in per_class:
        rows = [(f"{p['name']}: {q['title']}", q["cards"]) for q in p["parts"] if q["cards"]]
        written.append(_sheet(plt, rows, path=folder / f"class_{p['cls']:03d}.png"))
    return written


def _sheet(plt: Any, rows: list[tuple[str, list[dict]]], *, path: Path, per_line: int = 8) -> Path:
    """A grid of cards: each titled block of ``rows`` starts a new line; every card its image with
    the caption under it (id, label, each teacher's prediction and p_gt). Sizes in inches."""
    lines: list[tuple[str | None, list[dict]]] = []
    for title, cards in rows:
        for i in range(0, len(cards), per_line):
            lines.append((title if i == 0 else None, cards[i:i + per_line]))
    cols = min(per_line, max(len(c) for _, c in lines))
    teachers = len(lines[0][1][0]["teachers"])
    cell_w, image, text, heading, margin = 1.6, 1.1, 0.11 * (2 + teachers) + 0.1, 0.28, 0.1
    heights = [(heading if title else 0.0) + image + text for title, _ in lines]
    width, height = cols * cell_w + 2 * margin, sum(heights) + 2 * margin
    fig = plt.figure(figsize=(width, height))
    top = height - margin
    for (title, cards), h in zip(lines, heights):
        if title:
            fig.text(margin / width, (top - heading / 2) / height, title, fontsize=9, fontweight="bold", va="center")
            top -= heading
        for ci, card in enumerate(cards):
            left = margin + ci * cell_w
            ax = fig.add_axes(((left + (cell_w - image) / 2) / width, (top - image) / height, image / width,
                               image / height))
            ax.set_axis_off()
            img = np.asarray(card["image"])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            caption = [f"id {card['sample_id']}", f"label {card['label_name']}"[:26]]
            caption += [f"{t['name'][:8]}: {t['pred_name'][:14]} {t['p_gt']:.2f}" for t in card["teachers"]]
            fig.text((left + 0.05) / width, (top - image - 0.04) / height, "\n".join(caption), fontsize=5.5,
                     va="top", linespacing=1.25)
        top -= image + text
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
