"""Setup shared by tests/methods: test-only methods are registered before the tests are collected.

Every module ``tests/methods/plugin_*.py`` is imported here, in name order, before pytest imports
the test modules of this directory. A plugin module registers a method with
``pipeline.methods.base.register`` and declares its public pure function (``loss_fn``), so the
tests parametrized over ``METHODS.names()`` (interface, one training step, options, mentor counts,
equality with the public function, ...) check it too. Adding one more plugin module needs no edit
anywhere else.

The plugin methods stay registered for the rest of the pytest session: tests elsewhere compare
against ``METHODS.names()``, never against a literal list of methods.
"""

from __future__ import annotations

import importlib
from pathlib import Path


def _import_plugins() -> None:
    # Imported under their package name (tests.methods.plugin_x), the name a test module would use,
    # so a module is loaded once and its method is not registered twice.
    package = __name__.rpartition(".")[0]
    for path in sorted(Path(__file__).parent.glob("plugin_*.py")):
        importlib.import_module(f"{package}.{path.stem}" if package else path.stem)


_import_plugins()
