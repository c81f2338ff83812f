"""Deterministic view replay: view ``v`` of a sample is a pure function of (spec, sample_id, v).

A random augmentation the student sees must be the one the teacher saw when its logits were
cached, so no view may depend on global RNG state, worker count, batch composition or order.
Each (spec.seed, sample_id, v) gets its own stream of uniforms from a keyed splitmix64
counter hash (written out below, so it cannot change with a numpy version; vectorised, so a
batch of 256 keys costs microseconds), and every random choice reads a fixed position of it.

    spec = ViewSpec("pad_crop_flip", seed=0, params={"pad": 4, "mean": [...], "std": [...]})
    x = apply_view(spec, image_uint8_hwc, sample_id=17, view=3)   # float32 tensor [C, H, W]
    xs = batch_view(spec, images, sample_ids=ids, view=3)   # [B, C, H, W]: the same views, a batch at once
    small = for_model(spec, input_size=24)          # the same crops and flips, resized to 24 px
    box, flip = view_geometry(spec, (32, 32), sample_id=17, view=3)   # where view 3 crops the image

Kinds:
- ``identity``: vectors (synthetic data) unchanged; every view equals view 0.
- ``pad_crop_flip``: CIFAR / Fashion-MNIST style: pad, random ``size`` crop, horizontal flip.
- ``rrc_flip_jitter``: ImageNet style: random-resized-crop, flip, colour jitter (brightness,
  contrast, saturation, hue in a random order). Eval: resize shorter side, center crop.
View 0 is always the evaluation transform (no randomness).

Image kinds optionally add, after the crop and flip of views >= 1, RandAugment or TrivialAugmentWide
and random erasing (``with_augment(spec, "randaugment", {"n": 2, "m": 9}, erase=0.25)``;
``pipeline.data.augment``), reading stream positions 32 and up, so the geometry of a view does not
change when augmentations are added. Such a spec records the torchvision version that made them.

Image kinds optionally mix views >= 1 with a partner sample of the same split, MixUp and/or CutMix
(``with_mix(spec, ["mixup", "cutmix"], {"mixup_alpha": 0.8})``; ``pipeline.data.mix``), reading stream
positions 128 and up. ``apply_view`` makes one sample's view unmixed; mixing needs the partner's
view too, so the split's datasets (``pipeline.data.dataset``) do it.

A view's geometry (the crop box in the source image and the flip: ``view_geometry``) is fixed by
the spec's ``seed`` and geometry parameters (``size``, ``pad``, ``resize``, ``scale``, ...); the
resolution and normalization are each model's own. ``input_size`` (image kinds, recorded only when
given) resizes the crop to another side, and ``mean``/``std`` normalise it: ``for_model(spec, ...)``
is the spec a model of another resolution or normalization takes, seeing the same crops and flips
(a 160 px student of a 224 px teacher's cache).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from pipeline.config import ConfigError
from pipeline.data.augment import augment_image, augment_params, num_uniforms
from pipeline.data.jitter import adjust_hue, jitter_batch
from pipeline.data.mix import MIX_AT, NUM_DRAWS, Mixing, draw_mixing, mix_params
from pipeline.errors import DataError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Every parameter with its default, per kind. The spec stores the merged values, so a
# recorded spec replays the same views even if these defaults change later.
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "identity": {},
    "pad_crop_flip": {"size": None, "pad": 4, "padding_mode": "constant", "flip": True, "mean": None, "std": None},
    "rrc_flip_jitter": {
        "size": 224, "resize": 256, "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "flip": True,
        "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.0,
        "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
    },
}

# Parameters of a model's inputs rather than the geometry: not merged in, recorded only when given,
# so the specs written before they existed stay the same.
MODEL_PARAMS: dict[str, tuple[str, ...]] = {"identity": (), "pad_crop_flip": ("input_size",),
                                            "rrc_flip_jitter": ("input_size",)}

# Augmentations after the crop and flip (pipeline.data.augment), recorded only when given, with the
# torchvision version whose pixels they replay: specs without them stay byte-identical.
AUGMENT_PARAMS: dict[str, tuple[str, ...]] = {"identity": (), "pad_crop_flip": ("augment", "erase", "torchvision"),
                                              "rrc_flip_jitter": ("augment", "erase", "torchvision")}

# Mixing with a partner sample (pipeline.data.mix), recorded only when given: specs without it stay
# byte-identical.
MIX_PARAMS: dict[str, tuple[str, ...]] = {"identity": (), "pad_crop_flip": ("mix",), "rrc_flip_jitter": ("mix",)}

_NUM_UNIFORMS = 32


def _jsonable(value: Any) -> Any:
    # Tuples become lists so a spec read back from JSON compares equal to the original.
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class ViewSpec:
    """How views are made: data, not code (recorded in caches and checkpoints)."""

    kind: str
    seed: int = 0
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_PARAMS:
            raise DataError(f"views field 'kind': unknown {self.kind!r}; expected one of: {', '.join(DEFAULT_PARAMS)}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise DataError(f"views field 'seed': expected an integer >= 0, found {self.seed!r}")
        defaults = DEFAULT_PARAMS[self.kind]
        optional = MODEL_PARAMS[self.kind] + AUGMENT_PARAMS[self.kind] + MIX_PARAMS[self.kind]
        unknown = sorted(set(self.params) - set(defaults) - set(optional))
        if unknown:
            raise DataError(
                f"views field 'params.{unknown[0]}': not a parameter of {self.kind!r}; "
                f"expected some of: {', '.join((*defaults, *optional)) or 'none'}"
            )
        given = {k: v for k, v in self.params.items() if not (k in optional and v is None)}
        if "input_size" in given:
            size = given["input_size"]
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
                raise DataError(f"views field 'params.input_size': expected an integer >= 1, found {size!r}")
            given["input_size"] = int(size)
        if given.get("augment") is not None or given.get("erase") is not None:
            given.update(_checked_augment(given))
        if "mix" in given:
            given.update(_checked_mix(given["mix"]))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "params", _jsonable({**defaults, **given}))

    @property
    def augmented(self) -> bool:
        """Whether views past 0 get photometric augmentations or erasing after the crop and flip."""
        return "augment" in self.params or "erase" in self.params

    @property
    def mixed(self) -> bool:
        """Whether views past 0 are mixed with a partner sample (MixUp / CutMix)."""
        return "mix" in self.params

    def to_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "params": _jsonable(self.params)}

    @classmethod
    def from_dict(cls, d: dict) -> "ViewSpec":
        if not isinstance(d, dict) or "kind" not in d:
            raise DataError(f"views: expected a dict with 'kind', 'seed', 'params', found {d!r}")
        return cls(kind=d["kind"], seed=d.get("seed", 0), params=dict(d.get("params") or {}))

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def _checked_augment(given: dict) -> dict:
    """``augment``/``erase``/``torchvision`` of a spec's params, checked; a recorded torchvision is kept."""
    augment, erase = given.get("augment"), given.get("erase")
    if augment is not None and (not isinstance(augment, dict) or "kind" not in augment):
        raise DataError(f"views field 'params.augment': expected a dict with 'kind', found {augment!r}")
    if erase is not None and (not isinstance(erase, dict) or "p" not in erase):
        raise DataError(f"views field 'params.erase': expected a dict with 'p', found {erase!r}")
    options = {k: v for k, v in (augment or {}).items() if k != "kind"}
    out = augment_params(augment and augment["kind"], options, erase=erase and erase["p"])
    if erase is not None:
        out["erase"] = {**out["erase"], **erase}
    out = {k: v for k, v in out.items() if given.get(k) is not None or k == "torchvision"}
    return {**out, "torchvision": given.get("torchvision") or out["torchvision"]}


