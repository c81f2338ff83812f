"""Views are a pure function of (spec, sample_id, view): same pixels in any worker, order or process.

    .venv/bin/pytest tests/test_views.py -q
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader

from pipeline.data import ViewSpec, build_manifest, default_views, open_split
from pipeline.data.jitter import jitter_rows
from pipeline.data.views import (apply_view, batch_view, for_model, uniforms, uniforms_batch,
                                 view_geometry, with_augment, with_mix)
from pipeline.errors import UserError
from pipeline.manifest import Manifest
from tests.support.data import write_imagefolder

SMALL_RRC = {"size": 16, "resize": 20}


@pytest.fixture(scope="module")
def cifar(cifar10_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    tmp = tmp_path_factory.mktemp("cifar")
    return build_manifest("cifar10", cifar10_root, tmp / "c.parquet", val_fraction=0.2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    tmp = tmp_path_factory.mktemp("folder")
    return build_manifest("imagefolder", write_imagefolder(tmp / "root", dirs={"train": 4, "val": 2}), tmp / "f.parquet")


def test_spec_is_data(cifar: Manifest) -> None:
    spec = default_views(cifar, seed=3)
    assert spec.kind == "pad_crop_flip" and spec.seed == 3 and spec.params["pad"] == 4
    d = spec.to_dict()
    assert ViewSpec.from_dict(d) == spec and ViewSpec.from_dict(d).to_dict() == d
    assert hash(ViewSpec.from_dict(d)) == hash(spec)
    # Defaults are stored in the spec, so a recorded spec replays even if defaults change.
    assert ViewSpec("rrc_flip_jitter").params["scale"] == [0.08, 1.0]
    with pytest.raises(UserError, match="kind"):
        ViewSpec("mixup")
    with pytest.raises(UserError, match="params.padd"):
        ViewSpec("pad_crop_flip", params={"padd": 4})


def test_uniforms_are_pure_and_distinct() -> None:
    a = uniforms(0, 17, view=3)
    assert np.array_equal(a, uniforms(0, 17, view=3)) and ((a >= 0) & (a < 1)).all()
    assert not np.array_equal(a, uniforms(0, 17, view=4))
    assert not np.array_equal(a, uniforms(1, 17, view=3))
    assert not np.array_equal(a, uniforms(0, 18, view=3))
    batch = uniforms_batch(0, np.arange(20_000), view=3)
    assert np.array_equal(batch[17], a) and batch.shape == (20_000, 32)
    assert abs(batch.mean() - 0.5) < 0.005 and abs(np.corrcoef(batch[:, 0], batch[:, 1])[0, 1]) < 0.03


def test_view0_is_the_plain_image_and_other_views_differ(cifar: Manifest) -> None:
    plain = ViewSpec("pad_crop_flip", params={"pad": 4})
    ds = open_split(cifar, "train", views=plain, view=0)
    raw = ds.samples.array
    x0 = torch.stack([ds[i][0] for i in range(len(ds))])
    np.testing.assert_allclose(x0.numpy() * 255, raw.transpose(0, 3, 1, 2), atol=1e-3)
    normed = open_split(cifar, "train", view=0)  # default views: CIFAR-10 mean / std
    mean, std = (np.asarray(normed.views.params[k], dtype=np.float32)[:, None, None] for k in ("mean", "std"))
    np.testing.assert_allclose(normed[0][0].numpy(), (raw[0].transpose(2, 0, 1) / 255 - mean) / std, rtol=1e-5, atol=1e-6)
    ds.set_view(1)
    x1 = torch.stack([ds[i][0] for i in range(len(ds))])
    ds.set_view(2)
    x2 = torch.stack([ds[i][0] for i in range(len(ds))])
    assert not torch.equal(x0, x1) and not torch.equal(x1, x2)


@pytest.mark.parametrize("view", [0, 3])
def test_get_batch_equals_items(cifar: Manifest, view: int) -> None:
    ds = open_split(cifar, "train", view=view)
    rows = np.array([5, 0, 7, 7, 2])
    x, y = ds.get_batch(rows)
    assert torch.equal(x, torch.stack([ds[int(i)][0] for i in rows]))
    assert y.tolist() == ds.labels[rows].tolist()
    # reflect padding and an explicit crop size go through the same two paths
    spec = ViewSpec("pad_crop_flip", seed=1, params={"size": 28, "pad": 2, "padding_mode": "reflect"})
    raw, ids = ds.samples.array[rows], ds.sample_ids[rows]
    assert torch.equal(batch_view(spec, raw, sample_ids=ids, view=view),
                       torch.stack([apply_view(spec, r, sample_id=int(s), view=view) for r, s in zip(raw, ids)]))


def _epoch(ds, *, num_workers: int, order: np.ndarray) -> torch.Tensor:
    """All items of ``ds`` loaded in ``order``, returned sorted back by row index."""
    loader = DataLoader(ds, batch_size=5, sampler=order.tolist(), num_workers=num_workers)
    xs, rows = [], []
    for x, _, row in loader:
        xs.append(x)
        rows.append(row)
    x, row = torch.cat(xs), torch.cat(rows)
    return x[torch.argsort(row)]


@pytest.mark.parametrize("which", ["cifar", "folder"])
def test_same_pixels_whatever_workers_and_order(which: str, cifar: Manifest, folder: Manifest) -> None:
    if which == "cifar":
        ds = open_split(cifar, "train", view=3)
    else:
        ds = open_split(folder, "train", views=ViewSpec("rrc_flip_jitter", seed=5, params={**SMALL_RRC, "hue": 0.1}),
                        view=3)
    n = len(ds)
    ref = _epoch(ds, num_workers=0, order=np.arange(n))
    shuffled = _epoch(ds, num_workers=2, order=np.random.default_rng(0).permutation(n))
    assert torch.equal(ref, shuffled)
    assert ref.shape[1:] == torch.Size(ds.input_shape)


_SCRIPT = """
import hashlib, sys, torch
from pipeline.data import ViewSpec, open_split
from pipeline.manifest import load_manifest
m = load_manifest(sys.argv[1])
views = ViewSpec.from_dict(eval(sys.argv[2]))
ds = open_split(m, "train", views=views, view=int(sys.argv[3]))
x = torch.stack([ds[i][0] for i in reversed(range(len(ds)))])
print(hashlib.sha256(x.numpy().tobytes()).hexdigest())
"""


def _digest(ds) -> str:
    x = torch.stack([ds[i][0] for i in reversed(range(len(ds)))])
    return hashlib.sha256(x.numpy().tobytes()).hexdigest()


def test_same_pixels_in_separate_processes(folder: Manifest) -> None:
    spec = ViewSpec("rrc_flip_jitter", seed=2, params=SMALL_RRC)
    here = _digest(open_split(folder, "train", views=spec, view=4))
    runs = [subprocess.run([sys.executable, "-c", _SCRIPT, str(folder.path), repr(spec.to_dict()), "4"],
                           capture_output=True, text=True, timeout=120) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    assert [r.stdout.strip() for r in runs] == [here, here]


def test_rrc_shapes_and_eval_view(folder: Manifest) -> None:
    spec = ViewSpec("rrc_flip_jitter", seed=0, params=SMALL_RRC)
    ds = open_split(folder, "test", views=spec, view=0)
    assert ds.input_shape == (3, 16, 16) and not hasattr(ds, "get_batch")  # lazy: decode in workers
    x0, _, _ = ds[1]  # a grayscale file: converted to RGB
    assert x0.shape == (3, 16, 16) and torch.equal(x0, ds[1][0])
    ds.set_view(1)
    assert not torch.equal(ds[1][0], x0)
    assert default_views(folder).params["size"] == 224


def test_view_kind_must_fit_the_data(cifar: Manifest, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="identity"):
        open_split(cifar, "train", views=ViewSpec("identity"))
    syn = build_manifest("synthetic", tmp_path / "s", tmp_path / "s.parquet", num_samples=20, dim=2)
    with pytest.raises(UserError, match="kind"):
        open_split(syn, "train", views=ViewSpec("pad_crop_flip"))
    with pytest.raises(UserError, match="view"):
        open_split(syn, "train", view=-1)


# --- per-model resolution: the same crops and flips, another size ---------------------------------

UNNORMALISED = {"mean": None, "std": None}      # x * 255 gives the pixels back exactly


def _pixels(x: torch.Tensor) -> np.ndarray:
    """A view made without mean/std back to its uint8 HWC pixels."""
    return (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _smooth_image(width: int, height: int) -> Image.Image:
    """Colours that vary slowly (bicubic from 6 x 5 random pixels), so that resizing twice or once differ little."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)


