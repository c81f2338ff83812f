"""DVC stage: train one teacher (params.yaml ``teachers.<name>``) and score it (section ``evaluate``).

    python stages/train_teacher.py --name ce --manifest data_manifests/synthetic.parquet \
        --out models/teachers/ce.pt --metrics metrics/teachers/ce.json --history metrics/teachers/ce.csv \
        --log logs/teachers/ce.json

``--metrics``: the test scores (``accuracy``, ``nll``, ``mse_to_bayes`` where the posterior is
known); ``--history``: one CSV row per epoch; ``--log``: wall time (not tracked by DVC).
"""

import argparse

from _params import Section, is_main_process, run, scores, wall_log

from pipeline.files import write_json
from pipeline.runtime import torch_threads
from pipeline.train import EvaluateConfig, TeacherConfig, train_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="key under `teachers` in params.yaml")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="checkpoint to write")
    parser.add_argument("--metrics", required=True, help="test scores to write (JSON)")
    parser.add_argument("--history", required=True, help="per-epoch CSV to write")
    parser.add_argument("--log", help="wall time to write (JSON)")
    args = parser.parse_args()
    defaults = Section.read("teacher_defaults", optional=True)
    params = Section.read("teachers", args.name)
    params = params.with_values(**{**defaults.values, **params.values})
    cfg = params.config(TeacherConfig, manifest=args.manifest, out=args.out, history=args.history)
    evaluate = Section.read("evaluate", optional=True).config(EvaluateConfig)
    # The threads hold for the scoring too: a small model's every op waits on each of torch's threads.
    with wall_log(args.log, teacher=args.name), torch_threads(cfg.threads):
        train_teacher(cfg)
        if not is_main_process():          # under torchrun: rank 0 scores and writes
            return
        result = scores(evaluate.score(cfg.out, cfg.manifest))
    write_json(args.metrics, result)
    print(f"teacher {args.name} ({evaluate.split}): " + ", ".join(f"{k} {v}" for k, v in result.items()))


if __name__ == "__main__":
    run(main)
