"""The machinery of the bad-input catalogue (tests/test_bad_inputs*.py): the world every case starts
from, the ``Case`` it builds, the command lines it spoils, and the one check every case must pass.

    cases = Catalogue()

    @cases.case("manifest: file missing")
    def _(w: World) -> Case:
        return Case(["manifest", "check", str(w.tmp / "nope.parquet")], ("nope.parquet", "not found"))

    def test_a_mistake_ends_in_one_line(name, base, tmp_path, monkeypatch, capsys):
        check_case(cases[name], World(base, tmp_path, monkeypatch, {"capsys": capsys}))
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import pipeline.store.codecs.base as codec_base
import pipeline.store.writer as store_writer
from pipeline.cache.teacher import TeacherComputer
from pipeline.cli import cli
from pipeline.store.schema import read_attrs
from tests.support.distill import cache, untrained_teacher

STAGES = Path(__file__).resolve().parents[2] / "stages"

# --- the world every case starts from ---------------------------------------------------------------------

@dataclass(frozen=True)
class Base:
    """Built once: a synthetic manifest (200 train rows), an untrained teacher, its complete cache."""

    manifest: Path
    teacher: Path
    store: Path


def make_base(synthetic: str, root: Path) -> Base:
    """The world's starting point, built once per test module (its ``base`` fixture) under ``root``."""
    teacher = untrained_teacher(synthetic, root / "t.pt")
    store = cache(teacher, synthetic, root / "t.zarr", views=1)
    return Base(Path(synthetic), teacher, store)


@dataclass
class Case:
    """What to run, what the one error line must name, and what must not be left complete."""

    args: list[str]
    needles: tuple[str, ...]
    store: Path | None = None          # a store that must not be marked complete (if it exists)
    checkpoint: Path | None = None     # a checkpoint that must not exist
    run: Callable[[], tuple[int, str]] | None = None   # instead of the CLI (params.yaml: a stage script)
    unchanged: tuple[Path, ...] = ()   # inputs whose bytes the run must leave as they were
    status: int = 2                    # the exit status
    absent: tuple[Path, ...] = ()      # paths (a glob in the last part) the run must not leave behind


@dataclass
class World:
    base: Base
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    extra: dict[str, Any] = field(default_factory=dict)

    def copy_store(self) -> Path:
        out = self.tmp / "copy.zarr"
        shutil.copytree(self.base.store, out)
        return out

    def a_file(self, name: str = "file") -> Path:
        path = self.tmp / name
        path.write_text("a regular file, not a folder\n")
        return path

    def teacher_with(self, name: str, change: Callable[[dict], None]) -> Path:
        """A copy of the base teacher with its checkpoint dict changed by ``change``."""
        blob = torch.load(self.base.teacher, weights_only=True)
        change(blob)
        out = self.tmp / name
        torch.save(blob, out)
        return out


class Catalogue(dict):
    """Case name -> a function building the ``Case`` in a ``World``; ``@cases.case(name)`` adds one."""

    def case(self, name: str) -> Callable:
        def register(fn: Callable[[World], Case]) -> Callable[[World], Case]:
            assert name not in self, name
            self[name] = fn
            return fn
        return register


def train_args(w: World, *extra: str, out: str = "t_out.pt") -> list[str]:
    return ["train-teacher", "--manifest", str(w.base.manifest), "--arch", "mlp", "--epochs", "1",
            "--no-progress", "--out", str(w.tmp / out), *extra]


def distill_args(w: World, *extra: str, mentors: tuple[str, ...] | None = None, out: str = "s_out.pt",
                 method: str = "kd") -> list[str]:
    given = ["--mentors", *(mentors if mentors is not None else (str(w.base.store),))] if mentors != () else []
    return ["distill", "--method", method, *given, "--manifest", str(w.base.manifest), "--student", "mlp",
            "--epochs", "1", "--no-progress", "--device", "cpu", "--out", str(w.tmp / out), *extra]


