"""Student training (distillation), one task on the shared loop: ``distill(DistillConfig) -> metrics``.

    kdcache distill --method kd --mentors caches/train/ce.zarr --manifest data_manifests/synthetic.parquet \\
        --student mlp --epochs 20 --out models/kd.pt
    kdcache distill ... --student mlp --student-option hidden=64 --out models/kd64.pt   # a smaller student
    kdcache distill ... --student resnet18 --input-size 160 --out models/kd160.pt     # 224 px teachers, 160 px student

    from pipeline.train import DistillConfig, distill
    metrics = distill(DistillConfig(method="kd", mentors=("caches/train/ce.zarr",), manifest="m.parquet",
                                    student="mlp", out="models/kd.pt"))

The loop (``pipeline.train.loop.fit``) never looks at the method's name, only at
``num_students``, ``needs`` and ``check_mentors``:

- Targets (``pipeline.train.targets``): the mentor stores (``CachedTargets``), or with ``online``
  the teachers run on each batch (``LiveTargets``; each a ``kdcache cache --teacher`` spec, with
  ``teacher_weights`` in the same order); each step asks for
  ``targets(batch, fields=method.needs)`` (from a cache: one vectorized gather) and calls the
  method on the students' float32 logits.
- Views: the split is opened with the views spec stored in the cache and epoch ``e`` replays view
  ``e mod V`` (V = the stores' view count; ``view_schedule="cycle"``), or with ``"random"`` each
  row its own view drawn per epoch from the run's seed (``pipeline.train.sampling.ViewSchedule``):
  either way each row's targets are those of the view its input was made in. Online or
  without mentors the spec is the dataset's default with ``views_seed``, ``augment`` / ``erase`` and
  ``mix``, and V = ``views`` (what ``kdcache cache --views V --views-seed S --augment ...`` writes). ``input_size`` / ``input_mean`` / ``input_std``
  give the students a resolution and normalization of their own (``pipeline.data.views.for_model``):
  the same crop boxes and flips as the teachers', resized to ``input_size``; the checkpoint's views
  are the students', so ``kdcache evaluate`` scores them at their own size.
- Mixed views (a store cached with ``--mix``, or ``mix``/``mix_options`` without mentors: MixUp /
  CutMix, ``pipeline.data.mix``): each row's input is its view mixed with its partner's, and the
  method gets the mixed labels ``lam * onehot(y) + (1 - lam) * onehot(y_partner)`` [B, C] instead
  of ``y`` (``Batch.mixed``), so every hard-label term is ``lam * CE(y) + (1 - lam) * CE(y_partner)``.
  Methods without ``mixed_labels`` refuse mixed views in one line; a cache's partners and lambdas
  are checked against the students' views first (``CachedTargets.check_mixing``).
- Batches: the targets' order (``pipeline.train.sampling``: block-aware when streaming, one slice
  per DDP rank); online, the in-memory order over the same rows, so both see the same batches.
- Students: ``method.num_students`` (A = ``student``, B = ``student_b``), each with its own SGD +
  cosine schedule. A goes to ``out``, B to ``out`` with suffix ``_b`` (``models/dual_b.pt``); both are
  ordinary checkpoints for ``kdcache evaluate``. ``student_options`` / ``student_b_options`` are the
  archs' size options (``pipeline.models.model_options``), recorded as meta ``arch_options``.
  A's file holds the train state for ``resume`` (B's weights included), rewritten atomically
  after every epoch; a resumed run ends where an uninterrupted one ends.
- Logs: the loop's history (``train_<part>``, ``train_top1[_i]``, per student ``val_*[_i]``), its last
  row as the metrics JSON, all rows as a CSV; the per-mentor 1-D stats a method returns (classroom:
  rank, active, temperature) also as ``mentor_stats`` (CSV, one row per epoch and mentor).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import yaml

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError
from pipeline.data import default_views, open_split
from pipeline.data.mix import mixed_labels
from pipeline.data.views import ViewSpec, check_view_options, for_model, with_view_options
from pipeline.errors import UserError
from pipeline.files import write_history
from pipeline.manifest import Manifest, load_manifest
from pipeline.methods import METHODS, create_method
from pipeline.models import MODELS, check_model_options, create_model
from pipeline.runtime import Runtime, seed_everything, torch_threads
from pipeline.teachers import TeacherSource, teacher_source
from pipeline.train.config import TrainConfig, is_number
from pipeline.train.evaluate import evaluate_model, has_val_split, posterior
from pipeline.train.loop import Batch, LoopState, cosine_schedule, finish_run, fit, restore_train_state, sgd
from pipeline.train.sampling import VIEW_SCHEDULES, ViewSchedule
from pipeline.train.targets import CachedTargets, LiveTargets, Targets

CACHE_MODES = ("auto", "memory", "stream")


@dataclass(frozen=True, kw_only=True)
class DistillConfig(TrainConfig):
    """Settings of ``distill`` (also a ``students.<name>`` section of params.yaml)."""

    section: ClassVar[str] = "distill"
    resume_keys: ClassVar[tuple[str, ...]] = ("method", "options", "student", "student_options", "student_b",
                                              "student_b_options", "online", "view_schedule") + TrainConfig.resume_keys

    method: str
    student: str
    mentors: tuple[str, ...] = ()          # cache stores, teacher first
    student_b: str | None = None           # the second student's arch (dual, dml)
    student_options: dict = field(default_factory=dict)    # student A's size options, e.g. {"hidden": 64}
    student_b_options: dict = field(default_factory=dict)  # ... and student B's
    options: dict = field(default_factory=dict)   # the method's options (docs/methods.md)
    online: bool = False                   # live teachers instead of the cache
    teachers: tuple[str, ...] = ()         # teachers for ``online``, teacher first (as ``kdcache cache --teacher``)
    teacher_weights: tuple[str | None, ...] = ()   # none, or a weights file (or None) per teacher, in order
    init: str | None = None                # weights to start student A from
    init_b: str | None = None              # ... and student B
    views: int | None = None               # V without a cache (default 1); with one: must match it
    view_schedule: str = "cycle"           # cycle: epoch e replays view e mod V; random: a view per row and epoch
    train_split: str | None = None         # default: the stores' split, else "train"
    cache_mode: str = "auto"               # auto | memory | stream (see pipeline.store.reader)
    memory_budget_mb: int | None = None    # per process; default: a quarter of RAM over the local processes
    mentor_stats: str | None = None        # default: ``out`` stem + "_mentors.csv", when there are any
    input_size: int | None = None          # the students' input side (default: the teachers' views' size)
    input_mean: tuple[float, ...] | None = None   # the students' normalization (default: the teachers')
    input_std: tuple[float, ...] | None = None
    augment: str | None = None             # without mentors: randaugment | trivialaugment (a store has its own)
    augment_options: dict = field(default_factory=dict)   # without mentors: as kdcache cache --augment-option
    erase: float | None = None             # without mentors: random erasing probability, as kdcache cache --erase
    mix: str | None = None                 # without mentors: mixup | cutmix | mixup,cutmix views (a store has its own)
    mix_options: dict = field(default_factory=dict)   # without mentors: as kdcache cache --mix-option
    threads: int | None = None             # torch CPU threads (None: torch's own); fixed for bit-identical CPU runs

    def own_views(self, manifest: Manifest) -> ViewSpec:
        """The views of a run without mentors: the dataset's default (``views_seed``) with this config's
        augmentations and mixing, as ``kdcache cache`` would record them."""
        return with_view_options(default_views(manifest, seed=self.views_seed), self)

    def __post_init__(self) -> None:
        for key in ("mentors", "teachers", "teacher_weights"):
            value = getattr(self, key)
            value = (value,) if isinstance(value, (str, Path)) else tuple(value or ())
            object.__setattr__(self, key, tuple(None if v is None else str(v) for v in value))
        for key in ("input_mean", "input_std"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not all(is_number(v) for v in value) or not value:
                raise self.bad(key, "a list of numbers, one per channel (or one for all)")
            if key == "input_std" and not all(v > 0 for v in value):
                raise self.bad(key, "numbers > 0 (the inputs are divided by them)")
            object.__setattr__(self, key, tuple(float(v) for v in value))
        for key in ("options", "student_options", "student_b_options"):
            if not isinstance(getattr(self, key), dict):
                raise self.bad(key, "a mapping of option: value")
            object.__setattr__(self, key, dict(getattr(self, key)))
        super().__post_init__()
        self.check_ints(("views", "memory_budget_mb", "input_size", "threads"), minimum=1, optional=True)
        if self.cache_mode not in CACHE_MODES:
            raise self.bad("cache_mode", " or ".join(CACHE_MODES))
        if self.view_schedule not in VIEW_SCHEDULES:
            raise self.bad("view_schedule", " or ".join(VIEW_SCHEDULES))
        if self.method not in METHODS:
            raise self.bad("method", "one of " + ", ".join(METHODS.names()))
        method = create_method(self.method, **self.options)
        for key in ("student",) + (("student_b",) if self.student_b is not None else ()):
            if getattr(self, key) not in MODELS:
                raise self.bad(key, "one of " + ", ".join(MODELS.names()))
            try:
                check_model_options(getattr(self, key), getattr(self, f"{key}_options"))
            except UserError as err:
                raise ConfigError(str(err), key=f"{key}_options", section=self.section) from None
        if self.student_b is None and self.student_b_options:
            raise self.bad("student_b_options", "none without student_b")
        if method.num_students == 2 and self.student_b is None:
            raise self.bad("student_b", f"the arch of the second student (method {self.method!r} trains two)")
        if method.num_students == 1 and (self.student_b is not None or self.init_b is not None):
            raise self.bad("student_b" if self.student_b is not None else "init_b",
                           f"none (method {self.method!r} trains one student)")
        if self.online and self.mentors:
            raise self.bad("mentors", "no stores with online (live teachers come from 'teachers')")
        if (self.mix is not None or self.mix_options) and self.mentors:
            raise self.bad("mix", "none with mentors (a store's views are mixed as it was cached)")
        for key in ("augment", "augment_options", "erase"):
            if getattr(self, key) not in (None, {}) and self.mentors:
                raise self.bad(key, "none with mentors (a store's views are augmented as it was cached)")
        check_view_options(self)
        if self.teachers and not self.online:
            raise self.bad("teachers", "teachers only with online (offline, the targets come from 'mentors')")
        if self.teacher_weights and len(self.teacher_weights) != len(self.teachers):
            raise self.bad("teacher_weights", f"none or one per teacher, in the order of 'teachers' "
                                              f"({len(self.teachers)} teachers), found {len(self.teacher_weights)}")
        method.check_mentors(len(self.teachers if self.online else self.mentors))

    def teacher_sources(self) -> list[TeacherSource]:
        """The live teachers of ``online`` (``pipeline.teachers.teacher_source``: a checkpoint, an arch
        name with weights, ``timm:NAME`` or ``module:function``)."""
        weights = self.teacher_weights or (None,) * len(self.teachers)
        return [teacher_source(t, w, weights_flag="--teacher-weights") for t, w in zip(self.teachers, weights)]

    def student_views(self, teacher_views: ViewSpec) -> ViewSpec:
        """The students' views: the teachers' crops and flips at the students' size and normalization."""
        given = {k: getattr(self, k) for k in ("input_size", "input_mean", "input_std") if getattr(self, k) is not None}
        if given and teacher_views.kind == "identity":
            raise self.bad(next(iter(given)), "nothing for vector data (its views are 'identity': no resolution "
                                              "or normalization)")
        views = for_model(teacher_views, input_size=self.input_size, mean=self.input_mean, std=self.input_std)
        if self.online and views != teacher_views:
            raise self.bad(next(iter(given)), "nothing with online (the live teachers run on the students' inputs); "
                                              "cache the teachers to give the students inputs of their own")
        return views

    def output_paths(self) -> dict[str, str]:
        paths = super().output_paths()
        method = create_method(self.method, **self.options)
        for i, path in enumerate(student_paths(self.out, method.num_students)[1:], start=1):
            paths[f"--out (student {chr(ord('a') + i)})"] = str(path)
        paths["--mentor-stats"] = self.mentor_stats or str(Path(self.out).with_name(f"{Path(self.out).stem}_mentors.csv"))
        return paths

    def input_paths(self) -> dict[str, str]:
        """The manifest, the mentor stores, the start weights, and the live teachers that are files."""
        paths = super().input_paths()
        paths.update({f"--mentors ({path})": path for path in self.mentors})
        paths.update({f"--teachers ({path})": path for path in self.teachers if Path(path).exists()})
        paths.update({f"--teacher-weights ({path})": path for path in self.teacher_weights if path})
        paths.update({f"--{key.replace('_', '-')}": getattr(self, key) for key in ("init", "init_b") if getattr(self, key)})
        return paths