def with_augment(spec: ViewSpec, augment: str | None, options: dict | None = None, *,
                 erase: float | None = None) -> ViewSpec:
    """``spec`` with RandAugment or TrivialAugmentWide (``augment``) and random erasing (probability
    ``erase``) after its crop and flip; both None: ``spec`` itself (its views unchanged)."""
    extra = augment_params(augment, options, erase=erase)
    if not extra:
        return spec
    if spec.kind == "identity":
        raise DataError("views field 'params.augment': vector data ('identity' views) takes no image augmentation")
    return ViewSpec(spec.kind, seed=spec.seed, params={**spec.params, **extra})


def with_view_options(spec: ViewSpec, settings: Any) -> ViewSpec:
    """``spec`` with the augmentations and mixing of views >= 1 that ``settings`` sets (its ``augment``,
    ``augment_options``, ``erase``, ``mix``, ``mix_options``: a ``CacheConfig`` or ``DistillConfig``)."""
    spec = with_augment(spec, settings.augment, settings.augment_options, erase=settings.erase)
    return with_mix(spec, settings.mix, settings.mix_options)


def check_view_options(settings: Any) -> None:
    """The view settings of ``settings`` (as ``with_view_options`` reads them) checked; a mistake is a
    ``ConfigError`` worded as a key of its section."""
    try:
        augment_params(settings.augment, settings.augment_options, erase=settings.erase)
        mix_params(settings.mix, settings.mix_options)
    except ConfigError as err:
        raise ConfigError(err.problem, key=err.key, section=settings.section) from None


