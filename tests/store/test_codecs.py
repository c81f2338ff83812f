"""Storage codecs through their registry: the checks every registered codec passes, and a
test-only codec (tests/store/plugin_codec.py) cached, verified, read back, inspected and
distilled from with no edit outside its own file.

    .venv/bin/pytest tests/store/test_codecs.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import UserError
from pipeline.store import schema
from pipeline.store.codecs import CODECS, Codec, codec_class, make_codec, register
from pipeline.store.reader import StoreGroup
from pipeline.store.stats import target_stats
from pipeline.store.verify import verify_store
from tests.store.plugin_codec import from_bfloat16_bits, to_bfloat16_bits  # registers "test-bfloat16"
from tests.support.stores import store_files

PLUGIN = "test-bfloat16"
C, B = 7, 40


def _cases() -> list[tuple[str, str]]:
    return [(name, dtype) for name in CODECS.names() for dtype in codec_class(name).dtypes]


def _codec(name: str, dtype: str) -> Codec:
    return make_codec(name, num_classes=C, dtype=dtype, k=3 if "k" in codec_class(name).parameters else None)


def _block(codec: Codec, z: np.ndarray, labels: np.ndarray,
           mixed: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A block's arrays as the writer makes them: the codec's payload, the exact targets."""
    stats = target_stats(z, labels, mixed=mixed)
    parts = codec.encode(z, seed=0, view=1, block=2, where="test block")
    filled = {name: parts[name] if name in parts else stats[name] for name in codec.payload()}
    return {**filled, "entropy": stats["entropy"], "p_gt": stats["p_gt"], "pred": stats["pred"]}


@pytest.mark.parametrize("name,dtype", _cases())
def test_every_codec_encodes_decodes_and_checks_a_block(name: str, dtype: str) -> None:
    codec = _codec(name, dtype)
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((B, C)) * 3).astype(np.float32)
    labels = rng.integers(0, C, B)
    block = _block(codec, z, labels)
    for array, (row, want) in codec.payload().items():
        assert block[array].shape == (B,) + row and block[array].dtype == np.dtype(want), array
    again = codec.encode(z, seed=0, view=1, block=2, where="test block")       # the bytes depend on the logits only
    assert all(again[a].tobytes() == block[a].tobytes() for a in again)
    assert codec.payload_bytes_per_row() == sum(block[a][0].nbytes for a in codec.payload())
    dense = codec.decode({a: block[a] for a in codec.payload()})
    assert dense.shape == (B, C) and dense.dtype == np.float32 and np.isfinite(dense).all()
    assert codec.check(block, labels) == []
    conf = codec.max_prob({a: block[a][None] for a in codec.payload()})        # [V=1, B]
    assert conf.shape == (1, B) and ((conf > 0) & (conf <= 1 + 1e-6)).all()
    damaged = {**block, "p_gt": np.full(B, 2.0, np.float32)}
    assert any(p.startswith("p_gt:") for p in codec.check(damaged, labels))


@pytest.mark.parametrize("name,dtype", _cases())
def test_every_codec_checks_the_mixed_labels_p_gt_where_its_payload_determines_it(name: str, dtype: str) -> None:
    codec = _codec(name, dtype)
    rng = np.random.default_rng(1)
    z = (rng.standard_normal((B, C)) * 3).astype(np.float32)
    order = np.argsort(-z, axis=1)
    labels, partner = order[:, 0], order[:, 1]                  # kept by every codec that keeps logits (k = 3)
    z[np.arange(B), labels] += 2                                # p[label] - p[partner] well above any rounding
    lam = rng.uniform(0.7, 0.95, B).astype(np.float32)
    lam[:5] = 1                                                 # unmixed rows among them
    block = _block(codec, z, labels, mixed=(partner, lam))
    assert codec.check(block, labels, (partner, lam)) == []
    flipped = (partner, np.where(lam == 1, lam, 1 - lam))       # the same rows read with the other weights
    [p_gt] = [p for p in codec.check(block, labels, flipped) if p.startswith("p_gt:")]
    # logits kept: every flipped row is seen; k = 3 draws (at T_s = 1) bound p[y] within 1/3 only
    assert "rows off" in p_gt and (name == "sampled" or f"found {B - 5} rows off" in p_gt), p_gt
    assert any(p.startswith("p_gt:") for p in codec.check(block, labels))   # read as unmixed rows: off too


def test_sampled_bounds_p_gt_by_the_draws_at_its_own_temperature_1_only() -> None:
    rng = np.random.default_rng(2)
    z = (rng.standard_normal((B, C)) * 2).astype(np.float32)
    labels, partner = rng.integers(0, C, B), rng.integers(0, C, B)
    lam = rng.uniform(0, 1, B).astype(np.float32)
    for temperature, caught in ((1.0, True), (2.0, False)):
        codec = make_codec("sampled", num_classes=C, k=1000, temperature=temperature)
        block = _block(codec, z, labels, mixed=(partner, lam))
        assert codec.check(block, labels, (partner, lam)) == []
        block["p_gt"] = np.clip(block["p_gt"] + np.float32(0.01), 0, 1)      # 10 x the 1/k bound
        problems = [p for p in codec.check(block, labels, (partner, lam)) if p.startswith("p_gt:")]
        assert bool(problems) == caught, problems


