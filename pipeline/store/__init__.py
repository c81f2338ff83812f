"""The teacher-logit cache: Zarr stores written once, verified, and read by distillation.

    schema.py   layout, FORMAT_VERSION, attrs, byte planning (README.md shows the attrs)
    writer.py   create/reopen a store, resumable block writes, finalize; ``cache_teacher``
    compute.py  block computers: the frozen teacher over a split's views, block by block
    distribute.py  --shard i/n and dask.distributed execution (one task per block)
    verify.py   ``kdcache verify``
    reader.py   ``Classroom``: in-memory or block-streaming targets for training

Submodules are imported explicitly (``from pipeline.store.reader import Classroom``) so that
importing this package stays cheap.
"""
