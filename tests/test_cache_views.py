"""Many views of a block from one decode: the caching job decodes each source image once per block
for all its views, and writes the same bytes as decoding it once per view.

    .venv/bin/pytest tests/test_cache_views.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cache import run as cache_run
from pipeline.data import build_manifest
from pipeline.data.base import Samples
from pipeline.manifest import Manifest
from tests.support.data import write_imagefolder
from tests.support.distill import cache, untrained_teacher
from tests.support.stores import store_files

VIEWS = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    tmp = tmp_path_factory.mktemp("decode_once")
    root = write_imagefolder(tmp / "root", dirs={"train": 4, "val": 1})
    manifest = build_manifest("imagefolder", root, tmp / "f.parquet", image_size=16)
    return manifest, untrained_teacher(manifest.path, tmp / "t.pt", arch="cnn")


def _counting(monkeypatch) -> list[int]:
    """Count lazy decodes (``Samples.get`` of an image folder) in this process."""
    calls: list[int] = []
    get = Samples.get

    def counted(self, i):
        if self.array is None:
            calls.append(int(i))
        return get(self, i)

    monkeypatch.setattr(Samples, "get", counted)
    return calls


@pytest.mark.parametrize("views", [{}, {"augment": "trivialaugment"},
                                   {"augment": "randaugment", "erase": 0.5, "mix": "mixup,cutmix"}])
def test_one_decode_per_image_and_block_and_the_same_bytes_as_one_per_view(folder, tmp_path, monkeypatch,
                                                                           views) -> None:
    manifest, teacher = folder
    kw = {"views": VIEWS, "threads": 1, "rows_per_block": 5, **views}
    calls = _counting(monkeypatch)
    once = cache(teacher, manifest.path, tmp_path / "once.zarr", **kw)
    num_rows = len(manifest.split("train").sample_id)
    if "mix" in views:   # a mixed view decodes its partner's image too
        assert set(calls) == set(range(num_rows)) and len(calls) <= VIEWS * num_rows + 2, calls
    else:                # the teacher check opens view 0 of one sample; every other decode is one per image
        assert sorted(calls[-num_rows:]) == list(range(num_rows)) and len(calls) <= num_rows + 2, calls
    calls.clear()
    monkeypatch.setattr(cache_run, "views_per_pass", lambda layout, num_stores: 1)   # decode once per view
    per_view = cache(teacher, manifest.path, tmp_path / "per_view.zarr", **kw)
    assert len(calls) >= VIEWS * num_rows
    assert store_files(once) == store_files(per_view)


def test_blocks_are_cut_into_passes_of_at_most_the_budgeted_views() -> None:
    units = [(v, b) for v in range(5) for b in range(3)]
    assert cache_run.by_block(units) == [(0, [0, 1, 2, 3, 4]), (1, [0, 1, 2, 3, 4]), (2, [0, 1, 2, 3, 4])]
    assert cache_run.by_block(units, most=2)[:3] == [(0, [0, 1]), (0, [2, 3]), (0, [4])]
    assert cache_run.by_block([]) == []
