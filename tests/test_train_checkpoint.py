"""Checkpoints: round trip, atomic write, errors that name the file, file_sha256.

    .venv/bin/pytest tests/test_train_checkpoint.py -q
"""

from __future__ import annotations

import hashlib
import time

import pytest
import torch

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.errors import UserError
from pipeline.files import file_sha256
from pipeline.models import create_model, load_model

META = {"arch": "resnet8", "num_classes": 4, "input_shape": (1, 28, 28), "loss": "mse",
        "manifest_sha256": "ab" * 32, "dataset": "fashion-mnist", "views": {"kind": "identity", "seed": 0, "params": {}},
        "epoch": 3, "metrics": {"val_top1": 0.5}, "seed": 7}


def test_round_trip_rebuilds_the_model_in_eval_mode(tmp_path) -> None:
    torch.manual_seed(0)
    net = create_model("resnet8", num_classes=4, input_shape=(1, 28, 28))
    path = tmp_path / "sub" / "t.pt"
    save_checkpoint(path, model=net, meta=META, train_state={"epoch": 3, "rng": torch.get_rng_state()})
    assert [p.name for p in path.parent.iterdir()] == ["t.pt"]  # no temporary file left behind
    model, meta = load_model(path)
    assert not model.training
    for (ka, a), (kb, b) in zip(net.state_dict().items(), model.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    assert meta["input_shape"] == (1, 28, 28)
    assert {k: meta[k] for k in META if k != "input_shape"} == {k: v for k, v in META.items() if k != "input_shape"}
    assert meta["kdcache_version"]
    assert load_checkpoint(path)["train_state"]["epoch"] == 3
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), model(x))


def test_a_ddp_style_prefix_is_not_saved(tmp_path) -> None:
    class Wrapper(torch.nn.Module):
        def __init__(self, module: torch.nn.Module):
            super().__init__()
            self.module = module

    net = create_model("mlp", num_classes=3, input_shape=(5,))
    save_checkpoint(tmp_path / "w.pt", model=Wrapper(net), meta={"arch": "mlp", "num_classes": 3, "input_shape": (5,)})
    assert all(not k.startswith("module.") for k in load_checkpoint(tmp_path / "w.pt")["model"])


def test_missing_and_corrupt_files_name_the_file(tmp_path) -> None:
    with pytest.raises(UserError, match="nope.pt: checkpoint not found"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pt: unreadable checkpoint"):
        load_checkpoint(bad)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="other.pt: field 'format'"):
        load_checkpoint(tmp_path / "other.pt")


def test_weights_that_do_not_fit_the_arch_are_a_user_error(tmp_path) -> None:
    net = create_model("mlp", num_classes=3, input_shape=(5,))
    path = tmp_path / "w.pt"
    save_checkpoint(path, model=net, meta={"arch": "mlp", "num_classes": 4, "input_shape": (5,)})
    with pytest.raises(UserError, match="w.pt: weights do not fit"):
        load_model(path)


def test_meta_must_say_what_model_it_is(tmp_path) -> None:
    net = create_model("mlp", num_classes=3, input_shape=(5,))
    with pytest.raises(ValueError, match="input_shape"):
        save_checkpoint(tmp_path / "w.pt", model=net, meta={"arch": "mlp", "num_classes": 3})


def test_file_sha256(tmp_path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"kdcache" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"kdcache" * 1000).hexdigest()
    with pytest.raises(UserError, match="missing.bin"):
        file_sha256(tmp_path / "missing.bin")


def test_file_sha256_hashes_a_settled_file_once_until_it_changes(tmp_path, monkeypatch) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 4096)
    longer = hashlib.sha256(b"a" * 4097).hexdigest()
    hashed = []
    real_sha256, real_now = hashlib.sha256, time.time_ns
    monkeypatch.setattr("pipeline.files.hashlib.sha256", lambda: hashed.append(1) or real_sha256())  # counts hashings
    monkeypatch.setattr("pipeline.files.time.time_ns", lambda: real_now() + 10**10)   # 10 s later: settled
    first = file_sha256(path)
    assert file_sha256(path) == first and len(hashed) == 1            # the same file: hashed once
    with open(path, "ab") as fh:
        fh.write(b"a")
    assert file_sha256(path) == longer and len(hashed) == 2           # changed: hashed again
    monkeypatch.setattr("pipeline.files.time.time_ns", real_now)
    fresh = tmp_path / "g.bin"
    fresh.write_bytes(b"a" * 4096)                                    # just written: never remembered
    assert file_sha256(fresh) == file_sha256(fresh) == first and len(hashed) == 4
