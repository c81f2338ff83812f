"""Distil a student from two or more cached teachers in a plain PyTorch loop (DistillLoader).

    python examples/distill_loop.py --manifest data_manifests/synthetic.parquet \
        --stores caches/train/a.zarr caches/train/b.zarr --epochs 5 --out models/student.pt

Prints ``epoch E loss L`` (the epoch's mean CA-WKD loss) and saves the student's state_dict at --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.losses import ca_wkd_loss
from pipeline.models import create_model
from pipeline.train.loader import DistillLoader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="the manifest the stores were cached from")
    parser.add_argument("--stores", nargs="+", required=True, help="two or more cache stores (teachers)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", required=True, help="where the student's state_dict goes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    if len(args.stores) < 2:
        parser.error("--stores: expected two or more stores (CA-WKD weighs teachers against each other)")
    try:
        train(args)
    except UserError as err:  # a stale or mismatched store: one line, exit 2, as the kdcache commands do
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    with DistillLoader(args.stores, args.manifest, batch_size=args.batch_size, seed=0) as loader:
        student = create_model("mlp", num_classes=loader.num_classes, input_shape=loader.input_shape)
        opt = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9)
        for epoch in range(args.epochs):
            total, count = 0.0, 0
            for x, y, t in loader.epoch(epoch):
                loss = ca_wkd_loss(student(x), t["logits"], y, T=4)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, count = total + loss.item() * len(y), count + len(y)
            print(f"epoch {epoch + 1} loss {total / count:.4f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(student.state_dict(), args.out)


if __name__ == "__main__":
    main()
