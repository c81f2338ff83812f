"""The fault-injection hook (``KDCACHE_FAULT``): counts per point, acts on the n-th arrival only,
does nothing when unset, and a malformed value is one clear error.

    .venv/bin/pytest tests/test_faults.py -q

What a fault at each point leaves behind (and that a rerun repairs it) is tested where the
points are: tests/test_store_teacher.py, tests/test_distill.py, tests/test_user_mistakes.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline import faults
from pipeline.cli import cli
from pipeline.errors import UserError


@pytest.fixture(autouse=True)
def fresh_counts(monkeypatch):
    monkeypatch.delenv(faults.VARIABLE, raising=False)
    faults.reset()
    yield
    faults.reset()


def test_unset_does_nothing_and_counts_nothing():
    for _ in range(5):
        for name in faults.POINTS:
            faults.point(name)
    assert all(faults.count(name) == 0 for name in faults.POINTS)


def test_counts_are_per_point_and_only_the_named_arrival_acts(monkeypatch):
    monkeypatch.setenv(faults.VARIABLE, "marker:3:interrupt")
    for _ in range(4):
        faults.point("block")                 # another point: counted apart, never acts
    faults.point("marker")
    faults.point("marker")
    with pytest.raises(KeyboardInterrupt):
        faults.point("marker")
    faults.point("marker")                    # the 4th arrival goes on
    assert (faults.count("block"), faults.count("marker"), faults.count("epoch")) == (4, 4, 0)
    faults.reset()
    assert faults.count("marker") == 0


def test_parse_defaults_to_kill():
    assert faults.parse("block:3") == ("block", 3, "kill")
    assert faults.parse("epoch:12:interrupt") == ("epoch", 12, "interrupt")


@pytest.mark.parametrize("value", ["block", "block:", "block:x", "block:0", "block:-1", "blok:1",
                                   "block:1:explode", "block:1:kill:now", ":1"])
def test_a_malformed_value_is_a_user_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(faults.VARIABLE, value)
    with pytest.raises(UserError) as err:
        faults.point("block")
    text = str(err.value)
    assert text.startswith("KDCACHE_FAULT: expected <point>:<count>[:kill|interrupt]") and repr(value) in text
    assert "\n" not in text


def test_an_unknown_point_in_the_code_is_a_bug_not_a_user_error(monkeypatch):
    monkeypatch.setenv(faults.VARIABLE, "block:1")
    with pytest.raises(ValueError) as err:
        faults.point("blocks")
    assert not isinstance(err.value, UserError)


def test_kill_is_a_sigkill_at_the_named_arrival_with_nothing_flushed(tmp_path):
    buffered = tmp_path / "buffered.txt"
    code = ("import sys; from pipeline import faults\n"
            "faults.point('block'); print('after 1', flush=True)\n"
            f"fh = open({str(buffered)!r}, 'w'); fh.write('never flushed')\n"
            "faults.point('block'); print('after 2', flush=True)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**_env_without_fault(), faults.VARIABLE: "block:2"})
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert run.stdout == "after 1\n"
    assert buffered.read_text() == ""         # a hard crash: no exit handlers, no buffers written out


def _env_without_fault() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != faults.VARIABLE}


def test_the_cli_reports_a_malformed_value_in_one_line_and_writes_no_checkpoint(synthetic, monkeypatch, tmp_path):
    monkeypatch.setenv(faults.VARIABLE, "checkpoint=1")
    out = tmp_path / "t.pt"
    result = CliRunner().invoke(cli, ["train-teacher", "--manifest", synthetic, "--arch", "mlp", "--epochs", "1",
                                      "--threads", "1", "--no-progress", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == ["error: KDCACHE_FAULT: expected <point>:<count>[:kill|interrupt], found 'checkpoint=1'"]
    assert not out.exists() and list(tmp_path.glob(".t.pt*")) == []   # the temporary file is removed too
