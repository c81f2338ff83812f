"""Where a teacher comes from: a ``--teacher`` spec parsed once into a typed source, built, checked
against the manifest, recorded and named here, for the caching job and for live teachers alike.

    from pipeline.teachers import check_teacher, teacher_name, teacher_source
    source = teacher_source("models/ce.pt")                                  # a kdcache checkpoint
    source = teacher_source("resnet18", "weights/r18.pt")                    # an arch name + a weights file
    source = teacher_source("timm:convnext_tiny", "weights/cnx.safetensors") # timm (pip install 'kdcache[timm]')
    source = teacher_source("my_models:build_teacher")                       # your code: called with no arguments
    teacher = check_teacher(source, manifest=man, input_shape=(3, 32, 32), split="train", views=spec, build=True)
    teacher.model, teacher.meta, teacher.sha256                              # in eval mode; arch, num_classes, ...
    teacher.provenance(views=spec, input_shape=(3, 32, 32))                 # what a store or a student records
    teacher_name(source)                                                     # "ce", "r18", "build_teacher"

The forms, tried in this order (``SOURCES``, by ``rank``); the first that claims the text is it:

- ``checkpoint``: a kdcache checkpoint file (it holds its arch, class count, input shape and
  weights; no ``--weights``). A text that looks like a path but names no file is read as one, so
  that loading it says the file is not found.
- ``arch``: an arch name: kdcache's own (``pipeline.models.MODELS``), any torchvision
  classification model (``torchvision:NAME`` to mean torchvision's where both have it; a plain
  name shared by both is the one the weights fit), or ``timm:NAME``; built untrained (never a
  download) with the manifest's class count, then ``--weights`` (required) are loaded strictly.
- ``callable``: ``module:function``, imported from ``sys.path`` or the current folder and called
  with no arguments; it must return an ``nn.Module``, and the same weights every call (dask workers
  and shard jobs rebuild it). ``--weights`` is optional. The only form that runs code of the user's.

Weights files are read as data only (``pipeline.checkpoint.load_state_dict``: a state_dict, a
kdcache checkpoint or a ``.safetensors`` file). A source is a small frozen dataclass: a dask
worker or a shard job gets the source, not the model, and builds it again.

A new form is one frozen dataclass subclass of ``TeacherSource`` under ``@register_source("kind",
rank=...)`` and one import line (tests/plugin_teacher_source.py is a test-only one): it says which
texts it claims (``parse``) and how it builds its model (``build``); everything else (the checks,
the provenance, the name, caching, ``distill --online``) is the same for every form.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from pipeline.checkpoint import fit_state_dict, load_checkpoint, load_state_dict
from pipeline.data.views import ViewSpec
from pipeline.errors import UserError
from pipeline.files import file_sha256
from pipeline.manifest import Manifest
from pipeline.models import MODELS, create_model, load_model, state_sha256, torchvision_names
from pipeline.registry import Registry


@dataclass(frozen=True)
class TeacherSource:
    """A parsed ``--teacher``: ``spec`` (the checkpoint path, the arch name, ``module:function``...)
    and ``weights`` (an absolute weights file, or None). ``kind`` is what stores record as the
    teacher's ``source``; ``rank`` orders the forms when a text is parsed (lower first)."""

    spec: str
    weights: str | None = None

    kind: ClassVar[str] = ""
    rank: ClassVar[int] = 0

    @classmethod
    def form(cls) -> str:
        """How the form reads, for the message of a text that no form claims."""
        raise NotImplementedError

    @classmethod
    def parse(cls, text: str, weights: str | None, *, weights_flag: str) -> "TeacherSource | None":
        """This form's source for ``text`` (``weights`` already checked to be a file), or None."""
        raise NotImplementedError

    def build(self, *, num_classes: int, input_shape: tuple[int, ...]) -> tuple[nn.Module, dict]:
        """``(model in eval mode, meta)``: meta holds ``arch``, ``num_classes`` and ``input_shape``."""
        raise NotImplementedError

    def read_meta(self) -> dict | None:
        """The meta, when the source knows it without building the model (a checkpoint); else None."""
        return None

    @property
    def weights_file(self) -> str | None:
        """The file the weights come from (its sha256 is recorded); None for a model holding its own."""
        return self.weights

    def with_weights_file(self, path: str) -> "TeacherSource":
        """The same source reading its weights from ``path`` (a copy of ``weights_file`` elsewhere)."""
        return dataclasses.replace(self, weights=path)

    @property
    def default_name(self) -> str:
        """Its name when none is given: the weights file's stem, else the spec's last part."""
        if self.weights is not None:
            return Path(self.weights).stem
        return self.spec.rpartition(":")[2].rpartition(".")[2]


