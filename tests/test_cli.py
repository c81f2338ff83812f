"""The command line takes its names from the registries and its defaults from the config dataclasses.

    .venv/bin/pytest tests/test_cli.py -q

No training runs here: the library functions the commands call (``distill``, ``cache_teacher``)
are replaced by ones that record the config they are given.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import click
import pytest
import torch
from click.testing import CliRunner

import pipeline.cli
from pipeline.cache import CacheConfig
from pipeline.cli import cli
from pipeline.data import READERS
from pipeline.methods import METHODS
from pipeline.methods.base import Method, register, result
from pipeline.methods.teacher_losses import TEACHER_LOSSES
from pipeline.models import MODELS
from pipeline.store import codecs
from pipeline.store.writer import CacheResult
from pipeline.train import DistillConfig, TeacherConfig
from pipeline.train.student import CACHE_MODES


def _command(*path: str) -> click.Command:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


def _param(command: click.Command, name: str) -> click.Parameter:
    (param,) = [p for p in command.params if p.name == name and not getattr(p, "hidden", False)]
    return param


def _help(*args: str) -> str:
    run = CliRunner().invoke(cli, [*args, "--help"])
    assert run.exit_code == 0, run.output
    return run.output


@pytest.fixture
def trivial_method() -> Iterator[str]:
    """A method registered after pipeline.cli was imported, removed again afterwards."""

    @register("test-trivial")
    class Trivial(Method):
        min_mentors = 0
        needs = frozenset()

        def compute(self, students, targets, y):
            return result(students[0].sum() * 0, {})

    try:
        yield "test-trivial"
    finally:
        METHODS._entries.pop("test-trivial", None)


@pytest.fixture
def captured(monkeypatch) -> list[Any]:
    """Configs the distill and cache commands would run, instead of running them."""
    seen: list[Any] = []

    def fake_distill(config: DistillConfig) -> dict:
        seen.append(config)
        return {"epoch": 0}

    def fake_cache(config: CacheConfig) -> CacheResult:
        seen.append(config)
        return CacheResult(store=config.out, computed=0, missing=1, complete=False)

    monkeypatch.setattr(pipeline.cli, "distill", fake_distill)
    monkeypatch.setattr(pipeline.cli, "cache_teacher", fake_cache)
    return seen


# --- names come from the registries, read when they are used ---------------------------------------


def test_a_method_registered_later_is_listed_and_accepted(trivial_method, tmp_path):
    assert trivial_method in _help("distill")
    missing = tmp_path / "missing.parquet"
    run = CliRunner().invoke(cli, ["distill", "--method", trivial_method, "--manifest", str(missing),
                                   "--student", "mlp", "--out", str(tmp_path / "s.pt"), "--device", "cpu",
                                   "--no-progress"])
    # Past click's choice check and the config: it fails on the manifest that is not there.
    assert run.exit_code == 2, (run.output, run.exception)
    lines = run.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], lines
    assert "Invalid value" not in run.output


def test_an_unregistered_method_is_refused_by_click_with_the_registry_names(tmp_path):
    assert "test-trivial" not in METHODS
    run = CliRunner().invoke(cli, ["distill", "--method", "test-trivial", "--manifest", "m.parquet",
                                   "--student", "mlp", "--out", str(tmp_path / "s.pt")])
    assert run.exit_code == 2
    assert "Invalid value for '--method'" in run.output and "test-trivial" in run.output
    for name in METHODS.names():
        assert name in run.output


@pytest.mark.parametrize("path, name, names", [
    (("manifest", "build"), "dataset", READERS.names),
    (("train-teacher",), "loss", TEACHER_LOSSES.names),
    (("distill",), "method", METHODS.names),
    (("distill",), "cache_mode", lambda: list(CACHE_MODES)),
    (("cache",), "storage", lambda: codecs.CODECS.names()),
    (("cache",), "dtype", lambda: codecs.dtypes()),
    (("plan",), "storage", lambda: codecs.CODECS.names()),
    (("plan",), "dtype", lambda: codecs.dtypes()),
])
def test_choices_are_the_registry_names(path, name, names):
    param = _param(_command(*path), name)
    assert isinstance(param.type, click.Choice)
    assert list(param.type.choices) == list(names()) and names()


def test_arch_help_lists_the_models_registered_when_help_runs():
    name = "test-arch-listed"
    assert name not in _help("train-teacher")
    MODELS.register(name)(lambda **kwargs: torch.nn.Identity())
    try:
        for args in (("train-teacher",), ("distill",)):
            text = " ".join(_help(*args).split())  # help wraps lines
            assert name in text
            for arch in MODELS.names():
                assert arch in text
    finally:
        MODELS._entries.pop(name, None)


# --- defaults come from the config dataclasses ---------------------------------------------------


def _field_defaults(config: type) -> dict[str, Any]:
    out = {}
    for item in dataclasses.fields(config):
        if item.default is not dataclasses.MISSING:
            out[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            out[item.name] = item.default_factory()
    return out


@pytest.mark.parametrize("path, config, not_fields", [
    (("train-teacher",), TeacherConfig, set()),
    (("distill",), DistillConfig, {"option_pairs"}),
    (("cache",), CacheConfig, {"out", "out_dir", "weights", "name"}),
])
def test_option_defaults_are_the_config_defaults(path, config, not_fields):
    command = _command(*path)
    fields = {item.name for item in dataclasses.fields(config)}
    defaults = _field_defaults(config)
    options = [p for p in command.params if isinstance(p, click.Option) and p.name not in not_fields]
    # Every option is a config field (the command passes them all to the config).
    assert {p.name for p in options} <= fields
    checked = 0
    for param in options:
        if param.required:
            assert param.name not in defaults, param.name
            continue
        want = defaults[param.name]
        assert param.default == (want if not param.multiple else tuple(want)), param.name
        if want not in (None, False, ()):
            assert param.show_default, param.name
        checked += 1
    assert checked >= 10


def test_help_shows_the_config_defaults():
    text = " ".join(_help("train-teacher").split())
    assert f"[default: {_field_defaults(TeacherConfig)['lr']}]" in text
    text = " ".join(_help("cache").split())
    assert f"[default: {_field_defaults(CacheConfig)['micro_batch']}]" in text
    text = " ".join(_help("manifest", "build").split())
    for value in READERS.get("synthetic").options.values():    # said in the help, owned by the reader
        assert f"(default {value})" in text


# --- one spelling per flag, the same on every command ------------------------------------------


def _cache_args(tmp_path, *extra: str) -> list[str]:
    return ["cache", "--teacher", "t.pt", "--manifest", "m.parquet", "--out", str(tmp_path / "c.zarr"), *extra]


@pytest.mark.parametrize("flag", ["--threads", "--device", "--workers", "--progress"])
def test_the_run_options_are_spelled_the_same_on_every_command(flag):
    for path in (["train-teacher"], ["cache"], ["distill"]):
        assert flag in {opt for param in _command(*path).params for opt in param.opts}, (path, flag)


def test_cache_takes_workers_and_views_seed(captured, tmp_path):
    run = CliRunner().invoke(cli, _cache_args(tmp_path, "--workers", "3", "--views-seed", "7"))
    assert run.exit_code == 0, (run.output, run.exception)
    assert captured[-1].workers == 3 and captured[-1].views_seed == 7
    for old in (["--loader-workers", "3"], ["--view-seed", "7"]):
        run = CliRunner().invoke(cli, _cache_args(tmp_path, *old))
        assert run.exit_code == 2 and "No such option" in run.output


def _distill_args(tmp_path, *extra: str) -> list[str]:
    return ["distill", "--method", "aver", "--manifest", "m.parquet", "--student", "mlp",
            "--out", str(tmp_path / "s.pt"), *extra]


@pytest.mark.parametrize("spelling", [
    ["--mentors", "a.zarr", "b.zarr", "c.zarr"],
    ["--mentors", "a.zarr", "--mentors", "b.zarr", "--mentors", "c.zarr"],
    ["--mentors", "a.zarr", "b.zarr", "--mentors", "c.zarr"],
    ["--mentors=a.zarr", "b.zarr", "c.zarr"],
    ["--mentors", "a.zarr", "--epochs", "3", "--mentors", "b.zarr", "c.zarr"],
])
def test_mentors_after_one_flag_or_repeated(captured, tmp_path, spelling):
    run = CliRunner().invoke(cli, _distill_args(tmp_path, *spelling))
    assert run.exit_code == 0, (run.output, run.exception)
    (config,) = captured
    assert config.mentors == ("a.zarr", "b.zarr", "c.zarr")


def test_greedy_values_stop_at_the_next_option(captured, tmp_path):
    run = CliRunner().invoke(cli, ["distill", "--mentors", "a.zarr", "b.zarr", "--method", "aver",
                                   "--manifest", "m.parquet", "--student", "mlp", "--out", str(tmp_path / "s.pt"),
                                   "--epochs", "3"])
    assert run.exit_code == 0, (run.output, run.exception)
    (config,) = captured
    assert config.mentors == ("a.zarr", "b.zarr") and config.method == "aver" and config.epochs == 3


def test_online_teachers_after_one_flag_or_repeated(captured, tmp_path):
    runner = CliRunner()
    for spelling in (["--teachers", "a.pt", "b.pt"], ["--teachers", "a.pt", "--teachers", "b.pt"]):
        run = runner.invoke(cli, _distill_args(tmp_path, "--online", *spelling))
        assert run.exit_code == 0, (run.output, run.exception)
    first, second = captured
    assert first.teachers == second.teachers == ("a.pt", "b.pt") and first.online and first.mentors == ()


def test_every_command_help_has_an_example():
    def walk(command: click.Command, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        yield path
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, path + (name,))

    for path in walk(cli, ()):
        description = _help(*path).split("Options:")[0].split("\n", 1)[1]  # without the usage line
        assert "kdcache " + "".join(f"{name} " for name in path) in description, path