def cache_args(w: World, *extra: str, teacher: Path | str | None = None, out: Path | str | None = None) -> list[str]:
    return ["cache", "--teacher", str(teacher or w.base.teacher), "--manifest", str(w.base.manifest),
            "--split", "train", "--out", str(out or w.tmp / "c.zarr"), "--rows-per-block", "64",
            "--micro-batch", "32", "--threads", "1", "--device", "cpu", "--no-progress", *extra]



def stage_runner(w: World, name: str, params: dict | str, argv: list[str]) -> Callable[[], tuple[int, str]]:
    """Run ``stages/<name>.py`` in-process in ``w.tmp`` with ``params``; returns (status, stderr)."""
    def run() -> tuple[int, str]:
        (w.tmp / "params.yaml").write_text(params if isinstance(params, str) else yaml.safe_dump(params))
        w.monkeypatch.syspath_prepend(str(STAGES))
        w.monkeypatch.chdir(w.tmp)
        spec = importlib.util.spec_from_file_location(f"stage_{name}", STAGES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        w.monkeypatch.setitem(sys.modules, f"stage_{name}", module)
        spec.loader.exec_module(module)
        w.monkeypatch.setattr(sys, "argv", [f"stages/{name}.py", *argv])
        capture = w.extra["capsys"]
        capture.readouterr()
        try:
            module.run(module.main)
            status = 0
        except SystemExit as exit_:
            status = int(exit_.code or 0)
        return status, capture.readouterr().err
    return run


def nan_store(w: World, *, rows: tuple[int, ...]) -> Path:
    """A complete cache whose teacher gave NaN logits at ``rows`` (view 0): the writer's finite checks are
    switched off (the writer's and the codecs'), as a writer without them (or another tool) would have left it."""
    real_compute = TeacherComputer.compute_views

    def compute(self: TeacherComputer, views: list[int], start: int, stop: int) -> list[np.ndarray]:
        out = real_compute(self, views, start, stop)
        for view, z in zip(views, out):
            for row in rows:
                if view == 0 and start <= row < stop:
                    z[row - start] = np.nan
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TeacherComputer, "compute_views", compute)
        mp.setattr(store_writer, "np", FiniteChecksOff())
        mp.setattr(codec_base, "np", FiniteChecksOff())          # the float16 range check
        out = cache(w.base.teacher, w.base.manifest, w.tmp / "nan.zarr", views=1)
    assert read_attrs(out)["status"]["complete"]
    return out


class FiniteChecksOff:
    """numpy for the store writer with ``isfinite`` true everywhere (a writer without finite checks)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    @staticmethod
    def isfinite(values: Any) -> np.ndarray:
        return np.ones(np.shape(values), dtype=bool)


def store_complete(store: Path) -> bool | None:
    """``status.complete`` of ``store``, None when there is no store there."""
    try:
        if not (store / "zarr.json").is_file():
            return None
    except OSError:
        return None
    return bool(read_attrs(store)["status"].get("complete"))


def check_case(build: Callable[[World], Case], world: World) -> None:
    """Run one case and assert what every mistake must give: its exit status (2), exactly one ``error:``
    line holding the case's needles, no traceback, nothing marked complete, no checkpoint at --out,
    no input changed, nothing left at ``absent``."""
    got = build(world)
    before = {path: path.read_bytes() for path in got.unchanged}
    if got.run is not None:
        status, stderr = got.run()
    else:
        result = CliRunner().invoke(cli, got.args, catch_exceptions=False)
        status, stderr = result.exit_code, result.stderr
    assert status == got.status, (status, stderr)
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for needle in got.needles:
        assert needle in errors[0], (needle, errors[0])
    print(errors[0])        # `pytest -rP tests/test_bad_inputs*.py` lists every case with its line
    if got.store is not None:
        assert store_complete(got.store) in (None, False), got.store
    if got.checkpoint is not None:
        assert not got.checkpoint.exists(), got.checkpoint
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} was changed"
    for pattern in got.absent:
        assert not list(pattern.parent.glob(pattern.name)), f"{pattern} was left behind"
