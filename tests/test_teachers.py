"""Teachers from anywhere: a torchvision arch name with a bare state_dict, and the user's
``module:function``, cached on a tiny ImageFolder; the mistakes each give one line.

    .venv/bin/pytest tests/test_teachers.py -q
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
import zarr
from click.testing import CliRunner

from pipeline.cache import CacheConfig, cache_teacher
from pipeline.cli import cli
from pipeline.data import build_manifest, open_split
from pipeline.data.views import ViewSpec
from pipeline.errors import UserError
from pipeline.files import file_sha256
from pipeline.manifest import load_manifest
from pipeline.models import state_sha256
from pipeline.store import schema
from pipeline.store.verify import verify_store
from tests.support.cli import one_error_line
from tests.support.data import write_imagefolder

VIEWS = 2
MODULE = "kd_user_teachers"   # the user's module, written into the test's folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-class ImageFolder manifest at 32 px, a torchvision resnet18 and its bare state_dict file."""
    tmp = tmp_path_factory.mktemp("teachers")
    root = write_imagefolder(tmp / "imgs", dirs={"train": 4, "val": 2})
    manifest = tmp / "m.parquet"
    build_manifest("imagefolder", root, manifest, image_size=32)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    weights = tmp / "r18.pt"
    torch.save(model.state_dict(), weights)
    return SimpleNamespace(tmp=tmp, manifest=manifest, model=model, weights=weights)


