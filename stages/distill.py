"""DVC stage: distill one student from cached teachers (params.yaml ``students.<name>``).

    python stages/distill.py --name kd_ce --manifest data_manifests/synthetic.parquet \
        --caches caches/train --out models/student_kd_ce.pt --metrics metrics/student_kd_ce.json

Mentors are named by their teacher: ``mentors: [ce]`` reads ``<caches>/ce.zarr``.
"""

import argparse
from pathlib import Path

from _params import Section, run

from pipeline.train import DistillConfig, distill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="key under `students` in params.yaml")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--caches", required=True, help="folder of the teachers' stores, <teacher>.zarr")
    parser.add_argument("--out", required=True, help="student checkpoint to write")
    parser.add_argument("--metrics", required=True, help="metrics JSON (a CSV history goes beside it)")
    args = parser.parse_args()
    params = Section.read("students", args.name)
    if "mentors" in params.values:         # teacher names -> their stores
        names = params.values["mentors"]
        if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
            raise params.error("mentors", f"expected a list of teacher names, found {names!r}")
        params = params.with_values(mentors=[str(Path(args.caches) / f"{name}.zarr") for name in names])
    cfg = params.config(DistillConfig, manifest=args.manifest, out=args.out, metrics=args.metrics)
    metrics = distill(cfg)
    print(f"student {args.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    run(main)
