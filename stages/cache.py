"""DVC stage: cache one teacher's targets for a split (params.yaml section ``cache``).

    python stages/cache.py --teacher models/teachers/ce.pt --manifest data_manifests/synthetic.parquet \
        --out caches/ce.zarr --log logs/caches/ce.json

``--log``: wall time (not tracked by DVC; the store holds no dates).
"""

import argparse

from _params import Section, run, wall_log

from pipeline.errors import UserError
from pipeline.store.verify import verify_store
from pipeline.cache import CacheConfig, cache_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", required=True, help="teacher checkpoint")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="store to write")
    parser.add_argument("--log", help="wall time to write (JSON)")
    args = parser.parse_args()
    cfg = Section.read("cache").config(CacheConfig, teacher=args.teacher, manifest=args.manifest, out=args.out,
                                       overwrite=True, progress=False)
    with wall_log(args.log, store=args.out):
        result = cache_teacher(cfg)
    report = verify_store(args.out)
    if not (result.complete and report.ok):
        problem = report.problems[0] if report.problems else "not marked complete"
        raise UserError(f"{args.out}: the new store does not verify: {problem}")
    print(f"{args.out}: complete, {result.computed} blocks, stats {result.stats}")


if __name__ == "__main__":
    run(main)
