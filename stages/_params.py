"""Shared by the DVC stages: read one section of params.yaml into a config, report errors in one line.

    params = Section.read("students", "kd_ce")             # params.yaml[students][kd_ce]
    cfg = params.config(DistillConfig, manifest=args.manifest, out=args.out)
    # a mistake: "error: params.yaml: students.kd_ce.lr: expected a number > 0, found -1", exit 2

Stages are thin: each reads its section, calls one library function and writes the outputs
whose paths dvc.yaml passes on its command line. The settings' defaults live in the config
classes, never here. Outputs are reproducible bytes; wall times go to ``--log`` files only
(not tracked by DVC), so a rerun with the same inputs changes nothing DVC or git sees.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import yaml

from pipeline.cli_options import warnings_as_lines
from pipeline.config import ConfigError, FromDict
from pipeline.errors import UserError
from pipeline.files import write_json
from pipeline.runtime import is_main_process

PARAMS = "params.yaml"

C = TypeVar("C", bound=FromDict)


@dataclass(frozen=True)
class Section:
    """One mapping of params.yaml (``values``), with the file and key path errors name."""

    values: dict[str, Any]
    source: str
    prefix: str

    @classmethod
    def read(cls, name: str, *keys: str, path: str | Path = PARAMS, optional: bool = False) -> Section:
        """``params.yaml[name][keys[0]]...``; a missing file or key, or a value that is not a
        mapping, is a UserError naming it. An empty section (``evaluate:``) means the defaults, and
        so does a missing one when ``optional``."""
        path = Path(path)
        try:
            params = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise UserError(f"{path}: cannot read ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        value: Any = params
        trail: list[str] = []
        for key in (name, *keys):
            if optional and isinstance(value, dict) and key not in value:
                value, trail = None, [name, *keys]
                break
            if not isinstance(value, dict) or key not in value:
                raise UserError(f"{path}: missing key {'.'.join((*trail, key))!r}")
            value = value[key]
            trail.append(key)
        prefix = ".".join(trail)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping of key: value, found {value!r}", source=str(path), prefix=prefix)
        return cls(dict(value), str(path), prefix)

    def error(self, key: str, problem: str) -> ConfigError:
        """An error about ``key`` of this section: ``params.yaml: <prefix>.<key>: <problem>``."""
        return ConfigError(problem, key=key, source=self.source, prefix=self.prefix)

    def with_values(self, **values: Any) -> Section:
        """This section with some of its values replaced (still named as coming from the file)."""
        return replace(self, values={**self.values, **values})

    def config(self, cls: type[C], **given: Any) -> C:
        """``cls`` built from this section plus ``given``, the values the stage sets itself (paths
        from its command line): the file may not set those too, they would be silently overridden."""
        for key in self.values:
            if key in given:
                raise self.error(key, "set by the stage itself (paths come from dvc.yaml), not here")
        return cls.from_dict({**self.values, **given}, source=self.source, prefix=self.prefix)


# The scores every model's metrics file holds (one small set of keys, so that `dvc metrics show`
# is a narrow table): ours <- pipeline.train.evaluate's. Students: means over seeds.
SCORES = {"accuracy": "top1", "nll": "ce", "mse_to_bayes": "bayes_mse"}


def scores(evaluated: dict[str, Any]) -> dict[str, float]:
    """The ``SCORES`` of one ``EvaluateConfig.score`` result (``mse_to_bayes`` only where the data
    has a known posterior)."""
    return {ours: round(float(evaluated[theirs]), 6) for ours, theirs in SCORES.items() if theirs in evaluated}


@contextmanager
def wall_log(path: str | Path | None, **fields: Any) -> Iterator[dict[str, Any]]:
    """Write ``{**fields, seconds, finished}`` as JSON to ``path`` when the block ends; the block may add
    entries to the yielded dict (per-seed times, say)."""
    began = time.perf_counter()
    extra: dict[str, Any] = {}
    yield extra
    if path and is_main_process():
        write_json(path, {**fields, **extra, "seconds": round(time.perf_counter() - began, 3),
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def run(main: Callable[[], None]) -> None:
    """Call ``main``; a UserError ends as one line on stderr and exit status 2, and each warning
    (a run that did not learn, say) is one ``warning: ...`` line."""
    try:
        with warnings_as_lines():
            main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