@pytest.mark.parametrize("view", [0, 1, 2, 3, 4])
def test_a_160_px_model_sees_the_crop_of_a_224_px_teacher(view: int) -> None:
    img = _smooth_image(300, 260)
    teacher = ViewSpec("rrc_flip_jitter", seed=1)                 # 224 px, eval: shorter side to 256
    student = for_model(teacher, input_size=160)
    geometry = view_geometry(teacher, img.size, sample_id=5, view=view)
    assert view_geometry(student, img.size, sample_id=5, view=view) == geometry      # the same box and flip
    x_t, x_s = (apply_view(s, img, sample_id=5, view=view) for s in (teacher, student))
    assert x_t.shape == (3, 224, 224) and x_s.shape == (3, 160, 160)
    # the teacher's 224 px view resized to 160 px is the student's input, within interpolation
    resized = F.interpolate(x_t[None], size=(160, 160), mode="bilinear", antialias=True, align_corners=False)[0]
    assert float((resized - x_s).abs().mean()) < 0.02
    # exactly: without jitter, the student's pixels are the source's crop box resized to 160 px once
    plain = ViewSpec("rrc_flip_jitter", seed=1, params={"brightness": 0, "contrast": 0, "saturation": 0,
                                                         **UNNORMALISED})
    box, flip = view_geometry(plain, img.size, sample_id=5, view=view)
    assert (box, flip) == geometry
    expected = img.resize((160, 160), Image.BILINEAR, box=box)
    expected = expected.transpose(Image.FLIP_LEFT_RIGHT) if flip else expected
    small = apply_view(for_model(plain, input_size=160), img, sample_id=5, view=view)
    np.testing.assert_array_equal(_pixels(small), np.asarray(expected))
    if view > 0:  # the teacher's own random views crop that box too (view 0 resizes the whole image first)
        own = img.resize((224, 224), Image.BILINEAR, box=box)
        own = own.transpose(Image.FLIP_LEFT_RIGHT) if flip else own
        np.testing.assert_array_equal(_pixels(apply_view(plain, img, sample_id=5, view=view)), np.asarray(own))