SOURCES: Registry[TeacherSource] = Registry("teacher source")


def register_source(kind: str, *, rank: int) -> Callable[[type[TeacherSource]], type[TeacherSource]]:
    """Class decorator: name a teacher source's form and add it to SOURCES."""

    def decorator(cls: type[TeacherSource]) -> type[TeacherSource]:
        cls.kind, cls.rank = kind, rank
        return SOURCES.register(kind)(cls)

    return decorator


def teacher_source(teacher: str | Path, weights: str | Path | None = None, *,
                   weights_flag: str = "--weights") -> TeacherSource:
    """Read ``--teacher`` (and ``--weights``, named ``weights_flag`` in errors) into its source;
    a UserError naming the forms when none claims it."""
    text = str(teacher)
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise UserError(f"{weights_flag} {weights}: weights file not found")
        weights = str(weights.resolve())
    forms = sorted((SOURCES.get(kind) for kind in SOURCES.names()), key=lambda cls: cls.rank)
    for cls in forms:
        found = cls.parse(text, weights, weights_flag=weights_flag)
        if found is not None:
            return found
    if os.sep in text or "/" in text or Path(text).suffix:
        return CheckpointSource(str(Path(text).resolve()))  # loading it says the file is not found
    described = [cls.form() for cls in forms]
    raise UserError(f"--teacher {text}: unknown; expected {', '.join(described[:-1])} or {described[-1]}")


def teacher_name(source: TeacherSource) -> str:
    """A teacher's default name: its checkpoint's or weights file's stem, else its function's name."""
    return source.default_name


# --- a teacher checked against a manifest -----------------------------------------------------


class Teacher:
    """A source checked against a manifest's class count and a split's input shape: its meta, the
    model when it was built, and the sha256 recorded for its weights (computed when first asked)."""

    def __init__(self, source: TeacherSource, meta: dict, model: nn.Module | None) -> None:
        self.source, self.meta, self.model = source, meta, model

    @functools.cached_property
    def sha256(self) -> str:
        """The weights file's sha256; for a model holding its own weights, its state_dict's."""
        if self.source.weights_file is not None:
            return file_sha256(self.source.weights_file)
        assert self.model is not None, "a source without a weights file is always built"
        return state_sha256(self.model)

    def provenance(self, *, views: ViewSpec, input_shape: tuple[int, ...], name: str | None = None,
                   **recorded: Any) -> dict:
        """What a store's ``teacher`` section and a student's ``mentors`` record of it; ``recorded``
        (the store's path and manifest) goes before ``preprocessing``."""
        return {"name": name or teacher_name(self.source), "source": self.source.kind, "arch": self.meta["arch"],
                "checkpoint_sha256": self.sha256, "train_loss": self.meta.get("loss"), **recorded,
                "preprocessing": {"mean": views.params.get("mean"), "std": views.params.get("std"),
                                  "input_shape": list(input_shape)}}


def check_teacher(source: TeacherSource, *, manifest: Manifest, input_shape: tuple[int, ...], split: str,
                  views: ViewSpec, build: bool = False, same_every_call: bool = False) -> Teacher:
    """The teacher ``source`` names, checked against ``manifest``'s class count and the input shape
    of ``split`` in ``views`` (a UserError naming the field).

    A checkpoint is checked from its meta without building its model unless ``build``; the other
    forms are built (and must run on zeros of ``input_shape`` giving ``num_classes`` logits).
    ``same_every_call``: a model without a weights file is built twice and must give the same
    state_dict (dask workers and shard jobs rebuild it: an unseeded init would be another teacher).
    """
    shape = tuple(int(s) for s in input_shape)
    meta = None if build else source.read_meta()
    model = None
    if meta is None:
        model, meta = source.build(num_classes=manifest.num_classes, input_shape=shape)
    if int(meta["num_classes"]) != manifest.num_classes:
        raise UserError(f"{source.spec}: field num_classes: expected {manifest.num_classes} "
                        f"(manifest {manifest.path}), found {meta['num_classes']}")
    if tuple(meta["input_shape"]) != shape:
        raise UserError(f"{source.spec}: field input_shape: expected {shape} (split {split} with views "
                        f"{views.kind}), found {tuple(meta['input_shape'])}")
    teacher = Teacher(source, meta, model)
    if same_every_call and source.weights_file is None:
        again = state_sha256(source.build(num_classes=manifest.num_classes, input_shape=shape)[0])
        if again != teacher.sha256:
            raise UserError(f"--teacher {source.spec}: expected the same weights every call (workers and shard "
                            f"jobs rebuild it), found two calls giving state_dict sha256 {teacher.sha256[:12]} and "
                            f"{again[:12]}; load trained weights in it, or pass --weights")
    return teacher


