"""Teachers from anywhere: a torchvision arch name with a bare state_dict, and the user's
``module:function``, cached on a tiny ImageFolder; the mistakes each give one line. The same specs
run live (``distill --online``), several in one ``kdcache cache`` take their own ``--weights`` and
``--name``, and (where timm / safetensors are installed) a ``timm:NAME`` teacher and a
``.safetensors`` weights file.

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
from pipeline.checkpoint import load_checkpoint
from pipeline.cli import cli
from pipeline.data import build_manifest, open_split
from pipeline.data.views import ViewSpec
from pipeline.errors import UserError
from pipeline.files import file_sha256
from pipeline.manifest import load_manifest
from pipeline.models import state_sha256
from pipeline.teachers import teacher_source
from pipeline.runtime import Runtime
from pipeline.store import schema
from pipeline.store.verify import verify_store
from pipeline.train.loop import Batch
from pipeline.train.targets import CachedTargets, LiveTargets
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
               needles=(f"{whole}: refused: loading it needs arbitrary unpickling", "will not run it", "state_dict"))
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


# --- live teachers: the same specs, the same targets as their cache --------------------------------


def _live_equals_cached(world, spec, store: Path) -> LiveTargets:
    """The live targets of ``spec`` equal the cached ones of ``store`` on every batch of two epochs (views
    0 and 1), within the fp16 rounding of the cache; returns the live targets."""
    man = load_manifest(world.manifest)
    cached = CachedTargets.open([str(store)], man)
    try:
        live = LiveTargets([spec], man, runtime=Runtime.create("cpu", images=True), split="train",
                           view_spec=cached.view_spec, num_views=cached.num_views, input_shape=(3, 32, 32))
        for epoch in range(VIEWS):
            ds = open_split(man, "train", views=cached.view_spec, view=epoch % VIEWS)
            batches = list(live.batches(epoch, batch_size=4, seed=0))
            assert all(np.array_equal(a, b) for a, b in zip(batches, cached.batches(epoch, batch_size=4, seed=0)))
            for rows in batches:
                batch = Batch(x=torch.stack([ds[int(r)][0] for r in rows]),
                              y=torch.as_tensor(ds.labels[rows], dtype=torch.int64), rows=rows, epoch=epoch, step=0)
                want, got = cached.targets(batch), live.targets(batch)
                for name in ("logits", "entropy", "p_gt"):
                    torch.testing.assert_close(got[name], want[name], rtol=2e-3, atol=2e-3)
    finally:
        cached.close()
    return live


def test_live_teachers_take_the_cache_specs_and_give_its_targets(world, user_module, arch_store):
    live = _live_equals_cached(world, teacher_source("resnet18", world.weights), arch_store)
    recorded = schema.read_attrs(arch_store)["teacher"]
    mentor = live.provenance[0]
    assert mentor["source"] == "arch" and mentor["arch"] == "resnet18" and mentor["name"] == "r18"
    assert mentor["checkpoint_sha256"] == recorded["checkpoint_sha256"] == file_sha256(world.weights)
    assert mentor["preprocessing"] == recorded["preprocessing"]
    live = _live_equals_cached(world, teacher_source(f"{user_module}:build"), arch_store)
    assert live.provenance[0]["source"] == "callable"
    assert live.provenance[0]["checkpoint_sha256"] == state_sha256(world.model)


def test_distill_online_with_an_arch_teacher_and_its_weights(world, tmp_path):
    out = tmp_path / "s.pt"
    base = ["distill", "--method", "kd", "--online", "--manifest", str(world.manifest), "--student", "cnn",
            "--student-option", "width=4", "--epochs", "1", "--batch-size", "6", "--views", str(VIEWS),
            "--device", "cpu", "--no-progress", "--out", str(out)]
    result = CliRunner().invoke(cli, base + ["--teachers", "resnet18", "--teacher-weights", str(world.weights)])
    assert result.exit_code == 0, result.output
    mentor = load_checkpoint(out)["meta"]["mentors"][0]
    assert mentor["source"] == "arch" and mentor["checkpoint_sha256"] == file_sha256(world.weights)
    out.unlink()
    one_error_line(CliRunner().invoke(cli, base + ["--teachers", "resnet18"]),
                   "--teacher resnet18", "expected --teacher-weights FILE")
    one_error_line(CliRunner().invoke(cli, base + ["--teachers", "resnet18", "resnet18",
                                                   "--teacher-weights", str(world.weights)]),
                   "teacher_weights", "none or one per teacher", "2 teachers", "found 1")
    assert not out.exists()


# --- several teachers of one kdcache cache, each with its own --weights and --name ------------------


def test_each_teacher_of_a_pass_takes_its_own_weights_and_name(world, user_module, tmp_path):
    torch.manual_seed(2)
    other = tmp_path / "r18_b.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), other)
    base = ["cache", "--manifest", str(world.manifest), "--views", "1", "--rows-per-block", "8", "--micro-batch", "4",
            "--threads", "1", "--no-progress", "--device", "cpu"]
    stores = [tmp_path / f"{name}.zarr" for name in ("a", "b", "c")]
    result = CliRunner().invoke(cli, base + ["--teacher", "resnet18", "--teacher", f"{user_module}:build",
                                             "--teacher", "resnet18", "--weights", str(world.weights), str(world.weights),
                                             str(other), "--name", "first", "mine", "third",
                                             "--out", *map(str, stores)])
    assert result.exit_code == 0, result.output
    teachers = [schema.read_attrs(store)["teacher"] for store in stores]
    assert [t["name"] for t in teachers] == ["first", "mine", "third"]
    assert [t["source"] for t in teachers] == ["arch", "callable", "arch"]
    assert [t["checkpoint_sha256"] for t in teachers] == [file_sha256(w) for w in (world.weights, world.weights, other)]
    logits = [zarr.open_group(str(store), mode="r")["logits"][:] for store in stores]
    np.testing.assert_array_equal(logits[0], logits[1])
    assert not np.array_equal(logits[0], logits[2])                 # the third teacher's own weights
    bad = [str(tmp_path / "x.zarr"), str(tmp_path / "y.zarr")]
    one_error_line(CliRunner().invoke(cli, base + ["--teacher", "resnet18", "resnet18", "--weights", str(world.weights),
                                                   "--out", *bad]),
                   "--weights: expected none or one per teacher (2 teachers), found 1", "in the same order")
    one_error_line(CliRunner().invoke(cli, base + ["--teacher", "resnet18", "resnet18", "--weights", str(world.weights),
                                                   str(other), "--name", "a", "b", "c", "--out", *bad]),
                   "--name: expected none or one per teacher (2 teachers), found 3")
    assert not any(Path(b).exists() for b in bad)


# --- timm and safetensors, where installed (never a requirement of the tests) ---------------------


@pytest.fixture(scope="module")
def timm_teacher(world):
    """An untrained ``timm:resnet10t`` for the 3 classes (built without a download) and its state_dict file."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    weights = world.tmp / "r10t.pt"
    torch.save(model.state_dict(), weights)
    return SimpleNamespace(model=model, weights=weights)


