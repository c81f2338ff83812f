"""The ``kdcache`` command line: thin click wrappers around the library.

    kdcache --help
    kdcache manifest build --dataset synthetic --root data/synthetic --out data_manifests/synthetic.parquet

Every command calls one library function. A user's mistake raises ``UserError`` and ends
here as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys

import click

from pipeline import __version__
from pipeline.errors import UserError


class _Group(click.Group):
    """Turns ``UserError`` into one line and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kdcache")
def cli() -> None:
    """kdcache: cache frozen teachers' logits once, distill students from the cache.

    \b
    Typical flow:
      kdcache manifest build --dataset synthetic --root data/synthetic --out data_manifests/synthetic.parquet
      kdcache train-teacher --manifest data_manifests/synthetic.parquet --arch mlp --loss ce --out models/ce.pt
      kdcache cache --teacher models/ce.pt --manifest data_manifests/synthetic.parquet --split train --views 1 --out caches/train/ce.zarr
      kdcache verify caches/train/ce.zarr
      kdcache distill --method kd --mentors caches/train/ce.zarr --manifest data_manifests/synthetic.parquet --student mlp --out models/kd.pt
      kdcache evaluate models/kd.pt --manifest data_manifests/synthetic.parquet --split test
    """


# --- manifest --------------------------------------------------------------
# (manifest: commands go here)
_DATASETS = ["synthetic", "fashion-mnist", "cifar10", "cifar100", "imagefolder"]


@cli.group("manifest")
def manifest_group() -> None:
    """Build and check Parquet manifests (one row per sample: id, label, split, source).

    \b
    Example:
      kdcache manifest build --dataset cifar10 --root data/cifar --out data_manifests/cifar10.parquet
      kdcache manifest check data_manifests/cifar10.parquet
    """


@manifest_group.command("build")
@click.option("--dataset", required=True, type=click.Choice(_DATASETS), help="Dataset reader.")
@click.option("--root", required=True, type=click.Path(path_type=str),
              help="Dataset root (synthetic: where the generated data is written).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=str), help="Manifest to write (.parquet).")
@click.option("--classes", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="File with one class name per line: keep only these classes, in this order.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the carved val split (synthetic: of all the data).")
@click.option("--val-fraction", type=float, default=None,
              help="Fraction of train moved to val for datasets without one (default 0.1).")
@click.option("--num-samples", type=int, default=None, help="synthetic: number of samples (default 100000).")
@click.option("--dim", type=int, default=None, help="synthetic: input dimension d (default 30).")
@click.option("--num-classes", type=int, default=None, help="synthetic: number of classes K (default 3).")
@click.option("--sigma2", type=float, default=None, help="synthetic: noise variance (default 6).")
def manifest_build(dataset: str, root: str, out: str, classes: str | None, seed: int, **options) -> None:
    """Scan a dataset root and write its manifest (atomically).

    \b
    Splits: fashion-mnist and cifar keep their test set as `test` and move
    --val-fraction of train (chosen by --seed) to `val`. imagefolder reads
    ROOT/train/<class>/*; with ROOT/test/ present, ROOT/val/ is `val` and ROOT/test/
    is `test`; otherwise ROOT/val/ is `test` (the ImageNet convention) and `val` is
    carved from train. synthetic writes its data under ROOT (5/5/90 train/val/test).

    \b
    Examples:
      kdcache manifest build --dataset synthetic --root data/synthetic --out data_manifests/synthetic.parquet
      kdcache manifest build --dataset fashion-mnist --root /usr/share/datasets/fashion-mnist --out data_manifests/fashion.parquet
      kdcache manifest build --dataset imagefolder --root data/imagenet --classes data_manifests/imagenet100.txt --out data_manifests/imagenet100.parquet
    """
    from pipeline.manifest import build_manifest

    given = {k: v for k, v in options.items() if v is not None}
    m = build_manifest(dataset, root, out, classes=classes, seed=seed, progress=True, **given)
    sizes = ", ".join(f"{k} {v}" for k, v in m.split_sizes().items())
    click.echo(f"wrote {out}: {m.dataset}, {m.num_classes} classes, {sizes}; sha256 {m.sha256}")


@manifest_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--files/--no-files", "check_files", default=True, show_default=True,
              help="Also check that the data files the manifest names exist (and are unchanged).")
def manifest_check(file: str, check_files: bool) -> None:
    """Validate a manifest and print a summary (exit 2 with one line if it is bad).

    \b
    Example:
      kdcache manifest check data_manifests/cifar10.parquet
    """
    from pipeline.manifest import load_manifest

    m = load_manifest(file, check_files=check_files)
    names = ", ".join(m.class_names[:10]) + (", ..." if m.num_classes > 10 else "")
    click.echo(f"manifest: {file}")
    click.echo(f"dataset:  {m.dataset} (root {m.root})")
    click.echo(f"classes:  {m.num_classes} ({names})")
    click.echo("rows:     " + ", ".join(f"{k} {v}" for k, v in m.split_sizes().items()) + f" (total {len(m.table)})")
    click.echo(f"sha256:   {m.sha256}")


# --- train-teacher / evaluate ----------------------------------------------
# (train-teacher / evaluate: commands go here)


# --- cache / verify / plan -------------------------------------------------
# (cache / verify / plan: commands go here)


# --- distill ---------------------------------------------------------------
# (distill: commands go here)


# --- inspect ---------------------------------------------------------------
# (inspect: commands go here)


def main() -> None:
    cli(prog_name="kdcache")


if __name__ == "__main__":
    sys.exit(main())