@pytest.mark.parametrize("view", [0, 1, 2])
def test_pad_crop_flip_resizes_the_same_crop(cifar: Manifest, view: int) -> None:
    teacher = ViewSpec("pad_crop_flip", seed=2, params=UNNORMALISED)
    student = for_model(teacher, input_size=24)
    big, small = (open_split(cifar, "train", views=s, view=view) for s in (teacher, student))
    assert small.input_shape == (3, 24, 24)
    for i in range(len(big)):
        sid = int(big.sample_ids[i])
        assert view_geometry(student, (32, 32), sample_id=sid, view=view) == \
            view_geometry(teacher, (32, 32), sample_id=sid, view=view)
        expected = Image.fromarray(_pixels(big[i][0])).resize((24, 24), Image.BILINEAR)
        np.testing.assert_array_equal(_pixels(small[i][0]), np.asarray(expected))
    x, _ = small.get_batch(np.arange(len(small)))
    assert torch.equal(x, torch.stack([small[i][0] for i in range(len(small))]))


def test_for_model_changes_only_what_it_is_given() -> None:
    spec = ViewSpec("rrc_flip_jitter", seed=3)
    assert for_model(spec) == spec and for_model(spec, input_size=224) == spec     # its own size: the same spec
    assert "input_size" not in spec.to_dict()["params"]       # recorded only when given: older specs are unchanged
    student = for_model(spec, input_size=160, mean=[0.5] * 3, std=[0.25] * 3)
    assert ViewSpec.from_dict(student.to_dict()) == student
    assert student.params["input_size"] == 160 and student.params["mean"] == [0.5] * 3
    geometry = {k: v for k, v in spec.params.items() if k not in ("mean", "std")}
    assert {k: v for k, v in student.params.items() if k not in ("mean", "std", "input_size")} == geometry
    x = apply_view(student, _smooth_image(64, 48), sample_id=0, view=1)
    assert x.shape == (3, 160, 160) and float(x.min()) >= -2.0 and float(x.max()) <= 2.0
    with pytest.raises(UserError, match=r"params\.input_size': expected an integer >= 1, found 0"):
        ViewSpec("rrc_flip_jitter", params={"input_size": 0})
    with pytest.raises(UserError, match="not a parameter of 'identity'"):
        ViewSpec("identity", params={"input_size": 8})
    with pytest.raises(UserError, match="no resolution"):
        for_model(ViewSpec("identity"), input_size=8)


# --- batches: bit-identical to the per-sample path -----------------------------------------------

def _images(rng: np.random.Generator, n: int, *, mode: str, sizes: bool) -> list[Image.Image]:
    """``n`` random images of ``mode``, of varying sizes when ``sizes`` (else 28 x 28)."""
    out = []
    for _ in range(n):
        h, w = (int(rng.integers(12, 48)), int(rng.integers(12, 48))) if sizes else (28, 28)
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode))
    return out


GRAY = {"mean": [0.5], "std": [0.25]}
BATCH_SPECS = {
    "rrc": ViewSpec("rrc_flip_jitter", seed=1, params={"size": 28, "resize": 32}),
    "rrc strong jitter + hue": ViewSpec("rrc_flip_jitter", seed=2, params={
        **SMALL_RRC, "brightness": 0.9, "contrast": 1.5, "saturation": 2.0, "hue": 0.3}),
    "rrc input_size": for_model(ViewSpec("rrc_flip_jitter", seed=3, params={"size": 28, "resize": 32}), input_size=20),
    "rrc no jitter": ViewSpec("rrc_flip_jitter", seed=4, params={**SMALL_RRC, "brightness": 0, "contrast": 0,
                                                                 "saturation": 0, **UNNORMALISED}),
    "rrc augment + erase": with_augment(ViewSpec("rrc_flip_jitter", seed=5, params=SMALL_RRC), "randaugment",
                                        erase=0.5),
    "rrc trivialaugment": with_augment(ViewSpec("rrc_flip_jitter", seed=6, params=SMALL_RRC), "trivialaugment"),
    "pad_crop_flip": ViewSpec("pad_crop_flip", seed=7, params={"pad": 4}),
    "pad_crop_flip input_size + erase": with_augment(for_model(ViewSpec("pad_crop_flip", seed=8), input_size=20),
                                                     None, erase=0.5),
}