@pytest.fixture
def user_module(world, tmp_path, monkeypatch):
    """``kd_user_teachers`` importable from tmp_path: ``build`` (resnet18 with the weights), ``not_a_model``,
    ``untrained`` (a fresh random init each call)."""
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(f'''
        import torch
        import torchvision

        def build():
            model = torchvision.models.resnet18(num_classes=3)
            model.load_state_dict(torch.load({str(world.weights)!r}, weights_only=True))
            return model

        def not_a_model():
            return {{"fc": 1}}

        def untrained():
            return torchvision.models.resnet18(num_classes=3)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield MODULE
    sys.modules.pop(MODULE, None)


def _cache(world, out: Path, **teacher) -> object:
    return cache_teacher(CacheConfig(manifest=str(world.manifest), out=str(out), split="train", views=VIEWS,
                                     rows_per_block=8, micro_batch=4, device="cpu", threads=1, progress=False,
                                     **teacher))


def _assert_logits_are_the_models(world, store: Path, model: torch.nn.Module) -> None:
    """Every stored view equals the model's own forward on that view (within the fp16 rounding)."""
    attrs = schema.read_attrs(store)
    spec = ViewSpec.from_dict(attrs["views"]["spec"])
    group = zarr.open_group(str(store), mode="r")
    man = load_manifest(world.manifest)
    seen = []
    for v in range(VIEWS):
        ds = open_split(man, "train", views=spec, view=v)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        with torch.no_grad():
            z = model.eval()(x).numpy()
        np.testing.assert_allclose(group["logits"][v].astype(np.float32), z, rtol=2e-3, atol=2e-3)
        seen.append(x)
    assert not torch.equal(seen[0], seen[1])       # view 1 is another crop/flip, and it was replayed


@pytest.fixture(scope="module")
def arch_store(world):
    """The store of ``--teacher resnet18 --weights r18.pt``."""
    out = world.tmp / "arch.zarr"
    assert _cache(world, out, teacher="resnet18", weights=str(world.weights)).complete
    return out


def test_arch_name_with_a_bare_state_dict(world, arch_store):
    out = arch_store
    report = verify_store(out)
    assert report.ok, str(report)
    _assert_logits_are_the_models(world, out, world.model)
    attrs = schema.read_attrs(out)
    teacher, spec = attrs["teacher"], attrs["views"]["spec"]
    assert teacher["source"] == "arch" and teacher["arch"] == "resnet18"
    assert teacher["checkpoint_sha256"] == file_sha256(world.weights)
    assert teacher["path"] == os.path.relpath(world.weights.resolve(), Path(out).resolve().parent)   # store-relative
    assert teacher["name"] == "r18"
    assert teacher["preprocessing"] == {"mean": spec["params"]["mean"], "std": spec["params"]["std"],
                                        "input_shape": [3, 32, 32]}
    assert spec["params"]["mean"] is not None

    # the same run again: nothing to compute; other weights for the same store: refused
    assert _cache(world, out, teacher="resnet18", weights=str(world.weights)).computed == 0
    torch.manual_seed(1)
    other = world.tmp / "other.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), other)
    with pytest.raises(UserError, match=r"teacher\.checkpoint_sha256"):
        _cache(world, out, teacher="resnet18", weights=str(other))


def test_module_function_callable(world, user_module, arch_store):
    out = world.tmp / "callable.zarr"
    assert _cache(world, out, teacher=f"{user_module}:build").complete
    report = verify_store(out)
    assert report.ok, str(report)
    _assert_logits_are_the_models(world, out, world.model)
    teacher = schema.read_attrs(out)["teacher"]
    assert teacher["source"] == "callable" and teacher["arch"] == f"{user_module}:build"
    # no weights file: the sha256 of the state_dict's tensors identifies the weights
    assert teacher["checkpoint_sha256"] == state_sha256(world.model) and teacher["path"] is None
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["logits"][:],
                                  zarr.open_group(str(arch_store), mode="r")["logits"][:])


def test_a_callable_with_weights_records_the_weights_file(world, user_module):
    out = world.tmp / "callable_w.zarr"
    assert _cache(world, out, teacher=f"{user_module}:build", weights=str(world.weights)).complete
    teacher = schema.read_attrs(out)["teacher"]
    assert teacher["source"] == "callable" and teacher["checkpoint_sha256"] == file_sha256(world.weights)


def _cli_error(world, tmp_path, *args: str, needles: tuple[str, ...]) -> str:
    out = tmp_path / "bad.zarr"
    result = CliRunner().invoke(cli, ["cache", "--manifest", str(world.manifest), "--out", str(out), "--views", "1",
                                      "--no-progress", "--device", "cpu", *args])
    line = one_error_line(result, *needles)
    assert not out.exists()          # refused before any store exists
    return line


def test_weights_of_another_arch(world, tmp_path):
    _cli_error(world, tmp_path, "--teacher", "resnet34", "--weights", str(world.weights),
               needles=("r18.pt", "weights do not fit --teacher resnet34", "missing keys"))


def test_weights_trained_for_another_class_count(world, tmp_path):
    ten = tmp_path / "r18_10.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), ten)
    _cli_error(world, tmp_path, "--teacher", "resnet18", "--weights", str(ten),
               needles=("r18_10.pt", "num_classes", "expected 3", "found 10"))


def test_a_callable_that_returns_no_module(world, user_module, tmp_path):
    _cli_error(world, tmp_path, "--teacher", f"{user_module}:not_a_model",
               needles=(f"--teacher {user_module}:not_a_model", "nn.Module", "found dict"))


def test_a_callable_giving_other_weights_each_call(world, user_module, tmp_path):
    # workers rebuild the teacher: an unseeded random init would not be the teacher recorded
    _cli_error(world, tmp_path, "--teacher", f"{user_module}:untrained",
               needles=(f"--teacher {user_module}:untrained", "the same weights every call", "--weights"))


def test_a_callable_that_cannot_be_imported(world, tmp_path):
    _cli_error(world, tmp_path, "--teacher", "kd_no_such_module:build", needles=("kd_no_such_module", "import"))


def test_a_pickled_whole_model_is_refused_not_run(world, tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save(world.model, whole)
    _cli_error(world, tmp_path, "--teacher", "resnet18", "--weights", str(whole),
               needles=(f"{whole}: refused: it needs arbitrary unpickling (weights_only=False)", "state_dict"))
    # a pickle that would run code when loaded: refused the same way, and the code never ran
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"fc.weight": Payload()}, evil)
    _cli_error(world, tmp_path, "--teacher", "resnet18", "--weights", str(evil), needles=("evil.pt: refused",))
    assert not marker.exists()


def test_timm_without_timm(world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)      # `import timm` fails even where it is installed
    line = _cli_error(world, tmp_path, "--teacher", "timm:resnet18", "--weights", str(world.weights), needles=())
    assert line == ("error: --teacher timm:resnet18: expected the timm package, found it missing "
                    "(pip install 'kdcache[timm]')")


def test_unknown_arch_and_missing_weights(world, tmp_path):
    _cli_error(world, tmp_path, "--teacher", "resnet_nope", needles=("--teacher resnet_nope: unknown",))
    _cli_error(world, tmp_path, "--teacher", "resnet18", needles=("--teacher resnet18", "--weights"))
    _cli_error(world, tmp_path, "--teacher", "resnet18", "--weights", str(tmp_path / "nope.pt"),
               needles=("nope.pt", "not found"))


@pytest.mark.distributed
def test_dask_workers_rebuild_a_callable_teacher_from_its_spec(world, user_module, arch_store):
    """The factory carries the teacher spec, not the model: two worker processes rebuild it and
    write the same bytes as one process did."""
    out = world.tmp / "callable_dask.zarr"
    assert _cache(world, out, teacher=f"{user_module}:build", local_workers=2).complete
    assert verify_store(out).ok
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["logits"][:],
                                  zarr.open_group(str(arch_store), mode="r")["logits"][:])
