"""DVC stage: build the dataset's manifest (params.yaml section ``data``).

    python stages/manifest.py --out data_manifests/synthetic.parquet
"""

import argparse

from _params import run, section

from pipeline.data import build_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="manifest to write")
    args = parser.parse_args()
    data = section("data")
    manifest = build_manifest(data["dataset"], data["root"], args.out, seed=int(data.get("seed", 0)),
                              classes=data.get("classes"), **(data.get("options") or {}))
    counts = {name: len(manifest.split(name).sample_id) for name in ("train", "val", "test")}
    print(f"{args.out}: {manifest.dataset}, {manifest.num_classes} classes, {counts}, sha256 {manifest.sha256[:12]}")


if __name__ == "__main__":
    run(main)
