"""Which dataset a manifest is built from (the ``data`` section of params.yaml), defaults in one place.

    from pipeline.data import build_manifest
    from pipeline.data.config import DataConfig

    cfg = DataConfig.from_dict({"dataset": "synthetic", "root": "data/synthetic", "options": {"num_samples": 300}},
                               source="params.yaml", prefix="data")
    build_manifest(cfg.dataset, cfg.root, "data_manifests/synthetic.parquet", seed=cfg.seed,
                   classes=cfg.classes, **cfg.options)

The reader's option names and their types (those of the reader's defaults) are checked here,
so ``options: {num_sample: 300}`` is an error naming ``data.options`` before anything is scanned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.config import ConfigError, FromDict, conforms, describe
from pipeline.data.base import READERS
from pipeline.errors import UserError


@dataclass(frozen=True, kw_only=True)
class DataConfig(FromDict):
    """What ``build_manifest`` scans: a registered reader over a root, with its options."""

    section: ClassVar[str] = "data"

    dataset: str                                  # a name in pipeline.data.READERS
    root: str                                     # the dataset's folder (synthetic: where it is written)
    seed: int = 0                                 # of the carved val split (synthetic: of all the data)
    classes: str | tuple[str, ...] | None = None  # a class-list file or names: only those classes, in that order
    options: dict[str, Any] = field(default_factory=dict)  # the reader's own options
    subset: dict[str, int] = field(default_factory=dict)   # {split: rows}: a random subset of those splits

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or self.dataset not in READERS:
            raise self.bad("dataset", "one of " + ", ".join(READERS.names()))
        self.check_strings(("root",))
        self.check_ints(("seed",), minimum=0)
        names = (self.classes,) if isinstance(self.classes, str) else self.classes
        if names is not None and not (isinstance(names, (list, tuple)) and names
                                      and all(isinstance(c, str) and c for c in names)):
            raise self.bad("classes", "a class-list file, a list of class names or nothing")
        if isinstance(self.classes, list):
            object.__setattr__(self, "classes", tuple(self.classes))
        if not isinstance(self.options, dict):
            raise self.bad("options", "a mapping of option: value")
        if not (isinstance(self.subset, dict) and all(isinstance(k, str) and isinstance(v, int)
                                                      and not isinstance(v, bool) and v > 0
                                                      for k, v in self.subset.items())):
            raise self.bad("subset", "a mapping of split: number of rows > 0")
        object.__setattr__(self, "options", dict(self.options))
        reader = READERS.create(self.dataset)
        try:
            reader.resolve_options(self.options)
        except UserError as err:
            raise ConfigError(str(err), key="options", section=self.section) from None
        for name, value in self.options.items():
            kind = type(reader.options[name])    # an option takes the type of the reader's default
            if kind in (bool, int, float) and not conforms(value, kind):
                raise ConfigError(f"expected {describe(kind)}, found {value!r}", key=f"options.{name}",
                                  section=self.section)