def check_rebuilt(teacher: Teacher, recorded_sha256: str | None) -> None:
    """In a worker: the model built again is the one whose state_dict sha256 the store recorded."""
    if recorded_sha256 is not None and teacher.sha256 != recorded_sha256:
        # an unseeded random init, or code that changed: this process's teacher is not the recorded one
        raise UserError(f"--teacher {teacher.source.spec}: field teacher.checkpoint_sha256: expected "
                        f"{recorded_sha256}, found {teacher.sha256} in this process (the callable "
                        "must return the same weights every call: load them, or pass --weights)")


# --- the three forms --------------------------------------------------------------------------


@register_source("checkpoint", rank=0)
@dataclass(frozen=True)
class CheckpointSource(TeacherSource):
    """A kdcache checkpoint file: its meta says its arch, class count and input shape."""

    @classmethod
    def form(cls) -> str:
        return "a kdcache checkpoint file"

    @classmethod
    def parse(cls, text: str, weights: str | None, *, weights_flag: str) -> TeacherSource | None:
        if not Path(text).is_file():
            return None
        if weights is not None:
            raise UserError(f"{weights_flag} {weights}: expected no {weights_flag} with the checkpoint --teacher "
                            f"{text} (it holds its own weights)")
        return cls(str(Path(text).resolve()))

    def build(self, *, num_classes: int, input_shape: tuple[int, ...]) -> tuple[nn.Module, dict]:
        return load_model(self.spec)

    def read_meta(self) -> dict:
        return load_checkpoint(Path(self.spec))["meta"]

    @property
    def weights_file(self) -> str:
        return self.spec

    def with_weights_file(self, path: str) -> TeacherSource:
        return dataclasses.replace(self, spec=path)

    @property
    def default_name(self) -> str:
        return Path(self.spec).stem


@register_source("arch", rank=10)
@dataclass(frozen=True)
class ArchSource(TeacherSource):
    """An arch name (kdcache's, torchvision's, ``timm:NAME``) and the weights file it is built for."""

    @classmethod
    def form(cls) -> str:
        return f"an architecture name (kdcache's {', '.join(MODELS.names())}; any torchvision classification model; timm:NAME)"

    @classmethod
    def parse(cls, text: str, weights: str | None, *, weights_flag: str) -> TeacherSource | None:
        if text.startswith("timm:"):
            _timm(text)
        if not (text.startswith(("timm:", "torchvision:")) or text in MODELS.names() or text in torchvision_names()):
            return None
        if weights is None:
            raise UserError(f"--teacher {text}: expected {weights_flag} FILE with an architecture name (it is built "
                            "untrained)")
        return cls(text, weights)

    def build(self, *, num_classes: int, input_shape: tuple[int, ...]) -> tuple[nn.Module, dict]:
        shape = tuple(int(s) for s in input_shape)
        state = load_state_dict(self.weights)
        model = _build_arch(self.spec, weights=self.weights, state=state, num_classes=num_classes, input_shape=shape)
        fit_state_dict(model, state, self.weights)
        return _checked(model, self.spec, num_classes=num_classes, input_shape=shape)


_CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


@register_source("callable", rank=20)
@dataclass(frozen=True)
class CallableSource(TeacherSource):
    """``module:function`` of the user's code, and optionally a weights file loaded into what it returns."""

    @classmethod
    def form(cls) -> str:
        return "module:function"

    @classmethod
    def parse(cls, text: str, weights: str | None, *, weights_flag: str) -> TeacherSource | None:
        return cls(text, weights) if _CALLABLE.fullmatch(text) else None

    def build(self, *, num_classes: int, input_shape: tuple[int, ...]) -> tuple[nn.Module, dict]:
        model = _call_teacher(self.spec)
        if self.weights is not None:
            fit_state_dict(model, load_state_dict(self.weights), self.weights)
        return _checked(model, self.spec, num_classes=num_classes, input_shape=tuple(int(s) for s in input_shape))


