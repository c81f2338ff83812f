"""DVC stage: cache one teacher's targets for a split: the store ``caches.<name>`` of params.yaml, whose
keys (besides ``teacher``) override the section ``cache``.

    python stages/cache.py --name ce_v16 --teacher models/teachers/ce.pt \
        --manifest data_manifests/synthetic.parquet --out caches/ce_v16.zarr --log logs/caches/ce_v16.json

    # params.yaml:  cache: {views: 4, ...}     caches: {ce: {teacher: ce}, ce_v16: {teacher: ce, views: 16}}

``--log``: wall time (not tracked by DVC; the store holds no dates).
"""

import argparse

from _params import Section, run, wall_log

from pipeline.errors import UserError
from pipeline.store.verify import verify_store
from pipeline.cache import CacheConfig, cache_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="key under `caches` in params.yaml")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint (of the entry's `teacher`)")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="store to write")
    parser.add_argument("--log", help="wall time to write (JSON)")
    args = parser.parse_args()
    entry = Section.read("caches", args.name)
    teacher = entry.values.pop("teacher", None)
    if not isinstance(teacher, str) or not teacher:
        raise entry.error("teacher", f"expected the name of a teacher (a key under `teachers`), found {teacher!r}")
    paths = dict(teacher=args.teacher, manifest=args.manifest, out=args.out, overwrite=True, progress=False)
    shared = Section.read("cache")
    shared.config(CacheConfig, **paths)          # a mistake there is named as the section's, not the entry's
    cfg = entry.with_values(**{**shared.values, **entry.values}).config(CacheConfig, **paths)
    with wall_log(args.log, store=args.out):
        result = cache_teacher(cfg)
    report = verify_store(args.out)
    if not (result.complete and report.ok):
        problem = report.problems[0] if report.problems else "not marked complete"
        raise UserError(f"{args.out}: the new store does not verify: {problem}")
    print(f"{args.out}: complete, {result.computed} blocks, stats {result.stats}")


if __name__ == "__main__":
    run(main)