def test_a_timm_teacher_from_a_state_dict(world, timm_teacher):
    out = world.tmp / "timm.zarr"
    assert _cache(world, out, teacher="timm:resnet10t", weights=str(timm_teacher.weights)).complete
    assert verify_store(out).ok
    _assert_logits_are_the_models(world, out, timm_teacher.model)
    teacher = schema.read_attrs(out)["teacher"]
    assert teacher["source"] == "arch" and teacher["arch"] == "timm:resnet10t"
    assert teacher["checkpoint_sha256"] == file_sha256(timm_teacher.weights)


def _safetensors(model: torch.nn.Module, path: Path) -> Path:
    """``model``'s state_dict saved as a .safetensors file (skips the test without safetensors)."""
    pytest.importorskip("safetensors.torch").save_file(model.state_dict(), str(path))
    return path


def test_a_timm_teacher_from_a_safetensors_file(world, timm_teacher):
    weights = _safetensors(timm_teacher.model, world.tmp / "r10t.safetensors")
    out = world.tmp / "timm_st.zarr"
    assert _cache(world, out, teacher="timm:resnet10t", weights=str(weights)).complete
    assert verify_store(out).ok
    _assert_logits_are_the_models(world, out, timm_teacher.model)
    assert schema.read_attrs(out)["teacher"]["checkpoint_sha256"] == file_sha256(weights)


def test_a_safetensors_weights_file(world, arch_store):
    weights = _safetensors(world.model, world.tmp / "r18.safetensors")
    out = world.tmp / "st.zarr"
    assert _cache(world, out, teacher="resnet18", weights=str(weights)).complete
    assert verify_store(out).ok
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["logits"][:],
                                  zarr.open_group(str(arch_store), mode="r")["logits"][:])
    assert schema.read_attrs(out)["teacher"]["name"] == "r18"