def test_top_k_bounds_a_mixed_p_gt_whose_labels_are_not_kept() -> None:
    codec = make_codec("topk", num_classes=C, dtype="float32", k=2)
    z = np.tile(np.array([[6.0, 4.0, 1.0, 0.5, 0.0, -1.0, -2.0]], np.float32), (4, 1))
    labels, partner = np.array([0, 0, 5, 5]), np.array([6, 6, 6, 6])
    lam = np.full(4, 0.75, np.float32)
    block = _block(codec, z, labels, mixed=(partner, lam))
    assert codec.check(block, labels, (partner, lam)) == []
    # a row off by more than the k-th class's probability, whichever labels are kept
    block["p_gt"] = block["p_gt"] + np.float32(0.2)
    assert any("found 4 rows off" in p for p in codec.check(block, labels, (partner, lam)))


def test_the_registry_refuses_a_second_codec_of_a_name_and_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register(PLUGIN)(type("Again", (Codec,), {}))
    with pytest.raises(UserError, match=rf"storage: expected one of .*{PLUGIN}.*, found 'nope'"):
        schema.Layout(num_samples=10, num_classes=C, num_views=1, kind="nope")
    with pytest.raises(UserError, match=f"k: expected only with .* storage, found k=3 with '{PLUGIN}'"):
        schema.Layout(num_samples=10, num_classes=C, num_views=1, kind=PLUGIN, k=3)


def _cache(runner: CliRunner, teacher: Path, manifest: Path, out: Path, *extra: str) -> None:
    done = runner.invoke(cli, ["cache", "--teacher", str(teacher), "--manifest", str(manifest), "--out", str(out),
                               "--views", "2", "--rows-per-block", "64", "--micro-batch", "32", "--device", "cpu",
                               "--no-progress", *extra])
    assert done.exit_code == 0, done.output


def test_a_plugin_codec_caches_verifies_reads_inspects_and_trains(synthetic_teacher, tmp_path: Path) -> None:
    manifest, teacher = synthetic_teacher
    runner = CliRunner()
    store, exact = tmp_path / "bf16.zarr", tmp_path / "f32.zarr"
    _cache(runner, teacher, manifest, store, "--storage", PLUGIN)
    _cache(runner, teacher, manifest, exact, "--dtype", "float32")
    attrs = schema.read_attrs(store)
    assert attrs["storage"]["kind"] == PLUGIN and attrs["status"]["complete"]
    lay = schema.Layout.from_attrs(attrs)
    assert lay.num_samples % lay.rows_per_block and lay.num_views == 2        # a partial last block, 2 views
    assert (store / "logits_bf16").is_dir() and not (store / "logits").exists()

    before = store_files(store)
    _cache(runner, teacher, manifest, store, "--storage", PLUGIN)             # a rerun: nothing to compute
    assert store_files(store) == before

    verified = runner.invoke(cli, ["verify", str(store)])
    assert verified.exit_code == 0 and "ok" in verified.output, verified.output
    report = verify_store(store)
    assert report.ok and report.rows_recomputed > 0 and f"{PLUGIN} k=" not in report.summary

    rows = np.arange(lay.num_samples)
    for view in range(2):
        got = StoreGroup([store]).targets(view, rows)
        want = StoreGroup([exact]).targets(view, rows)
        rounded = from_bfloat16_bits(to_bfloat16_bits(want["logits"].numpy()))
        np.testing.assert_array_equal(got["logits"].numpy(), rounded)
        np.testing.assert_array_equal(got["entropy"].numpy(), want["entropy"].numpy())   # the exact targets
        assert not np.array_equal(rounded, want["logits"].numpy())                      # bfloat16 rounds

    shown = runner.invoke(cli, ["inspect", str(store), str(exact), "--json"])
    assert shown.exit_code == 0, shown.output
    conf = [s["per_view"][0]["mean_max_prob"] for s in json.loads(shown.output)["stores"]]
    assert conf[0] == pytest.approx(conf[1], abs=1e-2)

    planned = runner.invoke(cli, ["plan", "--num-samples", "1000", "--num-classes", "100", "--storage", PLUGIN])
    assert planned.exit_code == 0 and "logit payload: 200.0 bytes per sample-view (logits_bf16" in planned.output

    trained = runner.invoke(cli, ["distill", "--method", "kd", "--mentors", str(store), "--manifest", str(manifest),
                                  "--student", "mlp", "--epochs", "1", "--device", "cpu", "--no-progress",
                                  "--out", str(tmp_path / "kd.pt"), "--metrics", str(tmp_path / "kd.json")])
    assert trained.exit_code == 0 and (tmp_path / "kd.pt").is_file(), trained.output
    assert np.isfinite(json.loads((tmp_path / "kd.json").read_text())["train_loss"])

    chunk = store / schema.chunk_key("logits_bf16", 3, 1, 0)
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0x40
    chunk.write_bytes(bytes(data))
    damaged = verify_store(store)
    assert not damaged.ok and any(p.startswith("checksum: logits_bf16 view 1 block 0") for p in damaged.problems)