def _checked_mix(mix: Any) -> dict:
    """The ``mix`` entry of a spec's params, checked (``pipeline.data.mix.mix_params``)."""
    if not isinstance(mix, dict) or "kinds" not in mix:
        raise DataError(f"views field 'params.mix': expected a dict with 'kinds', found {mix!r}")
    return mix_params(mix["kinds"], {k: v for k, v in mix.items() if k != "kinds"})


def with_mix(spec: ViewSpec, kinds: Any, options: dict | None = None) -> ViewSpec:
    """``spec`` whose views >= 1 are mixed with a partner sample: ``kinds`` mixup, cutmix or both
    (a list or ``"mixup,cutmix"``), ``options`` those of ``pipeline.data.mix.mix_params``; ``kinds``
    None: ``spec`` itself."""
    extra = mix_params(kinds, options)
    if not extra:
        return spec
    if spec.kind == "identity":
        raise DataError("views field 'params.mix': vector data ('identity' views) takes no MixUp or CutMix; "
                        "mixing is for image views")
    return ViewSpec(spec.kind, seed=spec.seed, params={**spec.params, **extra})


_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (array arithmetic wraps modulo 2**64, as intended)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms_batch(seed: int, sample_ids: np.ndarray, *, view: int, n: int = _NUM_UNIFORMS,
                   start: int = 0) -> np.ndarray:
    """[B, n - start] floats in [0, 1), positions ``start`` .. ``n - 1`` of each stream: row b is a pure
    function of (seed, sample_ids[b], view).

    The key hashes seed, sample_id and view in turn; position j of the stream is
    ``mix(key + (j + 1) * golden)``, i.e. splitmix64 started from the key.
    """
    golden = np.uint64(_GOLDEN)
    ids = np.asarray(sample_ids, dtype=np.int64).astype(np.uint64).reshape(-1)
    key = _mix64(np.full(ids.shape, int(seed), dtype=np.uint64) + golden)
    key = _mix64((key ^ ids) + golden)
    key = _mix64((key ^ np.uint64(int(view))) + golden)
    state = _mix64(key[:, None] + _steps(start, n)[None, :])
    return (state >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@functools.lru_cache(maxsize=16)
def _steps(start: int, n: int) -> np.ndarray:
    """The stream constants ``(j + 1) * golden`` (mod 2**64) of positions ``start`` .. ``n - 1``, built once."""
    steps = np.asarray([(j + 1) * _GOLDEN % (1 << 64) for j in range(start, n)], dtype=np.uint64)
    steps.flags.writeable = False
    return steps


def uniforms(seed: int, sample_id: int, *, view: int, n: int = _NUM_UNIFORMS) -> np.ndarray:
    """``n`` floats in [0, 1), a pure function of (seed, sample_id, view)."""
    return uniforms_batch(seed, np.asarray([sample_id]), view=view, n=n)[0]


def view_mixing(spec: ViewSpec, sample_ids: np.ndarray, rows: np.ndarray, *, view: int, num_rows: int,
                size: tuple[int, int]) -> Mixing:
    """The mixing of ``rows`` (their ``sample_ids``) of a split of ``num_rows`` rows in ``view``, on views
    of ``size`` = (H, W) pixels (``pipeline.data.mix``): a pure function of (spec, sample id, row, view);
    view 0 and specs that do not mix: every row its own partner, lambda 1."""
    if view == 0 or not spec.mixed:
        return Mixing.unmixed(rows)
    u = uniforms_batch(spec.seed, sample_ids, view=view, n=MIX_AT + NUM_DRAWS, start=MIX_AT)
    return draw_mixing(spec.params["mix"], u, rows, num_rows=num_rows, size=size)


def output_shape(spec: ViewSpec, native_shape: tuple) -> tuple[int, ...]:
    """Shape of a view given the raw sample shape ((d,) or (H, W, C))."""
    if spec.kind == "identity":
        return tuple(native_shape)
    channels, side = native_shape[-1], spec.params.get("input_size")
    if side is not None:
        return (channels, side, side)
    if spec.kind == "pad_crop_flip":
        size = spec.params["size"]
        return (channels, size or native_shape[0], size or native_shape[1])
    return (channels, spec.params["size"], spec.params["size"])


def for_model(spec: ViewSpec, *, input_size: int | None = None, mean: list | None = None,
              std: list | None = None) -> ViewSpec:
    """The views of ``spec`` as another model takes them: the same crop boxes and flips (the same
    ``view_geometry``), resized to ``input_size`` a side and normalised with ``mean``/``std`` (each
    None: as in ``spec``). An ``input_size`` equal to the crop's own size changes nothing."""
    if spec.kind == "identity":
        if input_size is not None or mean is not None or std is not None:
            raise DataError("views field 'params.input_size': vector data ('identity' views) has no resolution "
                            "or normalization")
        return spec
    params = dict(spec.params)
    if (input_size is not None and input_size != params.get("input_size", params["size"])
            and "cutmix" in params.get("mix", {}).get("kinds", [])):
        raise DataError(f"views field 'params.input_size': {input_size} differs from the views' own size, and "
                        "their CutMix boxes and lambdas are cut in the views' own pixels; use the same input size")
    if input_size is not None:
        params["input_size"] = None if input_size == params["size"] else input_size
    for key, value in (("mean", mean), ("std", std)):
        if value is not None:
            params[key] = list(value)
    return ViewSpec(spec.kind, seed=spec.seed, params=params)


def view_geometry(spec: ViewSpec, image_size: tuple[int, int], *, sample_id: int,
                  view: int) -> tuple[tuple[float, float, float, float], bool]:
    """Where view ``view`` of a ``(width, height)`` image crops it and whether it flips it:
    ``((left, top, right, bottom), flip)`` in source pixels (pad_crop_flip: negative inside the
    padding). It does not depend on ``input_size``, ``mean`` or ``std``."""
    if spec.kind == "identity":
        raise DataError("views field 'kind': 'identity' applies to vector data, which is not cropped")
    width, height = image_size
    u = uniforms(spec.seed, sample_id, view=view) if view > 0 else None
    p = spec.params
    if spec.kind == "pad_crop_flip":
        pad, size_h, size_w, top, left, flip = _crop_window(p, (height, width), u=u)
        return (left - pad, top - pad, left - pad + size_w, top - pad + size_h), flip
    if u is None:
        return _eval_box(p, image_size), False
    left, top, w, h = _rrc_box(p, image_size, u=u)
    return (left, top, left + w, top + h), bool(p["flip"]) and u[22] < 0.5


def apply_view(spec: ViewSpec, raw: Any, *, sample_id: int, view: int) -> torch.Tensor:
    """View ``view`` of one raw sample (vector, uint8 HW/HWC array or PIL image) as float32."""
    if view < 0:
        raise DataError(f"views: view index must be >= 0, found {view}")
    if spec.kind == "identity":
        if isinstance(raw, Image.Image) or np.asarray(raw).ndim != 1:
            raise DataError("views field 'kind': 'identity' applies to vector data; use an image view kind")
        return torch.from_numpy(np.array(raw, dtype=np.float32))
    u = uniforms(spec.seed, sample_id, view=view, n=num_uniforms(spec.params)) if view > 0 else None
    if spec.kind == "pad_crop_flip":
        return _pad_crop_flip(spec.params, _as_array(raw), u)
    return _rrc_flip_jitter(spec.params, _as_image(raw), u)


def _as_array(raw: Any) -> np.ndarray:
    arr = np.asarray(raw)
    if arr.ndim == 1:
        raise DataError("views field 'kind': image view kinds do not apply to vector data; use 'identity'")
    return arr[:, :, None] if arr.ndim == 2 else arr


def _as_image(raw: Any) -> Image.Image:
    if isinstance(raw, Image.Image):
        return raw
    arr = np.asarray(raw)
    if arr.ndim == 1:
        raise DataError("views field 'kind': image view kinds do not apply to vector data; use 'identity'")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)


