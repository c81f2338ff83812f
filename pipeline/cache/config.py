"""Settings of one caching job (also the ``cache`` section of params.yaml), defaults in one place.

    from pipeline.cache import CacheConfig, cache_teacher
    cache_teacher(CacheConfig(teacher="models/ce.pt", manifest="m.parquet", out="caches/train/ce.zarr", views=2))
    CacheConfig(teacher="resnet18", weights="weights/r18.pt", ...)      # an arch name + a state_dict
    CacheConfig(teacher="my_models:build_teacher", ...)                 # your callable (weights optional)
    CacheConfig(..., views=16, augment="randaugment", augment_options={"n": 2, "m": 9}, erase=0.25)
    CacheConfig(..., views=16, mix="mixup,cutmix", mix_options={"mixup_alpha": 0.8, "switch_prob": 0.5})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, ClassVar

from pipeline.config import FromDict
from pipeline.data.views import check_view_options
from pipeline.store import codecs, schema


@dataclass(frozen=True, kw_only=True)
class CacheConfig(FromDict):
    """What ``cache_teacher`` runs: which teacher over which views, stored how, computed by whom."""

    section: ClassVar[str] = "cache"

    teacher: str                            # a checkpoint, an arch name (with weights) or module:function
    manifest: str
    out: str
    split: str = "train"
    views: int = 1                          # V views per sample (view 0 = the evaluation transform)
    views_seed: int = 0                     # seed of the random views
    view_spec: dict[str, Any] | None = None  # a ViewSpec.to_dict(); default: the dataset's views with views_seed
    augment: str | None = None              # after the crop and flip of views >= 1: randaugment | trivialaugment
    # randaugment: n (ops per view, default 2), m (magnitude 0..30, default 9)
    augment_options: dict[str, Any] = field(default_factory=dict)
    erase: float | None = None              # random erasing in views >= 1 with this probability
    mix: str | None = None                  # views >= 1 mixed with a partner sample: mixup | cutmix | mixup,cutmix
    # mixup_alpha (0.8), cutmix_alpha (1.0), switch_prob (0.5, both kinds), prob (1.0): pipeline.data.mix
    mix_options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float16"                  # of the stored logits: one its storage codec takes
    storage: str = codecs.DEFAULT_KIND      # a storage codec's name (entropy, p_gt: always exact float32)
    k: int | None = None                    # classes kept or drawn per row, for codecs that take k
    temperature: float | None = None        # for codecs that take one: draws from softmax(z / T) (default 1)
    rows_per_block: int | None = None       # default: 4096, fewer for huge C
    micro_batch: int = schema.DEFAULT_MICRO_BATCH
    shard: str | None = None                # "i/n": every n-th block from the i-th (SLURM array jobs)
    scheduler: str | None = None            # address of a dask scheduler: one task per block
    local_workers: int | None = None        # a dask LocalCluster of this many processes
    ship_inputs: bool | None = None         # teachers' files sent with the dask tasks (default: with a scheduler)
    worker_data_root: str | None = None     # where shipped-to workers find the data (default: the caller's root)
    overwrite: bool = False                 # delete an existing store first
    device: str = "auto"
    threads: int | None = None              # torch CPU threads; the same across jobs for bit-identical stores
    workers: int = 0                        # DataLoader workers decoding images
    weights: str | None = None              # weights file of an arch or callable teacher (a state_dict)
    name: str | None = None                 # teacher name recorded in the store (default: checkpoint stem)
    progress: bool = True

    def __post_init__(self) -> None:
        for key in ("teacher", "manifest", "out", "weights"):
            if isinstance(getattr(self, key), PurePath):
                object.__setattr__(self, key, str(getattr(self, key)))
        self.check_strings(("teacher", "manifest", "out", "split"))
        self.check_strings(("weights", "worker_data_root"), optional=True)
        self.check_ints(("views", "micro_batch"), minimum=1)
        self.check_ints(("views_seed", "workers"), minimum=0)
        self.check_ints(("k", "rows_per_block", "local_workers", "threads"), minimum=1, optional=True)
        if self.dtype not in codecs.dtypes():
            raise self.bad("dtype", " or ".join(codecs.dtypes()))
        if self.storage not in codecs.CODECS:
            raise self.bad("storage", " or ".join(codecs.CODECS.names()))
        with_temperature = codecs.kinds_taking("temperature")
        if self.temperature is not None and (self.storage not in with_temperature
                                             or isinstance(self.temperature, bool)
                                             or not isinstance(self.temperature, (int, float))
                                             or not self.temperature > 0):
            raise self.bad("temperature", f"a number > 0, with storage {' or '.join(with_temperature)} only")
        check_view_options(self)
