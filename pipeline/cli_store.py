"""``kdcache store copy``: a store moved between a folder and a bucket (``pipeline.cli`` adds this
group to the command line)."""

from __future__ import annotations

import click

from pipeline.cli_options import StorePath
from pipeline.errors import UserError
from pipeline.files import os_error_text
from pipeline.store.copy import copy_store
from pipeline.store.schema import human_bytes


@click.group("store")
def store_group() -> None:
    """Move cache stores between folders and buckets.

    \b
    Example:
      kdcache store copy caches/train/ce.zarr s3://bucket/caches/train/ce.zarr
      kdcache store copy s3://bucket/caches/train/ce.zarr caches/train/ce.zarr
    """


@store_group.command("copy")
@click.argument("src", type=StorePath(path_type=str))
@click.argument("dst", type=StorePath(path_type=str))
def copy_command(src: str, dst: str) -> None:
    """Copy the complete store SRC to DST (a folder or s3://bucket/prefix/name.zarr), checking every
    chunk's checksum on the way. DST's group zarr.json is written last, so an interrupted copy is no
    store yet; rerun the same command and the objects already at DST with the same bytes are skipped.

    \b
    Examples:
      kdcache store copy caches/train/ce.zarr s3://bucket/caches/train/ce.zarr     # publish
      kdcache store copy s3://bucket/caches/train/ce.zarr caches/train/ce.zarr     # pull back
    """
    try:
        result = copy_store(src, dst)
    except OSError as err:
        raise UserError(f"{os_error_text(err, dst)}; {dst} is not a complete copy yet: fix that and rerun the "
                        "same command (objects already copied are kept)") from None
    click.echo(f"{dst}: copied from {src} ({result.copied} objects, {human_bytes(result.bytes)} written, "
               f"{result.skipped} already there), every chunk's checksum checked")