@functools.lru_cache(maxsize=64)
def _lut(channels: int, mean: tuple | None, std: tuple | None) -> np.ndarray:
    """[C, 256] float32: uint8 value v of channel c -> (v / 255 - mean_c) / std_c (or v / 255).

    One table lookup per pixel instead of four float passes, and both the per-sample and
    the batch path use it, so they agree bit for bit.
    """
    v = np.arange(256, dtype=np.float32)[None, :] * np.float32(1 / 255)
    if mean is None:
        return np.repeat(v, channels, axis=0)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1)
    s = np.asarray(std if std is not None else [1.0], dtype=np.float32).reshape(-1, 1)
    if m.shape[0] not in (1, channels) or s.shape[0] not in (1, channels):
        raise DataError(f"views field 'params.mean'/'params.std': {m.shape[0]}/{s.shape[0]} values for "
                        f"{channels}-channel images")
    return np.ascontiguousarray(np.broadcast_to((v - m) / s, (channels, 256)))


def _normalise(chw: np.ndarray, mean: list | None, std: list | None) -> torch.Tensor:
    """uint8 [..., C, H, W] -> float32 through the channel lookup tables."""
    channels = chw.shape[-3]
    lut = _lut(channels, None if mean is None else tuple(mean), None if std is None else tuple(std))
    # One gather from the flattened [C * 256] table: channel c's values sit at c * 256 + v.
    index = chw.astype(np.intp)
    index += (np.arange(channels, dtype=np.intp) * 256)[:, None, None]
    return torch.from_numpy(lut.reshape(-1).take(index))


