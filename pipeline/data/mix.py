"""Mixed views that replay: MixUp and CutMix of a sample with a partner from the same split.

    from pipeline.data.mix import mix_params, mix_batch
    from pipeline.data.views import view_mixing
    params = mix_params(["mixup", "cutmix"], {"mixup_alpha": 0.8})   # merged into a ViewSpec's params
    m = view_mixing(spec, ids, rows, view=3, num_rows=N, size=(32, 32))   # partners, lambdas, boxes of the rows
    x = mix_batch(x_rows, x_partners, m)                             # float32 [B, C, H, W], mixed

The semantics are timm's ``Mixup`` per sample: ``mixup_alpha`` and ``cutmix_alpha`` (each > 0 when
its kind is chosen), ``switch_prob`` (the probability of CutMix when both kinds are chosen) and
``prob`` (the probability that a view is mixed at all). View ``v >= 1`` of the sample in row ``i``
is mixed with the partner in row ``j`` of the same split, each at its own view ``v`` (its own crop,
flip and augmentations, unmixed); view 0, the evaluation view, is never mixed. Every choice reads a
fixed position of the view's keyed stream (``pipeline.data.views.uniforms``: a pure function of
(seed, sample_id, view)), after the positions the geometry (0..31) and the augmentations (32..111)
read:

- ``u[128]``: whether the view is mixed (``< prob``);
- ``u[129]``: the partner row, uniform over the split's other rows (the sample itself when alone);
- ``u[130]``: CutMix rather than MixUp (``< switch_prob``; when both kinds are chosen);
- ``u[131]``: lambda, the ``u[131]`` quantile of Beta(alpha, alpha) (inverse CDF: one uniform,
  no rejection loop);
- ``u[132]``, ``u[133]``: the CutMix box's center row and column.

Mixing is done on the normalized float32 views (as timm does on its batch): MixUp is
``x_i * lam + x_j * (1 - lam)`` with ``lam`` a float32, CutMix pastes the partner's box into
``x_i``. The box has sides ``int(H * sqrt(1 - lam))`` and ``int(W * sqrt(1 - lam))`` around its
center, clipped to the image, and lambda is then corrected to the area the sample keeps,
``1 - box_area / (H * W)``. The effective lambda (float32) is what a store records, what mixes the
labels (``lam * onehot(y_i) + (1 - lam) * onehot(y_j)``) and what weighs ``p_gt``. A view that is
not mixed has itself as partner and lambda 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError

KINDS = ("mixup", "cutmix")
MIX_AT = 128                # first stream position of the mixing draws (u[128:134])
NUM_DRAWS = 6
# Options with their defaults (timm's common ImageNet recipe); a spec records the merged values.
MIX_DEFAULTS: dict[str, float] = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5, "prob": 1.0}
_OPTION_OF = {"mixup": "mixup_alpha", "cutmix": "cutmix_alpha"}


def _bad(key: str, problem: str) -> ConfigError:
    """``views config key 'mix_options.prob': ...`` (a config re-words it with its own section)."""
    return ConfigError(problem, key=key, section="views")


def _kinds(kinds: Any) -> list[str]:
    """The chosen kinds in canonical order from a list or a comma-separated string."""
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    if not isinstance(kinds, (list, tuple)) or not kinds or any(k not in KINDS for k in kinds) \
            or len(set(kinds)) != len(kinds):
        raise _bad("mix", f"expected mixup, cutmix or mixup,cutmix, found {kinds!r}")
    return [k for k in KINDS if k in kinds]


def mix_params(kinds: Any, options: dict | None = None) -> dict:
    """The ``mix`` entry of a ViewSpec's params (empty when ``kinds`` is None), checked and merged with
    its defaults: ``{"mix": {"kinds": [...], "<kind>_alpha": ..., ["switch_prob": ...,] "prob": ...}}``.
    A bad value raises ``ConfigError`` with key ``mix`` or ``mix_options.<option>``."""
    if options is not None and not isinstance(options, dict):
        raise _bad("mix_options", f"expected a mapping of option: value, found {options!r}")
    options = dict(options or {})
    if kinds is None:
        if options:
            raise _bad("mix_options", f"expected a mix ({', '.join(KINDS)}) to take options, found none")
        return {}
    chosen = _kinds(kinds)
    known = [_OPTION_OF[k] for k in chosen] + (["switch_prob"] if len(chosen) == 2 else []) + ["prob"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise _bad(f"mix_options.{unknown[0]}",
                   f"expected an option of mix {','.join(chosen)} ({', '.join(known)}), found {unknown[0]!r}")
    out: dict[str, Any] = {"kinds": chosen}
    for key in known:
        value = options.get(key, MIX_DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise _bad(f"mix_options.{key}", f"expected a number, found {value!r}")
        if key.endswith("_alpha") and not value > 0:
            raise _bad(f"mix_options.{key}", f"expected a number > 0, found {value!r}")
        if not key.endswith("_alpha") and not 0 <= value <= 1:
            raise _bad(f"mix_options.{key}", f"expected a number in [0, 1], found {value!r}")
        out[key] = float(value)
    return {"mix": out}


@dataclass(frozen=True)
class Mixing:
    """The draws of B rows in one view: partner rows, effective lambdas and CutMix boxes."""

    partner: np.ndarray      # int64 [B]: the partner's row in the split (the row itself when unmixed)
    lam: np.ndarray          # float32 [B]: the weight of the row's own image and label
    cut: np.ndarray          # bool [B]: CutMix (else MixUp, or unmixed where lam == 1 and partner is the row)
    box: np.ndarray          # int64 [B, 4]: (top, bottom, left, right) of the pasted box; empty unless cut

    @classmethod
    def unmixed(cls, rows: np.ndarray) -> "Mixing":
        """Every row its own partner, lambda 1: the mixing of view 0 and of specs that do not mix."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return cls(rows.copy(), np.ones(len(rows), np.float32), np.zeros(len(rows), bool),
                   np.zeros((len(rows), 4), np.int64))