@pytest.mark.parametrize("name", list(BATCH_SPECS))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_batch_of_views_is_the_per_sample_views_bit_for_bit(name: str, mode: str) -> None:
    spec = BATCH_SPECS[name]
    if mode == "L" and spec.params["mean"] is not None:
        spec = ViewSpec(spec.kind, seed=spec.seed, params={**spec.params, **GRAY})
    rng = np.random.default_rng(len(name))
    sizes = spec.kind == "rrc_flip_jitter"          # pad_crop_flip batches share one size
    images = _images(rng, 24, mode=mode, sizes=sizes)
    ids = rng.choice(1_000_000, size=len(images), replace=False)
    arrays = [np.asarray(img) for img in images]
    for view in range(6):
        expected = torch.stack([apply_view(spec, img, sample_id=int(s), view=view) for img, s in zip(images, ids)])
        for raw in (images, arrays, np.stack(arrays) if not sizes else arrays):
            got = batch_view(spec, raw, sample_ids=ids, view=view)
            assert got.dtype == torch.float32 and torch.equal(got, expected), (name, mode, view)
        # one sample alone, and the batch's rows in another order, are the same rows
        assert torch.equal(batch_view(spec, images[:1], sample_ids=ids[:1], view=view), expected[:1])
        order = rng.permutation(len(images))
        assert torch.equal(batch_view(spec, [images[i] for i in order], sample_ids=ids[order], view=view),
                           expected[order])


def test_identity_batches_are_the_vectors() -> None:
    vectors = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    spec = ViewSpec("identity")
    x = batch_view(spec, vectors, sample_ids=np.arange(6), view=3)
    assert torch.equal(x, torch.stack([apply_view(spec, v, sample_id=i, view=3) for i, v in enumerate(vectors)]))
    with pytest.raises(UserError, match="view index"):
        batch_view(ViewSpec("rrc_flip_jitter"), _images(np.random.default_rng(0), 1, mode="RGB", sizes=False),
                   sample_ids=np.arange(1), view=-1)


@pytest.mark.parametrize("factor", [0.0, 0.3, 0.6, 0.999, 1.0, 1.2, 1.4, 2.7])
def test_the_batch_jitters_are_pils_image_enhance_on_every_pixel_value(factor: float) -> None:
    values = np.arange(256, dtype=np.uint8)
    r, g = np.meshgrid(values, values)       # every (red, green) pair, blue from a third pattern
    rgb = np.stack([r, g, (r.astype(np.int32) * 7 + g) % 256], axis=-1).astype(np.uint8)
    for img in (Image.fromarray(rgb), Image.fromarray(rgb).convert("L")):
        for name, enhancer in (("brightness", ImageEnhance.Brightness), ("contrast", ImageEnhance.Contrast),
                               ("saturation", ImageEnhance.Color)):
            expected = np.asarray(enhancer(img).enhance(factor))
            chw = np.asarray(img)[None] if img.mode == "L" else np.asarray(img).transpose(2, 0, 1)
            got = jitter_rows(name, chw[None].copy(), np.array([factor]))[0]
            np.testing.assert_array_equal(got, expected[None] if img.mode == "L" else expected.transpose(2, 0, 1))


@pytest.mark.parametrize("spec", [ViewSpec("rrc_flip_jitter", seed=2, params=SMALL_RRC),
                                  with_mix(with_augment(ViewSpec("rrc_flip_jitter", seed=3, params=SMALL_RRC),
                                                        "trivialaugment", erase=0.5), ["mixup", "cutmix"])],
                         ids=["plain", "augment + erase + mix"])
def test_a_datasets_batch_of_decoded_samples_is_its_items(folder: Manifest, spec: ViewSpec) -> None:
    ds = open_split(folder, "train", views=spec)
    n = len(ds)
    for view in range(5):
        ds.set_view(view)
        expected = torch.stack([ds[i][0] for i in range(n)])
        for rows in (np.arange(n), np.arange(1, n, 3)):    # a part of the split: partners decoded outside it
            got = ds.batch_of(rows, [ds.samples.get(int(i)) for i in rows])
            assert torch.equal(got, expected[rows]), view