def _checked(model: nn.Module, name: str, *, num_classes: int, input_shape: tuple[int, ...]) -> tuple[nn.Module, dict]:
    """A built model in eval mode, once run on zeros (it takes the split's inputs and gives
    ``num_classes`` logits), and its meta."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except (Exception, SystemExit) as err:
        raise UserError(f"--teacher {name}: expected a model taking inputs of shape {input_shape} (the split's "
                        f"view 0), its forward pass failed ({type(err).__name__}: {str(err)[:200]})") from None
    found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if found != (2, num_classes):
        raise UserError(f"--teacher {name}: field num_classes: expected logits [batch, {num_classes}] (the "
                        f"manifest's classes), found {found}")
    return model, {"arch": name, "num_classes": num_classes, "input_shape": input_shape}


def _timm(name: str) -> Any:
    try:
        import timm  # optional: only timm:NAME teachers need it
    except ImportError:
        raise UserError(f"--teacher {name}: expected the timm package, found it missing "
                        "(pip install 'kdcache[timm]')") from None
    if not timm.is_model(name.removeprefix("timm:")):
        raise UserError(f"--teacher {name}: unknown timm model (timm.list_models() lists them)")
    return timm


def _mismatch(model: nn.Module, state: Mapping[str, torch.Tensor], num_classes: int) -> str | None:
    """Why ``state`` does not fit ``model`` (None when every key and shape matches)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        return f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}"
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if not wrong:
        return None
    # Only the head differs, in its first dimension: the weights were trained for another class count.
    if all(own[k].ndim and own[k].shape[0] == num_classes and own[k].shape[1:] == state[k].shape[1:] for k in wrong):
        return (f"field num_classes: expected {num_classes} (the manifest's classes), found {state[wrong[0]].shape[0]} "
                f"in the weights' head {wrong[0]!r}")
    key = wrong[0]
    return f"field {key!r}: expected shape {tuple(own[key].shape)}, found {tuple(state[key].shape)}"


def _build_arch(name: str, *, weights: str | None, state: Mapping[str, torch.Tensor], num_classes: int,
                input_shape: tuple[int, ...]) -> nn.Module:
    """The untrained ``name`` for ``num_classes``; of kdcache's and torchvision's, the one ``state`` fits."""
    builders: list[Callable[[], nn.Module]] = []
    if name.startswith("timm:"):
        timm = _timm(name)
        builders.append(lambda: timm.create_model(name.removeprefix("timm:"), pretrained=False,
                                                  num_classes=num_classes, in_chans=input_shape[0]))
    else:
        plain = name.removeprefix("torchvision:")
        if plain == name and name in MODELS.names():
            builders.append(lambda: create_model(name, num_classes=num_classes, input_shape=input_shape))
        if plain in torchvision_names():
            import torchvision.models as tvm  # deferred: torchvision is slow to import

            builders.append(lambda: tvm.get_model(plain, weights=None, num_classes=num_classes))
        if not builders:
            raise UserError(f"--teacher {name}: unknown torchvision classification model "
                            "(torchvision.models.list_models() lists them)")
    problems = []
    for build in builders:
        try:
            model = build()
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"--teacher {name}: could not be built with num_classes={num_classes} "
                            f"({type(err).__name__}: {str(err)[:200]})") from None
        problem = _mismatch(model, state, num_classes)
        if problem is None:
            return model
        problems.append(problem)
    # Of kdcache's and torchvision's, the one that fits but for the head says the most: name num_classes.
    problems.sort(key=lambda text: not text.startswith("field num_classes"))
    raise UserError(f"{weights}: weights do not fit --teacher {name}: {problems[0]}")


def _call_teacher(name: str) -> nn.Module:
    """Import ``module:function`` (from sys.path, then the current folder) and call it with no arguments."""
    module_name, _, attr = name.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:  # a console script's sys.path lacks the folder it was started in
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:   # a user's code calling sys.exit() fails like any other error
        raise UserError(f"--teacher {name}: cannot import module {module_name!r} "
                        f"({type(err).__name__}: {str(err)[:200]})") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise UserError(f"--teacher {name}: expected a callable {attr!r} in module {module_name!r}, found "
                        f"{type(fn).__name__ if fn is not None else 'none'}")
    try:
        model = fn()
    except UserError:
        raise
    except (Exception, SystemExit) as err:   # sys.exit(5) in the callable: its failure, not kdcache's exit status
        raise UserError(f"--teacher {name}: calling it raised {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--teacher {name}: expected it to return a torch nn.Module, found {type(model).__name__}")
    return model