def _to_tensor(arr: np.ndarray, mean: list | None, std: list | None) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [0, 1], then (x - mean) / std per channel if given."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return _normalise(np.ascontiguousarray(arr.transpose(2, 0, 1)), mean, std)


def _crop_window(p: dict, size: tuple[int, int], *, u: np.ndarray | None) -> tuple[int, int, int, int, int, bool]:
    """(pad, size_h, size_w, top, left, flip) for pad_crop_flip on an h x w image, reading u[0:3]."""
    h, w = size
    pad = int(p["pad"])
    size_h, size_w = (p["size"], p["size"]) if p["size"] else (h, w)
    if h + 2 * pad < size_h or w + 2 * pad < size_w:
        raise DataError(f"views field 'params.size': {size_h}x{size_w} is larger than the padded image {h}x{w} + 2*{pad}")
    range_h, range_w = h + 2 * pad - size_h, w + 2 * pad - size_w
    if u is None:  # evaluation view: the centered window, i.e. the image itself when size == native
        return pad, size_h, size_w, range_h // 2, range_w // 2, False
    top = min(int(u[0] * (range_h + 1)), range_h)
    left = min(int(u[1] * (range_w + 1)), range_w)
    return pad, size_h, size_w, top, left, bool(p["flip"]) and u[2] < 0.5


