"""kdcache inspect's report for people: the rankings (planted label flips found, the streaming
top-N equal to a full sort), report.html and galleries/*.png of a tiny ImageFolder, the page in
headless Chromium with the network off, --label-issues against cleanlab, bad option values.

    .venv/bin/pytest tests/test_inspect_report.py -q

The Chromium test is skipped (with the reason) where ``chromium`` is not installed or cannot start;
the cleanlab tests where cleanlab is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from pipeline.cache import CacheConfig, cache_teacher
from pipeline.cli import cli
from pipeline.data import build_manifest
from pipeline.inspect_rank import TopN, rank_samples
from pipeline.inspect_report import thumbnails
from tests.support.cli import one_error_line
from tests.support.stores import make_fake_store

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("a_red", "b_green", "c_blue")        # ImageFolder sorts them: class c is colour channel c
# (class the image shows, index) -> the folder (label) it is filed under: the planted label errors
FLIPS = {("a_red", 2): "b_green", ("c_blue", 5): "a_red", ("b_green", 7): "c_blue"}
PER_CLASS_TRAIN = 10


def _colour_images(root: Path) -> Path:
    """``root/<split>/<label>/<colour>_<k>.png``: 16 px images, one channel dominant by a random
    amount; the images of FLIPS are filed under another class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", PER_CLASS_TRAIN), ("val", 2)):
        for c, name in enumerate(CLASSES):
            for k in range(n):
                pixels = rng.integers(0, 80, (16, 16, 3)).astype(np.uint8)
                pixels[:, :, c] += np.uint8(rng.integers(40, 170))
                folder = root / split / (FLIPS.get((name, k), name) if split == "train" else name)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / f"{name}_{k}.png")
    return root


@pytest.fixture(scope="module")
def colour_stores(tmp_path_factory) -> dict:
    """Two stand-in teachers (tests.support.color_teachers: sharp, blurry) cached over 2 views."""
    tmp = tmp_path_factory.mktemp("colour")
    manifest = tmp / "m.parquet"
    build_manifest("imagefolder", _colour_images(tmp / "imgs"), manifest, image_size=16, val_fraction=0.0)
    stores = []
    for name in ("sharp", "blurry"):
        stores.append(tmp / f"{name}.zarr")
        cache_teacher(CacheConfig(teacher=f"tests.support.color_teachers:{name}", manifest=str(manifest),
                                  out=str(stores[-1]), views=2, rows_per_block=8, device="cpu", threads=1,
                                  progress=False))
    return {"stores": [str(s) for s in stores], "manifest": manifest, "tmp": tmp}


def _sources(store: str) -> np.ndarray:
    from pipeline.manifest import load_manifest
    attrs = zarr.open_group(store, mode="r").attrs.asdict()
    return load_manifest(Path(store).parent / "m.parquet").split(attrs["manifest"]["split"]).source


def _planted() -> set[str]:
    return {f"train/{label}/{name}_{k}.png" for (name, k), label in FLIPS.items()}


def test_contradicted_ranking_puts_the_planted_label_flips_first(colour_stores):
    stores = colour_stores["stores"]
    ranked = rank_samples(stores, teachers=["sharp", "blurry"], view=0, top=10, per_class=3)
    source = _sources(stores[0])
    top = [source[r] for r in ranked.rows["contradicted"][: len(FLIPS)]]
    assert set(top) == _planted()
    # per class: each flip is among the contradicted samples of the class it was filed under
    for (name, k), label in FLIPS.items():
        rows = ranked.by_class["contradicted"][CLASSES.index(label)]
        assert f"train/{label}/{name}_{k}.png" in {source[r] for r in rows}
    # every teacher predicts against the label on each contradicted row
    details = ranked.details(ranked.rows["contradicted"])
    for d in details.values():
        assert all(t["pred"] != d["label"] for t in d["teachers"])


def test_streaming_top_n_equals_a_full_sort_with_ties():
    rng = np.random.default_rng(1)
    n_rows, n, m = 5000, 7, 3
    scores = rng.integers(0, 40, n_rows).astype(float)      # many ties: the lower row wins
    scores[rng.random(n_rows) < 0.2] = -np.inf               # not ranked
    classes = rng.integers(0, 5, n_rows)
    top = TopN(n, m)
    for start in range(0, n_rows, 333):
        rows = np.arange(start, min(start + 333, n_rows))
        top.add(scores[rows], rows, classes=classes[rows])
    ok = np.isfinite(scores)
    everything = np.flatnonzero(ok)[np.lexsort((np.flatnonzero(ok), -scores[ok]))]
    assert top.rows.tolist() == everything[:n].tolist()
    per_class = top.per_class()
    for c in range(5):
        assert per_class[c] == [r for r in everything if classes[r] == c][:m]


