"""The DVC stages read params.yaml through the typed configs: every mistake in a section is one
line naming the file and the full key, exit status 2, and nothing is written.

    .venv/bin/pytest -q tests/test_stages.py

Stages run in-process (their ``main`` under ``_params.run``, argv patched, in a folder holding
the test's params.yaml); one test runs a stage script as a real subprocess.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.data.config import DataConfig
from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from pipeline.train import DistillConfig, TeacherConfig
from pipeline.train.evaluate import EvaluateConfig

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "stages"


def _load(name: str, as_name: str) -> ModuleType:
    """``stages/<name>.py`` as a module (the stages are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(as_name, STAGES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[as_name] = module        # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


PARAMS = _load("_params", "stage_params")   # the stages' helper for params.yaml

# The stage's arguments; the paths need not exist, a config mistake stops the stage first.
ARGS = {
    "manifest": ["--out", "m.parquet", "--data", "data"],
    "train_teacher": ["--name", "ce", "--manifest", "m.parquet", "--out", "t.pt", "--metrics", "t.json",
                      "--history", "t.csv"],
    "cache": ["--name", "ce", "--teacher", "t.pt", "--manifest", "m.parquet", "--out", "ce.zarr"],
    "distill": ["--name", "kd_ce", "--manifest", "m.parquet", "--caches", "caches", "--out", "s",
                "--metrics", "s.json", "--history", "s.csv", "--results", "r.json"],
    "report": ["--metrics", "metrics", "--results", "results", "--models", "models", "--caches", "caches",
               "--out", "reports"],
}
ARGS["evaluate"] = ARGS["train_teacher"]    # the evaluate section is read by the training stages

# A valid section per stage; each case below spoils one key of it.
GOOD: dict[str, dict[str, Any]] = {
    "manifest": {"data": {"dataset": "synthetic", "root": "data/synthetic", "seed": 0,
                          "options": {"num_samples": 300}}},
    "train_teacher": {"teachers": {"ce": {"arch": "mlp", "loss": "ce", "epochs": 1, "lr": 0.1}}},
    "cache": {"cache": {"split": "train", "views": 1, "dtype": "float16", "storage": "dense", "k": None}},
    "distill": {"students": {"kd_ce": {"method": "kd", "mentors": ["ce"], "student": "mlp", "epochs": 1,
                                       "lr": 0.1}}},
    "evaluate": {"evaluate": {"split": "test"}},
}


def _params(stage: str, **changes: Any) -> dict[str, Any]:
    """``GOOD[stage]`` with its one section's keys changed (a value ``...`` deletes the key)."""
    if stage == "evaluate":
        return {**GOOD["train_teacher"], "evaluate": _changed(GOOD["evaluate"]["evaluate"], changes)}
    (name, section), = GOOD[stage].items()
    if stage in ("train_teacher", "distill"):
        (entry, values), = section.items()
        return {name: {entry: _changed(values, changes)}}
    if stage == "cache":          # the store's own entry, over the shared section
        return {name: _changed(section, changes), "caches": {"ce": {"teacher": "ce"}}}
    return {name: _changed(section, changes)}


def _changed(values: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = {**values, **changes}
    return {k: v for k, v in out.items() if v is not ...}


@pytest.fixture
def stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Callable:
    """``stage(name, params)``: write params.yaml, run ``stages/<name>.py`` with its ``ARGS``;
    returns (exit status, stdout lines, stderr lines)."""
    monkeypatch.syspath_prepend(str(STAGES))
    monkeypatch.chdir(tmp_path)

    def call(name: str, params: dict[str, Any] | str) -> tuple[int, list[str], list[str]]:
        text = params if isinstance(params, str) else yaml.safe_dump(params)
        (tmp_path / "params.yaml").write_text(text)
        script = "train_teacher" if name == "evaluate" else name
        module = _load(script, f"stage_{script}")  # imports `_params` from the stages' folder, as a script does
        monkeypatch.setattr(sys, "argv", [f"stages/{name}.py", *ARGS[name]])
        capsys.readouterr()
        try:
            module.run(module.main)
            status = 0
        except SystemExit as exit_:
            status = exit_.code
        out, err = capsys.readouterr()
        return status, out.splitlines(), err.splitlines()

    return call


BAD_VALUES = [
    ("distill", {"lr": "x"}, "params.yaml: students.kd_ce.lr: expected a number, found 'x'"),
    ("distill", {"lr": -1}, "params.yaml: students.kd_ce.lr: expected a number in (0, 1000], found -1"),
    ("distill", {"epochs": "3"}, "params.yaml: students.kd_ce.epochs: expected an integer, found '3'"),
    ("distill", {"options": 5}, "params.yaml: students.kd_ce.options: expected a mapping of key: value, found 5"),
    ("distill", {"mentors": "ce"}, "params.yaml: students.kd_ce.mentors: expected a list of store names (keys of `caches`), found 'ce'"),
    ("distill", {"method": ["kd"]}, "params.yaml: students.kd_ce.method: expected a string, found ['kd']"),
    ("distill", {"online": "yes please"},
     "params.yaml: students.kd_ce.online: expected true or false, found 'yes please'"),
    ("train_teacher", {"lr": "x"}, "params.yaml: teachers.ce.lr: expected a number, found 'x'"),
    ("train_teacher", {"epochs": 0}, "params.yaml: teachers.ce.epochs: expected an integer >= 1, found 0"),
    ("train_teacher", {"loss": "hinge"}, "params.yaml: teachers.ce.loss: expected one of ce, mse, found 'hinge'"),
    ("cache", {"views": 0}, "params.yaml: cache.views: expected an integer >= 1, found 0"),
    ("cache", {"dtype": "float12"}, "params.yaml: cache.dtype: expected "),
    ("cache", {"k": "all"}, "params.yaml: cache.k: expected an integer or nothing, found 'all'"),
    ("manifest", {"dataset": "nope"}, "params.yaml: data.dataset: expected one of cifar10, cifar100, "
                                      "fashion-mnist, imagefolder, synthetic, found 'nope'"),
    ("manifest", {"seed": -1}, "params.yaml: data.seed: expected an integer >= 0, found -1"),
    ("manifest", {"options": {"num_samples": "many"}},
     "params.yaml: data.options.num_samples: expected an integer, found 'many'"),
    ("evaluate", {"batch_size": 0}, "params.yaml: evaluate.batch_size: expected an integer >= 1, found 0"),
    ("evaluate", {"strict": "no way"}, "params.yaml: evaluate.strict: expected true or false, found 'no way'"),
]


@pytest.mark.parametrize("name, changes, message", BAD_VALUES)
def test_a_bad_value_is_one_line_naming_the_file_and_the_full_key(stage, name, changes, message) -> None:
    status, out, err = stage(name, _params(name, **changes))
    assert status == 2
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not (Path.cwd() / "m.parquet").exists()     # the manifest stage wrote nothing


UNKNOWN_KEYS = [
    ("distill", "lrr", "params.yaml: students.kd_ce: unknown key 'lrr' (did you mean 'lr'?); expected one of: "),
    ("train_teacher", "archh", "params.yaml: teachers.ce: unknown key 'archh' (did you mean 'arch'?); "),
    ("cache", "veiws", "params.yaml: cache: unknown key 'veiws' (did you mean 'views'?); "),
    ("manifest", "sead", "params.yaml: data: unknown key 'sead' (did you mean 'seed'?); "
                         "expected one of: classes, dataset, options, root, seed, subset"),
    ("evaluate", "strickt", "params.yaml: evaluate: unknown key 'strickt' (did you mean 'strict'?); "
                            "expected one of: batch_size, device, split, strict, workers"),
]


@pytest.mark.parametrize("name, key, message", UNKNOWN_KEYS)
def test_a_typo_in_a_key_is_an_error_naming_it(stage, name, key, message) -> None:
    status, _, err = stage(name, _params(name, **{key: 1}))
    assert status == 2
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_other_mistakes_in_a_section_name_it(stage) -> None:
    cases = [
        ("manifest", _params("manifest", root=...), "error: params.yaml: data: missing key 'root'"),
        ("manifest", {"data": 5}, "error: params.yaml: data: expected a mapping of key: value, found 5"),
        ("manifest", _params("manifest", options={"num_sample": 300}),
         "error: params.yaml: data.options: dataset 'synthetic': unknown option 'num_sample'; "
         "expected one of: dim, num_classes, num_samples, sigma2"),
        ("distill", _params("distill", student=...), "error: params.yaml: students.kd_ce: missing key 'student'"),
        ("distill", _params("distill", options={"tua": 4}),
         "error: params.yaml: students.kd_ce: method 'kd': unknown option 'tua'; known options: T, w_ce, w_kd"),
        ("distill", {"students": {"nokd": {}}}, "error: params.yaml: missing key 'students.kd_ce'"),
        ("train_teacher", _params("train_teacher", out="x.pt"),
         "error: params.yaml: teachers.ce.out: set by the stage itself (paths come from dvc.yaml), not here"),
        ("cache", "cache: [views: 1\n", "error: params.yaml: not valid YAML "),
    ]
    for name, params, message in cases:
        status, _, err = stage(name, params)
        assert status == 2 and len(err) == 1 and err[0].startswith(message), (name, err)


def test_a_store_entry_overrides_the_cache_section_and_mistakes_name_where_they_are(stage) -> None:
    cases = [
        ({"views": 0}, "error: params.yaml: caches.ce.views: expected an integer >= 1, found 0"),
        ({"veiws": 2}, "error: params.yaml: caches.ce: unknown key 'veiws' (did you mean 'views'?)"),
        ({"teacher": ...}, "error: params.yaml: caches.ce.teacher: expected the name of a teacher"),
        ({"out": "x.zarr"}, "error: params.yaml: caches.ce.out: set by the stage itself"),
    ]
    for changes, message in cases:
        params = _params("cache")
        params["caches"]["ce"] = _changed(params["caches"]["ce"], changes)
        status, _, err = stage("cache", params)
        assert status == 2 and len(err) == 1 and err[0].startswith(message), (changes, err)
    params = {**_params("cache", views=0), "caches": {"ce": {"teacher": "ce", "views": 2}}}
    status, _, err = stage("cache", params)          # the entry's good value does not hide the section's bad one
    assert status == 2 and err[0].startswith("error: params.yaml: cache.views: expected an integer >= 1"), err
    status, _, err = stage("cache", {**_params("cache"), "caches": {"mse": {"teacher": "mse"}}})
    assert status == 2 and err == ["error: params.yaml: missing key 'caches.ce'"]


def test_the_manifest_stage_builds_the_manifest_params_yaml_describes(stage) -> None:
    status, out, err = stage("manifest", GOOD["manifest"])
    assert status == 0 and err == []
    manifest = load_manifest(Path.cwd() / "m.parquet")
    assert manifest.dataset == "synthetic" and len(manifest.table) == 300
    assert out[0].startswith("m.parquet: synthetic, 3 classes")


def test_an_empty_evaluate_section_means_the_config_defaults(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("evaluate:\nstudents:\n  kd_ce: {method: kd}\n")
    section = PARAMS.Section.read("evaluate", path=tmp_path / "params.yaml")
    assert section.config(EvaluateConfig) == EvaluateConfig()
    assert EvaluateConfig().split == "test" and EvaluateConfig().strict is False   # the CLI default: warn
    student = PARAMS.Section.read("students", "kd_ce", path=tmp_path / "params.yaml")
    assert (student.source, student.prefix) == (str(tmp_path / "params.yaml"), "students.kd_ce")


def test_a_stage_script_fails_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params("distill", lr="x")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(STAGES / "distill.py"), *ARGS["distill"]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["error: params.yaml: students.kd_ce.lr: expected a number, found 'x'"]
    assert proc.stdout == ""


# --- the config base, without a file ------------------------------------------------------------------


def test_without_a_source_errors_name_the_config_and_the_key() -> None:
    base = {"manifest": "m.parquet", "out": "s.pt", "method": "nokd", "student": "mlp"}
    with pytest.raises(ConfigError) as err:
        DistillConfig(**base, lr=-1)
    assert str(err.value) == "distill config key 'lr': expected a number in (0, 1000], found -1"
    with pytest.raises(ConfigError) as err:
        TeacherConfig.from_dict({"manifest": "m.parquet", "out": "t.pt", "arch": "mlp", "epochs": "3"})
    assert str(err.value) == "teacher config key 'epochs': expected an integer, found '3'"
    with pytest.raises(UserError, match=r"^distill config: unknown key 'lr_max'; expected one of: augment, augment_options, batch_size, "):
        DistillConfig.from_dict({**base, "lr_max": 1})
    with pytest.raises(UserError, match=r"^method 'nokd': unknown option"):   # other checks keep their words
        DistillConfig.from_dict({**base, "options": {"T": 4}})
    assert DistillConfig.from_dict({**base, "mentors": []}).mentors == ()


def test_a_located_error_keeps_its_parts_and_survives_pickling() -> None:
    with pytest.raises(ConfigError) as caught:
        DataConfig.from_dict({"dataset": "synthetic", "root": "r", "classes": []}, source="p.yaml", prefix="data")
    err = caught.value
    assert str(err) == ("p.yaml: data.classes: expected a class-list file, a list of class names or nothing, "
                        "found []")
    assert (err.key, err.source, err.prefix) == ("classes", "p.yaml", "data")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ConfigError and str(again) == str(err) and again.key == "classes"
    cfg = DataConfig.from_dict({"dataset": "synthetic", "root": "r", "classes": ["a", "b"]})
    assert cfg.classes == ("a", "b") and cfg.seed == 0 and cfg.options == {}