def _pad(p: dict, img: np.ndarray, pad: int) -> np.ndarray:
    """Pad the two spatial axes (the two before the channel axis) of one image or a batch."""
    width = [(0, 0)] * (img.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)]
    if p["padding_mode"] == "constant":
        return np.pad(img, width)
    return np.pad(img, width, mode=p["padding_mode"])


def _pad_crop_flip(p: dict, img: np.ndarray, u: np.ndarray | None) -> torch.Tensor:
    pad, size_h, size_w, top, left, flip = _crop_window(p, img.shape[:2], u=u)
    out = _pad(p, img, pad)[top : top + size_h, left : left + size_w]
    if flip:
        out = out[:, ::-1]
    side = p.get("input_size")
    if side is not None and (size_h, size_w) != (side, side):
        out = _resize_array(out, side)
    return _to_tensor(_augmented(p, out, u), p["mean"], p["std"])


def _augmented(p: dict, img: np.ndarray, u: np.ndarray | None) -> np.ndarray:
    """uint8 HW/HWC after the spec's augmentations (pipeline.data.augment); unchanged without them or in view 0."""
    if u is None or ("augment" not in p and "erase" not in p):
        return img
    hwc = img[:, :, None] if img.ndim == 2 else img
    chw = torch.from_numpy(np.array(hwc.transpose(2, 0, 1), order="C"))   # a writable copy
    return augment_image(p, chw, u).numpy().transpose(1, 2, 0)


def _resize_array(img: np.ndarray, side: int) -> np.ndarray:
    """uint8 HWC -> side x side HWC, bilinear (PIL, as the rrc views resize)."""
    single = img.shape[2] == 1
    pil = Image.fromarray(np.ascontiguousarray(img[:, :, 0] if single else img))
    out = np.asarray(pil.resize((side, side), Image.BILINEAR))
    return out[:, :, None] if single else out


def batch_view(spec: ViewSpec, raw: Any, *, sample_ids: np.ndarray, view: int) -> torch.Tensor:
    """``torch.stack([apply_view(spec, raw[b], sample_id=sample_ids[b], view=view) ...])``, faster.

    ``raw``: B samples, one array or a sequence (arrays or PIL images, such as a lazily decoded
    batch; rrc_flip_jitter takes any sizes). The batch's uniforms come from one ``uniforms_batch``
    call. pad_crop_flip crops the padded batch; rrc_flip_jitter resizes each crop with PIL, then
    flips, jitters and normalises the batch's array at once (``_rrc_batch``). Both normalise through
    the lookup table of the per-sample path, and the result is bit-identical to it.
    """
    if view < 0:
        raise DataError(f"views: view index must be >= 0, found {view}")
    if spec.kind == "identity":
        raw = np.asarray(raw)
        if raw.ndim != 2:
            raise DataError("views field 'kind': 'identity' applies to vector data; use an image view kind")
        return torch.from_numpy(np.array(raw, dtype=np.float32))
    p = spec.params
    if spec.kind == "rrc_flip_jitter" and len(raw):
        images = [_as_image(r) for r in raw]
        if {img.mode for img in images} in ({"L"}, {"RGB"}):
            u = uniforms_batch(spec.seed, sample_ids, view=view, n=num_uniforms(p)) if view > 0 else None
            return _rrc_batch(p, images, u)
    if spec.kind == "pad_crop_flip" and len(raw) and p.get("input_size") is None and not spec.augmented:
        imgs = _stacked(raw)
        if imgs is not None:
            return _pad_crop_flip_batch(p, imgs, sample_ids=sample_ids, seed=spec.seed, view=view)
    return torch.stack([apply_view(spec, r, sample_id=int(s), view=view) for r, s in zip(raw, sample_ids)])


