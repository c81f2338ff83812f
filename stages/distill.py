"""DVC stage: distill one student from cached teachers, once per seed (params.yaml ``students.<name>``
over ``student_defaults``), and score every run (section ``evaluate``).

    python stages/distill.py --name kd --manifest data_manifests/synthetic.parquet --caches caches \
        --out models/students/kd --metrics metrics/students/kd.json --history metrics/students/kd.csv \
        --results results/students/kd.json --log logs/students/kd.json

Mentors are named by their store (params.yaml ``caches``): ``mentors: [ce]`` reads ``<caches>/ce.zarr``.
``seeds: [0, 1, 2]`` trains ``<out>/seed0.pt`` ... (a second student, dual/dml: ``seed0_b.pt``).
``--metrics``: the means and spread over seeds of the test scores; ``--history``: the per-epoch means over seeds;
``--results``: every seed's scores (student B's too); ``--log``: wall times (not tracked by DVC).
Every other key is a ``DistillConfig`` field, e.g. ``input_size: 160`` (optional): a student of its own
resolution, seeing the teachers' crops resized.
"""

import argparse
import statistics
import time
from pathlib import Path

from _params import Section, run, scores, wall_log

from pipeline.files import write_history, write_json
from pipeline.report import read_csv
from pipeline.runtime import is_main_process, torch_threads
from pipeline.store.location import child
from pipeline.train import DistillConfig, EvaluateConfig, distill
from pipeline.train.student import student_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="key under `students` in params.yaml")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--caches", required=True, help="folder of the teachers' stores, <teacher>.zarr")
    parser.add_argument("--out", required=True, help="folder of the student checkpoints, one per seed")
    parser.add_argument("--metrics", required=True, help="test scores over seeds to write (JSON)")
    parser.add_argument("--history", required=True, help="per-epoch means over seeds to write (CSV)")
    parser.add_argument("--results", required=True, help="every seed's scores to write (JSON)")
    parser.add_argument("--log", help="wall times to write (JSON)")
    args = parser.parse_args()
    defaults = Section.read("student_defaults", optional=True)
    params = Section.read("students", args.name)
    params = params.with_values(**{**defaults.values, **params.values})
    seeds = params.values.pop("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise params.error("seeds", f"expected a non-empty list of seeds >= 0, found {seeds!r}")
    names = params.values.get("mentors", [])
    if "mentors" in params.values:         # store names -> their stores
        if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
            raise params.error("mentors", f"expected a list of store names (keys of `caches`), found {names!r}")
        params = params.with_values(mentors=[child(args.caches, f"{name}.zarr") for name in names])
    evaluate = Section.read("evaluate", optional=True).config(EvaluateConfig)
    runs, histories = [], []
    # The threads hold for the scoring too: a small model's every op waits on each of torch's threads.
    with wall_log(args.log, student=args.name) as log, torch_threads(params.values.get("threads")):
        for seed in seeds:
            out = Path(args.out) / f"seed{seed}.pt"
            cfg = params.with_values(seed=seed).config(DistillConfig, manifest=args.manifest, out=str(out),
                                                       history=str(out.with_suffix(".csv")))
            began = time.perf_counter()
            distill(cfg)
            log.setdefault("seed_seconds", []).append(round(time.perf_counter() - began, 3))
            if not is_main_process():      # under torchrun: rank 0 scores and writes
                continue
            paths = student_paths(cfg.out, 2 if cfg.student_b else 1)
            run_scores = {"seed": seed, **scores(evaluate.score(paths[0], cfg.manifest))}
            if len(paths) > 1:
                run_scores.update({f"{k}_b": v for k, v in scores(evaluate.score(paths[1], cfg.manifest)).items()})
            runs.append(run_scores)
            histories.append(read_csv(out.with_suffix(".csv")))
            print(f"student {args.name} seed {seed} ({evaluate.split}): "
                  + ", ".join(f"{k} {v}" for k, v in run_scores.items() if k != "seed"))
    if not is_main_process():
        return
    write_json(args.results, {"method": cfg.method, "mentors": list(names),
                              "seeds": runs})
    write_json(args.metrics, spread(runs, ("accuracy", "nll", "mse_to_bayes")))
    write_history(args.history, mean_history(histories))


def spread(runs: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    """``key`` (the mean over runs) and ``accuracy_std`` (the sample standard deviation; 0 for one run)."""
    out = {key: round(statistics.fmean(r[key] for r in runs), 6) for key in keys if all(key in r for r in runs)}
    values = [r["accuracy"] for r in runs]
    out["accuracy_std"] = round(statistics.stdev(values), 6) if len(values) > 1 else 0.0
    return out


def mean_history(histories: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per epoch, the mean over seeds of every column all seeds have."""
    rows = []
    for epoch_rows in zip(*histories):
        keys = set.intersection(*(set(r) for r in epoch_rows)) - {"epoch"}
        rows.append({"epoch": int(epoch_rows[0]["epoch"]),
                     **{k: round(statistics.fmean(r[k] for r in epoch_rows), 6) for k in sorted(keys)}})
    return rows


if __name__ == "__main__":
    run(main)
