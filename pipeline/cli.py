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
