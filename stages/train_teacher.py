"""DVC stage: train one teacher (params.yaml ``teachers.<name>``).

    python stages/train_teacher.py --name ce --manifest data_manifests/synthetic.parquet \
        --out models/teacher_ce.pt --metrics metrics/teacher_ce.json
"""

import argparse

from _params import Section, run

from pipeline.train import TeacherConfig, train_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="key under `teachers` in params.yaml")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="checkpoint to write")
    parser.add_argument("--metrics", required=True, help="metrics JSON (a CSV history goes beside it)")
    args = parser.parse_args()
    cfg = Section.read("teachers", args.name).config(TeacherConfig, manifest=args.manifest, out=args.out,
                                                      metrics=args.metrics)
    metrics = train_teacher(cfg)
    print(f"teacher {args.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    run(main)