def _report(stores: list[str], out: Path, *, top: int, per_class: int) -> str:
    """``kdcache inspect STORES --out OUT --top --per-class``; the text of report.html."""
    result = CliRunner().invoke(cli, ["inspect", *stores, "--out", str(out), "--top", str(top),
                                      "--per-class", str(per_class)])
    assert result.exit_code == 0, result.output
    return (out / "report.html").read_text()


def test_report_page_and_contact_sheets(colour_stores, tmp_path):
    out = tmp_path / "out"
    html = _report(colour_stores["stores"], out, top=4, per_class=2)
    ranked = rank_samples(colour_stores["stores"], teachers=["sharp", "blurry"], view=0, top=4, per_class=2)
    expected = sum(map(len, ranked.rows.values())) + sum(len(r) for per in ranked.by_class.values()
                                                         for r in per.values())
    assert html.count('<img class="thumb"') == expected
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert "<script" not in html and "@import" not in html and "url(" not in html
    assert html.count('src="data:image/png;base64,') == expected + 2     # + the two figures
    for planted in _planted():
        assert planted in html                                           # the source path, to fix the label
    sheets = sorted(p.name for p in (out / "galleries").glob("*.png"))
    assert sheets == ["class_000.png", "class_001.png", "class_002.png", "contradicted.png", "disagree.png",
                      "uncertain.png"]
    assert Image.open(out / "galleries" / "contradicted.png").size[0] > 100


def test_thumbnails_show_the_cached_view(colour_stores):
    store = colour_stores["stores"][0]
    rows = list(range(6))
    plain, sources, names = thumbnails(store, rows, view=0)
    replayed, _, _ = thumbnails(store, rows, view=1)
    assert names == CLASSES and sources[0].startswith("train/")
    assert all(plain[r].size == (16, 16) for r in rows)
    assert any(not np.array_equal(np.asarray(plain[r]), np.asarray(replayed[r])) for r in rows)
    again, _, _ = thumbnails(store, rows, view=1)
    assert all(np.array_equal(np.asarray(replayed[r]), np.asarray(again[r])) for r in rows)


def test_vector_stores_get_tables_without_galleries(tmp_path):
    stores = [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    make_fake_store(stores[0], num_samples=300, num_classes=4, views=1, rows_per_block=64)
    make_fake_store(stores[1], num_samples=300, num_classes=4, views=1, rows_per_block=64, seed=2,
                    teacher_sha="u" * 64)
    result = CliRunner().invoke(cli, ["inspect", *map(str, stores), "--out", str(tmp_path / "out"), "--top", "5"])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "no thumbnails" in result.output
    html = (tmp_path / "out" / "report.html").read_text()
    assert '<img class="thumb"' not in html and not (tmp_path / "out" / "galleries").exists()
    assert html.count("<h2 id=\"uncertain\">") == 1
    ids = zarr.open_group(str(stores[0]), mode="r")["sample_id"][:]
    ranked = rank_samples(list(map(str, stores)), teachers=["a", "b"], top=5, per_class=0)
    for row in ranked.rows["uncertain"]:
        assert f"<td>{ids[row]}</td>" in html


def test_templates_are_package_data():
    tomllib = pytest.importorskip("tomllib")                  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["pipeline"]
    for template in (ROOT / "pipeline" / "templates").iterdir():
        assert any(template.relative_to(ROOT / "pipeline").match(g) for g in globs), template


# --- the page in a real browser ----------------------------------------------------------------

def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("chromium is not installed (Debian: apt-get install chromium)")


def _browse(page: Path, tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Open ``page`` in headless Chromium with every connection sent to a closed port; its output
    and the URLs the page itself asked for (net log requests of the file:// page, not the
    browser's own background requests)."""
    netlog = tmp / f"net-{len(list(tmp.glob('net-*')))}.json"
    args = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>", "--no-first-run", "--disable-background-networking",
            f"--user-data-dir={tmp / 'profile'}", f"--log-net-log={netlog}", "--net-log-capture-mode=Everything",
            *extra, page.as_uri()]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"chromium cannot start here: {err}")
    if done.returncode != 0:
        pytest.skip(f"chromium cannot start here (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    asked = [e["params"]["url"] for e in log["events"] if e["type"] == start
             and str(e["params"].get("network_isolation_key", "")).startswith("file://")]
    return done, asked


def test_report_renders_offline_in_headless_chromium(colour_stores, tmp_path):
    out = tmp_path / "out"
    cards = _report(colour_stores["stores"], out, top=5, per_class=2).count('<img class="thumb"')
    # the check itself: a page with one remote image is caught
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="http://example.invalid/x.png"><p>remote</p></body></html>')
    _, asked = _browse(bad, tmp_path, "--dump-dom")
    assert asked == ["http://example.invalid/x.png"]

    done, asked = _browse(out / "report.html", tmp_path, "--dump-dom")
    assert asked == []
    assert "kdcache inspect" in done.stdout and done.stdout.count('class="thumb"') == cards > 0
    shot = tmp_path / "shot.png"
    _browse(out / "report.html", tmp_path, f"--screenshot={shot}", "--window-size=1100,1600")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1600, 1100) and pixels.std() > 10          # not a blank page
    assert (pixels < 128).mean() > 0.01                                 # text, tables, thumbnails drawn


