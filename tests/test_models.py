"""Every registered model: right output shape for vectors / 1- and 3-channel images; weights files.

    .venv/bin/pytest tests/test_models.py -q
"""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.models import MODELS, TORCHVISION, create_model, model_options

IMAGE_SHAPES = [(1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("arch", MODELS.names())
def test_forward_shape_images(arch: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=7, input_shape=shape).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_mlp_on_vectors_is_d_128_128_c() -> None:
    model = create_model("mlp", num_classes=3, input_shape=(30,))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(30, 128), (128, 128), (128, 3)]
    assert model(torch.randn(4, 30)).shape == (4, 3)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_large_input_keeps_imagenet_stem(arch: str) -> None:
    model = create_model(arch, num_classes=5, input_shape=(1, 72, 72)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 72, 72)).shape == (1, 5)
    if arch == "resnet18":
        assert model.conv1.kernel_size == (7, 7) and model.conv1.in_channels == 1


def test_small_resnet_gets_cifar_stem() -> None:
    model = create_model("resnet18", num_classes=10, input_shape=(3, 32, 32))
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_cifar_resnet20_has_the_papers_parameter_count() -> None:
    model = create_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.27e6, rel=0.01)


def test_registry_lists_the_families() -> None:
    names = set(MODELS.names())
    assert {"mlp", "cnn", "resnet8", "resnet20", "resnet110"} <= names
    assert set(TORCHVISION) <= names


def test_unknown_arch_lists_known_names() -> None:
    with pytest.raises(UserError, match="resnet20"):
        create_model("resnet21", num_classes=3, input_shape=(3, 32, 32))


def test_image_model_on_vectors_is_a_user_error() -> None:
    with pytest.raises(UserError, match="image inputs"):
        create_model("resnet8", num_classes=3, input_shape=(30,))


def test_weights_from_state_dict_and_mismatch(tmp_path) -> None:
    torch.manual_seed(0)
    src = create_model("mlp", num_classes=3, input_shape=(30,))
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    dst = create_model("mlp", num_classes=3, input_shape=(30,), weights=str(path))
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="w.pt.*shape"):
        create_model("mlp", num_classes=4, input_shape=(30,), weights=str(path))
    with pytest.raises(UserError, match="not found"):
        create_model("mlp", num_classes=3, input_shape=(30,), weights=str(tmp_path / "missing.pt"))


# --- size options ------------------------------------------------------------------


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape and torch.equal(sa[key], sb[key]), key


def test_default_options_build_the_models_of_before_options_existed() -> None:
    """Same keys, shapes and initial values under one seed as the fixed mlp (d-128-128-C) and cnn (32/64/128)."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(30, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                              torch.nn.ReLU(), torch.nn.Linear(128, 3))
    before = torch.nn.Module()
    before.net = net
    torch.manual_seed(3)
    _assert_same_state(create_model("mlp", num_classes=3, input_shape=(30,)), before)
    torch.manual_seed(3)
    _assert_same_state(create_model("mlp", num_classes=3, input_shape=(30,), hidden=128, depth=2), before)

    torch.manual_seed(4)
    layers: list[torch.nn.Module] = []
    cin = 1
    for cout in (32, 64, 128):
        layers += [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU(),
                   torch.nn.MaxPool2d(2, ceil_mode=True)]
        cin = cout
    cnn_before = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                     torch.nn.Linear(128, 5))
    torch.manual_seed(4)
    _assert_same_state(create_model("cnn", num_classes=5, input_shape=(1, 28, 28)), cnn_before)


def test_mlp_hidden_and_depth_set_the_layers_and_parameter_count() -> None:
    model = create_model("mlp", num_classes=3, input_shape=(30,), hidden=64, depth=3)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(30, 64), (64, 64), (64, 64), (64, 3)]
    assert _count(model) == (30 * 64 + 64) + 2 * (64 * 64 + 64) + (64 * 3 + 3)
    assert _count(create_model("mlp", num_classes=3, input_shape=(30,), depth=1)) == (30 * 128 + 128) + (128 * 3 + 3)
    assert model(torch.randn(2, 30)).shape == (2, 3)


def _cnn_count(width: int, channels: int, classes: int) -> int:
    convs = [(channels, width), (width, 2 * width), (2 * width, 4 * width)]
    return sum(cin * cout * 9 + 2 * cout for cin, cout in convs) + 4 * width * classes + classes


@pytest.mark.parametrize("width", [8, 32])
def test_cnn_width_sets_the_channels_and_parameter_count(width: int) -> None:
    model = create_model("cnn", num_classes=10, input_shape=(3, 32, 32), width=width)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [width, 2 * width, 4 * width]
    assert _count(model) == _cnn_count(width, 3, 10)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_cnn_width_8_is_smaller_than_the_default() -> None:
    small = _count(create_model("cnn", num_classes=10, input_shape=(3, 32, 32), width=8))
    assert small < _count(create_model("cnn", num_classes=10, input_shape=(3, 32, 32)))


def test_model_options_lists_each_archs_defaults() -> None:
    assert model_options("mlp") == {"hidden": 128, "depth": 2}
    assert model_options("cnn") == {"width": 32}
    assert model_options("resnet20") == {} and model_options("resnet18") == {}


@pytest.mark.parametrize("arch, options, expected", [
    ("mlp", {"widht": 8}, "model 'mlp': unknown option 'widht'; expected one of: depth, hidden"),
    ("cnn", {"hidden": 8}, "model 'cnn': unknown option 'hidden'; expected one of: width"),
    ("resnet20", {"width": 8}, "model 'resnet20': unknown option 'width'; it takes no options"),
    ("mobilenet_v2", {"depth": 2}, "model 'mobilenet_v2': unknown option 'depth'; it takes no options"),
    ("mlp", {"hidden": 0}, "model 'mlp': option 'hidden': expected an integer >= 1, found 0"),
    ("cnn", {"width": "wide"}, "model 'cnn': option 'width': expected an integer >= 1, found 'wide'"),
])
def test_bad_options_are_one_line_user_errors(arch: str, options: dict, expected: str) -> None:
    shape = (30,) if arch == "mlp" else (3, 32, 32)
    with pytest.raises(UserError) as err:
        create_model(arch, num_classes=3, input_shape=shape, **options)
    assert str(err.value) == expected
