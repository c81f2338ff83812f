"""The click building blocks of ``pipeline.cli``: where option names and defaults come from.

    @cli.command("distill", cls=GreedyCommand)
    @click.option("--method", type=RegistryChoice(METHODS.names))        # choices read when used
    @click.option("--mentors", cls=Greedy)                                # --mentors a b, or repeated
    @training_options(DistillConfig)                                      # the shared training settings
    def distill_command(**options): ...

- ``config_default(Config, "field")``: an option's default is its config field's default.
- ``RegistryChoice``: a ``click.Choice`` over a registry's names, read each time click validates,
  completes or prints help (a name registered after import is a choice too).
- ``ListsNames``: an option whose help lists a registry's names (model archs).
- ``Greedy`` + ``GreedyCommand``: a ``multiple`` option that also takes several values after one flag.
- ``Numbers``: a comma-separated list of numbers (``--input-mean 0.485,0.456,0.406``).
- ``training_options(Config)``: the options of ``TrainConfig``'s shared settings, declared once for
  train-teacher and distill, with ``Config``'s defaults.
- ``warnings_as_lines``: library warnings as ``warning: <message>`` lines on stderr.
- ``OneLineErrors``: the command group that ends a user's mistake in one ``error:`` line, exit 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Iterator, Sequence, TypeVar

import click

from pipeline.errors import UserError
from pipeline.files import check_local, os_error_text
from pipeline.store.location import is_url

F = TypeVar("F", bound=Callable[..., Any])


def config_default(config: type, name: str) -> Any:
    """The default of field ``name`` of the config dataclass ``config`` (its default or default_factory())."""
    for item in dataclasses.fields(config):
        if item.name == name:
            if item.default is not dataclasses.MISSING:
                return item.default
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
            raise TypeError(f"{config.__name__}.{name} has no default")
    raise TypeError(f"{config.__name__} has no field {name!r}")


class RegistryChoice(click.Choice):
    """A ``click.Choice`` whose choices are ``names()`` (a registry's ``names``), read each time click
    validates, completes or prints help, not once at import."""

    def __init__(self, names: Callable[[], Sequence[str]]) -> None:
        self._names = names
        super().__init__((), case_sensitive=True)

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        return tuple(self._names())

    @choices.setter
    def choices(self, value: Sequence[str]) -> None:
        """click.Choice.__init__ assigns the choices; they come from ``names`` instead."""


class ListsNames(click.Option):
    """An option whose help ends with ``names()``, read when the help is shown (model archs: too many
    to spell in the usage line; the configs validate them and name the key)."""

    def __init__(self, *args: Any, names: Callable[[], Sequence[str]], **kwargs: Any) -> None:
        self._names = names
        self._base_help = kwargs.get("help") or ""
        super().__init__(*args, **kwargs)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        self.help = f"{self._base_help} One of: {', '.join(self._names())}.".strip()
        return super().get_help_record(ctx)


class Greedy(click.Option):
    """A ``multiple`` option that also takes several values after one flag: ``--mentors a.zarr b.zarr``
    as well as ``--mentors a.zarr --mentors b.zarr`` (its command must be a ``GreedyCommand``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, multiple=True, **kwargs)


class GreedyCommand(click.Command):
    """A command whose ``Greedy`` options take every value up to the next option: the arguments are
    rewritten (``--mentors a b`` -> ``--mentors a --mentors b``) before click parses them."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        flags = {opt for param in self.params if isinstance(param, Greedy) for opt in param.opts}
        return super().parse_args(ctx, expand_greedy(args, flags))


def expand_greedy(args: Sequence[str], flags: set[str]) -> list[str]:
    """``args`` with each bare value that follows a value of a flag in ``flags`` given its own flag."""
    out: list[str] = []
    greedy: str | None = None   # the flag whose values are being read
    needs_value = False         # the next argument is the value of a flag just seen
    for i, arg in enumerate(args):
        if needs_value:
            out.append(arg)
            needs_value = False
        elif arg == "--":       # the end of the options: the rest is passed on as it is
            out.extend(args[i:])
            break
        elif arg in flags:
            greedy, needs_value = arg, True
            out.append(arg)
        elif arg.partition("=")[0] in flags and "=" in arg:  # --mentors=a.zarr b.zarr
            greedy = arg.partition("=")[0]
            out.append(arg)
        elif greedy is not None and not arg.startswith("-"):
            out += [greedy, arg]
        else:
            greedy = None
            out.append(arg)
    return out


class LocalPath(click.Path):
    """A ``click.Path`` that refuses a URL (``s3://...``) in one ``error:`` line (``UserError``, raised while
    click parses, so the command group reports it) instead of taking it for a folder."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        check_local(value, what=param.opts[0] if param is not None and param.opts else "path")
        return super().convert(value, param, ctx)


class StorePath(click.Path):
    """A store: a local path (a ``click.Path``) or an object-store URL (``s3://bucket/t.zarr``), passed on as
    it is (``pipeline.store.location`` opens it)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value if is_url(value) else super().convert(value, param, ctx)


class Numbers(click.ParamType):
    """Comma-separated numbers (``0.5,0.5,0.5``) as a tuple of floats."""

    name = "N,N,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(float(part) for part in str(value).split(","))
        except ValueError:
            self.fail(f"expected comma-separated numbers, found {value!r}", param, ctx)
        return numbers


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Show each warning the library raises as one ``warning: <message>`` line on stderr, when it is
    raised (a provenance warning at the start of a long run is read at the start)."""
    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        click.echo(f"warning: {message}", err=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def stacked(options: Sequence[Callable[[F], F]]) -> Callable[[F], F]:
    """One decorator applying ``options`` (click options) in order: the first is the first in --help."""
    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def training_options(config: type) -> Callable[[F], F]:
    """The command-line options of the settings every training run shares (``TrainConfig``), with the
    defaults of ``config`` (``TeacherConfig`` or ``DistillConfig``)."""
    path = click.Path(dir_okay=False, path_type=str)
    options = [
        click.option("--epochs", type=int, default=config_default(config, "epochs"), show_default=True),
        click.option("--batch-size", type=int, default=config_default(config, "batch_size"), show_default=True,
                     help="Per process (DDP: per rank)."),
        click.option("--lr", type=float, default=config_default(config, "lr"), show_default=True,
                     help="Peak learning rate (cosine decay per step)."),
        click.option("--momentum", type=float, default=config_default(config, "momentum"), show_default=True),
        click.option("--weight-decay", type=float, default=config_default(config, "weight_decay"), show_default=True),
        click.option("--seed", type=int, default=config_default(config, "seed"), show_default=True,
                     help="Seed of initialisation and batch order."),
        click.option("--views-seed", type=int, default=config_default(config, "views_seed"), show_default=True,
                     help="Seed of the replayable augmentations (distill: of the default views without a cache, "
                          "as kdcache cache --views-seed)."),
        click.option("--val-split", default=config_default(config, "val_split"), show_default=True,
                     help="Split scored after every epoch (skipped if absent)."),
        click.option("--workers", type=int, default=config_default(config, "workers"), show_default=True,
                     help="DataLoader workers decoding images."),
        click.option("--resume", type=path, default=config_default(config, "resume"),
                     help="Checkpoint of an interrupted run with the same settings: continue it."),
        click.option("--metrics", type=path, default=config_default(config, "metrics"),
                     help="JSON of the last epoch's metrics; a per-epoch CSV goes next to it (.csv)."),
        click.option("--device", default=config_default(config, "device"), show_default=True,
                     help="auto (cuda if present), cpu, cuda, cuda:N."),
        click.option("--progress/--no-progress", default=config_default(config, "progress"), show_default=True,
                     help="Progress bar on a terminal."),
        click.option("--threads", type=int, default=config_default(config, "threads"),
                     help="Torch CPU threads (default: torch's own). Fix it for bit-identical CPU runs; 1 keeps "
                          "small models fast on a busy machine."),
    ]

    return stacked(options)


def view_options(config: type, *, without_mentors: bool = False) -> Callable[[F], F]:
    """``--augment``, ``--augment-option``, ``--erase``, ``--mix``, ``--mix-option``: the augmentations and
    mixing of views >= 1, with the defaults of ``config`` (``CacheConfig``, or ``DistillConfig`` whose
    runs without mentors make their own views: ``without_mentors``)."""
    pairs = dict(multiple=True, metavar="KEY=VALUE[,KEY=VALUE]", default=(), show_default=True)
    scope = "Without --mentors (--online, nokd), as kdcache cache: " if without_mentors else ""
    options = [
        click.option("--augment", metavar="POLICY", default=config_default(config, "augment"),
                     help=f"{scope}randaugment or trivialaugment: applied to views >= 1 after their crop and flip "
                          "(torchvision's ops, every choice replayed from the views seed)."),
        click.option("--augment-option", "augment_options", **pairs,
                     help="An option of --augment (repeatable or comma-separated): randaugment n=2 (ops per view), "
                          "m=9 (magnitude 0..30)."),
        click.option("--erase", metavar="P", default=None,
                     help=f"{scope}random erasing in views >= 1 with probability P (after --augment)."),
        click.option("--mix", metavar="KINDS", default=config_default(config, "mix"),
                     help=f"{scope}mixup, cutmix or mixup,cutmix: views >= 1 are mixed with a partner sample of the "
                          "split at the same view, and the teacher answers the mixed image (timm's Mixup semantics)."),
        click.option("--mix-option", "mix_options", **pairs,
                     help="An option of --mix (repeatable or comma-separated): mixup_alpha=0.8, cutmix_alpha=1.0, "
                          "switch_prob=0.5 (CutMix's share when both), prob=1.0 (share of views mixed at all)."),
    ]

    return stacked(options)


class OneLineErrors(click.Group):
    """Turns ``UserError`` into one line and exit status 2, Ctrl-C into a hint and exit status 130.

    An ``OSError`` that names a file (a full disk, a read-only folder, a file where a folder should
    be) is the user's to fix too: one line with the path and the reason, exit status 2. The library
    turns the ones it expects into ``UserError`` where it knows what the path is for; this catches
    the rest (``--out`` of evaluate or inspect, for instance)."""

    def invoke(self, ctx: click.Context):
        try:
            with warnings_as_lines():
                return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)
        except OSError as err:
            if err.filename is None:
                raise
            click.echo(f"error: {os_error_text(err)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            # Nothing is lost: cache blocks with markers stay, checkpoints are written per epoch.
            click.echo("\ninterrupted: finished work is kept; rerun the same `kdcache cache` command to compute "
                       "only the missing blocks, or add `--resume OUT` to train-teacher/distill to continue "
                       "from the last epoch", err=True)
            ctx.exit(130)
