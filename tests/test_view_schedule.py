"""``--view-schedule cycle|random``: which cached view each row of each epoch takes, and that its
input and its targets are of that same view.

    .venv/bin/pytest tests/test_view_schedule.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config import ConfigError
from pipeline.data import build_manifest
from pipeline.data.views import apply_view
from pipeline.errors import UserError
from pipeline.manifest import Manifest
from pipeline.train import DistillConfig, DistillLoader, distill
from pipeline.checkpoint import load_checkpoint
from pipeline.train.sampling import ViewSchedule
from tests.support.cli import one_error_line
from tests.support.distill import cache, untrained_teacher

VIEWS = 4


@pytest.fixture(scope="module")
def cifar_cache(cifar10_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    tmp = tmp_path_factory.mktemp("schedule")
    manifest = build_manifest("cifar10", cifar10_root, tmp / "c.parquet", val_fraction=0.2)
    teacher = untrained_teacher(manifest.path, tmp / "t.pt", arch="cnn")
    return manifest, cache(teacher, manifest.path, tmp / "t.zarr", views=VIEWS, threads=1, dtype="float32",
                           rows_per_block=8)


def test_cycle_is_epoch_mod_v_for_every_row() -> None:
    schedule = ViewSchedule("cycle", num_views=3, seed=5, sample_ids=np.arange(10, 20))
    for epoch in range(7):
        np.testing.assert_array_equal(schedule.views(epoch), np.full(10, epoch % 3))
    assert schedule.one_view_per_epoch


def test_random_is_a_pure_function_of_the_seed_and_covers_every_view_equally() -> None:
    ids = np.arange(1000, 1300)
    a = ViewSchedule("random", num_views=VIEWS, seed=1, sample_ids=ids)
    b = ViewSchedule("random", num_views=VIEWS, seed=1, sample_ids=ids)
    other = ViewSchedule("random", num_views=VIEWS, seed=2, sample_ids=ids)
    draws = np.stack([a.views(e) for e in range(100)])            # [epochs, rows]
    np.testing.assert_array_equal(draws, np.stack([b.views(e) for e in range(100)][::-1])[::-1])
    assert not np.array_equal(draws, np.stack([other.views(e) for e in range(100)]))
    assert not np.array_equal(draws[0], draws[1])                 # drawn afresh each epoch
    assert not a.one_view_per_epoch
    # Every view, view 0 included, with frequency 1/V (30,000 draws: 4 standard deviations is 0.01).
    freq = np.bincount(draws.ravel(), minlength=VIEWS) / draws.size
    np.testing.assert_allclose(freq, 1 / VIEWS, atol=0.01)
    # A row's draw is its own: the same sample id gives the same view whatever the other rows are.
    np.testing.assert_array_equal(ViewSchedule("random", num_views=VIEWS, seed=1, sample_ids=ids[::-1]).views(3),
                                  draws[3][::-1])
    # Over E epochs a row meets about V (1 - (1 - 1/V)^E) distinct views, as documented.
    seen = np.mean([len(set(draws[:8, r])) for r in range(len(ids))])
    assert abs(seen - VIEWS * (1 - (1 - 1 / VIEWS) ** 8)) < 0.1


def test_each_row_gets_the_input_and_the_targets_of_its_own_view(cifar_cache) -> None:
    manifest, store = cifar_cache
    with DistillLoader([store], manifest, batch_size=5, seed=3, view_schedule="random") as loader, \
            DistillLoader([store], manifest, batch_size=5, seed=3) as reference:
        raw = loader.dataset.samples
        kinds = set()
        for epoch in (0, 1):
            e = loader.epoch(epoch)
            assert e.view is None and len(np.unique(e.views)) > 1
            for (x, _, t), rows in zip(e, e.batches):
                views = e.views[rows]
                kinds.update(np.unique(views).tolist())
                for j, (row, view) in enumerate(zip(rows, views)):
                    want = apply_view(loader.view_spec, raw.get(int(row)), sample_id=int(loader.dataset.sample_ids[row]),
                                      view=int(view))
                    torch.testing.assert_close(x[j], want, rtol=0, atol=0)
                    stored = reference.cached.group.targets(int(view), np.array([row]))
                    torch.testing.assert_close(t["logits"][:, j], stored["logits"][:, 0], rtol=0, atol=0)
                    torch.testing.assert_close(t["p_gt"][:, j], stored["p_gt"][:, 0], rtol=0, atol=0)
        assert kinds == set(range(VIEWS))


def test_per_row_views_in_a_batch_equal_the_items(cifar_cache) -> None:
    manifest, store = cifar_cache
    with DistillLoader([store], manifest, batch_size=5, view_schedule="random") as loader:
        ds = loader.epoch(2).dataset
        rows = np.arange(len(ds))
        np.testing.assert_array_equal(ds.get_batch(rows)[0].numpy(), np.stack([ds[int(r)][0].numpy() for r in rows]))


def test_a_streamed_cache_refuses_random_in_one_line(cifar_cache) -> None:
    manifest, store = cifar_cache
    with pytest.raises(UserError, match="view_schedule: 'random'.*cache_mode memory") as err:
        DistillLoader([store], manifest, batch_size=5, view_schedule="random", cache_mode="stream")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="view_schedule: expected cycle or random, found 'shuffle'"):
        DistillLoader([store], manifest, batch_size=5, view_schedule="shuffle")


def test_distill_with_random_views_trains_and_records_the_schedule(cifar_cache, tmp_path) -> None:
    manifest, store = cifar_cache
    out = tmp_path / "s.pt"
    distill(DistillConfig(method="kd", mentors=(str(store),), manifest=str(manifest.path), student="cnn",
                          out=str(out), epochs=2, batch_size=8, device="cpu", progress=False,
                          view_schedule="random"))
    blob = load_checkpoint(out)
    assert blob["meta"]["config"]["view_schedule"] == "random"
    with pytest.raises(ConfigError, match="'view_schedule': expected cycle or random, found 'often'"):
        DistillConfig(method="kd", mentors=(str(store),), manifest=str(manifest.path), student="cnn",
                      out=str(out), view_schedule="often")


def test_cli_bad_view_schedule_is_one_error_line(tmp_path) -> None:
    run = CliRunner().invoke(cli, ["distill", "--method", "nokd", "--manifest", str(tmp_path / "m.parquet"),
                                   "--student", "mlp", "--out", str(tmp_path / "s.pt"), "--view-schedule", "often"])
    one_error_line(run, "view_schedule", "often")
    assert "--view-schedule cycle|random" in CliRunner().invoke(cli, ["distill", "--help"]).output


def test_resume_keeps_the_schedule_and_a_checkpoint_without_one_had_cycle(cifar_cache, tmp_path) -> None:
    manifest, store = cifar_cache
    out = tmp_path / "s.pt"
    settings = dict(method="kd", mentors=(str(store),), manifest=str(manifest.path), student="cnn", epochs=1,
                    batch_size=8, device="cpu", progress=False)
    distill(DistillConfig(out=str(out), **settings))
    blob = load_checkpoint(out)
    del blob["meta"]["config"]["view_schedule"]          # as written before the setting existed
    torch.save(blob, out)
    distill(DistillConfig(out=str(tmp_path / "more.pt"), resume=str(out), **settings))   # taken as cycle
    with pytest.raises(UserError, match="setting 'view_schedule' differs: checkpoint has 'cycle', this run 'random'"):
        distill(DistillConfig(out=str(tmp_path / "other.pt"), resume=str(out), view_schedule="random", **settings))