def _beta_quantile(alpha: float, q: np.ndarray) -> np.ndarray:
    """The ``q`` quantiles of Beta(alpha, alpha) (SciPy imported here: only mixing specs need it)."""
    from scipy.special import betaincinv

    return np.asarray(betaincinv(alpha, alpha, q), dtype=np.float64)


def draw_mixing(mix: dict, u: np.ndarray, rows: np.ndarray, *, num_rows: int, size: tuple[int, int]) -> Mixing:
    """The mixing of ``rows`` of a split of ``num_rows`` rows in a view >= 1 whose keyed streams hold
    ``u`` at positions MIX_AT .. MIX_AT + NUM_DRAWS - 1 ([B, NUM_DRAWS]: ``pipeline.data.views.view_mixing``
    draws them), on views of ``size`` = (H, W) pixels."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    n = len(rows)
    if n == 0:
        return Mixing.unmixed(rows)
    partner, lam, box = rows.copy(), np.ones(n, np.float64), np.zeros((n, 4), np.int64)
    mixed = u[:, 0] < mix["prob"]
    if num_rows > 1:
        other = np.minimum((u[:, 1] * (num_rows - 1)).astype(np.int64), num_rows - 2)
        partner = np.where(mixed, other + (other >= rows), rows)
    kinds = mix["kinds"]
    cut = mixed & ((u[:, 2] < mix["switch_prob"]) if len(kinds) == 2 else np.full(n, kinds == ["cutmix"]))
    for is_cut, kind in ((False, "mixup"), (True, "cutmix")):
        at = mixed & (cut == is_cut)
        if at.any():
            lam[at] = _beta_quantile(mix[_OPTION_OF[kind]], u[at, 3])
    height, width = size
    for b in np.nonzero(cut)[0]:
        ratio = math.sqrt(1.0 - lam[b])
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = min(int(u[b, 4] * height), height - 1), min(int(u[b, 5] * width), width - 1)
        top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
        left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
        box[b] = (top, bottom, left, right)
        lam[b] = 1.0 - (bottom - top) * (right - left) / (height * width)
    return Mixing(partner, lam.astype(np.float32), cut, box)


def mix_batch(x: torch.Tensor, partner_x: torch.Tensor, mixing: Mixing) -> torch.Tensor:
    """Rows of ``x`` [B, C, H, W] mixed with their partners' views ``partner_x``: MixUp rows as
    ``x * lam + partner * (1 - lam)`` (float32), CutMix rows with the partner's box pasted in, unmixed
    rows unchanged. The same arithmetic for one row or many, so a batch equals its rows."""
    out = x.clone()
    blend = ~mixing.cut & (mixing.lam < 1)
    if blend.any():
        at = torch.from_numpy(np.nonzero(blend)[0])
        lam = torch.from_numpy(mixing.lam[blend]).view(-1, *([1] * (x.dim() - 1)))
        out[at] = x[at] * lam + partner_x[at] * (1 - lam)
    for b in np.nonzero(mixing.cut)[0]:
        top, bottom, left, right = (int(v) for v in mixing.box[b])
        out[b, ..., top:bottom, left:right] = partner_x[b, ..., top:bottom, left:right]
    return out


def mixed_labels(labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor,
                 num_classes: int) -> torch.Tensor:
    """[B, C] float32 targets ``lam * onehot(y) + (1 - lam) * onehot(y_partner)``: cross-entropy
    against them is ``lam * CE(y) + (1 - lam) * CE(y_partner)``."""
    lam = lam.to(torch.float32)[:, None]
    own = torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float32)
    other = torch.nn.functional.one_hot(partner_labels.long(), num_classes).to(torch.float32)
    return own * lam + other * (1 - lam)