# --- label issues (cleanlab) ----------------------------------------------------------------------

def _probabilities(store: str) -> np.ndarray:
    z = zarr.open_group(store, mode="r")["logits"][0].astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def test_label_issues_agree_with_cleanlab_called_directly(colour_stores, tmp_path):
    filt = pytest.importorskip("cleanlab.filter")
    stores = colour_stores["stores"]
    samples, out = tmp_path / "s.parquet", tmp_path / "out"
    result = CliRunner().invoke(cli, ["inspect", *stores, "--samples", str(samples), "--out", str(out),
                                      "--label-issues"])
    assert result.exit_code == 0, result.output
    labels = zarr.open_group(stores[0], mode="r")["label"][:]
    probs = (_probabilities(stores[0]) + _probabilities(stores[1])) / 2
    direct = filt.find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    assert len(direct) >= len(FLIPS)
    table = pq.read_table(samples).to_pandas()
    view0 = table[table["view"] == 0].reset_index(drop=True)
    ranked = view0["label_issue_rank"].dropna().sort_values()
    assert view0.loc[ranked.index, "sample_id"].tolist() == view0.loc[direct, "sample_id"].tolist()
    assert ranked.tolist() == list(range(1, len(direct) + 1))
    assert table[table["view"] == 1]["label_issue_rank"].isna().all()
    assert (out / "galleries" / "label_issues_mean.png").is_file()
    assert "Label issues (cleanlab, mean)" in (out / "report.html").read_text()


def test_label_issues_per_teacher(colour_stores, tmp_path):
    filt = pytest.importorskip("cleanlab.filter")
    stores = colour_stores["stores"]
    samples = tmp_path / "s.parquet"
    result = CliRunner().invoke(cli, ["inspect", *stores, "--samples", str(samples), "--label-issues",
                                      "--label-issue-probs", "each"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(samples).to_pandas()
    view0 = table[table["view"] == 0].reset_index(drop=True)
    labels = zarr.open_group(stores[0], mode="r")["label"][:]
    for name, store in zip(("sharp", "blurry"), stores):
        direct = filt.find_label_issues(labels, _probabilities(store), return_indices_ranked_by="self_confidence")
        ranked = view0[f"{name}_label_issue_rank"].dropna().sort_values()
        assert ranked.index.tolist() == list(direct)


def test_label_issues_without_cleanlab_say_how_to_install(colour_stores, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanlab", None)
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    result = CliRunner().invoke(cli, ["inspect", *colour_stores["stores"], "--out", str(tmp_path / "o"),
                                      "--label-issues"])
    one_error_line(result, "--label-issues", "pip install", "kdcache[labels]")


@pytest.mark.parametrize("args, needle", [
    (["--top", "0"], "--top"),
    (["--per-class", "-1"], "--per-class"),
    (["--view", "2"], "--view"),
    (["--view", "-1"], "--view"),
    (["--label-issue-probs", "median"], "--label-issue-probs"),
    (["--label-issues"], "--out DIR"),
])
def test_bad_values_of_the_new_options_are_one_error_line(colour_stores, tmp_path, args, needle):
    out = [] if args == ["--label-issues"] else ["--out", str(tmp_path / "o")]
    one_error_line(CliRunner().invoke(cli, ["inspect", *colour_stores["stores"], *out, *args]), needle)
    assert not (tmp_path / "o" / "report.html").exists()
