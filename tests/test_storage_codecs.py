"""Storage codecs for large label spaces: class-id dtypes, int8 dense logits, sampled logits.

    .venv/bin/pytest tests/test_storage_codecs.py -q

The sampled estimator is checked by Monte Carlo: over many independent draws, the mean gradient of
the sampled KD loss w.r.t. the student's logits is the dense KD gradient (a z-test per class, 5
sigma, fixed seeds), while top-k's gradient is off by many standard errors on the same example.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from pipeline import losses
from pipeline.cache import CacheConfig, write_cache
from pipeline.cli import cli
from pipeline.config import ConfigError
from pipeline.errors import UserError
from pipeline.methods import create_method
from pipeline.methods.base import SAMPLE_TEMPERATURE as METHOD_FIELD
from pipeline.store import schema
from pipeline.store.codecs import base as base_codec
from pipeline.store.codecs import dense as dense_codec
from pipeline.store.codecs import sampled as sampled_codec
from pipeline.store.codecs import topk as topk_codec
from pipeline.store.reader import SAMPLE_TEMPERATURE, StoreGroup
from pipeline.store.verify import verify_store
from tests.support.cli import one_error_line
from tests.support.distill import cache
from tests.support.stores import FakeFactory, fake_labels, fake_provenance, make_fake_store, store_files

N, C, RPB = 600, 10, 128                         # 5 blocks, the last one short


def _write(out, *, kind="sampled", k=4, num_classes=C, temperature=None, index_dtype=None, **kw):
    """A FakeFactory store of any layout (temperature and index_dtype included), through write_cache."""
    layout = schema.Layout(num_samples=N, num_classes=num_classes, num_views=2, kind=kind, k=k, rows_per_block=RPB,
                           micro_batch=64, temperature=temperature, index_dtype=index_dtype)
    return write_cache(out, factory=FakeFactory(num_classes), provenance=fake_provenance(N, num_classes, 2),
                       layout=layout, sample_id=np.arange(N, dtype=np.int64) * 3 + 7,
                       label=fake_labels(N, num_classes), progress=False, **kw)


def test_class_ids_take_the_smallest_unsigned_type():
    assert [base_codec.index_dtype(c) for c in (2, 256, 257, 65536, 65537)] == \
        ["uint8", "uint8", "uint16", "uint16", "uint32"]
    assert [sampled_codec.count_dtype(k) for k in (1, 255, 256, 70000)] == ["uint8", "uint8", "uint16", "uint32"]
    lay = schema.Layout(num_samples=10, num_classes=1000, num_views=1, kind="topk", k=5)
    assert lay.arrays()["topk_index"][2] == "uint16" and lay.storage_attrs()["index_dtype"] == "uint16"
    with pytest.raises(UserError, match="index_dtype"):
        schema.Layout(num_samples=10, num_classes=1000, num_views=1, kind="topk", k=5, index_dtype="uint8")


def test_a_version_2_store_with_uint16_class_ids_still_reads_and_resumes(tmp_path):
    new, old = tmp_path / "new.zarr", tmp_path / "old.zarr"
    make_fake_store(new, num_samples=N, kind="topk", k=3, rows_per_block=RPB)
    _write(old, kind="topk", k=3, index_dtype="uint16")
    group = zarr.open_group(str(old), mode="r+")
    storage = dict(group.attrs["storage"])
    del storage["index_dtype"], storage["temperature"]     # the attrs of a store of the previous release
    group.attrs["storage"] = storage
    assert group["topk_index"].dtype == np.uint16 and zarr.open_group(str(new))["topk_index"].dtype == np.uint8
    assert verify_store(old).ok
    a, b = StoreGroup([old]), StoreGroup([new])
    rows = np.arange(N)
    np.testing.assert_array_equal(a.targets(1, rows)["logits"].numpy(), b.targets(1, rows)["logits"].numpy())
    (old / "done" / "c.1.2").unlink()                      # killed before a marker: a rerun of the new code
    group.attrs["status"] = {"complete": False}
    result = make_fake_store(old, num_samples=N, kind="topk", k=3, rows_per_block=RPB)
    assert result.computed == 1 and result.complete and verify_store(old).ok
    assert zarr.open_group(str(old))["topk_index"].dtype == np.uint16


def test_int8_logits_are_within_half_a_step_and_targets_stay_exact(tmp_path):
    make_fake_store(tmp_path / "f32.zarr", num_samples=N, dtype="float32", rows_per_block=RPB)
    make_fake_store(tmp_path / "i8.zarr", num_samples=N, dtype="int8", rows_per_block=RPB)
    exact, q = zarr.open_group(str(tmp_path / "f32.zarr")), zarr.open_group(str(tmp_path / "i8.zarr"))
    assert q["logits_q"].dtype == np.int8 and "logits" not in q
    for name in ("entropy", "p_gt", "pred"):
        np.testing.assert_array_equal(q[name][:], exact[name][:])
    z = exact["logits"][1]
    scale = q["logits_scale"][1]
    got = StoreGroup([tmp_path / "i8.zarr"]).targets(1, np.arange(N))["logits"][0].numpy()
    err = np.abs(got - z)
    assert (err <= scale[:, None] / 2 + 1e-5 * np.abs(z)).all() and err.max() > scale.min() / 8
    np.testing.assert_allclose(got.max(axis=1), z.max(axis=1), rtol=1e-6)        # the row max is exact
    np.testing.assert_allclose(scale, (z.max(axis=1) - z.min(axis=1)) / 255, rtol=1e-6)
    assert verify_store(tmp_path / "i8.zarr").ok
    q["entropy"][0, :50] += 0.05
    assert any(p.startswith("entropy:") for p in verify_store(tmp_path / "i8.zarr").problems)
    flat = dense_codec.quantize_int8(np.full((2, 5), 3.0, np.float32))                 # a constant row
    np.testing.assert_array_equal(dense_codec.dequantize_int8(*flat), np.full((2, 5), 3.0, np.float32))


def test_sampled_store_is_byte_identical_across_shards_and_resumes(tmp_path):
    ref = tmp_path / "ref.zarr"
    _write(ref, k=6, temperature=2.0)
    for i in range(3):
        _write(tmp_path / "shards.zarr", k=6, temperature=2.0, shard=f"{i}/3")
    assert store_files(tmp_path / "shards.zarr") == store_files(ref)
    group = zarr.open_group(str(ref))
    attrs = schema.read_attrs(ref)["storage"]
    assert attrs["kind"] == "sampled" and attrs["temperature"] == 2.0 and attrs["k"] == 6
    assert group["sample_index"].dtype == np.uint8 and group["sample_count"].dtype == np.uint8
    count = group["sample_count"][:].astype(np.int64)
    assert (count.sum(axis=2) == 6).all() and verify_store(ref).ok
    assert not np.array_equal(group["sample_index"][0], group["sample_index"][1])   # views draw afresh
    with pytest.raises(UserError, match=r"storage\.temperature"):
        _write(ref, k=6, temperature=1.0)
    bad = tmp_path / "bad.zarr"
    _write(bad, k=6)
    zarr.open_group(str(bad), mode="r+")["sample_count"][0, :5, 0] = 9
    assert any(p.startswith("sample_count:") for p in verify_store(bad).problems)


def test_reader_serves_sampled_stores_as_logits_of_the_sampled_distribution(tmp_path):
    _write(tmp_path / "s.zarr", k=5, temperature=2.0)
    make_fake_store(tmp_path / "d.zarr", num_samples=N, rows_per_block=RPB)
    g = zarr.open_group(str(tmp_path / "s.zarr"))
    rows = np.arange(0, N, 7)
    for mode in ("memory", "stream"):
        group = StoreGroup([tmp_path / "d.zarr", tmp_path / "s.zarr"], mode=mode, window_blocks=5)
        if mode == "stream":
            group.stream(0, [np.arange(5)]).ensure(0)
        got = group.targets(0, rows)
        assert got[SAMPLE_TEMPERATURE].tolist() == [0.0, 2.0] and SAMPLE_TEMPERATURE == METHOD_FIELD
        p = torch.softmax(got["logits"][1] / 2.0, dim=1).numpy()
        want = np.zeros((len(rows), C))
        np.add.at(want, (np.repeat(np.arange(len(rows)), 5), g["sample_index"][0][rows].reshape(-1)),
                  g["sample_count"][0][rows].reshape(-1) / 5)
        np.testing.assert_allclose(p, want, atol=1e-6)
        np.testing.assert_array_equal(got["entropy"][1].numpy(), g["entropy"][0][rows])
        group.close()
    assert SAMPLE_TEMPERATURE not in StoreGroup([tmp_path / "d.zarr"]).targets(0, rows)


def _student_grad(loss_rows: torch.Tensor, z_s: torch.Tensor) -> np.ndarray:
    (grad,) = torch.autograd.grad(loss_rows.sum(), z_s)
    return grad.double().numpy()


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sampled_kd_gradient_is_unbiased_and_topk_is_not(temperature):
    rng = np.random.default_rng(0)
    classes, draws, k = 12, 20_000, 4
    z_t = (rng.normal(size=classes) * 3.0).astype(np.float32)
    z_s = torch.tensor(rng.normal(size=classes), dtype=torch.float32)
    teacher = np.repeat(z_t[None], draws, axis=0)
    index, count = sampled_codec.draw_samples(teacher, k=k, temperature=temperature, rng=np.random.default_rng(1))
    weight = torch.from_numpy(sampled_codec.sample_weights(count))
    student = z_s.repeat(draws, 1).requires_grad_(True)
    rows = losses.sampled_kd_loss(student, torch.from_numpy(index.astype(np.int64)), weight, temperature,
                                  reduction="none")
    grads = _student_grad(rows, student)                               # one independent estimate per row
    dense_z = torch.from_numpy(z_t)[None].requires_grad_(False)
    one = z_s[None].clone().requires_grad_(True)
    dense = _student_grad(losses.kd_kl(one, dense_z, temperature, reduction="none"), one)[0]
    mean, se = grads.mean(axis=0), grads.std(axis=0, ddof=1) / math.sqrt(draws)
    assert (np.abs(mean - dense) <= 5 * se + 1e-7).all(), np.abs(mean - dense) / se

    values, top = topk_codec.top_k(z_t[None], k)                            # top-k with the same payload size
    lse = schema.target_stats(z_t[None], np.array([0]))["logsumexp"]
    z_topk = torch.from_numpy(topk_codec.dense_from_topk(values, top, lse, classes))
    topk = _student_grad(losses.kd_kl(one, z_topk, temperature, reduction="none"), one)[0]
    assert (np.abs(topk - dense) / se).max() > 20                        # biased by many standard errors

    # the reader's dense logits give kd_kl the same gradient as the estimator, row by row
    z_tilde = torch.from_numpy(sampled_codec.dense_from_samples(index[:50], count[:50], classes, temperature))
    part = student.detach()[:50].clone().requires_grad_(True)
    np.testing.assert_allclose(_student_grad(losses.kd_kl(part, z_tilde, temperature, reduction="none"), part),
                               grads[:50], atol=1e-5)
    p_t = torch.softmax(torch.from_numpy(z_t).double() / temperature, 0)     # with H(p^T): the KL value itself
    h = -(p_t * p_t.log()).sum().float().repeat(draws)
    values_ = losses.sampled_kd_loss(student.detach(), torch.from_numpy(index.astype(np.int64)), weight, temperature,
                                     teacher_entropy=h, reduction="none").double().numpy()
    kl = losses.kd_kl(z_s[None], dense_z, temperature).item()
    assert abs(values_.mean() - kl) <= 5 * values_.std(ddof=1) / math.sqrt(draws) + 1e-6


def test_draws_follow_the_teacher_distribution():
    z = np.log(np.array([[0.5, 0.3, 0.2, 0.0]], np.float64) + 1e-300).astype(np.float32)
    index, count = sampled_codec.draw_samples(np.repeat(z, 4000, 0), k=8, temperature=1.0, rng=np.random.default_rng(3))
    freq = np.bincount(index.reshape(-1).astype(np.int64), weights=count.reshape(-1), minlength=4) / count.sum()
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2, 0.0], atol=0.01)
    assert freq[3] == 0                                                 # a class of probability 0 is never drawn
    i2, c2 = sampled_codec.draw_samples(np.repeat(z, 4000, 0), k=8, temperature=1.0, rng=np.random.default_rng(3))
    assert np.array_equal(index, i2) and np.array_equal(count, c2)


def test_methods_check_the_sampled_temperature(tmp_path):
    _write(tmp_path / "s.zarr", k=4, temperature=2.0)
    targets = StoreGroup([tmp_path / "s.zarr"]).targets(0, np.arange(64))
    y = torch.from_numpy(fake_labels(N, C)[:64]).long()
    z_s = torch.zeros(64, C, requires_grad=True)
    out = create_method("kd", T=2.0)([z_s], targets, y)
    out["loss"].backward()
    assert torch.isfinite(z_s.grad).all() and z_s.grad.abs().sum() > 0
    with pytest.raises(UserError, match=r"option 'T' expected 2, .* found 4; pass --option T=2"):
        create_method("kd")([z_s], targets, y)
    with pytest.raises(UserError, match="methods that read sampled stores: .*adaptive-alpha.*kd"):
        create_method("classroom")([z_s], {**targets, "logits": targets["logits"].repeat(2, 1, 1),
                                           "p_gt": targets["p_gt"].repeat(2, 1),
                                           SAMPLE_TEMPERATURE: torch.tensor([2.0, 2.0])}, y)


def test_config_and_layout_refuse_codecs_that_do_not_fit():
    with pytest.raises(ConfigError, match="temperature"):
        CacheConfig(teacher="t.pt", manifest="m.parquet", out="o.zarr", temperature=2.0)
    with pytest.raises(UserError, match="int8 is a dtype of dense storage only"):
        schema.Layout(num_samples=10, num_classes=5, num_views=1, kind="topk", k=2, dtype="int8")
    with pytest.raises(UserError, match="k: expected a positive number of draws"):
        schema.Layout(num_samples=10, num_classes=5, num_views=1, kind="sampled")
    with pytest.raises(UserError, match="temperature: expected a number > 0"):
        schema.Layout(num_samples=10, num_classes=5, num_views=1, kind="sampled", k=3, temperature=0.0)
    big = schema.Layout(num_samples=10, num_classes=5, num_views=1, kind="sampled", k=300)   # k > C: fine
    assert big.arrays()["sample_count"][2] == "uint16"


def test_cli_plan_reports_the_payload_of_every_codec():
    runner = CliRunner()
    base = ["plan", "--num-samples", "100000", "--num-classes", "1000"]
    for extra, array, per_row in ((["--dtype", "int8"], "logits_q", "1008.0"),
                                  (["--storage", "topk", "--k", "9"], "topk_index", "40.0"),
                                  (["--storage", "sampled", "--k", "13"], "sample_count", "39.0")):
        out = runner.invoke(cli, base + extra)
        assert out.exit_code == 0 and array in out.output, out.output
        assert f"logit payload: {per_row} bytes per sample-view" in out.output, out.output
    one_error_line(runner.invoke(cli, base + ["--storage", "topk", "--dtype", "int8", "--k", "3"]), "int8")


def test_cache_and_distill_a_sampled_store_end_to_end(synthetic_teacher, tmp_path):
    manifest, teacher = synthetic_teacher
    runner = CliRunner()
    store = tmp_path / "s.zarr"
    done = runner.invoke(cli, ["cache", "--teacher", str(teacher), "--manifest", str(manifest), "--out", str(store),
                               "--storage", "sampled", "--k", "4", "--device", "cpu", "--no-progress"])
    assert done.exit_code == 0, done.output
    assert runner.invoke(cli, ["verify", str(store)]).exit_code == 0
    args = ["distill", "--method", "kd", "--mentors", str(store), "--manifest", str(manifest), "--student", "mlp",
            "--epochs", "1", "--device", "cpu", "--no-progress"]
    one_error_line(runner.invoke(cli, args + ["--out", str(tmp_path / "a.pt")]), "option 'T' expected 1", "T=1")
    ok = runner.invoke(cli, args + ["--option", "T=1", "--out", str(tmp_path / "b.pt")])
    assert ok.exit_code == 0 and (tmp_path / "b.pt").exists(), ok.output
    one_error_line(runner.invoke(cli, ["cache", "--teacher", str(teacher), "--manifest", str(manifest), "--out",
                                       str(tmp_path / "t.zarr"), "--temperature", "2"]), "temperature")
    int8 = cache(teacher, manifest, tmp_path / "i8.zarr", views=1, dtype="int8")
    assert verify_store(int8).ok


def test_a_sampled_temperature_is_recorded_and_every_codec_is_inspected(synthetic_teacher, tmp_path):
    manifest, teacher = synthetic_teacher
    warm = cache(teacher, manifest, tmp_path / "t2.zarr", views=1, storage="sampled", k=8, temperature=2.0)
    assert schema.read_attrs(warm)["storage"]["temperature"] == 2.0
    dense = cache(teacher, manifest, tmp_path / "d.zarr", views=1)
    int8 = cache(teacher, manifest, tmp_path / "i8.zarr", views=1, dtype="int8")
    sampled = cache(teacher, manifest, tmp_path / "s.zarr", views=1, storage="sampled", k=64)
    result = CliRunner().invoke(cli, ["inspect", str(dense), str(int8), str(sampled), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    stores = json.loads((tmp_path / "r" / "summary.json").read_text())["stores"]
    conf = [s["per_view"][0]["mean_max_prob"] for s in stores]
    assert conf[1] == pytest.approx(conf[0], abs=1e-3)     # int8: the same confidences within quantization
    assert conf[2] == pytest.approx(conf[0], abs=0.02)     # sampled: the largest draw share, an estimate
