"""Every registered model: right output shape for vectors / 1- and 3-channel images; weights files.

    .venv/bin/pytest tests/test_models.py -q
"""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.models import MODELS, TORCHVISION, create_model

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
