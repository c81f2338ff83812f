"""DVC stage: build the dataset's manifest (params.yaml section ``data``).

    python stages/manifest.py --out data_manifests/synthetic.parquet --data data

``--data`` is the folder of generated data (the synthetic set writes ``data.root`` inside it);
it is made even when the dataset's files live elsewhere (``data.root: /usr/share/...``; then it
holds a README saying where), so that dvc.yaml declares the same outputs for every experiment.
"""

import argparse
from pathlib import Path

from _params import Section, run

from pipeline.data import build_manifest
from pipeline.data.config import DataConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="manifest to write")
    parser.add_argument("--data", required=True, help="folder of generated data (made if missing)")
    args = parser.parse_args()
    cfg = Section.read("data").config(DataConfig)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(cfg.dataset, cfg.root, args.out, seed=cfg.seed, classes=cfg.classes,
                              subset=cfg.subset, **cfg.options)
    if not Path(cfg.root).resolve().is_relative_to(data.resolve()):   # files elsewhere: say where
        (data / "README").write_text(f"{cfg.dataset} is read from {cfg.root} (manifest {args.out})\n")
    counts = {name: len(manifest.split(name).sample_id) for name in ("train", "val", "test")}
    print(f"{args.out}: {manifest.dataset}, {manifest.num_classes} classes, {counts}, sha256 {manifest.sha256[:12]}")


if __name__ == "__main__":
    run(main)
