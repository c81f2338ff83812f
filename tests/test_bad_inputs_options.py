"""The catalogue of user mistakes (tests/test_bad_inputs.py says what every case must end with),
this part: command-line arguments and params.yaml (the DVC stages).

    .venv/bin/pytest -q tests/test_bad_inputs_options.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.support.bad_inputs import (
    Base,
    Case,
    Catalogue,
    World,
    cache_args,
    check_case,
    distill_args,
    make_base,
    stage_runner,
    train_args,
)

CASES = Catalogue()
case = CASES.case


@pytest.fixture(scope="module")
def base(synthetic: str, tmp_path_factory: pytest.TempPathFactory) -> Base:
    return make_base(synthetic, tmp_path_factory.mktemp("bad_inputs"))


# --- command-line arguments ------------------------------------------------------------------------------

@case("args: distill --out is the --manifest")
def _(w):
    manifest = w.tmp / "m.parquet"
    manifest.write_bytes(w.base.manifest.read_bytes())
    args = distill_args(w, "--manifest", str(manifest), out="m.parquet")
    return Case(args, ("--out would overwrite --manifest", "m.parquet"), unchanged=(manifest,))


@case("args: train-teacher --metrics is the --out")
def _(w):
    return Case(train_args(w, "--metrics", str(w.tmp / "t_out.pt")), ("--out and --metrics", "t_out.pt"),
                checkpoint=w.tmp / "t_out.pt")


@case("args: distill's history CSV (next to --metrics) is the --out")
def _(w):
    return Case(distill_args(w, "--metrics", str(w.tmp / "s_out.json"), out="s_out.csv"),
                ("--out and --history", "s_out.csv"), checkpoint=w.tmp / "s_out.csv")


@case("args: classroom's --mentor-stats is the --out")
def _(w):
    return Case(distill_args(w, "--method", "classroom", "--mentor-stats", str(w.tmp / "s_out.pt")),
                ("--out and --mentor-stats", "s_out.pt"), checkpoint=w.tmp / "s_out.pt")


@case("args: distill --out inside a mentor store")
def _(w):
    store = w.tmp / "copy.zarr"
    shutil.copytree(w.base.store, store)
    marker = store / "zarr.json"
    return Case(distill_args(w, mentors=(str(store),), out="copy.zarr/s.pt"), ("--out lies inside --mentors",  "copy.zarr"),
                checkpoint=store / "s.pt", unchanged=(marker,))


@case("args: train-teacher --out is its --weights")
def _(w):
    weights = w.tmp / "w.pt"
    weights.write_bytes(w.base.teacher.read_bytes())
    return Case(train_args(w, "--weights", str(weights), out="w.pt"), ("--out would overwrite --weights", "w.pt"),
                unchanged=(weights,))


@case("args: evaluate --out is its checkpoint")
def _(w):
    ckpt = w.tmp / "t.pt"
    ckpt.write_bytes(w.base.teacher.read_bytes())
    return Case(["evaluate", str(ckpt), "--manifest", str(w.base.manifest), "--device", "cpu", "--out", str(ckpt)],
                ("--out would overwrite CHECKPOINT", "t.pt"), unchanged=(ckpt,))


@case("args: inspect --out inside the store it reads")
def _(w):
    store = w.tmp / "copy.zarr"
    shutil.copytree(w.base.store, store)
    return Case(["inspect", str(store), "--out", str(store / "report")], ("--out lies inside STORES", "copy.zarr"),
                checkpoint=store / "report", unchanged=(store / "zarr.json",))


@case("args: cache --out is its manifest")
def _(w):
    manifest = w.tmp / "m.parquet"
    manifest.write_bytes(w.base.manifest.read_bytes())
    return Case(cache_args(w, "--manifest", str(manifest), out=manifest), ("would overwrite --manifest", "m.parquet"),
                unchanged=(manifest,))


@case("args: a file that is not a torch file is said plainly")
def _(w):
    junk = w.tmp / "notes.pt"
    junk.write_text('{"top1": 0.5}')
    return Case(train_args(w, "--weights", str(junk)), ("notes.pt", "neither a torch zip file nor a pickle"),
                checkpoint=w.tmp / "t_out.pt")


@case("args: train-teacher --lr 1e300")
def _(w):
    return Case(train_args(w, "--lr", "1e300"), ("'lr'", "(0, 1000]"), checkpoint=w.tmp / "t_out.pt")


@case("args: distill --lr 1e300")
def _(w):
    return Case(distill_args(w, "--lr", "1e300"), ("'lr'", "(0, 1000]"), checkpoint=w.tmp / "s_out.pt")


@case("args: --seed 2**70")
def _(w):
    return Case(distill_args(w, "--seed", str(2**70)), ("'seed'", str(2**63 - 1)), checkpoint=w.tmp / "s_out.pt")


@case("args: --input-std 0,0,0")
def _(w):
    return Case(distill_args(w, "--input-std", "0"), ("'input_std'", "numbers > 0"), checkpoint=w.tmp / "s_out.pt")


@case("args: nokd given mentors")
def _(w):
    return Case(distill_args(w, "--method", "nokd"), ("'nokd'", "reads no mentor stores"), checkpoint=w.tmp / "s_out.pt")


def _unreachable_s3(w) -> None:
    """Dummy credentials and an endpoint nobody listens on: a bucket URL that cannot be reached."""
    from tests.support.s3 import forget_clients, free_port, s3_env
    w.monkeypatch.chdir(w.tmp)
    for key, value in {**s3_env(f"http://127.0.0.1:{free_port()}"), "AWS_MAX_ATTEMPTS": "1"}.items():
        w.monkeypatch.setenv(key, value)
    forget_clients()


@case("args: cache --out s3:// unreachable")
def _(w):
    _unreachable_s3(w)
    return Case(cache_args(w, out="s3://bucket/t.zarr"), ("s3://bucket/t.zarr", "reachable endpoint"),
                checkpoint=w.tmp / "s3:")


@case("args: verify gs:// without gcsfs")
def _(w):
    w.monkeypatch.chdir(w.tmp)
    w.monkeypatch.setitem(sys.modules, "gcsfs", None)
    return Case(["verify", "gs://bucket/t.zarr"], ("gs://bucket/t.zarr", "gs:// store library"), checkpoint=w.tmp / "gs:")


@case("args: distill --mentors s3:// unreachable")
def _(w):
    _unreachable_s3(w)
    return Case(distill_args(w, mentors=("s3://bucket/t.zarr",)), ("s3://bucket/t.zarr", "reachable endpoint"),
                checkpoint=w.tmp / "s_out.pt")


@case("args: --option without =")
def _(w):
    return Case(distill_args(w, "--option", "T"), ("--option", "KEY=VALUE"), checkpoint=w.tmp / "s_out.pt")


@case("args: --option key twice")
def _(w):
    return Case(distill_args(w, "--option", "T=4", "--option", "T=5"), ("--option", "'T'"),
                checkpoint=w.tmp / "s_out.pt")


@case("args: --option unknown to the method")
def _(w):
    return Case(distill_args(w, "--option", "tempurature=4"), ("tempurature",), checkpoint=w.tmp / "s_out.pt")


@case("args: a two-student method without --student-b")
def _(w):
    return Case(["distill", "--method", "dml", "--manifest", str(w.base.manifest), "--student", "mlp",
                 "--out", str(w.tmp / "s_out.pt")], ("student_b",), checkpoint=w.tmp / "s_out.pt")


@case("args: --teachers without --online")
def _(w):
    return Case(distill_args(w, "--teachers", str(w.base.teacher), mentors=()), ("teachers", "online"),
                checkpoint=w.tmp / "s_out.pt")


@case("args: --arch unknown")
def _(w):
    return Case(["train-teacher", "--manifest", str(w.base.manifest), "--arch", "resnet9000",
                 "--out", str(w.tmp / "t_out.pt")], ("'arch'", "resnet9000"), checkpoint=w.tmp / "t_out.pt")


@case("args: --lr negative")
def _(w):
    return Case(train_args(w, "--lr", "-1"), ("'lr'", "(0, 1000]"), checkpoint=w.tmp / "t_out.pt")


@case("args: --epochs 0")
def _(w):
    return Case(train_args(w, "--epochs", "0"), ("'epochs'",), checkpoint=w.tmp / "t_out.pt")


@case("args: --views 0 for cache")
def _(w):
    return Case(cache_args(w, "--views", "0"), ("'views'",), store=w.tmp / "c.zarr")


@case("args: --storage topk without --k")
def _(w):
    return Case(cache_args(w, "--storage", "topk"), ("k",), store=w.tmp / "c.zarr")


@case("args: --shard out of range")
def _(w):
    return Case(cache_args(w, "--shard", "3/2"), ("--shard", "3/2"), store=w.tmp / "c.zarr")


@case("args: --overwrite with --shard")
def _(w):
    return Case(cache_args(w, "--shard", "0/2", "--overwrite"), ("--overwrite", "--shard"), store=w.tmp / "c.zarr")


def _without(args: list[str], flag: str) -> list[str]:
    at = args.index(flag)
    return args[:at] + args[at + 2:]


@case("args: cache --rows-per-block 10**12")
def _(w):
    args = _without(cache_args(w), "--rows-per-block") + ["--rows-per-block", str(10**12)]
    return Case(args, ("rows_per_block: expected at most 4096", "split's 200", "found 1000000000000",
                       "the store would take 27.28 TiB"), absent=(w.tmp / "c.zarr", w.tmp / ".c.zarr.creating-*"))


@case("args: cache --micro-batch 1000000000 on 200 rows")
def _(w):
    args = _without(_without(cache_args(w), "--rows-per-block"), "--micro-batch") + ["--micro-batch", "1000000000"]
    return Case(args, ("micro_batch: expected at most 4096", "found 1000000000", "the store would take 27.94 GiB"),
                absent=(w.tmp / "c.zarr", w.tmp / ".c.zarr.creating-*"))


@case("args: cache --storage sampled --k 100000 with 3 classes")
def _(w):
    return Case(cache_args(w, "--storage", "sampled", "--k", "100000"),
                ("k: expected a logit payload of at most 4096 bytes", "found 500000", "sampled k=100000",
                 "the store would take 122.08 MiB"), absent=(w.tmp / "c.zarr", w.tmp / ".c.zarr.creating-*"))


@case("args: plan --rows-per-block 10**12")
def _(w):
    return Case(["plan", "--num-samples", "1000", "--num-classes", "3", "--rows-per-block", str(10**12)],
                ("rows_per_block: expected at most 4096", "found 1000000000000", "TiB"))


@case("args: plan without sizes")
def _(w):
    return Case(["plan"], ("--num-samples", "--manifest"))


@case("args: inspect --bins 1")
def _(w):
    return Case(["inspect", str(w.base.store), "--bins", "1"], ("--bins",))


# --- params.yaml (the DVC stages) --------------------------------------------------------------------------

_TEACHER_ARGS = ["--name", "ce", "--manifest", "m.parquet", "--out", "t_out.pt", "--metrics", "t.json",
                 "--history", "t.csv"]


@case("params.yaml: a bad value")
def _(w):
    params = {"teachers": {"ce": {"arch": "mlp", "loss": "ce", "epochs": 1, "lr": "fast"}}}
    return Case([], ("params.yaml", "teachers.ce.lr"), checkpoint=w.tmp / "t_out.pt",
                run=stage_runner(w, "train_teacher", params, _TEACHER_ARGS))


@case("params.yaml: a key typo")
def _(w):
    params = {"teachers": {"ce": {"arch": "mlp", "loss": "ce", "epochs": 1, "lrr": 0.1}}}
    return Case([], ("params.yaml", "'lrr'"), checkpoint=w.tmp / "t_out.pt",
                run=stage_runner(w, "train_teacher", params, _TEACHER_ARGS))


@case("params.yaml: the section missing")
def _(w):
    return Case([], ("params.yaml", "'teachers.ce'"), checkpoint=w.tmp / "t_out.pt",
                run=stage_runner(w, "train_teacher", {"teachers": {"mse": {"arch": "mlp"}}}, _TEACHER_ARGS))


@case("params.yaml: not YAML")
def _(w):
    return Case([], ("params.yaml", "YAML"), checkpoint=w.tmp / "t_out.pt",
                run=stage_runner(w, "train_teacher", "teachers: [unclosed", _TEACHER_ARGS))


def test_the_catalogue_is_large() -> None:
    assert len(CASES) >= 20


@pytest.mark.parametrize("name", list(CASES))
def test_a_mistake_ends_in_one_line(name: str, base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    check_case(CASES[name], World(base, tmp_path, monkeypatch, {"capsys": capsys}))
