"""The teacher-logit cache format: Zarr stores written block by block, verified, read for training.

    schema.py   layout, FORMAT_VERSION, attrs, the fields stores must agree on, chunk keys, byte
                planning (README.md shows the attrs)
    codecs/     one class per storage kind (dense, top-k, sampled), looked up by name: its arrays,
                encode, decode, checks
    stats.py    the exact targets every store keeps (entropy, p_gt, pred, logsumexp)
    writer.py   create/reopen a store, resumable block writes, finalize
    verify.py   ``kdcache verify``; the completeness check every reader makes
    reader.py   ``StoreGroup``: in-memory or block-streaming targets of several stores

This package is the format only: it imports no model, checkpoint or dataset code. The job that
fills a store (loading a teacher, --shard, dask) is ``pipeline.cache``. Submodules are imported
explicitly (``from pipeline.store.reader import StoreGroup``) so that importing this package stays cheap.
"""
