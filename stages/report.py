"""DVC stage: the experiment's report (params.yaml ``teachers``, ``students`` and ``report.claims``).

    python stages/report.py --metrics metrics --results results --models models --caches caches --out reports

Reads ``<metrics>/teachers/<name>.json`` (test scores), ``<results>/students/<name>.json`` (every
seed's scores), ``<metrics>/students/<name>.csv`` (per-epoch means) and the ClassroomKD mentor
logs ``<models>/students/<name>/seed<first seed>_mentors.csv``, and the size of each student's mentors'
stores ``<caches>/<mentor>.zarr`` (``stored_bytes_per_sample``: every file of them over the rows; 0
without mentors); writes ``<out>/summary.json``,
``<out>/summary.md`` (printed too) and ``<out>/figures/*.png`` (``pipeline.report``).
"""

import argparse
import json
from pathlib import Path

from _params import Section, run

from pipeline.errors import UserError
from pipeline.store.location import file_sizes
from pipeline.store.schema import read_attrs
from pipeline.report import Claim, summarize, write_report
from pipeline.train import EvaluateConfig


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror}); run its stage first (dvc repro)") from None


def stored_bytes_per_sample(stores: list[Path]) -> int:
    """The bytes of every file of ``stores`` (all views, checksums and metadata) over their rows."""
    for store in stores:
        if not store.is_dir():
            raise UserError(f"{store}: no such store; run its stage first (dvc repro)")
    total = sum(sum(file_sizes(store).values()) for store in stores)
    return round(total / read_attrs(stores[0])["manifest"]["num_samples"]) if stores else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--models", required=True)
    parser.add_argument("--caches", required=True, help="folder of the stores, <name>.zarr")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    teacher_params, student_params = Section.read("teachers").values, Section.read("students").values
    report = Section.read("report", optional=True)
    claims = report.values.get("claims", [])
    if not isinstance(claims, list):
        raise report.error("claims", f"expected a list of claims, found {claims!r}")
    claims = [Claim.from_dict(c, source=report.source, prefix=f"report.claims[{i}]") for i, c in enumerate(claims)]
    metrics, results, models = Path(args.metrics), Path(args.results), Path(args.models)
    teachers = {name: {"loss": t.get("loss", "ce"), "arch": t["arch"], "arch_options": t.get("arch_options", {}),
                       **_read_json(metrics / "teachers" / f"{name}.json")}
                for name, t in teacher_params.items()}
    students, curves, mentor_stats = {}, {}, {}
    for name in student_params:
        result = _read_json(results / "students" / f"{name}.json")
        stores = [Path(args.caches) / f"{mentor}.zarr" for mentor in result["mentors"]]
        students[name] = {"method": result["method"], "mentors": list(result["mentors"]),
                          "stored_bytes_per_sample": stored_bytes_per_sample(stores), "runs": result["seeds"]}
        curves[name] = metrics / "students" / f"{name}.csv"
        first = models / "students" / name / f"seed{result['seeds'][0]['seed']}_mentors.csv"
        if result["method"] == "classroom" and first.is_file():
            mentor_stats[name] = first
    summary = summarize(teachers, students, claims)
    split = Section.read("evaluate", optional=True).config(EvaluateConfig).split
    write_report(summary, args.out, split=split, curves=curves, mentor_stats=mentor_stats)
    print((Path(args.out) / "summary.md").read_text())


if __name__ == "__main__":
    run(main)
