"""RandAugment, TrivialAugmentWide and random erasing replay: a pure function of (seed, sample, view).

    .venv/bin/pytest tests/test_augment.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torchvision
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import ConfigError
from pipeline.data import ViewSpec, build_manifest, default_views, open_split
from pipeline.data.views import apply_view, with_augment
from pipeline.errors import UserError
from pipeline.manifest import Manifest
from tests.support.cli import one_error_line
from tests.support.distill import cache, untrained_teacher
from tests.support.stores import store_files


@pytest.fixture(scope="module")
def cifar(cifar10_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    tmp = tmp_path_factory.mktemp("cifar")
    return build_manifest("cifar10", cifar10_root, tmp / "c.parquet", val_fraction=0.2)


def _plain(cifar: Manifest) -> ViewSpec:
    """pad_crop_flip without normalization: views are pixel values / 255, easy to compare."""
    spec = default_views(cifar, seed=3)
    return ViewSpec(spec.kind, seed=spec.seed, params={**spec.params, "mean": None, "std": None})


def _views(ds, view: int) -> np.ndarray:
    ds.set_view(view)
    return np.stack([ds[i][0].numpy() for i in range(len(ds))])


@pytest.mark.parametrize("augment, options", [("randaugment", {"n": 2, "m": 9}), ("trivialaugment", None)])
def test_augmented_views_replay_and_view0_stays_the_evaluation_view(cifar: Manifest, augment, options) -> None:
    plain = _plain(cifar)
    spec = with_augment(plain, augment, options, erase=0.5)
    ds, base = open_split(cifar, "train", views=spec), open_split(cifar, "train", views=plain)
    np.testing.assert_array_equal(_views(ds, 0), _views(base, 0))
    first = _views(ds, 2)
    # A spec read back from its JSON, in a fresh dataset, makes the same pixels.
    again = open_split(cifar, "train", views=ViewSpec.from_dict(json.loads(json.dumps(spec.to_dict()))))
    np.testing.assert_array_equal(_views(again, 2), first)
    # The geometry is the plain spec's; the augmentation changes most samples' pixels, and views differ.
    changed = [not np.array_equal(a, b) for a, b in zip(first, _views(base, 2))]
    assert sum(changed) >= len(changed) // 2, changed
    assert not np.array_equal(first, _views(ds, 3))


def test_get_batch_takes_the_augmented_views(cifar: Manifest) -> None:
    ds = open_split(cifar, "train", views=with_augment(_plain(cifar), "randaugment", erase=0.5), view=1)
    rows = np.array([0, 3, 7])
    np.testing.assert_array_equal(ds.get_batch(rows)[0].numpy(), np.stack([ds[int(r)][0].numpy() for r in rows]))


def test_erasing_fills_one_box_with_one_value_per_channel(cifar: Manifest) -> None:
    plain = _plain(cifar)
    spec = with_augment(plain, None, erase=1.0)
    raw = open_split(cifar, "train", views=plain).samples.get(0)
    boxes = set()
    for view in range(1, 6):
        before = apply_view(plain, raw, sample_id=5, view=view).numpy()
        after = apply_view(spec, raw, sample_id=5, view=view).numpy()
        rows, cols = np.nonzero((before != after).any(axis=0))
        assert rows.size, view                        # p = 1: every view past 0 is erased
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        box = after[:, top:bottom, left:right]
        assert (box == box[:, :1, :1]).all(), view    # one value per channel over the whole box
        outside = np.ones(before.shape[1:], bool)
        outside[top:bottom, left:right] = False
        np.testing.assert_array_equal(after[:, outside], before[:, outside])
        boxes.add((top, bottom, left, right))
    assert len(boxes) > 1                             # the box is drawn per view


def test_spec_records_the_torchvision_version_only_with_augmentations(cifar: Manifest) -> None:
    plain = default_views(cifar)
    assert with_augment(plain, None) is plain
    assert "torchvision" not in plain.params and "augment" not in json.dumps(plain.to_dict())
    spec = with_augment(plain, "trivialaugment")
    assert spec.params["torchvision"] == torchvision.__version__
    assert spec.params["augment"] == {"kind": "trivialaugment"} and "erase" not in spec.params
    assert with_augment(plain, "randaugment").params["augment"] == {"kind": "randaugment", "n": 2, "m": 9}


def test_views_past_0_under_another_torchvision_are_refused_in_one_line(cifar: Manifest) -> None:
    spec = with_augment(default_views(cifar), "randaugment")
    recorded = ViewSpec.from_dict({**spec.to_dict(), "params": {**spec.params, "torchvision": "0.1.0"}})
    assert recorded.params["torchvision"] == "0.1.0"   # read back as recorded, not as running
    ds = open_split(cifar, "train", views=recorded)    # view 0, the evaluation view, has no augmentation
    assert ds[0][0].shape == ds.input_shape
    with pytest.raises(UserError, match=r"torchvision 0\.1\.0.*install torchvision==0\.1\.0") as err:
        ds.set_view(1)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="torchvision"):
        ds.set_view(np.arange(len(ds)) % 2)                 # rows of views >= 1 too


@pytest.mark.parametrize("augment, options, erase, key", [
    ("autoaugment", None, None, "augment"),
    ("randaugment", {"n": -1}, None, "augment_options.n"),
    ("randaugment", {"m": 31}, None, "augment_options.m"),
    ("randaugment", {"m": 2.5}, None, "augment_options.m"),
    ("trivialaugment", {"m": 3}, None, "augment_options.m"),
    (None, {"n": 2}, None, "augment_options"),
    (None, None, 1.5, "erase"),
    (None, None, True, "erase"),
])
def test_bad_augment_values_name_the_key(tmp_path: Path, augment, options, erase, key) -> None:
    from pipeline.cache import CacheConfig

    with pytest.raises(ConfigError, match=f"cache config key '{key}'"):
        CacheConfig(teacher="t.pt", manifest="m.parquet", out=str(tmp_path / "s.zarr"), augment=augment,
                    augment_options=options, erase=erase)


@pytest.mark.parametrize("args, needle", [
    (["--augment", "autoaugment"], "'augment'"),
    (["--augment", "randaugment", "--augment-option", "n=2,m=40"], "'augment_options.m'"),
    (["--augment", "randaugment", "--augment-option", "n"], "--augment-option"),
    (["--augment", "randaugment", "--augment-option", "k=1"], "'augment_options.k'"),
    (["--augment-option", "m=3"], "'augment_options'"),
    (["--erase", "1.5"], "--erase"),
    (["--erase", "often"], "--erase"),
])
@pytest.mark.parametrize("command", ["cache", "distill"])
def test_cli_bad_augment_values_are_one_error_line(tmp_path: Path, args, needle, command) -> None:
    given = (["--teacher", "t.pt"] if command == "cache" else
             ["--method", "nokd", "--student", "cnn"])             # distill: a run without mentors, its own views
    run = CliRunner().invoke(cli, [command, *given, "--manifest", "m.parquet", "--views", "2",
                                   "--out", str(tmp_path / "s.zarr"), "--no-progress", *args])
    one_error_line(run, needle)
    assert not (tmp_path / "s.zarr").exists()


def test_cache_help_shows_augment_examples() -> None:
    run = CliRunner().invoke(cli, ["cache", "--help"])
    assert "--augment randaugment --augment-option n=2,m=9 --erase 0.25" in run.output


def _spec_params(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["views"]["spec"]["params"]


def test_augmented_stores_replay_byte_identically(cifar: Manifest, tmp_path: Path) -> None:
    teacher = untrained_teacher(cifar.path, tmp_path / "t.pt", arch="cnn")
    kw = {"views": 3, "threads": 1, "augment": "randaugment", "augment_options": {"n": 2, "m": 9}, "erase": 0.5}
    a = cache(teacher, cifar.path, tmp_path / "a.zarr", **kw)
    b = cache(teacher, cifar.path, tmp_path / "b.zarr", **kw)
    plain = cache(teacher, cifar.path, tmp_path / "plain.zarr", views=3, threads=1)
    files = store_files(a)
    assert files == store_files(b)
    attrs = _spec_params(a)
    assert attrs["augment"] == {"kind": "randaugment", "n": 2, "m": 9} and attrs["erase"]["p"] == 0.5
    assert attrs["torchvision"] == torchvision.__version__
    assert "torchvision" not in _spec_params(plain)
    plain_logits = {k: v for k, v in store_files(plain).items() if k.startswith("logits/")}
    aug_logits = {k: v for k, v in files.items() if k.startswith("logits/")}
    assert plain_logits.keys() == aug_logits.keys()
    assert any(plain_logits[k] != aug_logits[k] for k in plain_logits)   # the teacher saw other pixels


def test_params_cache_section_takes_the_same_keys() -> None:
    from pipeline.cache import CacheConfig

    section = {"teacher": "t.pt", "manifest": "m.parquet", "out": "o.zarr", "augment": "randaugment",
               "augment_options": {"n": 3}, "erase": 0.1}
    cfg = CacheConfig.from_dict(section, source="params.yaml", prefix="cache")
    assert (cfg.augment, cfg.augment_options, cfg.erase) == ("randaugment", {"n": 3}, 0.1)
    with pytest.raises(ConfigError, match=r"^params.yaml: cache.augment_options.m: expected an integer in \[0, 30\], "
                                          r"found 99$"):
        CacheConfig.from_dict({**section, "augment_options": {"m": 99}}, source="params.yaml", prefix="cache")
