"""Model checkpoints: one torch file with the weights, what they are, and how to resume.

    from pipeline.checkpoint import save_checkpoint, load_checkpoint
    save_checkpoint("models/ce.pt", model=net, meta={"arch": "mlp", ...}, train_state=state)
    blob = load_checkpoint("models/ce.pt")         # {"model": state_dict, "meta": ..., "train_state": ...}
    # the model itself: pipeline.models.load_model("models/ce.pt")

File layout (a dict, read with ``torch.load(weights_only=True)``, so only plain data):
``{"format": "kdcache-checkpoint", "version": 1, "model": state_dict, "meta": dict,
"train_state": dict | None}``. ``meta`` holds at least ``arch``, ``num_classes``,
``input_shape`` and, when known, ``loss`` (a teacher's: ce|mse), ``method`` (a student's), ``manifest_sha256``, ``manifest``
(path), ``dataset``, ``views`` (ViewSpec dict), ``epoch``, ``metrics``, ``seed``;
``kdcache_version`` is added on save. ``train_state`` (optimizers, schedulers, epoch, RNG
states; see ``pipeline.train.loop``) is what ``--resume`` needs.

Saving is atomic: a temporary file in the same folder, fsync, then ``os.replace``, so a
crash never leaves half a checkpoint under the final name.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import __version__, faults
from pipeline.errors import UserError
from pipeline.files import atomic_path, os_error_text

FORMAT = "kdcache-checkpoint"
VERSION = 1
REQUIRED_META = ("arch", "num_classes", "input_shape")


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DistributedDataParallel / DataParallel / compiled wrapper."""
    while True:
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    meta: dict,
    train_state: dict | None = None,
) -> None:
    """Write ``model``'s weights with ``meta`` (and ``train_state`` for resuming) atomically."""
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}")
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    blob = {
        "format": FORMAT,
        "version": VERSION,
        "model": state,
        "meta": {**meta, "input_shape": list(meta["input_shape"]), "kdcache_version": __version__},
        "train_state": train_state,
    }
    data = io.BytesIO()
    torch.save(blob, data)  # in memory first: a full disk is then an OSError of the write, not a torch RuntimeError
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fh.write(data.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
            faults.point("checkpoint")  # the temporary file is whole, the target not yet replaced
    except OSError as err:  # a full disk, a read-only folder: the previous checkpoint stays as it was
        raise UserError(f"{os_error_text(err, path)}; checkpoint {path} not written (a previous one is "
                        "untouched)") from None


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)``: plain data only, never arbitrary unpickling."""
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        with warnings.catch_warnings():   # torch's notes on pickle protocols are not the user's business
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # A pickled object (a whole nn.Module, a custom class, a __reduce__ call) would run code to load:
        # refused, never executed. torch's own message invites weights_only=False; this one does not.
        if _holds_a_pickle(path):
            raise UserError(f"{path}: refused: loading it needs arbitrary unpickling ({_unpickling_reason(err)}), "
                            "which can run any code, and kdcache will not run it; "
                            "where you trust the file, re-save its weights as a plain state_dict "
                            "(torch.save(model.state_dict(), ...)) or a .safetensors file") from None
        raise UserError(f"{path}: unreadable {what} (expected a torch file, found neither a torch zip file nor a "
                        "pickle)") from None
    except Exception as err:
        raise UserError(f"{path}: unreadable {what} ({type(err).__name__}: {str(err)[:200]})") from None


def _holds_a_pickle(path: Path) -> bool:
    """Whether ``path`` is a well-formed pickle (or a torch zip file holding one): its opcodes are only
    parsed (``pickletools.genops``), never run. A file torch's weights-only loader refuses and that
    parses is a pickled object needing arbitrary code; one that does not parse is just unreadable."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
                data = zf.read(name)
        else:
            data = path.read_bytes()
        for _ in pickletools.genops(data):
            pass
        return True
    except Exception:
        return False


def _unpickling_reason(err: Exception) -> str:
    """The line of torch's weights-only refusal that says what the file holds (``Unsupported global:
    GLOBAL mypkg.Net``, ``unsupported GLOBAL posix.system``, ``Unsupported operand 149``)."""
    lines = [line.strip() for line in str(err).splitlines()]
    found = [line for line in lines if "nsupported" in line and "weights_only" not in line]
    return (found[0] if found else "a pickled object")[:160]


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by ``save_checkpoint``; UserError naming the file otherwise."""
    path = Path(path)
    blob = _torch_load(path, "checkpoint")
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise UserError(f"{path}: field 'format': expected {FORMAT!r}, found {found!r}")
    if blob.get("version") != VERSION:
        raise UserError(f"{path}: field 'version': expected {VERSION}, found {blob.get('version')!r}")
    meta = blob.get("meta")
    if not isinstance(meta, dict) or any(key not in meta for key in REQUIRED_META):
        raise UserError(f"{path}: field 'meta': expected a dict with {list(REQUIRED_META)}")
    meta["input_shape"] = tuple(meta["input_shape"])
    return blob


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in ``path``, read as data only: a bare state_dict, or a checkpoint dict holding
    one under ``state_dict`` or ``model`` (a kdcache checkpoint), or a ``.safetensors`` file (with
    the safetensors package); ``module.`` prefixes of DDP-saved weights removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        blob: Any = _safetensors_load(path)
    else:
        blob = _torch_load(path, "weights file")
    state = blob
    if isinstance(blob, dict):
        for key in ("state_dict", "model"):
            if isinstance(blob.get(key), dict):
                state = blob[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state_dict (names -> tensors), a dict holding one under 'state_dict' "
                        f"or 'model', or a kdcache checkpoint, found {_describe(state)}")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        odd = [k for k, v in value.items() if not isinstance(v, torch.Tensor)]
        return f"a dict with non-tensor entries {odd[:3]}" if odd else "an empty dict"
    return type(value).__name__


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        from safetensors.torch import load_file  # optional: only .safetensors weights need it
    except ImportError:
        raise UserError(f"{path}: expected the safetensors package to read it, found it missing "
                        "(pip install safetensors)") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise UserError(f"{path}: unreadable weights file ({type(err).__name__}: {str(err)[:200]})") from None


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load ``state`` into ``model`` strictly; a missing/extra key, a shape mismatch or a NaN/Inf
    weight is a UserError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"{path}: weights do not fit the model: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(
                f"{path}: weights do not fit the model: field {key!r}: expected shape {tuple(own[key].shape)}, "
                f"found {tuple(value.shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            # NaN weights give NaN logits: scored, cached or distilled from, they would pass for numbers
            bad = int((~torch.isfinite(value)).sum())
            raise UserError(f"{path}: field 'model.{key}': expected finite weights, found {bad} NaN/Inf "
                            f"of {value.numel()} (a diverged run?)")
    model.load_state_dict(state)


def plain(value: Any) -> Any:
    """``value`` with numpy scalars / tuples / paths turned into JSON- and weights_only-safe types."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value
