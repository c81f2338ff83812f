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

Teachers (a checkpoint, an arch name with weights, ``timm:NAME``, the user's ``module:function``) are
read and built by ``pipeline.teachers``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
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
