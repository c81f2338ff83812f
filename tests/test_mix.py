"""Mixed views (MixUp / CutMix): replayed, cached with the teacher's answer on the mixed image, trained on.

    .venv/bin/pytest tests/test_mix.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import zarr
from click.testing import CliRunner

from pipeline import faults
from pipeline.cache import CacheConfig
from pipeline.cli import cli
from pipeline.config import ConfigError
from pipeline.data import build_manifest, default_views, open_split
from pipeline.data.mix import mix_params, mixed_labels
from pipeline.data.views import ViewSpec, apply_view, view_mixing, with_augment, with_mix
from pipeline.errors import UserError
from pipeline.inspect import inspect_stores
from pipeline.inspect_rank import rank_samples
from pipeline.manifest import Manifest
from pipeline.methods import create_method
from pipeline.models import load_model
from pipeline.store import schema
from pipeline.store.verify import verify_store
from pipeline.train import DistillConfig, distill
from pipeline.train.loader import DistillLoader
from tests.support.cli import one_error_line
from tests.support.data import write_imagefolder
from tests.support.distill import cache, untrained_teacher
from tests.support.stores import rewrite_chunk, store_files

VIEWS = 4
MIXED = {"augment": "randaugment", "erase": 0.5, "mix": "mixup,cutmix"}   # every view past 0 reads the stream
CACHE = {"views": VIEWS, "threads": 1, "rows_per_block": 4, **MIXED}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path, Path]:
    """A lazily decoded image folder (12 train rows, 3 classes), its teacher and its mixed store."""
    tmp = tmp_path_factory.mktemp("mix")
    root = write_imagefolder(tmp / "root", dirs={"train": 4, "val": 1})
    manifest = build_manifest("imagefolder", root, tmp / "f.parquet", image_size=16)
    teacher = untrained_teacher(manifest.path, tmp / "t.pt", arch="cnn")
    return manifest, teacher, cache(teacher, manifest.path, tmp / "mixed.zarr", **CACHE)


def _spec(manifest: Manifest) -> ViewSpec:
    return with_mix(with_augment(default_views(manifest), "randaugment", erase=0.5), "mixup,cutmix")


def test_mixing_is_recorded_only_when_given_and_checked() -> None:
    assert mix_params(None) == {}
    assert mix_params("cutmix,mixup", {"switch_prob": 0.25}) == {"mix": {
        "kinds": ["mixup", "cutmix"], "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.25, "prob": 1.0}}
    assert mix_params(["mixup"], {"mixup_alpha": 0.2}) == {"mix": {"kinds": ["mixup"], "mixup_alpha": 0.2, "prob": 1.0}}
    for kinds, options, key in (("blend", None, "mix"), ("mixup", {"mixup_alpha": -1}, "mix_options.mixup_alpha"),
                                ("cutmix", {"prob": 1.5}, "mix_options.prob"),
                                ("mixup", {"cutmix_alpha": 1.0}, "mix_options.cutmix_alpha"),
                                ("mixup", {"switch_prob": 0.5}, "mix_options.switch_prob"),
                                (None, {"prob": 0.5}, "mix_options")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            mix_params(kinds, options)


def test_a_mixed_view_is_the_partners_own_view_mixed_in_and_view0_is_unmixed(folder) -> None:
    manifest, _, _ = folder
    spec = _spec(manifest)
    ds = open_split(manifest, "train", views=spec)
    rows = np.arange(len(ds))
    m0 = ds.mixing(rows, np.zeros(len(rows), np.int64))
    assert (m0.partner == rows).all() and (m0.lam == 1).all()
    plain = open_split(manifest, "train", views=default_views(manifest))
    np.testing.assert_array_equal(torch.stack([ds[i][0] for i in rows]), torch.stack([plain[i][0] for i in rows]))
    kinds = set()
    for view in range(1, VIEWS):
        ds.set_view(view)
        m = ds.mixing(rows)
        assert (m.partner != rows).all() and ((m.lam > 0) & (m.lam < 1)).any()
        for i in rows:
            own = apply_view(spec, ds.samples.get(int(i)), sample_id=int(ds.sample_ids[i]), view=view)
            j = int(m.partner[i])
            other = apply_view(spec, ds.samples.get(j), sample_id=int(ds.sample_ids[j]), view=view)
            if m.cut[i]:
                top, bottom, left, right = m.box[i]
                want = own.clone()
                want[:, top:bottom, left:right] = other[:, top:bottom, left:right]
                h, w = own.shape[1:]
                assert m.lam[i] == np.float32(1 - (bottom - top) * (right - left) / (h * w))   # the area kept
            else:
                lam = torch.tensor(m.lam[i])
                want = own * lam + other * (1 - lam)
            kinds.add(bool(m.cut[i]))
            torch.testing.assert_close(ds[int(i)][0], want, rtol=0, atol=0)
    assert kinds == {True, False}   # switch_prob 0.5: both kinds among 36 mixed views


def test_unmixed_specs_and_stores_keep_format_3_and_their_arrays(folder, tmp_path) -> None:
    manifest, teacher, mixed = folder
    assert "mix" not in json.dumps(default_views(manifest).to_dict())
    plain = cache(teacher, manifest.path, tmp_path / "plain.zarr", views=VIEWS, threads=1, rows_per_block=4)
    attrs = json.loads((plain / "zarr.json").read_text())["attributes"]
    assert attrs["version"] == schema.FORMAT_VERSION == 3 and "mix" not in attrs["views"]["spec"]["params"]
    arrays = {p.name for p in plain.iterdir() if p.is_dir()}
    assert not arrays & set(schema.MIX_ARRAYS)
    checked = json.loads((plain / "checksum" / "zarr.json").read_text())["attributes"]["arrays"]
    assert checked == ["logits", "entropy", "p_gt", "pred"]
    mixed_attrs = json.loads((mixed / "zarr.json").read_text())["attributes"]
    assert mixed_attrs["version"] == schema.MIXED_FORMAT_VERSION == 4
    assert json.loads((mixed / "checksum" / "zarr.json").read_text())["attributes"]["arrays"] == \
        checked + list(schema.MIX_ARRAYS)


def test_stored_partners_and_lambdas_are_the_pure_function_and_view0_is_unmixed(folder) -> None:
    manifest, _, store = folder
    group = zarr.open_group(str(store), mode="r")
    ds = open_split(manifest, "train", views=_spec(manifest))
    rows = np.arange(len(ds))
    for view in range(VIEWS):
        m = ds.mixing(rows, np.full(len(rows), view))
        np.testing.assert_array_equal(group["mix_partner"][view], ds.sample_ids[m.partner])
        np.testing.assert_array_equal(group["mix_lambda"][view], m.lam)
    np.testing.assert_array_equal(group["mix_partner"][0], group["sample_id"][:])
    assert (group["mix_lambda"][0] == 1).all()


def test_stored_logits_are_the_teacher_on_the_image_rebuilt_from_partner_and_lambda(folder) -> None:
    manifest, teacher, store = folder
    group = zarr.open_group(str(store), mode="r")
    spec = ViewSpec.from_dict(json.loads((store / "zarr.json").read_text())["attributes"]["views"]["spec"])
    ds = open_split(manifest, "train", views=spec)
    ids, labels = group["sample_id"][:], group["label"][:]
    model, _ = load_model(teacher)
    size = ds.input_shape[-2:]
    for view in range(1, VIEWS):
        partner_rows = np.searchsorted(ids, group["mix_partner"][view])
        lam = group["mix_lambda"][view]
        # the boxes of the CutMix rows are the pure function's; their lambdas must be the stored ones
        draws = view_mixing(spec, ids, np.arange(len(ids)), view=view, num_rows=len(ids), size=size)
        np.testing.assert_array_equal(draws.lam, lam)
        xs = []
        for i, j in enumerate(partner_rows):
            own = apply_view(spec, ds.samples.get(i), sample_id=int(ids[i]), view=view)
            other = apply_view(spec, ds.samples.get(int(j)), sample_id=int(ids[j]), view=view)
            if draws.cut[i]:
                top, bottom, left, right = draws.box[i]
                own[:, top:bottom, left:right] = other[:, top:bottom, left:right]
                xs.append(own)
            else:
                xs.append(own * float(lam[i]) + other * (1 - float(lam[i])))
        with torch.no_grad():
            z = model(torch.stack(xs)).numpy()
        np.testing.assert_allclose(group["logits"][view].astype(np.float32), z, rtol=2e-3, atol=2e-3)
        p = torch.softmax(torch.from_numpy(z), -1).numpy()
        at = np.arange(len(z))
        np.testing.assert_allclose(group["p_gt"][view], lam * p[at, labels] + (1 - lam) * p[at, labels[partner_rows]],
                                   rtol=1e-4, atol=1e-6)


def test_mixed_stores_are_the_same_bytes_with_decoding_workers_and_after_a_resume(folder, tmp_path,
                                                                                  monkeypatch) -> None:
    manifest, teacher, reference = folder
    want = store_files(reference)
    assert store_files(cache(teacher, manifest.path, tmp_path / "workers.zarr", workers=2, **CACHE)) == want
    # interrupted after its 5th block, then the same command again: the missing blocks only
    monkeypatch.setenv(faults.VARIABLE, "block:5:interrupt")
    faults.reset()
    with pytest.raises(KeyboardInterrupt):
        cache(teacher, manifest.path, tmp_path / "resumed.zarr", **CACHE)
    monkeypatch.delenv(faults.VARIABLE)
    faults.reset()
    assert store_files(cache(teacher, manifest.path, tmp_path / "resumed.zarr", **CACHE)) == want


@pytest.mark.distributed
def test_mixed_stores_are_the_same_bytes_from_shards_in_other_processes(folder, tmp_path) -> None:
    manifest, teacher, reference = folder
    out = tmp_path / "shards.zarr"
    args = [sys.executable, "-m", "pipeline.cli", "cache", "--teacher", str(teacher), "--manifest", str(manifest.path),
            "--out", str(out), "--views", str(VIEWS), "--rows-per-block", "4", "--micro-batch", "32", "--threads", "1",
            "--device", "cpu", "--augment", "randaugment", "--erase", "0.5", "--mix", "mixup,cutmix", "--no-progress"]
    for shard in ("0/2", "1/2"):
        run = subprocess.run([*args, "--shard", shard], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    assert store_files(out) == store_files(reference)


def test_verify_passes_a_mixed_store_and_finds_a_flipped_byte_in_partners_or_lambdas(folder, tmp_path) -> None:
    _, _, store = folder
    assert verify_store(store).ok, str(verify_store(store))
    for name in schema.MIX_ARRAYS:
        copy = Path(shutil.copytree(store, tmp_path / f"{name}.zarr"))
        chunk = copy / schema.chunk_key(name, 2, 2, 1)
        data = bytearray(chunk.read_bytes())
        data[3] ^= 0x10
        chunk.write_bytes(bytes(data))
        report = verify_store(copy)
        assert not report.ok
        assert any(p.startswith(f"checksum: {name} view 2 block 1:") for p in report.problems), report.problems
        run = CliRunner().invoke(cli, ["verify", str(copy)])
        assert run.exit_code == 1 and f"{name} view 2 block 1" in run.output


@pytest.mark.parametrize("storage", [{}, {"storage": "topk", "k": 2}, {"storage": "sampled", "k": 1000}],
                         ids=["dense", "topk", "sampled"])
def test_verify_checks_the_mixed_p_gt_of_each_codec_and_finds_a_flipped_lambda(
        folder, tmp_path, storage) -> None:
    manifest, teacher, dense = folder
    store = cache(teacher, manifest.path, tmp_path / "s.zarr", **CACHE, **storage) if storage else dense
    assert verify_store(store).ok, str(verify_store(store))
    # the mixed (view, row) whose p_gt the flip lambda -> 1 - lambda moves most, both labels among the top 2
    group = zarr.open_group(str(dense), mode="r")
    ids, labels = group["sample_id"][:], group["label"][:]
    p = torch.softmax(torch.from_numpy(group["logits"][1:].astype(np.float32)), -1).numpy()    # [V - 1, N, C]
    lam = group["mix_lambda"][1:].astype(np.float64)
    partner_labels = labels[np.searchsorted(ids, group["mix_partner"][1:])]
    p_own = np.take_along_axis(p, labels[None, :, None].repeat(VIEWS - 1, 0), -1)[..., 0]
    p_other = np.take_along_axis(p, partner_labels[..., None], -1)[..., 0]
    kept = np.argsort(-p, axis=-1)[..., :2]
    both = (kept == labels[None, :, None]).any(-1) & (kept == partner_labels[..., None]).any(-1)
    moved = np.where(both, np.abs((2 * lam - 1) * (p_own - p_other)), 0)
    view, row = np.unravel_index(np.argmax(moved), moved.shape)
    view, row = int(view) + 1, int(row)
    assert moved[view - 1, row] > 0.01                          # > 2 / k: beyond the sampled store's bounds too
    block, start = row // 4, row // 4 * 4
    flipped = group["mix_lambda"][view, start:start + 4].copy()
    flipped[row - start] = 1 - flipped[row - start]
    copy = Path(shutil.copytree(store, tmp_path / "flipped.zarr"))
    rewrite_chunk(copy, "mix_lambda", view=view, block=block, values=flipped)
    [problem] = verify_store(copy).problems
    assert problem.startswith("p_gt: expected the mixed label's probability") and "found 1 rows off" in problem
    assert problem.endswith(f"at view {view} rows {start}:{start + 4}"), problem


def test_a_mixed_stores_stats_weigh_both_labels_and_an_unmixed_stores_are_the_plain_figures(folder, tmp_path) -> None:
    manifest, teacher, mixed = folder
    plain = cache(teacher, manifest.path, tmp_path / "plain.zarr", views=VIEWS, threads=1, rows_per_block=4)
    for store in (plain, mixed):
        group = zarr.open_group(str(store), mode="r")
        pred, p_gt, labels = group["pred"][:], group["p_gt"][:], group["label"][:]
        stats = group.attrs["status"]["stats"]
        own = [round(float((pred[v] == labels).mean()), 6) for v in range(VIEWS)]
        nll = [round(float(-np.log(np.maximum(p_gt[v], 1e-30)).mean()), 6) for v in range(VIEWS)]
        assert [s["nll"] for s in stats["per_view"]] == nll          # -log p_gt: of the mixed label where mixed
        accuracy = [s["accuracy"] for s in stats["per_view"]]
        if store == plain:
            assert accuracy == own
            continue
        lam = group["mix_lambda"][:].astype(np.float64)
        other = labels[np.searchsorted(group["sample_id"][:], group["mix_partner"][:])]
        weighed = [round(float((lam[v] * (pred[v] == labels) + (1 - lam[v]) * (pred[v] == other[v])).mean()), 6)
                   for v in range(VIEWS)]
        assert accuracy == weighed and accuracy[0] == own[0]          # view 0 is unmixed
        assert accuracy[1:] != own[1:]                                 # the partners' labels count
        assert stats["accuracy"] == round(float(np.mean(weighed)), 6)


def test_verify_teacher_rebuilds_the_mixed_views(folder) -> None:
    _, teacher, store = folder
    run = CliRunner().invoke(cli, ["verify", str(store), "--teacher", str(teacher), "--rows", "24", "--device", "cpu"])
    assert run.exit_code == 0 and "teacher spot-check ok - 24 (view, row) pairs" in run.output, run.output
    assert "top-1 agreement 1" in run.output


def test_a_student_of_another_size_of_a_cutmix_store_is_refused(folder) -> None:
    manifest, _, _ = folder
    from pipeline.data.views import for_model

    with pytest.raises(UserError, match=r"params\.input_size.*CutMix"):
        for_model(_spec(manifest), input_size=8)


def _first_steps(config: DistillConfig) -> list[tuple]:
    """(rows, view of each row, x, the student's logits, the step's loss dict) of every step."""
    seen: list[tuple] = []
    distill(config, on_step=lambda b, out: seen.append((b.rows.copy(), b.epoch, b.x.clone(), b.y.clone(),
                                                         out["logits"].detach().clone(), dict(out))))
    return seen


@pytest.mark.parametrize("method", ["kd", "nokd"])
def test_students_train_on_the_mixed_label(folder, tmp_path, method) -> None:
    manifest, teacher, store = folder
    common = {"student": "cnn", "manifest": str(manifest.path), "epochs": 2, "batch_size": 5, "device": "cpu",
              "progress": False, "out": str(tmp_path / f"{method}.pt")}
    # kd reads the mixed store; nokd takes the same mixing without one
    extra = {"mentors": (str(store),)} if method == "kd" else {"views": VIEWS, "mix": "mixup,cutmix"}
    steps = _first_steps(DistillConfig(method=method, **common, **extra))
    group = zarr.open_group(str(store), mode="r")
    ids, label = group["sample_id"][:], group["label"][:]
    mixed = 0
    for rows, epoch, _, y, z, out in steps:
        view = epoch % VIEWS                                     # cycle: epoch e is view e mod V
        partner = label[np.searchsorted(ids, group["mix_partner"][view][rows])]
        lam = torch.from_numpy(group["mix_lambda"][view][rows])
        ce = lam * F.cross_entropy(z, y, reduction="none") + (1 - lam) * F.cross_entropy(
            z, torch.from_numpy(partner.astype(np.int64)), reduction="none")
        torch.testing.assert_close(out["ce"], ce.mean(), rtol=1e-5, atol=1e-6)
        mixed += int((lam < 1).sum())
    assert mixed > 0


def test_mixed_labels_in_the_methods_are_the_weighted_cross_entropy() -> None:
    torch.manual_seed(0)
    z, zt = torch.randn(4, 5), torch.randn(1, 4, 5)
    y, partner = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 1, 0, 2])
    lam = torch.tensor([1.0, 0.25, 0.5, 0.9])
    soft = mixed_labels(y, partner, lam, 5)
    by_hand = (lam * F.cross_entropy(z, y, reduction="none")
               + (1 - lam) * F.cross_entropy(z, partner, reduction="none")).mean()
    torch.testing.assert_close(create_method("nokd")([z], {}, soft)["loss"], by_hand)
    out = create_method("kd", T=2.0, w_ce=0.3, w_kd=0.7)([z], {"logits": zt}, soft)
    torch.testing.assert_close(out["ce"], by_hand)
    torch.testing.assert_close(out["loss"], 0.3 * by_hand + 0.7 * out["kd"])


def test_a_method_that_compares_class_ids_refuses_a_mixed_store_in_one_line(folder, tmp_path) -> None:
    manifest, _, store = folder
    run = CliRunner().invoke(cli, ["distill", "--method", "ca-wkd", "--mentors", str(store), str(store),
                                   "--manifest", str(manifest.path), "--student", "cnn", "--epochs", "1",
                                   "--device", "cpu", "--out", str(tmp_path / "s.pt"), "--no-progress"])
    one_error_line(run, "method 'ca-wkd'", "mixed views", "kd")


def test_online_students_see_the_images_of_the_cached_run(folder, tmp_path) -> None:
    manifest, teacher, _ = folder
    store = cache(teacher, manifest.path, tmp_path / "mixup.zarr", views=3, threads=1, rows_per_block=4,
                  mix="mixup,cutmix")
    common = {"method": "kd", "student": "cnn", "manifest": str(manifest.path), "epochs": 3, "batch_size": 6,
              "device": "cpu", "progress": False}
    cached = _first_steps(DistillConfig(mentors=(str(store),), out=str(tmp_path / "c.pt"), **common))
    online = _first_steps(DistillConfig(online=True, teachers=(str(teacher),), views=3, mix="mixup,cutmix",
                                        out=str(tmp_path / "o.pt"), **common))
    assert len(cached) == len(online) == 6
    for (rows_c, _, x_c, *_), (rows_o, _, x_o, *_) in zip(cached, online):
        np.testing.assert_array_equal(rows_c, rows_o)
        torch.testing.assert_close(x_c, x_o, rtol=0, atol=0)
    # the first step, before the students' weights part (the cache holds fp16 logits): the same loss
    torch.testing.assert_close(cached[0][-1]["ce"], online[0][-1]["ce"], rtol=0, atol=0)
    torch.testing.assert_close(cached[0][-1]["kd"], online[0][-1]["kd"], rtol=2e-2, atol=2e-3)


def test_online_students_see_the_augmented_images_of_the_cached_run(folder, tmp_path) -> None:
    manifest, teacher, _ = folder
    store = cache(teacher, manifest.path, tmp_path / "ra.zarr", views=3, threads=1, rows_per_block=4,
                  augment="randaugment", augment_options={"n": 2, "m": 9}, erase=0.5)
    common = {"method": "kd", "student": "cnn", "manifest": str(manifest.path), "epochs": 3, "batch_size": 6,
              "device": "cpu", "progress": False}
    cached = _first_steps(DistillConfig(mentors=(str(store),), out=str(tmp_path / "c.pt"), **common))
    online = _first_steps(DistillConfig(online=True, teachers=(str(teacher),), views=3, augment="randaugment",
                                        augment_options={"n": 2, "m": 9}, erase=0.5, out=str(tmp_path / "o.pt"),
                                        **common))
    plain = _first_steps(DistillConfig(online=True, teachers=(str(teacher),), views=3, out=str(tmp_path / "p.pt"),
                                       **common))
    for (rows_c, epoch, x_c, *_), (rows_o, _, x_o, *_), (_, _, x_p, *_) in zip(cached, online, plain):
        np.testing.assert_array_equal(rows_c, rows_o)
        torch.testing.assert_close(x_c, x_o, rtol=0, atol=0)
        assert (epoch == 0) == torch.equal(x_c, x_p)          # views >= 1 are augmented, view 0 is not
    with pytest.raises(ConfigError, match="augment.*none with mentors"):
        DistillConfig(mentors=(str(store),), augment="randaugment", out=str(tmp_path / "x.pt"), **common)


def test_distill_loader_yields_partners_and_lambdas(folder) -> None:
    manifest, _, store = folder
    group = zarr.open_group(str(store), mode="r")
    with DistillLoader([store], manifest.path, batch_size=5, seed=0) as loader:
        assert loader.mixed
        epoch = loader.epoch(2)
        ds = open_split(manifest, "train", views=loader.view_spec, view=2)
        for (x, y, t), rows in zip(epoch, epoch.batches):
            assert set(t) == {"logits", "entropy", "p_gt", "mix_partner", "mix_label", "mix_lambda"}
            np.testing.assert_array_equal(t["mix_partner"].numpy(), group["mix_partner"][2][rows])
            np.testing.assert_array_equal(t["mix_lambda"].numpy(), group["mix_lambda"][2][rows])
            np.testing.assert_array_equal(t["mix_label"].numpy(), ds.labels[np.searchsorted(
                group["sample_id"][:], t["mix_partner"].numpy())])
            torch.testing.assert_close(x, torch.stack([ds[int(r)][0] for r in rows]), rtol=0, atol=0)


def test_inspect_figures_a_mixed_store_against_its_mixed_labels_and_ranks_view_0_only(folder, tmp_path) -> None:
    manifest, teacher, store = folder
    plain = cache(teacher, manifest.path, tmp_path / "plain.zarr", views=VIEWS, threads=1, rows_per_block=4)
    assert "mixed" not in inspect_stores([plain])["stores"][0]          # an unmixed store's summary as before
    group = zarr.open_group(str(store), mode="r")
    [summary] = inspect_stores([store])["stores"]
    assert summary["mixed"]
    stats = group.attrs["status"]["stats"]["per_view"]
    for view, (row, reliability) in enumerate(zip(summary["per_view"], summary["reliability"])):
        assert row["accuracy"] == pytest.approx(stats[view]["accuracy"], abs=1e-6)   # the store's own definition
        assert row["nll"] == pytest.approx(stats[view]["nll"], abs=1e-5)
        correct = [a * c for a, c in zip(reliability["accuracy"], reliability["count"]) if c]
        assert sum(correct) == pytest.approx(row["accuracy"] * group["label"].shape[0], abs=1e-4)
    run = CliRunner().invoke(cli, ["inspect", str(store), "--out", str(tmp_path / "report"),
                                   "--samples", str(tmp_path / "samples.parquet")])
    assert run.exit_code == 0 and "mixed views (" in run.output, run.output
    assert "against each row's mixed label" in (tmp_path / "report" / "report.html").read_text()
    samples = pq.read_table(tmp_path / "samples.parquet").to_pandas()
    name = summary["teacher"]
    for view in range(VIEWS):
        rows = samples[samples["view"] == view]
        np.testing.assert_array_equal(rows[f"{name}_mix_partner"], group["mix_partner"][view])
        np.testing.assert_array_equal(rows[f"{name}_mix_lambda"], group["mix_lambda"][view])
    for args in (["--out", str(tmp_path / "v1")], ["--samples", str(tmp_path / "v1.parquet")]):
        run = CliRunner().invoke(cli, ["inspect", str(store), "--view", "1", *args])
        one_error_line(run, "--view: expected 0 with stores of mixed views", "found 1")
    with pytest.raises(UserError, match="--view: expected 0 with stores of mixed views"):
        rank_samples([str(store)], teachers=[name], view=2)


@pytest.mark.parametrize("args, needle", [
    (["--mix", "blend"], "'mix'"),
    (["--mix", "mixup", "--mix-option", "mixup_alpha=-1"], "'mix_options.mixup_alpha'"),
    (["--mix", "cutmix", "--mix-option", "prob=1.5"], "'mix_options.prob'"),
    (["--mix", "mixup,cutmix", "--mix-option", "switch_prob=2"], "'mix_options.switch_prob'"),
    (["--mix", "mixup", "--mix-option", "alpha=0.2"], "'mix_options.alpha'"),
    (["--mix", "mixup", "--mix-option", "mixup_alpha"], "--mix-option"),
    (["--mix-option", "prob=0.5"], "'mix_options'"),
])
def test_cli_bad_mix_values_are_one_error_line(tmp_path, args, needle) -> None:
    run = CliRunner().invoke(cli, ["cache", "--teacher", "t.pt", "--manifest", "m.parquet", "--views", "2",
                                   "--out", str(tmp_path / "s.zarr"), "--no-progress", *args])
    one_error_line(run, needle)
    assert not (tmp_path / "s.zarr").exists()


def test_distill_takes_no_mixing_beside_mentors_and_plan_counts_the_mixed_arrays(folder, tmp_path) -> None:
    manifest, _, store = folder
    run = CliRunner().invoke(cli, ["distill", "--method", "kd", "--mentors", str(store), "--manifest",
                                   str(manifest.path), "--student", "cnn", "--out", str(tmp_path / "s.pt"),
                                   "--mix", "mixup"])
    one_error_line(run, "'mix'", "none with mentors")
    plain, mixed = (CliRunner().invoke(cli, ["plan", "--num-samples", "1000", "--num-classes", "10", "--views",
                                             "2", *extra]).output for extra in ((), ("--mixed",)))
    assert "mix_partner" not in plain and "mix_partner" in mixed and "mix_lambda" in mixed


def test_mixing_vector_data_is_one_error_line(synthetic_teacher, tmp_path) -> None:
    manifest, teacher = synthetic_teacher
    run = CliRunner().invoke(cli, ["cache", "--teacher", str(teacher), "--manifest", str(manifest), "--views", "2",
                                   "--out", str(tmp_path / "s.zarr"), "--no-progress", "--mix", "mixup"])
    one_error_line(run, "params.mix", "vector data")


def test_params_cache_section_and_help_take_the_mix_keys() -> None:
    section = {"teacher": "t.pt", "manifest": "m.parquet", "out": "o.zarr", "mix": "mixup,cutmix",
               "mix_options": {"mixup_alpha": 0.2, "prob": 0.5}}
    cfg = CacheConfig.from_dict(section, source="params.yaml", prefix="cache")
    assert (cfg.mix, cfg.mix_options) == ("mixup,cutmix", {"mixup_alpha": 0.2, "prob": 0.5})
    with pytest.raises(ConfigError, match=r"^params.yaml: cache.mix_options.prob: expected a number in \[0, 1\], "
                                          r"found -0.5$"):
        CacheConfig.from_dict({**section, "mix_options": {"prob": -0.5}}, source="params.yaml", prefix="cache")
    assert "--mix mixup,cutmix --mix-option mixup_alpha=0.8" in CliRunner().invoke(cli, ["cache", "--help"]).output


def test_a_mixed_store_has_version_4_only_and_an_unmixed_one_never(folder) -> None:
    _, _, store = folder
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    schema.check_format(attrs, str(store))
    with pytest.raises(UserError, match=r"field version: expected 4 \(a store of mixed views\), found 3$"):
        schema.check_format({**attrs, "version": 3}, str(store))
    spec = attrs["views"]["spec"]
    unmixed = {**attrs, "views": {**attrs["views"], "spec": {**spec, "params": {
        k: v for k, v in spec["params"].items() if k != "mix"}}}}
    with pytest.raises(UserError, match=r"field version: expected 2 or 3, found 4$"):
        schema.check_format(unmixed, str(store))
