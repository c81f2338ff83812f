"""The settings every training run shares, declared once, and the rule for ``--resume``.

    @dataclass(frozen=True, kw_only=True)
    class TeacherConfig(TrainConfig):
        section: ClassVar[str] = "teacher"
        resume_keys: ClassVar[tuple[str, ...]] = TrainConfig.resume_keys + ("arch", "loss")
        arch: str
        ...

A run's checkpoint records ``asdict(config)`` under ``meta["config"]``; a run may resume from a
checkpoint whose ``resume_keys`` settings and identity fields (manifest hash, mentors, ...)
equal this run's, and that holds a train state.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

from pipeline.config import FromDict
from pipeline.errors import UserError
from pipeline.files import check_distinct, check_local, check_writable


MAX_SEED = 2**63 - 1      # torch's generators take a signed 64-bit seed
MAX_LR = 1e3              # far above any working learning rate, far below a float32 overflow of the weights


@dataclass(frozen=True, kw_only=True)
class TrainConfig(FromDict):
    """Settings of the one training loop (teachers and students alike)."""

    # Settings that must match for ``resume`` to continue the same run (a task adds its own).
    resume_keys: ClassVar[tuple[str, ...]] = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "seed",
                                              "views_seed", "train_split")

    manifest: str
    out: str
    epochs: int = 20
    batch_size: int = 128                  # per process (DDP: per rank)
    lr: float = 0.1                        # peak; cosine decay to 0, stepped per batch
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0                          # initialisation and batch order
    views_seed: int = 0                    # seed of the replayable augmentations
    train_split: str | None = "train"
    val_split: str | None = "val"          # the default is skipped when the manifest has no such split
    workers: int = 0                       # DataLoader workers decoding images
    device: str = "auto"
    eval_batch_size: int = 512
    resume: str | None = None              # a checkpoint of an interrupted run with the same settings
    metrics: str | None = None             # JSON of the last epoch
    history: str | None = None             # CSV of every epoch; default: ``metrics`` with suffix .csv
    progress: bool = True

    def __post_init__(self) -> None:
        self.check_ints(("epochs", "batch_size", "eval_batch_size"), minimum=1)
        self.check_ints(("seed", "views_seed"), minimum=0, maximum=MAX_SEED)
        self.check_ints(("workers",), minimum=0)
        if not is_number(self.lr) or not 0 < self.lr <= MAX_LR:
            raise self.bad("lr", f"a number in (0, {MAX_LR:g}]")
        if not is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise self.bad("momentum", "a number in [0, 1)")
        if not is_number(self.weight_decay) or not self.weight_decay >= 0:
            raise self.bad("weight_decay", "a number >= 0")
        self.check_strings(("manifest", "out"))
        for key in ("manifest", "out", "metrics", "history", "resume"):
            check_local(getattr(self, key), what=f"{self.section} config key {key!r}:")

    @property
    def history_path(self) -> str | None:
        if self.history:
            return self.history
        return str(Path(self.metrics).with_suffix(".csv")) if self.metrics else None

    def output_paths(self) -> dict[str, str]:
        """The files a run writes, by option name (a task adds its own)."""
        paths = {"--out": self.out, "--metrics": self.metrics, "--history": self.history_path}
        return {what: path for what, path in paths.items() if path}

    def input_paths(self) -> dict[str, str]:
        """The files and stores a run reads, by option name (a task adds its own). ``--resume`` is not
        among them: resuming into the checkpoint it reads (``--out X --resume X``) is the usual way."""
        return {"--manifest": self.manifest}

    def check_outputs(self) -> None:
        """Before any epoch runs: no output is an input or another output (the same file, or one inside
        the other), and every output can be written (``pipeline.files.check_writable``: a file where a
        folder should be or a read-only folder is one line now, not after an epoch)."""
        check_distinct(self.output_paths(), self.input_paths())
        for what, path in self.output_paths().items():
            check_writable(path, what=what)

    def check_resume(self, blob: dict, identity: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """The checkpoint ``blob`` to resume must hold a train state, the ``identity`` meta fields of
        this run and the same ``resume_keys`` settings (``config``: this run's ``asdict``, made plain)."""
        saved = blob["meta"]
        if blob.get("train_state") is None:
            raise UserError(f"{self.resume}: checkpoint has no train state to resume from")
        for key, want in identity.items():
            if saved.get(key) != want:
                raise UserError(f"{self.resume}: field {key!r}: expected {want!r} (this run), found {saved.get(key)!r}")
        before = saved.get("config", {})
        # A key a checkpoint does not hold came after it was written: that run had the key's default.
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        for key in self.resume_keys:
            had = before.get(key, defaults.get(key))
            if had != config.get(key):
                raise UserError(f"{self.resume}: setting {key!r} differs: checkpoint has {had!r}, "
                                f"this run {config.get(key)!r}")


def is_number(value: Any) -> bool:
    """An int or a float (a bool is neither here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
