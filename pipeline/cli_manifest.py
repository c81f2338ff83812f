"""``kdcache manifest build|check``: the commands that write and validate manifests (``pipeline.cli``
adds this group to the command line)."""

from __future__ import annotations

import click

from pipeline.cli_options import LocalPath, RegistryChoice
from pipeline.data import READERS, build_manifest, check_files
from pipeline.files import check_distinct
from pipeline.manifest import load_manifest
from pipeline.train import parse_options


def _reader_option(dataset: str, key: str) -> object:
    """A dataset reader's default for one of its options (the help repeats it, the reader owns it)."""
    return READERS.get(dataset).options[key]



@click.group("manifest")
def manifest_group() -> None:
    """Build and check Parquet manifests (one row per sample: id, label, split, source).

    \b
    Example:
      kdcache manifest build --dataset cifar10 --root data/cifar --out data_manifests/cifar10.parquet
      kdcache manifest check data_manifests/cifar10.parquet
    """


@manifest_group.command("build")
@click.option("--dataset", required=True, type=RegistryChoice(READERS.names), help="Dataset reader.")
@click.option("--root", required=True, type=LocalPath(path_type=str),
              help="Dataset root (synthetic: where the generated data is written).")
@click.option("--out", required=True, type=LocalPath(dir_okay=False, path_type=str), help="Manifest to write (.parquet).")
@click.option("--classes", type=LocalPath(dir_okay=False, path_type=str), default=None,
              help="File with one class name per line: keep only these classes, in this order.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the carved val split (synthetic: of all the data).")
@click.option("--val-fraction", type=float, default=None,
              help=f"Fraction of train moved to val for datasets without one (default {_reader_option('fashion-mnist', 'val_fraction')}).")
@click.option("--image-size", type=int, default=None,
              help=f"imagefolder: side of the square crops the views make (default {_reader_option('imagefolder', 'image_size')}; "
                   "e.g. 32 for small images).")
@click.option("--num-samples", type=int, default=None, help=f"synthetic: number of samples (default {_reader_option('synthetic', 'num_samples')}).")
@click.option("--dim", type=int, default=None, help=f"synthetic: input dimension d (default {_reader_option('synthetic', 'dim')}).")
@click.option("--num-classes", type=int, default=None, help=f"synthetic: number of classes K (default {_reader_option('synthetic', 'num_classes')}).")
@click.option("--sigma2", type=float, default=None, help=f"synthetic: noise variance (default {_reader_option('synthetic', 'sigma2')}).")
@click.option("--subset", "subset", multiple=True, metavar="SPLIT=N", default=(),
              help="Keep a random N rows of SPLIT (chosen by --seed), e.g. train=10000. Repeatable.")
def manifest_build(dataset: str, root: str, out: str, classes: str | None, seed: int, subset: tuple[str, ...],
                   **options) -> None:
    """Scan a dataset root and write its manifest (atomically).

    \b
    Splits: fashion-mnist and cifar keep their test set as `test` and move
    --val-fraction of train (chosen by --seed) to `val`. imagefolder reads
    ROOT/train/<class>/*; with ROOT/test/ present, ROOT/val/ is `val` and ROOT/test/
    is `test`; otherwise ROOT/val/ is `test` (the ImageNet convention); when no
    directory is `val`, it is carved from train. synthetic writes its data under
    ROOT (5/5/90 train/val/test).

    \b
    Examples:
      kdcache manifest build --dataset synthetic --root data/synthetic --out data_manifests/synthetic.parquet
      kdcache manifest build --dataset fashion-mnist --root /usr/share/datasets/fashion-mnist --out data_manifests/fashion.parquet
      kdcache manifest build --dataset fashion-mnist --root /usr/share/datasets/fashion-mnist --subset train=10000 --out data_manifests/fashion10k.parquet
      kdcache manifest build --dataset imagefolder --root data/imagenet --classes data_manifests/imagenet100.txt --out data_manifests/imagenet100.parquet
    """
    given = {k: v for k, v in options.items() if v is not None}
    check_distinct({"--out": out}, {"--classes": classes} if classes else {})
    rows = parse_options(subset, flag="--subset")
    m = build_manifest(dataset, root, out, classes=classes, seed=seed, subset=rows, progress=True, **given)
    sizes = ", ".join(f"{k} {v}" for k, v in m.split_sizes().items())
    click.echo(f"wrote {out}: {m.dataset}, {m.num_classes} classes, {sizes}; sha256 {m.sha256}")


@manifest_group.command("check")
@click.argument("file", type=LocalPath(dir_okay=False, path_type=str))
@click.option("--files/--no-files", "with_files", default=True, show_default=True,
              help="Also check that the data files the manifest names exist, are unchanged and read through.")
def manifest_check(file: str, with_files: bool) -> None:
    """Validate a manifest and print a summary (exit 2 with one line if it is bad).

    \b
    Example:
      kdcache manifest check data_manifests/cifar10.parquet
    """
    m = load_manifest(file)
    if with_files:
        check_files(m, contents=True)
    names = ", ".join(m.class_names[:10]) + (", ..." if m.num_classes > 10 else "")
    click.echo(f"manifest: {file}")
    click.echo(f"dataset:  {m.dataset} (root {m.root})")
    click.echo(f"classes:  {m.num_classes} ({names})")
    click.echo("rows:     " + ", ".join(f"{k} {v}" for k, v in m.split_sizes().items()) + f" (total {len(m.table)})")
    click.echo(f"sha256:   {m.sha256}")
