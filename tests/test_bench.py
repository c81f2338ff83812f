"""The benchmarks in bench/ run in their smallest mode and end with their one summary line.

    .venv/bin/pytest tests/test_bench.py -q

Each benchmark runs as a user runs it (a subprocess, tiny data, one repetition) and must exit 0
with a last line of ``name=value`` ratios, the names its docs promise. The figures themselves
are the benchmarks' business (bench/README.md), never asserted here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATIO = r"\d+\.\d{3}"
SMALLEST = {
    "busy.py": (["--train-rows", "256", "--epochs", "1", "--reps", "1"],
                ["threads_default_loaded_over_idle", "threads_1_loaded_over_idle", "threads_1_over_default_loaded"]),
    "offline_vs_online.py": (["--dataset", "synthetic", "--train-rows", "256", "--epochs", "1", "--reps", "1"],
                             ["offline_k6_over_student_only", "online_k6_over_student_only"]),
    "cache_write.py": (["--dataset", "synthetic", "--train-rows", "256", "--views", "1", "--rows", "4096",
                        "--classes", "100", "--reps", "1"], ["caching_over_inference", "writer_over_raw_write"]),
    "stream.py": (["--rows", "16384", "--views", "1", "--classes", "100", "--budget-mb", "1", "--batch-size", "64",
                   "--workers", "1", "--reps", "1"], ["stream_over_raw_read", "peak_rss_over_budget"]),
    "inspect_report.py": (["--rows", "4096", "--classes", "10", "--teachers", "2", "--reps", "1"],
                          ["report_over_inspect_seconds", "report_over_inspect_peak"]),
    "gpu_resnet50.py": (["--device", "cpu", "--images", "16", "--classes", "2", "--image-size", "16", "--teacher-arch",
                         "resnet18", "--batch-size", "4", "--workers", "0"],
                        ["writer_rows_per_s", "kd_cached_over_student", "kd_live_over_student", "top1_agreement"]),
    "object_store.py": (["--rows", "8192", "--classes", "10", "--budget-mb", "1", "--reps", "1"],
                        ["cache_bucket_over_disk", "stream_bucket_over_disk"]),
    "views.py": (["--dataset", "synthetic", "--images", "64", "--views", "2", "--width", "4", "--reps", "1"],
                 ["decode_once_over_per_view", "cached_view_over_forward", "overlapped_view_over_forward"]),
}


def run(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], check=False, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_smallest_mode_ends_with_its_summary_line(script: str, tmp_path: Path) -> None:
    args, names = SMALLEST[script]
    done = run(script, [*args, "--dir", str(tmp_path / "work")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(" ".join(f"{name}={RATIO}" for name in names), last), done.stdout[-3000:]


def test_views_with_mix_adds_the_mixed_caching_run_and_its_ratio(tmp_path: Path) -> None:
    args, names = SMALLEST["views.py"]
    done = run("views.py", [*args, "--mix", "mixup,cutmix", "--workers", "0", "--dir", str(tmp_path / "work")],
               tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    names = [name for name in names if name != "overlapped_view_over_forward"]      # --workers 0: no such run
    assert re.fullmatch(" ".join(f"{name}={RATIO}" for name in [*names, "mixed_over_unmixed"]), lines[-1]), lines[-1]
    assert not any(line.startswith("| caching, decoding workers |") for line in lines)
    assert any(line.startswith("| caching, mixed |") for line in lines), done.stdout[-3000:]
    assert "images/s over caching (wall)" in done.stdout


def test_help_names_the_quick_mode(tmp_path: Path) -> None:
    for script in sorted(SMALLEST):
        done = run(script, ["--help"], tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "--quick" in done.stdout, script
