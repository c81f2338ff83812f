"""Every network kdcache trains, behind one registry.

    from pipeline.models import MODELS, create_model
    net = create_model("resnet20", num_classes=100, input_shape=(3, 32, 32))
    net = create_model("mlp", num_classes=3, input_shape=(30,), weights="models/ce.pt")
    net = create_model("cnn", num_classes=10, input_shape=(3, 32, 32), width=16)   # a size option

Families (``MODELS.names()`` lists them all):

- ``mlp``: ``d -> 128 -> 128 -> C`` with ReLU (the synthetic data of docs/methods.md); images are flattened.
  Options: ``hidden`` (units per hidden layer, default 128), ``depth`` (hidden layers, default 2).
- ``cnn``: a small 3-block CNN for 28 or 32 px inputs, any channel count.
  Option: ``width`` (channels of the first block, doubled by each next one; default 32).
- ``resnet8 / 14 / 20 / 32 / 56 / 110``: the CIFAR ResNets of He et al. 2016 (3 stages of
  16 / 32 / 64 channels, 6n + 2 layers) with the paper's option A shortcut (stride-2 subsample
  plus zero-padded channels: no extra parameters, so resnet20 has 0.27 M weights as in the paper).
- torchvision models by name (``TORCHVISION``), always built with ``weights=None`` (never a
  download), their head sized to ``num_classes``. A first conv is rebuilt when the input has
  another channel count than 3. Small inputs (<= 64 px) get the usual CIFAR adaptation:
  resnets a 3x3 stride-1 stem without max-pool, mobilenets a stride-1 first conv, VGGs the
  CIFAR head (global pool + one linear layer, last max-pool dropped).

Size options are the keyword-only parameters a factory declares past ``num_classes`` and
``input_shape`` (``model_options(arch)`` lists them with their defaults); each is an integer >= 1,
and the defaults build exactly the model the arch built before it had options. Checkpoints record
them as meta ``arch_options`` so ``load_model`` rebuilds the same network. The other families take none.

``weights`` is a local file only: a kdcache checkpoint or a bare ``state_dict``.

Teachers (what ``kdcache cache --teacher`` takes; ``teacher_spec`` reads it, ``load_teacher`` builds it):

    spec = teacher_spec("models/ce.pt")                                   # a kdcache checkpoint
    spec = teacher_spec("resnet18", "weights/r18.pt")                     # an arch name + a weights file
    spec = teacher_spec("timm:convnext_tiny", "weights/cnx.safetensors")  # timm (pip install 'kdcache[timm]')
    spec = teacher_spec("my_models:build_teacher")                        # your code: called with no arguments
    model, meta = load_teacher(spec, num_classes=10, input_shape=(3, 32, 32))

An arch name is kdcache's own (``MODELS``), any torchvision classification model
(``torchvision:NAME`` to mean torchvision's where both have it; a plain name shared by both is
the one the weights fit), or ``timm:NAME``; it is built untrained (never a download) with
``num_classes`` outputs, then the weights are loaded strictly. ``module:function`` is imported
from ``sys.path`` or the current folder: the only form that runs code of the user's. Weights
files are read as data only (``pipeline.checkpoint.load_state_dict``: a state_dict, a kdcache
checkpoint or a ``.safetensors`` file). The same specs are the live teachers of ``kdcache distill
--online`` (``pipeline.train.targets.LiveTargets``), built by this one ``load_teacher``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.checkpoint import fit_state_dict, load_checkpoint, load_state_dict
from pipeline.errors import UserError
from pipeline.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")

SMALL_INPUT = 64  # images up to this many pixels a side get the CIFAR-style stem

_BUILD_ARGS = ("num_classes", "input_shape")  # what every factory takes; its other keywords are size options


def create_model(
    arch: str,
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    weights: str | Path | None = None,
    **options: Any,
) -> nn.Module:
    """Build ``arch`` for ``num_classes`` outputs and inputs of ``input_shape`` ((d,) or (C, H, W)).

    ``options`` are the arch's size options (``model_options``); ``weights`` loads a local
    checkpoint or state_dict (strictly: every key and shape must match).
    """
    factory = MODELS.get(arch)
    check_model_options(arch, options)
    if num_classes < 1:
        raise UserError(f"model {arch!r}: num_classes must be >= 1, found {num_classes}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise UserError(f"model {arch!r}: input_shape must be (d,) or (C, H, W), found {shape}")
    model = factory(num_classes=num_classes, input_shape=shape, **options)
    if weights is not None:
        load_weights(model, weights)
    return model


def model_options(arch: str) -> dict[str, Any]:
    """The size options ``arch`` takes, with their defaults (``{}`` for an arch without any)."""
    params = inspect.signature(MODELS.get(arch)).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _BUILD_ARGS}


def check_model_options(arch: str, options: Mapping[str, Any]) -> None:
    """Refuse options ``arch`` does not take, or values that are not integers >= 1 (one line, naming both)."""
    known = model_options(arch)
    for key, value in options.items():
        if key not in known:
            expected = f"expected one of: {', '.join(sorted(known))}" if known else "it takes no options"
            raise UserError(f"model {arch!r}: unknown option {key!r}; {expected}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"model {arch!r}: option {key!r}: expected an integer >= 1, found {value!r}")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a kdcache checkpoint's ``model`` entry or a bare state_dict into ``model`` (strict)."""
    fit_state_dict(model, load_state_dict(path), path)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a kdcache checkpoint describes with its weights: ``(model in eval mode, meta)``."""
    blob = load_checkpoint(path)
    meta = blob["meta"]
    # Checkpoints written before size options existed have no ``arch_options``: the defaults.
    model = create_model(meta["arch"], num_classes=int(meta["num_classes"]), input_shape=meta["input_shape"],
                         **dict(meta.get("arch_options") or {}))
    fit_state_dict(model, {k.removeprefix("module."): v for k, v in blob["model"].items()}, path)
    return model.to(device).eval(), meta


# --- teachers from anywhere: a checkpoint, an arch name + weights, or the user's callable ------

TEACHER_SOURCES = ("checkpoint", "arch", "callable")
_CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


@dataclass(frozen=True)
class TeacherSpec:
    """Which teacher: ``source`` (checkpoint | arch | callable), ``name`` (the checkpoint path,
    the arch name or ``module:function``) and ``weights`` (a weights file, or None)."""

    source: str
    name: str
    weights: str | None = None


def teacher_spec(teacher: str, weights: str | Path | None = None, *, weights_flag: str = "--weights") -> TeacherSpec:
    """Read ``--teacher`` (and ``--weights``, named ``weights_flag`` in errors): which of the three
    forms it is; a UserError when none."""
    text = str(teacher)
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise UserError(f"{weights_flag} {weights}: weights file not found")
        weights = str(weights.resolve())
    if Path(text).is_file():
        if weights is not None:
            raise UserError(f"{weights_flag} {weights}: expected no {weights_flag} with the checkpoint --teacher "
                            f"{text} (it holds its own weights)")
        return TeacherSpec("checkpoint", str(Path(text).resolve()))
    if text.startswith("timm:"):
        _timm(text)
    if text.startswith(("timm:", "torchvision:")) or text in MODELS.names() or text in torchvision_names():
        if weights is None:
            raise UserError(f"--teacher {text}: expected {weights_flag} FILE with an architecture name (it is built "
                            "untrained)")
        return TeacherSpec("arch", text, weights)
    if _CALLABLE.fullmatch(text):
        return TeacherSpec("callable", text, weights)
    if os.sep in text or "/" in text or Path(text).suffix:
        return TeacherSpec("checkpoint", str(Path(text).resolve()))  # load_checkpoint says it is not found
    raise UserError(f"--teacher {text}: unknown; expected a kdcache checkpoint file, an architecture name "
                    f"(kdcache's {', '.join(MODELS.names())}; any torchvision classification model; timm:NAME) "
                    "or module:function")


def load_teacher(spec: TeacherSpec, *, num_classes: int, input_shape: tuple[int, ...]) -> tuple[nn.Module, dict]:
    """Build the teacher ``spec`` names: ``(model in eval mode, meta)``.

    A checkpoint is ``load_model`` (its meta says its class count and input shape; the caller
    compares them). An arch or a callable is checked here: the weights must fit, and one
    forward pass on zeros of ``input_shape`` must give ``num_classes`` logits.
    """
    if spec.source == "checkpoint":
        return load_model(spec.name)
    shape = tuple(int(s) for s in input_shape)
    if spec.source == "arch":
        state = load_state_dict(spec.weights)
        model = _build_arch(spec.name, weights=spec.weights, state=state, num_classes=num_classes, input_shape=shape)
        fit_state_dict(model, state, spec.weights)
    elif spec.source == "callable":
        model = _call_teacher(spec.name)
        if spec.weights is not None:
            fit_state_dict(model, load_state_dict(spec.weights), spec.weights)
    else:
        raise ValueError(f"teacher source {spec.source!r}: expected one of {TEACHER_SOURCES}")
    model.eval()
    _check_outputs(model, name=spec.name, num_classes=num_classes, input_shape=shape)
    return model, {"arch": spec.name, "num_classes": num_classes, "input_shape": shape}


def state_sha256(model: nn.Module) -> str:
    """sha256 of a model's state_dict: each key, dtype, shape and the tensor's bytes, in key order."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(value.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    """Every torchvision classification model (``torchvision.models.list_models``)."""
    import torchvision.models as tvm  # deferred: torchvision is slow to import

    return tuple(tvm.list_models(module=tvm))


def _timm(name: str) -> Any:
    try:
        import timm  # optional: only timm:NAME teachers need it
    except ImportError:
        raise UserError(f"--teacher {name}: expected the timm package, found it missing "
                        "(pip install 'kdcache[timm]')") from None
    if not timm.is_model(name.removeprefix("timm:")):
        raise UserError(f"--teacher {name}: unknown timm model (timm.list_models() lists them)")
    return timm


def _mismatch(model: nn.Module, state: Mapping[str, torch.Tensor], num_classes: int) -> str | None:
    """Why ``state`` does not fit ``model`` (None when every key and shape matches)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        return f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}"
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if not wrong:
        return None
    # Only the head differs, in its first dimension: the weights were trained for another class count.
    if all(own[k].ndim and own[k].shape[0] == num_classes and own[k].shape[1:] == state[k].shape[1:] for k in wrong):
        return (f"field num_classes: expected {num_classes} (the manifest's classes), found {state[wrong[0]].shape[0]} "
                f"in the weights' head {wrong[0]!r}")
    key = wrong[0]
    return f"field {key!r}: expected shape {tuple(own[key].shape)}, found {tuple(state[key].shape)}"


