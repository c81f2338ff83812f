"""Shared by the DVC stages: read one section of params.yaml and report errors in one line.

Stages are thin: each reads its section, calls one library function and
writes the outputs whose paths dvc.yaml passes on its command line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.errors import UserError


def section(name: str, *keys: str, path: str | Path = "params.yaml") -> Any:
    """``params.yaml[name][keys[0]]...``; a missing file or key is a UserError naming it."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    value: Any = params
    trail = name
    for key in (name, *keys):
        if not isinstance(value, dict) or key not in value:
            raise UserError(f"{path}: missing key {trail!r}")
        value = value[key]
        trail = f"{trail}.{key}" if key != name else trail
    return value


def run(main: Callable[[], None]) -> None:
    """Call ``main``; a UserError ends as one line on stderr and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
