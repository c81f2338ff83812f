"""DVC stage: the experiment's report (params.yaml ``teachers``, ``students`` and ``report.claims``).

    python stages/report.py --metrics metrics --results results --models models --out reports

Reads ``<metrics>/teachers/<name>.json`` (test scores), ``<results>/students/<name>.json`` (every
seed's scores), ``<metrics>/students/<name>.csv`` (per-epoch means) and the ClassroomKD mentor
logs ``<models>/students/<name>/seed<first seed>_mentors.csv``; writes ``<out>/summary.json``,
``<out>/summary.md`` (printed too) and ``<out>/figures/*.png`` (``pipeline.report``).
"""

import argparse
import json
from pathlib import Path

from _params import Section, run

from pipeline.errors import UserError
from pipeline.report import Claim, summarize, write_report
from pipeline.train import EvaluateConfig


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror}); run its stage first (dvc repro)") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--models", required=True)
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
        students[name] = {"method": result["method"], "mentors": list(result["mentors"]),
                          "runs": result["seeds"]}
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