def _build_arch(name: str, *, weights: str | None, state: Mapping[str, torch.Tensor], num_classes: int,
                input_shape: tuple[int, ...]) -> nn.Module:
    """The untrained ``name`` for ``num_classes``; of kdcache's and torchvision's, the one ``state`` fits."""
    builders: list[Callable[[], nn.Module]] = []
    if name.startswith("timm:"):
        timm = _timm(name)
        builders.append(lambda: timm.create_model(name.removeprefix("timm:"), pretrained=False,
                                                  num_classes=num_classes, in_chans=input_shape[0]))
    else:
        plain = name.removeprefix("torchvision:")
        if plain == name and name in MODELS.names():
            builders.append(lambda: create_model(name, num_classes=num_classes, input_shape=input_shape))
        if plain in torchvision_names():
            import torchvision.models as tvm  # deferred: torchvision is slow to import

            builders.append(lambda: tvm.get_model(plain, weights=None, num_classes=num_classes))
        if not builders:
            raise UserError(f"--teacher {name}: unknown torchvision classification model "
                            "(torchvision.models.list_models() lists them)")
    problems = []
    for build in builders:
        try:
            model = build()
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"--teacher {name}: could not be built with num_classes={num_classes} "
                            f"({type(err).__name__}: {str(err)[:200]})") from None
        problem = _mismatch(model, state, num_classes)
        if problem is None:
            return model
        problems.append(problem)
    # Of kdcache's and torchvision's, the one that fits but for the head says the most: name num_classes.
    problems.sort(key=lambda text: not text.startswith("field num_classes"))
    raise UserError(f"{weights}: weights do not fit --teacher {name}: {problems[0]}")


