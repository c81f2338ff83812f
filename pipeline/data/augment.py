"""Photometric and erasing augmentations that replay: RandAugment, TrivialAugmentWide, random erasing.

    from pipeline.data.augment import augment_params, augment_image
    params = augment_params("randaugment", {"n": 2, "m": 9}, erase=0.25)   # merged into a ViewSpec's params
    img = augment_image(params, uint8_chw_tensor, u)                       # u: the view's uniforms

They run on a view's uint8 image after its geometric crop and flip, before normalization; view 0 (the
evaluation view) never gets them. Every random choice reads a fixed position of the view's keyed
stream ``u`` (``pipeline.data.views.uniforms``: a pure function of (seed, sample_id, view)), never a
global RNG, so a view replays exactly:

- ``u[32]``: whether to erase; ``u[33:53]``: the 10 tries of area and aspect (torchvision's
  ``RandomErasing`` search); ``u[53:55]``: top, left; ``u[55:58]``: the box's value per channel
  (0..255, one value per channel);
- op ``k`` of the policy (RandAugment: k < n; TrivialAugmentWide: k = 0): ``u[64 + 3k]`` which op,
  ``u[65 + 3k]`` its sign, ``u[66 + 3k]`` its magnitude bin (TrivialAugmentWide only).

The op tables below are torchvision's (``transforms.v2.RandAugment`` and ``TrivialAugmentWide``:
the same ops and magnitude ranges, 31 bins); the pixel operations are
``torchvision.transforms.v2.functional``'s. Their pixels may change with torchvision, so a spec that
uses these records the torchvision version (``check_replay``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.errors import UserError

NUM_BINS = 31
ERASE_AT, OPS_AT = 32, 64           # first stream positions of erasing and of the policy's ops

# Options of each policy with their defaults (the spec records the merged values).
POLICIES: dict[str, dict[str, Any]] = {
    "randaugment": {"n": 2, "m": 9},
    "trivialaugment": {},
}
ERASE_DEFAULTS: dict[str, Any] = {"p": 0.25, "scale": [0.02, 0.33], "ratio": [0.3, 3.3]}


def _linspace(hi: float) -> Callable[[int, int], np.ndarray]:
    return lambda h, w: np.linspace(0.0, hi, NUM_BINS)


def _posterize(levels: int) -> Callable[[int, int], np.ndarray]:
    return lambda h, w: np.round(8 - np.arange(NUM_BINS) / ((NUM_BINS - 1) / levels)).astype(int)


# name -> (magnitudes(h, w) or None, signed)
_SPACES: dict[str, dict[str, tuple[Callable[[int, int], np.ndarray] | None, bool]]] = {
    "randaugment": {
        "Identity": (None, False), "ShearX": (_linspace(0.3), True), "ShearY": (_linspace(0.3), True),
        "TranslateX": (lambda h, w: np.linspace(0.0, 150.0 / 331.0 * w, NUM_BINS), True),
        "TranslateY": (lambda h, w: np.linspace(0.0, 150.0 / 331.0 * h, NUM_BINS), True),
        "Rotate": (_linspace(30.0), True), "Brightness": (_linspace(0.9), True), "Color": (_linspace(0.9), True),
        "Contrast": (_linspace(0.9), True), "Sharpness": (_linspace(0.9), True), "Posterize": (_posterize(4), False),
        "Solarize": (lambda h, w: np.linspace(1.0, 0.0, NUM_BINS), False), "AutoContrast": (None, False),
        "Equalize": (None, False),
    },
    "trivialaugment": {
        "Identity": (None, False), "ShearX": (_linspace(0.99), True), "ShearY": (_linspace(0.99), True),
        "TranslateX": (_linspace(32.0), True), "TranslateY": (_linspace(32.0), True), "Rotate": (_linspace(135.0), True),
        "Brightness": (_linspace(0.99), True), "Color": (_linspace(0.99), True), "Contrast": (_linspace(0.99), True),
        "Sharpness": (_linspace(0.99), True), "Posterize": (_posterize(6), False),
        "Solarize": (lambda h, w: np.linspace(1.0, 0.0, NUM_BINS), False), "AutoContrast": (None, False),
        "Equalize": (None, False),
    },
}


def _bad(key: str, problem: str) -> ConfigError:
    """``views config key 'augment_options.n': expected ...`` (a config re-words it with its own section)."""
    return ConfigError(problem, key=key, section="views")


def _number(key: str, value: Any, *, lo: float, hi: float, integer: bool = False) -> Any:
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer) if integer else (int, float, np.number))
    if not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise _bad(key, f"expected {kind} in [{lo:g}, {hi:g}], found {value!r}")
    return int(value) if integer else float(value)


def _torchvision():
    # Imported on first use: torchvision takes seconds to import and most commands never augment.
    import torchvision
    return torchvision


def _functional():
    from torchvision.transforms.v2 import functional
    return functional


def augment_params(augment: str | None, options: dict | None = None, *, erase: float | None = None) -> dict:
    """The ``augment``/``erase`` entries a ViewSpec's params take (only those given), checked and merged
    with their defaults, plus ``torchvision``: the version whose pixels they replay. A bad value raises
    ``ConfigError`` with key ``augment``, ``augment_options.<option>`` or ``erase``."""
    out: dict[str, Any] = {}
    if options is not None and not isinstance(options, dict):
        raise _bad("augment_options", f"expected a mapping of option: value, found {options!r}")
    options = dict(options or {})
    if augment is None:
        if options:
            raise _bad("augment_options", f"expected an augment ({' or '.join(POLICIES)}) to take options, found none")
    else:
        if augment not in POLICIES:
            raise _bad("augment", f"expected {' or '.join(POLICIES)}, found {augment!r}")
        known = POLICIES[augment]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise _bad(f"augment_options.{unknown[0]}",
                       f"expected an option of {augment} ({', '.join(known) or 'none'}), found {unknown[0]!r}")
        merged = {**known, **options}
        if augment == "randaugment":
            merged["n"] = _number("augment_options.n", merged["n"], lo=0, hi=16, integer=True)
            merged["m"] = _number("augment_options.m", merged["m"], lo=0, hi=NUM_BINS - 1, integer=True)
        out["augment"] = {"kind": augment, **merged}
    if erase is not None:
        out["erase"] = {**ERASE_DEFAULTS, "p": _number("erase", erase, lo=0.0, hi=1.0)}
    if out:
        out["torchvision"] = _torchvision().__version__
    return out


def num_uniforms(params: dict) -> int:
    """How many stream positions a view with these params reads (at least the geometry's 32)."""
    augment = params.get("augment")
    if augment is None:
        return ERASE_AT + 26 if params.get("erase") else 32
    ops = augment["n"] if augment["kind"] == "randaugment" else 1
    return OPS_AT + 3 * ops


def check_replay(params: dict, *, where: str = "views") -> None:
    """Refuse to replay augmentations recorded under another torchvision: its pixels may differ."""
    recorded = params.get("torchvision")
    if recorded is not None and recorded != _torchvision().__version__:
        raise UserError(f"{where} field 'params.torchvision': its augmentations were recorded with torchvision "
                        f"{recorded}, found {_torchvision().__version__} running; install torchvision=={recorded} "
                        "to replay the same images")


def augment_image(params: dict, img: torch.Tensor, u: np.ndarray) -> torch.Tensor:
    """The policy's ops, then random erasing, on one uint8 [C, H, W] image, choices read from ``u``."""
    augment = params.get("augment")
    if augment is not None:
        space = _SPACES[augment["kind"]]
        names = list(space)
        ops = augment["n"] if augment["kind"] == "randaugment" else 1
        for k in range(ops):
            at = OPS_AT + 3 * k
            name = names[min(int(u[at] * len(names)), len(names) - 1)]
            magnitudes, signed = space[name]
            magnitude = 0.0
            if magnitudes is not None:
                bin_ = augment["m"] if augment["kind"] == "randaugment" else min(int(u[at + 2] * NUM_BINS), NUM_BINS - 1)
                magnitude = float(magnitudes(img.shape[-2], img.shape[-1])[bin_])
                if signed and u[at + 1] < 0.5:
                    magnitude = -magnitude
            img = _apply_op(img, name, magnitude)
    erase = params.get("erase")
    if erase is not None and u[ERASE_AT] < erase["p"]:
        box = _erase_box(erase, img.shape[-2:], u)
        if box is not None:
            top, left, h, w = box
            value = torch.tensor([min(int(u[ERASE_AT + 23 + c] * 256), 255) for c in range(img.shape[0])],
                                 dtype=img.dtype)[:, None, None]
            img = _functional().erase(img, top, left, h, w, value)
    return img


def _erase_box(erase: dict, size: torch.Size, u: np.ndarray) -> tuple[int, int, int, int] | None:
    """torchvision's ``RandomErasing.get_params`` search on stream positions ERASE_AT + 1 .. + 22."""
    height, width = int(size[0]), int(size[1])
    area = height * width
    lo, hi = math.log(erase["ratio"][0]), math.log(erase["ratio"][1])
    for attempt in range(10):
        target = area * (erase["scale"][0] + u[ERASE_AT + 1 + 2 * attempt] * (erase["scale"][1] - erase["scale"][0]))
        aspect = math.exp(lo + u[ERASE_AT + 2 + 2 * attempt] * (hi - lo))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            top = min(int(u[ERASE_AT + 21] * (height - h + 1)), height - h)
            left = min(int(u[ERASE_AT + 22] * (width - w + 1)), width - w)
            return top, left, h, w
    return None


def _apply_op(img: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """One op of the policy, as torchvision's auto-augment classes apply it (nearest, fill 0)."""
    F = _functional()
    if name == "ShearX":
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(magnitude)), 0.0],
                        center=[0, 0])
    if name == "ShearY":
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(magnitude))],
                        center=[0, 0])
    if name == "TranslateX":
        return F.affine(img, angle=0.0, translate=[int(magnitude), 0], scale=1.0, shear=[0.0, 0.0])
    if name == "TranslateY":
        return F.affine(img, angle=0.0, translate=[0, int(magnitude)], scale=1.0, shear=[0.0, 0.0])
    if name == "Rotate":
        return F.rotate(img, angle=magnitude)
    if name == "Brightness":
        return F.adjust_brightness(img, 1.0 + magnitude)
    if name == "Color":
        return F.adjust_saturation(img, 1.0 + magnitude)
    if name == "Contrast":
        return F.adjust_contrast(img, 1.0 + magnitude)
    if name == "Sharpness":
        return F.adjust_sharpness(img, 1.0 + magnitude)
    if name == "Posterize":
        return F.posterize(img, int(magnitude))
    if name == "Solarize":
        return F.solarize(img, 255.0 * magnitude)
    if name == "AutoContrast":
        return F.autocontrast(img)
    if name == "Equalize":
        return F.equalize(img)
    return img   # Identity
