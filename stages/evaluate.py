"""DVC stage: score every trained model on one split (params.yaml section ``evaluate``).

    python stages/evaluate.py --manifest data_manifests/synthetic.parquet --out metrics/evaluate.json \
        models/teacher_ce.pt models/student_kd_ce.pt ...

Writes one JSON object keyed by checkpoint name (file stem), for ``dvc metrics show``, and the
same figures as a Markdown table (``--table``) that ``make run`` prints at the end.
"""

import argparse
from pathlib import Path

from _params import Section, run

from pipeline.files import atomic_path, write_json
from pipeline.train import EvaluateConfig

# Figures worth a column in `dvc metrics show`; the rest stays in the checkpoints.
KEEP = ("top1", "top5", "ce", "bayes_mse", "bayes_ce", "bayes_agree", "bayes_top1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    parser.add_argument("--table", required=True, help="Markdown table to write")
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    cfg = Section.read("evaluate").config(EvaluateConfig)
    split = cfg.split
    results = {}
    for ckpt in args.checkpoints:
        scores = cfg.score(ckpt, args.manifest)
        results[Path(ckpt).stem] = {k: round(float(scores[k]), 5) for k in KEEP if k in scores}
    write_json(args.out, {split: results})
    columns = [k for k in KEEP if any(k in row for row in results.values())]
    lines = [f"| {split} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(f"{row.get(k, float('nan')):.4f}" for k in columns) + " |"
              for name, row in results.items()]
    with atomic_path(args.table) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run(main)