def _stacked(raw: Any) -> np.ndarray | None:
    """B image samples as one uint8 [B, H, W, C] array; None when their shapes differ."""
    if isinstance(raw, np.ndarray) and raw.ndim in (3, 4):
        return raw[..., None] if raw.ndim == 3 else raw
    imgs = [_as_array(r) for r in raw]
    return np.stack(imgs) if len({img.shape for img in imgs}) == 1 else None


def _pad_crop_flip_batch(p: dict, imgs: np.ndarray, *, sample_ids: np.ndarray, seed: int, view: int) -> torch.Tensor:
    """pad_crop_flip views of uint8 [B, H, W, C] ``imgs``: the padded batch cropped row by row."""
    n, h, w, c = imgs.shape
    u = uniforms_batch(seed, sample_ids, view=view) if view > 0 else [None] * n
    windows = [_crop_window(p, (h, w), u=u[b]) for b in range(n)]
    pad, size_h, size_w = windows[0][:3]
    padded = _pad(p, imgs, pad)
    out = np.empty((n, c, size_h, size_w), dtype=np.uint8)
    for b, (_, _, _, top, left, flip) in enumerate(windows):  # slicing beats a fancy-index gather here
        crop = padded[b, top : top + size_h, left : left + size_w]
        out[b] = (crop[:, ::-1] if flip else crop).transpose(2, 0, 1)
    return _normalise(out, p["mean"], p["std"])


def _rrc_box(p: dict, size: tuple[int, int], *, u: np.ndarray) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameter search, reading u[0:22]: (left, top, w, h)."""
    width, height = size
    area = width * height
    lo, hi = math.log(p["ratio"][0]), math.log(p["ratio"][1])
    for attempt in range(10):
        target = area * (p["scale"][0] + u[2 * attempt] * (p["scale"][1] - p["scale"][0]))
        aspect = math.exp(lo + u[2 * attempt + 1] * (hi - lo))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[20] * (height - h + 1)), height - h)
            left = min(int(u[21] * (width - w + 1)), width - w)
            return left, top, w, h
    # Fallback: a central crop with the aspect ratio clamped into range (as torchvision does).
    in_ratio = width / height
    if in_ratio < p["ratio"][0]:
        w, h = width, int(round(width / p["ratio"][0]))
    elif in_ratio > p["ratio"][1]:
        h, w = height, int(round(height * p["ratio"][1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _eval_window(p: dict, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): the evaluation view resizes a width x height image so that its
    shorter side is ``resize``, then takes the central ``size`` x ``size`` window at (left, top)."""
    width, height = size
    side = int(p["size"])
    scale = p["resize"] / min(width, height)
    new_w, new_h = max(side, int(round(width * scale))), max(side, int(round(height * scale)))
    return new_w, new_h, (new_w - side) // 2, (new_h - side) // 2


