"""DVC stage: build the dataset's manifest (params.yaml section ``data``).

    python stages/manifest.py --out data_manifests/synthetic.parquet
"""

import argparse

from _params import Section, run

from pipeline.data import build_manifest
from pipeline.data.config import DataConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="manifest to write")
    args = parser.parse_args()
    cfg = Section.read("data").config(DataConfig)
    manifest = build_manifest(cfg.dataset, cfg.root, args.out, seed=cfg.seed, classes=cfg.classes, **cfg.options)
    counts = {name: len(manifest.split(name).sample_id) for name in ("train", "val", "test")}
    print(f"{args.out}: {manifest.dataset}, {manifest.num_classes} classes, {counts}, sha256 {manifest.sha256[:12]}")


if __name__ == "__main__":
    run(main)
