"""The caching job: run frozen teachers over a split's views and write their stores.

    kdcache cache --teacher models/ce.pt --manifest data_manifests/synthetic.parquet --split train \\
        --views 2 --out caches/train/ce.zarr

    from pipeline.cache import CacheConfig, cache_teacher
    cache_teacher(CacheConfig(teacher="models/ce.pt", manifest="data_manifests/synthetic.parquet",
                              split="train", views=2, out="caches/train/ce.zarr"))

Several teachers in one pass: the views are decoded and augmented once and every teacher runs on
them; each store is byte for byte what caching its teacher alone writes (resumable, shardable,
claimed per store the same way):

    kdcache cache --teacher models/ce.pt --teacher models/mse.pt --out-dir caches/train ...   # caches/train/ce.zarr, mse.zarr
    kdcache cache --teacher models/ce.pt models/mse.pt --out caches/a.zarr caches/b.zarr ...  # one --out per teacher

    from pipeline.cache import cache_teachers, one_pass_configs
    cache_teachers(one_pass_configs(["models/ce.pt", "models/mse.pt"], out_dir="caches/train",
                                    manifest="data_manifests/synthetic.parquet", views=2))

``cache_teachers`` takes one ``CacheConfig`` per teacher; they differ only in ``teacher``,
``weights``, ``name``, ``out`` and ``view_spec`` (every other setting is one for all). Teachers
with the same views (``view_spec``: resolution and normalization) share their inputs; teachers
with other views get theirs from the same decoded images.

Three forms of teacher (``--teacher``, ``CacheConfig.teacher``; read by ``pipeline.teachers``):

    kdcache cache --teacher models/ce.pt ...                               # a kdcache checkpoint
    kdcache cache --teacher resnet18 --weights weights/r18.pt ...          # an arch name + a weights file
    kdcache cache --teacher timm:resnet50 --weights weights/r50.pt ...     # timm (pip install 'kdcache[timm]')
    kdcache cache --teacher my_models:build_teacher [--weights w.pt] ...   # your code, like a torch.hub entry point

Which texts each form takes, how it is built and what it must satisfy (the weights fit key for
key and shape for shape, a callable gives the same weights every call): ``pipeline.teachers``.
Weights files are read as data only: ``torch.load(weights_only=True)`` (or a ``.safetensors``
file with the safetensors package), a bare state_dict or a dict holding one under ``state_dict``
or ``model``; a file that would need arbitrary unpickling (a pickled whole model) is refused,
never run. Only ``module:function`` runs code of yours. The store's ``teacher`` section records
``source`` (the form: checkpoint | arch | callable), ``arch`` (the name or ``module:function``),
``checkpoint_sha256`` (of the weights file; for a model without one, of its state_dict's tensors
in key order) and ``preprocessing``; reopening a store with another teacher is refused.

The views replay geometry, not preprocessing: what a store fixes per sample and view is the crop
box and the flip (a pure function of the view spec, the sample id and the view index), and a
student trained from the store replays exactly those. The resolution and the normalization are a
property of each model: the teacher saw the split's view 0 input shape and the view spec's mean
and std, and both are recorded in the store's ``teacher.preprocessing`` (``mean``, ``std``,
``input_shape``), so a teacher that expects other inputs (another resolution, ImageNet statistics)
is cached with a view spec giving them (``CacheConfig.view_spec``).

Mixed views (``--mix``, ``pipeline.data.mix``): a view >= 1 is the sample's view mixed with its
partner's, the teacher runs on the mixed image, and the job hands each block's partners and lambdas
to the writer with its logits (``run.block_mixing``), so the store holds them beside the answers.

    config.py    CacheConfig: the settings of a caching job
    job.py       the job: each teacher checked, its store's target and its block computer's factory
    teacher.py   block computers: the frozen teacher over a split's views, block by block
    one_pass.py  several teachers over one pass of the views (the images decoded once)
    run.py       which blocks this job computes (--shard i/n, dask), a mixed block's partners, then finalize
    ship.py      the teachers' files sent with dask tasks, for workers that share no filesystem with the caller
    spot_check.py  kdcache verify --teacher: the teacher run again on sampled (view, row) pairs of a store

The store format itself (schema, writer, reader, verify) is ``pipeline.store``; tests drive
``write_cache`` with a fake block computer.
"""

from pipeline.cache.config import CacheConfig
from pipeline.cache.job import cache_teacher, cache_teachers, one_pass_configs, store_paths
from pipeline.cache.run import parse_shard, write_cache, write_caches

__all__ = ["CacheConfig", "cache_teacher", "cache_teachers", "one_pass_configs", "parse_shard", "store_paths",
           "write_cache", "write_caches"]