def _call_teacher(name: str) -> nn.Module:
    """Import ``module:function`` (from sys.path, then the current folder) and call it with no arguments."""
    module_name, _, attr = name.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:  # a console script's sys.path lacks the folder it was started in
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise UserError(f"--teacher {name}: cannot import module {module_name!r} "
                        f"({type(err).__name__}: {str(err)[:200]})") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise UserError(f"--teacher {name}: expected a callable {attr!r} in module {module_name!r}, found "
                        f"{type(fn).__name__ if fn is not None else 'none'}")
    try:
        model = fn()
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"--teacher {name}: calling it raised {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--teacher {name}: expected it to return a torch nn.Module, found {type(model).__name__}")
    return model


def _check_outputs(model: nn.Module, *, name: str, num_classes: int, input_shape: tuple[int, ...]) -> None:
    """One forward pass on zeros: the teacher takes the split's inputs and gives ``num_classes`` logits."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as err:
        raise UserError(f"--teacher {name}: expected a model taking inputs of shape {input_shape} (the split's "
                        f"view 0), its forward pass failed ({type(err).__name__}: {str(err)[:200]})") from None
    found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if found != (2, num_classes):
        raise UserError(f"--teacher {name}: field num_classes: expected logits [batch, {num_classes}] (the "
                        f"manifest's classes), found {found}")


def _image_shape(arch: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise UserError(f"model {arch!r} needs image inputs (C, H, W), found input_shape {input_shape}")
    return input_shape  # type: ignore[return-value]


# --- MLP and small CNN -------------------------------------------------------


class MLP(nn.Module):
    """``d -> hidden (x depth) -> C`` with ReLU; image inputs are flattened."""

    def __init__(self, in_features: int, num_classes: int, *, hidden: int = 128, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@MODELS.register("mlp")
def mlp(*, num_classes: int, input_shape: tuple[int, ...], hidden: int = 128, depth: int = 2) -> nn.Module:
    in_features = 1
    for s in input_shape:
        in_features *= s
    return MLP(in_features, num_classes, hidden=hidden, depth=depth)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@MODELS.register("cnn")
def cnn(*, num_classes: int, input_shape: tuple[int, ...], width: int = 32) -> nn.Module:
    """Three conv blocks (``width``, 2 x, 4 x channels: 32, 64, 128 by default; each halving the size),
    global pool, linear."""
    channels, _, _ = _image_shape("cnn", input_shape)
    layers: list[nn.Module] = []
    cin = channels
    for cout in (width, 2 * width, 4 * width):
        layers += _conv_bn(cin, cout) + [nn.MaxPool2d(2, ceil_mode=True)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


# --- CIFAR ResNets (He et al. 2016, section 4.2) -------------------------------


class _ShortcutA(nn.Module):
    """Option A: subsample by the stride and zero-pad the new channels (parameter-free)."""

    def __init__(self, stride: int, extra: int):
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = _ShortcutA(stride, cout - cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 3x3 stem, 3 stages of n blocks (16, 32, 64 channels)."""

    def __init__(self, depth: int, num_classes: int, *, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, found {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        cin = 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock(cin, cout, stride))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _register_cifar_resnet(depth: int) -> None:
    @MODELS.register(f"resnet{depth}")
    def build(*, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        channels, _, _ = _image_shape(f"resnet{depth}", input_shape)
        return CifarResNet(depth, num_classes, in_channels=channels)


for _depth in (8, 14, 20, 32, 56, 110):
    _register_cifar_resnet(_depth)


# --- torchvision models ---------------------------------------------------------

TORCHVISION = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "vgg11_bn",
    "vgg13_bn",
)

_VGG_CONFIG = {"vgg11_bn": "A", "vgg13_bn": "B"}


def _like(conv: nn.Conv2d, *, in_channels: int, kernel: int | None = None, stride: int | None = None) -> nn.Conv2d:
    """A fresh conv like ``conv`` with another input channel count / kernel / stride."""
    k = kernel if kernel is not None else conv.kernel_size[0]
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        k,
        stride=stride if stride is not None else conv.stride[0],
        padding=k // 2,
        bias=conv.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    return new


def _adapt_resnet(model: nn.Module, channels: int, small: bool) -> nn.Module:
    if small:
        model.conv1 = _like(model.conv1, in_channels=channels, kernel=3, stride=1)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = _like(model.conv1, in_channels=channels)
    return model


def _adapt_mobilenet(model: nn.Module, channels: int, small: bool) -> nn.Module:
    first = model.features[0][0]
    if small or channels != 3:
        model.features[0][0] = _like(first, in_channels=channels, stride=1 if small else None)
    return model


class _SmallVGG(nn.Module):
    """The CIFAR VGG head: conv features without the last max-pool, global pool, one linear."""

    def __init__(self, config: str, num_classes: int, *, in_channels: int):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs[config], batch_norm=True)
        features[0] = _like(features[0], in_channels=in_channels)
        self.features = nn.Sequential(*list(features)[:-1])
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def _register_torchvision(name: str) -> None:
    @MODELS.register(name)
    def build(*, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        import torchvision.models as tvm

        channels, height, width = _image_shape(name, input_shape)
        small = max(height, width) <= SMALL_INPUT
        if name.startswith("vgg"):
            if small:
                return _SmallVGG(_VGG_CONFIG[name], num_classes, in_channels=channels)
            model = getattr(tvm, name)(weights=None, num_classes=num_classes)
            if channels != 3:
                model.features[0] = _like(model.features[0], in_channels=channels)
            return model
        model = getattr(tvm, name)(weights=None, num_classes=num_classes)
        adapt: Callable[[nn.Module, int, bool], nn.Module]
        adapt = _adapt_resnet if name.startswith("resnet") else _adapt_mobilenet
        return adapt(model, channels, small)


for _name in TORCHVISION:
    _register_torchvision(_name)