def _eval_box(p: dict, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The evaluation window of ``_eval_window`` in source pixels (left, top, right, bottom)."""
    new_w, new_h, left, top = _eval_window(p, size)
    fx, fy, side = size[0] / new_w, size[1] / new_h, int(p["size"])
    return left * fx, top * fy, (left + side) * fx, (top + side) * fy


def _rrc_crop(p: dict, img: Image.Image, u: np.ndarray | None) -> tuple[Image.Image, bool]:
    """The crop of an rrc view resized to its side, and whether the view flips it. View 0 (``u`` None):
    the evaluation window, the shorter side resized to ``resize`` and the central ``size`` x ``size``
    (another ``input_size``: that window resized from the source once), never flipped; else the
    random-resized-crop box of ``u``, flipped when ``u[22] < 0.5``."""
    size = int(p["size"])
    out = int(p.get("input_size") or size)
    if u is None:
        if out != size:
            return img.resize((out, out), Image.BILINEAR, box=_eval_box(p, img.size)), False
        new_w, new_h, left, top = _eval_window(p, img.size)
        return img.resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + size, top + size)), False
    left, top, w, h = _rrc_box(p, img.size, u=u)
    img = img.resize((out, out), Image.BILINEAR, box=(left, top, left + w, top + h))
    return img, bool(p["flip"]) and u[22] < 0.5


def _jitters(p: dict, u: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The colour jitters of B views whose streams hold ``u`` [B, n], each as (name, amount [B], order
    key [B]): brightness, contrast and saturation a factor in [max(0, 1 - a), 1 + a] (u[23:26], keys
    u[27:30]), hue a shift in [-hue, hue] (u[26], key u[30]); only those whose parameter is > 0. A view
    applies them in the order of its keys, as torchvision's ColorJitter takes a random order."""
    out = []
    for k, name in enumerate(("brightness", "contrast", "saturation")):
        amount = float(p[name])
        if amount > 0:
            low = max(0.0, 1 - amount)
            out.append((name, low + u[:, 23 + k] * (1 + amount - low), u[:, 27 + k]))
    if float(p["hue"]) > 0:
        out.append(("hue", (2 * u[:, 26] - 1) * float(p["hue"]), u[:, 30]))
    return out


_ENHANCERS = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
              "saturation": ImageEnhance.Color}


def _rrc_flip_jitter(p: dict, img: Image.Image, u: np.ndarray | None) -> torch.Tensor:
    """One rrc view through PIL: the reference that ``_rrc_batch`` reproduces bit for bit."""
    img, flip = _rrc_crop(p, img, u)
    if u is not None:
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        for name, amount, _ in sorted(_jitters(p, u[None]), key=lambda j: j[2][0]):
            img = adjust_hue(img, amount[0]) if name == "hue" else _ENHANCERS[name](img).enhance(amount[0])
    return _to_tensor(_augmented(p, np.asarray(img), u), p["mean"], p["std"])


def _rrc_batch(p: dict, images: list[Image.Image], u: np.ndarray | None) -> torch.Tensor:
    """The rrc views of ``images`` (all "L" or all "RGB", any sizes) whose streams hold ``u`` [B, n]
    (None: view 0), equal to ``_rrc_flip_jitter`` of each: each crop resized by PIL, as there, then
    the flips, jitters and normalization on the batch's uint8 [B, C, H, W] array at once."""
    crops = [_rrc_crop(p, img, None if u is None else u[b]) for b, img in enumerate(images)]
    width, height = crops[0][0].size
    # one buffer of the crops' bytes (cheaper than an array per crop), then a channel-first copy
    x = np.frombuffer(b"".join(img.tobytes() for img, _ in crops), dtype=np.uint8)
    x = x.reshape(len(crops), height, width, -1).transpose(0, 3, 1, 2).copy()
    if u is not None:
        flip = np.array([f for _, f in crops])
        x[flip] = x[flip, ..., ::-1]
        x = jitter_batch(x, _jitters(p, u))
        if "augment" in p or "erase" in p:
            for b in range(len(x)):
                x[b] = augment_image(p, torch.from_numpy(x[b].copy()), u[b]).numpy()
    return _normalise(x, p["mean"], p["std"])