def parse_options(pairs: Sequence[str], *, flag: str = "--option") -> dict[str, Any]:
    """Options from ``KEY=VALUE`` strings (``--option``, ``--arch-option``, ``--student-option`` ...; ``flag``
    names it in errors); values are YAML scalars (``4`` -> int, ``true`` -> bool, ``~`` or nothing -> None)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{flag}: expected KEY=VALUE, found {pair!r}")
        if key in options:
            raise UserError(f"{flag}: expected each key once, found {key!r} twice")
        try:
            options[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise UserError(f"{flag} {key}: expected a YAML scalar, found {value!r}") from None
    return options


def student_paths(out: str | Path, count: int) -> list[Path]:
    """Where the students go: A at ``out``, B at ``out`` with suffix ``_b`` (``dual.pt`` -> ``dual_b.pt``)."""
    out = Path(out)
    return [out] + [out.with_name(f"{out.stem}_{chr(ord('a') + i)}{out.suffix}") for i in range(1, count)]


def distill(cfg: DistillConfig, *, on_step: Callable[[Batch, dict], None] | None = None) -> dict:
    """Train the student(s) of ``cfg``; checkpoint every epoch; returns the last epoch's metrics.

    ``on_step(batch, out)`` (optional) sees every step's batch and loss dict before the backward pass.
    """
    with torch_threads(cfg.threads):
        return _distill(cfg, on_step)


def _distill(cfg: DistillConfig, on_step: Callable[[Batch, dict], None] | None) -> dict:
    manifest = load_manifest(cfg.manifest)
    method = create_method(cfg.method, **cfg.options)
    cfg.check_outputs()  # an unwritable --out is said now, not after the first epoch
    cached = CachedTargets.open(cfg.mentors, manifest, train_split=cfg.train_split, views=cfg.views,
                                cache_mode=cfg.cache_mode, memory_budget_mb=cfg.memory_budget_mb,
                                workers=cfg.workers) if cfg.mentors else None
    try:
        split = cached.split if cached else cfg.train_split or "train"
        view_spec = cached.view_spec if cached else cfg.own_views(manifest)
        method.check_mixed(view_spec.mixed)
        views = cfg.student_views(view_spec)
        num_views = cached.num_views if cached else cfg.views or 1
        train_ds = open_split(manifest, split, views=views, view=0)
        if cached:
            cached.check_mixing(train_ds)
        input_shape = tuple(train_ds.input_shape)
        runtime = Runtime.create(cfg.device, images=len(input_shape) == 3)
        targets: Targets = cached or LiveTargets(cfg.teacher_sources(), manifest, runtime=runtime, split=split,
                                                 view_spec=view_spec, num_views=num_views, input_shape=input_shape)
        targets.use_schedule(ViewSchedule(cfg.view_schedule, num_views=num_views, seed=cfg.seed,
                                          sample_ids=train_ds.sample_ids))
        return _train(cfg, manifest, method, targets, train_ds, views, runtime, on_step)
    finally:
        if cached is not None:
            cached.close()


def _train(cfg: DistillConfig, manifest: Manifest, method: Any, targets: Targets, train_ds: Any, views: ViewSpec,
           runtime: Runtime, on_step: Callable[[Batch, dict], None] | None) -> dict:
    """Build the students, resume if asked, run the loop with the hooks of ``_StudentRun``, finish."""
    val_ds, val_posterior = None, None
    if has_val_split(manifest, cfg.val_split):
        val_ds = open_split(manifest, cfg.val_split, views=views, view=0)
        val_posterior = posterior(manifest, cfg.val_split)
    seed_everything(cfg.seed)
    input_shape = tuple(train_ds.input_shape)
    archs = [cfg.student, cfg.student_b][: method.num_students]
    arch_options = [cfg.student_options, cfg.student_b_options][: method.num_students]
    students = [runtime.prepare(_student(arch, init, manifest=manifest, input_shape=input_shape, key=key,
                                         options=options))
                for arch, init, key, options in zip(archs, [cfg.init, cfg.init_b], ["init", "init_b"], arch_options)]
    run = _StudentRun(cfg, manifest=manifest, method=method, targets=targets, train_ds=train_ds, val_ds=val_ds,
                      val_posterior=val_posterior, views=views, runtime=runtime, students=students, archs=archs,
                      arch_options=arch_options, on_step=on_step)
    optimizers = [sgd(m.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
                  for m in students]
    schedulers = [cosine_schedule(opt, total_steps=cfg.epochs * len(run.batches(0))) for opt in optimizers]
    start, blob = None, None
    if cfg.resume:
        blob = ckpt.load_checkpoint(cfg.resume)
        _check_resume(cfg, blob, run.meta)
        start = run.restore(blob, optimizers, schedulers)

    state = fit(
        students, optimizers, step=run.step, dataset=train_ds, epochs=cfg.epochs, runtime=runtime,
        schedulers=schedulers, workers=cfg.workers, start=start, batch_sampler=run.batches,
        on_epoch_start=run.on_epoch_start, on_epoch_end=run.on_epoch_end, on_checkpoint=run.on_checkpoint,
        on_diverged=run.on_diverged, progress=cfg.progress, desc=f"distill {cfg.method} {'+'.join(archs)}",
    )
    if runtime.is_main and blob is not None and start.epoch >= cfg.epochs:
        run.on_checkpoint(state, blob["train_state"])  # a finished run: still leave out and the logs in place
    return finish_run(state.history, runtime=runtime, num_classes=manifest.num_classes, what=f"distill {cfg.method}",
                      hint=f"the lr ({cfg.lr}) may not suit the scale of {cfg.method}'s loss (see 'Recommended "
                           "settings' in docs/methods.md), or the mentors are at chance (kdcache inspect)",
                      metrics_path=cfg.metrics)


class _StudentRun:
    """One distillation run's pieces and the loop's hooks over them: the step (students' logits, the
    batch's targets, the method), the epoch's view, validation, NaN diagnosis and the checkpoint."""

    def __init__(self, cfg: DistillConfig, *, manifest: Manifest, method: Any, targets: Targets, train_ds: Any,
                 val_ds: Any, val_posterior: Any, views: ViewSpec, runtime: Runtime, students: list[torch.nn.Module],
                 archs: list[str], arch_options: list[dict], on_step: Callable[[Batch, dict], None] | None) -> None:
        self.cfg, self.method, self.targets, self.train_ds, self.runtime = cfg, method, targets, train_ds, runtime
        self.val_ds, self.val_posterior = val_ds, val_posterior
        self.students, self.archs, self.arch_options, self.on_step = students, archs, arch_options, on_step
        self.fields = tuple(sorted(method.needs))
        self.per_mentor: set[str] = set()     # names of the per-mentor 1-D stats the method returns
        self.paths = student_paths(cfg.out, len(students))
        self.stats_path = cfg.output_paths()["--mentor-stats"]
        self.meta = {
            "arch": archs[0], "arch_options": ckpt.plain(arch_options[0]), "num_classes": manifest.num_classes,
            "input_shape": list(train_ds.input_shape),
            "method": cfg.method, "options": ckpt.plain(method.options),
            "mentors": targets.provenance, "online": cfg.online, "manifest_sha256": manifest.sha256,
            "manifest": str(cfg.manifest), "dataset": manifest.dataset, "views": views.to_dict(),
            "num_views": targets.num_views, "train_split": targets.split, "seed": cfg.seed,
            "students": archs, "config": ckpt.plain(asdict(cfg)),
        }

    def batches(self, epoch: int) -> Any:
        return self.targets.batches(epoch, batch_size=self.cfg.batch_size, seed=self.cfg.seed, rank=self.runtime.rank,
                                    world_size=self.runtime.world_size)

    def restore(self, blob: dict, optimizers: list, schedulers: list) -> LoopState:
        """Load the students, optimizers and schedulers of a checked checkpoint; the state to go on from."""
        self.students[0].load_state_dict(blob["model"])
        for model, state in zip(self.students[1:], blob["train_state"].get("students", [])):
            model.load_state_dict(state)
        self.per_mentor.update(blob["meta"].get("mentor_stats", []))
        return restore_train_state(blob["train_state"], optimizers, schedulers)

    def step(self, models: list[torch.nn.Module], batch: Batch) -> dict:
        logits = [m(batch.x).float() for m in models]
        device = self.runtime.device
        if self.train_ds.views.mixed:    # the rows' mixed labels: their own and their partners', weighed
            partner, lam = self.train_ds.mixed_targets(batch.rows)
            batch = replace(batch, mixed=mixed_labels(batch.y, partner.to(device), lam.to(device),
                                                 self.meta["num_classes"]))
        got = self.targets.targets(batch, self.fields) if self.fields else {}
        y = batch.y if batch.mixed is None else batch.mixed
        out = dict(self.method(logits, {k: v.to(device, non_blocking=True) for k, v in got.items()}, y))
        self.per_mentor.update(k for k, v in out.items()
                               if isinstance(v, torch.Tensor) and v.ndim == 1 and len(v) == self.targets.num_mentors)
        out["logits"] = logits[0] if len(logits) == 1 else logits
        if self.on_step is not None:
            self.on_step(batch, out)
        return out

    def on_epoch_start(self, epoch: int) -> None:
        self.train_ds.set_view(self.targets.schedule.views(epoch))

    def on_epoch_end(self, epoch: int, row: dict) -> dict:
        scores: dict = {}
        for i, model in enumerate(self.students if self.val_ds is not None else []):
            got = evaluate_model(model, self.val_ds, runtime=self.runtime, batch_size=self.cfg.eval_batch_size,
                                 workers=self.cfg.workers, posterior=self.val_posterior)
            suffix = "" if len(self.students) == 1 else f"_{i}"
            scores.update({f"val_{k}{suffix}": v for k, v in got.items() if k != "n"})
        return scores

    def on_diverged(self, epoch: int) -> None:
        # NaN targets make a NaN loss whatever the lr: name the store (or teacher) and the rows.
        for view in np.unique(self.targets.schedule.views(epoch)):
            problem = self.targets.nonfinite(int(view), dataset=self.train_ds,
                                             batches=lambda: self.batches(epoch), runtime=self.runtime)
            if problem:
                raise UserError(problem)

    def on_checkpoint(self, state: LoopState, train_state: dict) -> None:
        common = {"epoch": state.epoch, "metrics": ckpt.plain(state.history[-1]),
                  "history": ckpt.plain(state.history), "mentor_stats": sorted(self.per_mentor)}
        train_state = {**train_state, "students": [{k: v.detach().cpu() for k, v in m.state_dict().items()}
                                                   for m in self.students[1:]]}
        for i in range(1, len(self.students)):
            ckpt.save_checkpoint(self.paths[i], model=self.students[i],
                                 meta={**self.meta, **common, "arch": self.archs[i],
                                       "arch_options": ckpt.plain(self.arch_options[i]), "student": i})
        ckpt.save_checkpoint(self.paths[0], model=self.students[0], meta={**self.meta, **common, "student": 0},
                             train_state=train_state)
        if self.cfg.history_path:
            write_history(self.cfg.history_path, state.history)
        if self.per_mentor:
            write_mentor_stats(self.stats_path, state.history, names=self.targets.names, stats=sorted(self.per_mentor))


def _student(arch: str, init: str | None, *, manifest: Manifest, input_shape: tuple[int, ...], key: str,
             options: dict[str, Any]) -> Any:
    """A fresh student (``options``: the arch's size options), or one started from ``init`` (whose class
    count must be the manifest's)."""
    if init is not None and Path(init).is_file():
        try:
            meta = ckpt.load_checkpoint(init)["meta"]
        except UserError:
            meta = None  # a bare state_dict: create_model checks every key and shape
        if meta is not None and int(meta["num_classes"]) != manifest.num_classes:
            raise UserError(f"{init}: field num_classes: expected {manifest.num_classes} (manifest {manifest.path}) "
                            f"for the student ({key}), found {meta['num_classes']}")
    return create_model(arch, num_classes=manifest.num_classes, input_shape=input_shape, weights=init, **options)


def _check_resume(cfg: DistillConfig, blob: dict, meta: dict) -> None:
    """The checkpoint to resume must come from this configuration, manifest and mentors."""
    saved = blob["meta"]
    if "method" not in saved:
        raise UserError(f"{cfg.resume}: field 'method': expected a student checkpoint of `kdcache distill`, "
                        f"found a {saved.get('loss', 'teacher')!r} teacher checkpoint")
    if saved.get("method") != cfg.method:
        raise UserError(f"{cfg.resume}: setting 'method' differs: checkpoint has {saved.get('method')!r}, "
                        f"this run {cfg.method!r}")
    shas = [m.get("checkpoint_sha256") for m in saved.get("mentors", [])]
    if shas != [m["checkpoint_sha256"] for m in meta["mentors"]]:
        raise UserError(f"{cfg.resume}: field 'mentors': expected teachers with checkpoint sha256 "
                        f"{[m['checkpoint_sha256'] for m in meta['mentors']]} (this run), found {shas}")
    before = saved.get("config", {})
    for key in ("student_options", "student_b_options"):  # written before size options: the defaults
        before.setdefault(key, {})
    cfg.check_resume(blob, {key: meta[key] for key in ("num_classes", "manifest_sha256", "views", "num_views",
                                                       "students")}, meta["config"])


def write_mentor_stats(path: str | Path, history: list[dict], *, names: Sequence[str], stats: Sequence[str]) -> None:
    """One CSV row per (epoch, mentor): the epoch means of the per-mentor stats (``train_<stat>_<k>``)."""
    rows = [{"epoch": row["epoch"], "mentor": k, "name": name, **{s: row.get(f"train_{s}_{k}") for s in stats}}
            for row in history for k, name in enumerate(names)]
    write_history(path, rows)
